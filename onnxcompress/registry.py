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
from .passes import Canonicalize, Fuse
from .passes.int8 import Int8
from .passes.lowrank import LowRank
from .passes.prune import Prune
from .pipeline import Pass, Pipeline, describe_options

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REGISTRY: dict[str, type[Pass]] = {
    "canonicalize": Canonicalize,
    "fuse": Fuse,
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


def _split_outside_quotes(spec: str) -> list[str]:
    """Split at ``,`` and ``;`` that are not inside single or double quotes."""
    tokens, cur, quote = [], [], ""
    for ch in spec:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
            cur.append(ch)
        elif ch in ",;":
            tokens.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quote:
        raise OptionError(f"pipeline '{spec}': unbalanced {quote}")
    tokens.append("".join(cur))
    return tokens


def _unquote(value: str) -> str:
    v = value.strip()
    return v[1:-1] if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'" else v


def _takes_text(pass_name: str, key: str) -> bool:
    """Whether option ``key`` of pass ``pass_name`` is a string (a list-valued option
    such as ``exclude`` or ``guard_batches``); False for unknown passes and options."""
    cls = REGISTRY.get(pass_name)
    return cls is not None and any(o.name == key and o.type_name == "str" for o in describe_options(cls.Options))


def parse_spec(spec: str) -> list[tuple[str, dict[str, str]]]:
    """Split an inline pipeline string into ``[(pass name, {option: raw value})]``.

    Passes are separated by ``,`` or ``;``. A value may be quoted (``'a=0.5;b=0.3'``) to
    hold either. A token that is not a pass name, right after a string-valued option,
    continues that option's list: ``int8:exclude=Sigmoid,Mul:max_drop=0`` or
    ``int8:guard_batches=1,8``."""
    steps: list[tuple[str, dict[str, str]]] = []
    last_key: str | None = None
    for token in (t.strip() for t in _split_outside_quotes(spec)):
        if not token:
            continue
        head, sep, rest = token.partition(":")
        if ("=" not in head and head.strip() not in REGISTRY and steps and last_key is not None
                and _takes_text(steps[-1][0], last_key)):  # the list goes on (then maybe :opt=value)
            steps[-1][1][last_key] += "," + _unquote(head)
            parts = rest.split(":") if sep else []
        elif "=" in head:  # an option of the previous pass
            if not steps:
                raise OptionError(f"pipeline '{spec}': option '{token}' comes before any pass name")
            parts = [token]
        else:
            steps.append((head.strip(), {}))
            parts = rest.split(":") if sep else []
            last_key = None
        for part in parts:
            if not part.strip():
                continue
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise OptionError(f"pipeline '{spec}': '{part}' is not option=value (pass '{steps[-1][0]}')")
            last_key = key.strip()
            steps[-1][1][last_key] = _unquote(value)
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
