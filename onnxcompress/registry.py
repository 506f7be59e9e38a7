"""The registry of passes and the pipeline specification language.

The registry is one explicit dict (no registration by import side effects). A pipeline
is written inline as ``"pass[:opt=value[:opt=value]...][,pass...]"``; a comma-separated
``opt=value`` token without a pass name belongs to the pass before it, so
``"prune:ratio=0.3,global=true,int8:method=kl"`` is two passes. A TOML file says the
same with one ``[[passes]]`` table per pass::

    [[passes]]
    name = "prune"
    ratio = 0.3

``canonicalize`` always runs first: it is added when missing and moved to the front
when listed later.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import OptionError
from .passes import Canonicalize
from .passes.int8 import Int8
from .passes.lowrank import LowRank
from .passes.prune import Prune
from .pipeline import Pass, Pipeline

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REGISTRY: dict[str, type[Pass]] = {
    "canonicalize": Canonicalize,
    "prune": Prune,
    "lowrank": LowRank,
    "int8": Int8,
}

#: What ``optimize`` runs when no pipeline is given.
DEFAULT_PIPELINE = "canonicalize"


def get_pass_class(name: str) -> type[Pass]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise OptionError(f"unknown pass '{name}'; valid passes: {', '.join(sorted(REGISTRY))}") from None


def make_pass(name: str, options: Mapping[str, Any] | None = None) -> Pass:
    return get_pass_class(name).from_mapping(options or {})


def parse_spec(spec: str) -> list[tuple[str, dict[str, str]]]:
    """Split an inline pipeline string into ``[(pass name, {option: raw value})]``."""
    steps: list[tuple[str, dict[str, str]]] = []
    for token in (t.strip() for t in spec.replace(";", ",").split(",")):
        if not token:
            continue
        head, sep, rest = token.partition(":")
        if "=" in head:  # an option of the previous pass
            if not steps:
                raise OptionError(f"pipeline '{spec}': option '{token}' comes before any pass name")
            parts = [token]
        else:
            steps.append((head.strip(), {}))
            parts = rest.split(":") if sep else []
        for part in parts:
            if not part.strip():
                continue
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise OptionError(f"pipeline '{spec}': '{part}' is not option=value (pass '{steps[-1][0]}')")
            steps[-1][1][key.strip()] = value.strip()
    if not steps:
        raise OptionError(f"pipeline '{spec}' names no pass")
    return steps


def load_config(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Read a TOML pipeline file: ``[[passes]]`` tables with ``name`` and options."""
    p = Path(path)
    if not p.is_file():
        raise OptionError(f"{p}: no such config file")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise OptionError(f"{p}: not valid TOML ({exc})") from None
    unknown = set(doc) - {"passes"}
    if unknown:
        raise OptionError(f"{p}: unknown top-level key(s) {', '.join(sorted(unknown))}; expected [[passes]] tables")
    tables = doc.get("passes")
    if not isinstance(tables, list) or not tables:
        raise OptionError(f"{p}: needs at least one [[passes]] table with a 'name'")
    steps = []
    for i, table in enumerate(tables):
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            raise OptionError(f"{p}: [[passes]] entry {i + 1} has no 'name' string")
        opts = {k: v for k, v in table.items() if k != "name"}
        steps.append((table["name"], opts))
    return steps


def build_pipeline(steps: Sequence[tuple[str, Mapping[str, Any]]] | str | None = None) -> Pipeline:
    """Build a :class:`Pipeline` from an inline spec or parsed steps; canonicalize first."""
    if steps is None:
        steps = DEFAULT_PIPELINE
    if isinstance(steps, str):
        steps = parse_spec(steps)
    passes = [make_pass(name, opts) for name, opts in steps]
    canon = [p for p in passes if p.name == "canonicalize"]
    if len(canon) > 1:
        raise OptionError("pass 'canonicalize' is listed more than once")
    rest = [p for p in passes if p.name != "canonicalize"]
    return Pipeline([canon[0] if canon else Canonicalize(), *rest])
