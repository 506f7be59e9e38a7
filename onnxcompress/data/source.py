"""The base of every data source: batches of ``{input: array}`` checked against the
model, re-batched to the size asked for."""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterator, Sequence

import numpy as np

from ..errors import DataError
from .specs import Batch, InputSpec, check_array, to_internal

log = logging.getLogger(__name__)

class DataSource(abc.ABC):
    """A re-iterable source of batches for a model's inputs."""

    def __init__(self, specs: Sequence[InputSpec], batch_size: int = 8, limit: int | None = None) -> None:
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise DataError(f"sample limit must be at least 1, got {limit}")
        self.specs = list(specs)
        static = {s.static_batch for s in self.specs if s.static_batch is not None}
        if len(static) == 1:
            fixed = static.pop()
            if fixed != batch_size:
                log.info("model batch dimension is fixed at %d; using batch size %d", fixed, fixed)
            batch_size = fixed
        self.batch_size = batch_size
        self.limit = limit

    @property
    def num_samples(self) -> int | None:
        """Samples one pass yields, when known in advance (for progress bars)."""
        return None

    @abc.abstractmethod
    def _samples(self) -> Iterator[tuple[Batch, str]]:
        """Yield chunks ``({name: array with samples on axis 0}, where)``, unchecked."""

    def __iter__(self) -> Iterator[Batch]:
        if not self.specs:  # a model without inputs: one empty feed
            yield {}
            return
        pending: list[Batch] = []
        pending_n = 0
        pending_key: tuple[tuple[int, ...], ...] | None = None
        total = 0
        for chunk, where in self._samples():
            for spec in self.specs:
                chunk[spec.name] = check_array(spec, chunk[spec.name], where)
            n = next(iter(chunk.values())).shape[0]
            if self.limit is not None:
                if total >= self.limit:
                    break
                if total + n > self.limit:
                    chunk = {k: v[: self.limit - total] for k, v in chunk.items()}
                    n = self.limit - total
            total += n
            key = tuple(chunk[s.name].shape[1:] for s in self.specs)
            if pending and key != pending_key:  # dynamic dims changed: cannot stack
                yield from self._flush(pending)
                pending, pending_n = [], 0
            pending_key = key
            pending.append(chunk)
            pending_n += n
            if pending_n >= self.batch_size:
                merged = _concat(pending)
                full = (pending_n // self.batch_size) * self.batch_size
                for start in range(0, full, self.batch_size):
                    yield {k: v[start : start + self.batch_size] for k, v in merged.items()}
                rest = {k: v[full:] for k, v in merged.items()}
                pending_n -= full
                pending = [rest] if pending_n else []
        yield from self._flush(pending)

    def _flush(self, pending: list[Batch]) -> Iterator[Batch]:
        if not pending:
            return
        merged = _concat(pending)
        n = next(iter(merged.values())).shape[0]
        if n == 0:
            return
        fixed = any(s.static_batch is not None for s in self.specs)
        if fixed and n != self.batch_size:
            log.warning("dropping %d sample(s) that do not fill the model's fixed batch of %d", n, self.batch_size)
            return
        yield merged


def _concat(chunks: list[Batch]) -> Batch:
    if len(chunks) == 1:
        return chunks[0]
    return {k: np.concatenate([c[k] for c in chunks], axis=0) for k in chunks[0]}


def _internal(specs: Sequence[InputSpec], chunk: Batch, where: str) -> Batch:
    """A batch in the model's layout (as a user hands it over) with its samples on axis 0."""
    by_name = {sp.name: sp for sp in specs}
    counts = {arr.shape[sp.batch_axis] for k, arr in chunk.items()
              if (sp := by_name[k]).batch_axis is not None and arr.ndim == sp.rank}
    if len(counts) > 1:
        raise DataError(f"{where}: inputs hold different sample counts {sorted(counts)} on their batch axes")
    n = counts.pop() if counts else 1
    out = {}
    for k, arr in chunk.items():
        sp = by_name[k]
        if sp.batch_axis is not None and arr.ndim != sp.rank:
            raise DataError(f"input '{k}': expected rank {sp.rank} {sp.shape_str()}, found rank {arr.ndim} "
                            f"{list(arr.shape)} in {where}")
        out[k] = to_internal(sp, arr, n)
    return out
