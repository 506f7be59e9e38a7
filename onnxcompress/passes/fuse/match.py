"""What the fuse rules share: the match verdict (:class:`MatchResult`, declined with a
reason), the producer/reader index, fresh names, and splicing replacements into a graph."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx

from ...graph import drop_stale_value_info, producers, reads

log = logging.getLogger(__name__)


def _std(n: onnx.NodeProto | None, op: str) -> bool:
    """``n`` is a standard-domain ``op`` node."""
    return n is not None and n.op_type == op and n.domain in ("", "ai.onnx")


@dataclass(frozen=True)
class MatchResult:
    """A rule's verdict on one candidate, as onnxscript's rewriter gives it: what it
    matched (``value``), or why it declined (``reason``, counted in the pass's stats under
    ``declined_matches`` and logged at debug level)."""

    value: Any = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason

    @classmethod
    def fail(cls, reason: str) -> "MatchResult":
        return cls(None, reason)


def _decline(declines: Counter[str] | None, rule: str, where: str, result: MatchResult) -> None:
    log.debug("fuse: %s at %s declined: %s", rule, where, result.reason)
    if declines is not None:
        declines[result.reason] += 1


def _copy(model: onnx.ModelProto, change: Callable[[onnx.ModelProto], object] | None = None) -> onnx.ModelProto:
    """A copy of ``model``, with ``change`` applied to it."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if change is not None:
        change(out)
    return out


def _index(g: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, int]]:
    """(tensor → its producer, tensor → how many nodes read it; a graph output counts as a
    reader, so it is never an inner tensor)."""
    producer = producers(g)
    readers: dict[str, int] = {}
    for n in g.node:
        for x in reads(n):
            readers[x] = readers.get(x, 0) + 1
    for o in g.output:
        readers[o.name] = readers.get(o.name, 0) + 1
    return producer, readers


def _splice(g: onnx.GraphProto, replace: dict[int, list[onnx.NodeProto]], drop: set[int]) -> None:
    """Put ``replace[id(n)]`` where node n was, leave out the nodes in ``drop``, and forget
    the shapes of tensors no node produces any more."""
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if id(n) in replace:
            nodes.extend(replace[id(n)])
        elif id(n) not in drop:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    drop_stale_value_info(g)
