"""Progress reporting without printing from library code.

Library code asks a :class:`Progress` for a task and advances it; the CLI supplies a
rich progress bar, everything else gets :class:`NullProgress`, which does nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol


class ProgressTask(Protocol):
    def advance(self, n: int = 1) -> None: ...

    def describe(self, text: str) -> None:
        """Replace the task's description (e.g. the current trial and its figures)."""


class Progress(Protocol):
    def task(self, description: str, total: int | None = None) -> AbstractContextManager[ProgressTask]: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        return None

    def describe(self, text: str) -> None:
        return None


class NullProgress:
    """A progress sink that shows nothing."""

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[ProgressTask]:
        yield _NullTask()
