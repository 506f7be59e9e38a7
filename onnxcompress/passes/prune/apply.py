"""Remove (or mask) channel classes in the graph.

Removal slices, for the chosen classes, every coupled tensor at once: producer filters
and biases (Conv axis 0, ConvTranspose axis 1), BatchNormalization/InstanceNormalization
parameters, per-channel constants of elementwise ops, depthwise filters (and their
``group``), MatMul/Gemm weight columns and bias, consumer input channels (Conv axis 1,
ConvTranspose axis 0, Gemm/MatMul rows, H·W rows per channel after a flatten), ``Split`` sizes, channel ``Slice`` bounds,
``Resize`` sizes; flatten-like ``Reshape`` targets become ``[0, -1]``, and a constant
``Reshape`` target that names a token-feature or attention-head count gets the kept count.

Masking is the reference for tests: it keeps every channel but zeroes the consumers'
weights that read the chosen channels. Removed channels reach nothing but consumers
(channel-wise ops never mix channels, graph outputs are never in a pruned group), so
the pruned model and the masked model compute the same function.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...graph import initializers, remove_dead_code
from ...model import default_opset, node_attr
from ...shapes import infer_shapes as infer_model_shapes
from .groups import Analysis, Use

log = logging.getLogger(__name__)


class PruneConflict(ValueError):
    """The chosen channels would empty a Split/Slice output or a producer."""


class _Edits:
    """Per-node copies of initializers, written back under fresh names."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = initializers(graph)
        self.names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | {
            i.name for i in graph.input}
        self.cur: dict[tuple[int, int], np.ndarray] = {}

    def get(self, idx: int, k: int) -> np.ndarray:
        key = (idx, k)
        if key not in self.cur:
            self.cur[key] = numpy_helper.to_array(self.inits[self.graph.node[idx].input[k]]).copy()
        return self.cur[key]

    def set(self, idx: int, k: int, arr: np.ndarray) -> None:
        self.cur[(idx, k)] = np.ascontiguousarray(arr)

    def add_input(self, idx: int, k: int, arr: np.ndarray, base: str) -> None:
        node = self.graph.node[idx]
        while len(node.input) <= k:
            node.input.append("")
        node.input[k] = self._fresh(base)
        self.inits[node.input[k]] = numpy_helper.from_array(arr, node.input[k])
        self.graph.initializer.append(self.inits[node.input[k]])
        self.cur[(idx, k)] = np.ascontiguousarray(arr)

    def _fresh(self, base: str) -> str:
        i = 0
        while f"{base}__p{i}" in self.names:
            i += 1
        name = f"{base}__p{i}"
        self.names.add(name)
        return name

    def commit(self) -> None:
        for (idx, k), arr in self.cur.items():
            node = self.graph.node[idx]
            name = self._fresh(node.input[k])
            self.graph.initializer.append(numpy_helper.from_array(arr, name))
            node.input[k] = name



def _set_attr(node: onnx.NodeProto, name: str, value: object) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def removed_atoms(an: Analysis, removed_classes: np.ndarray) -> np.ndarray:
    """Boolean mask over atoms: True where the atom's class is removed."""
    return np.isin(an.parent, np.asarray(removed_classes, dtype=np.int64))


def keep_positions(atoms: np.ndarray, gone: np.ndarray) -> np.ndarray:
    """Positions of a tensor that survive: untracked (-1) or of a kept class."""
    safe = np.where(atoms >= 0, atoms, 0)
    return np.flatnonzero((atoms < 0) | ~gone[safe])


def _slice_axis(arr: np.ndarray, keep: np.ndarray, axis: int) -> np.ndarray:
    return np.take(arr, keep, axis=axis)


def apply_removal(
    an: Analysis,
    removed_classes: np.ndarray,
    infer_shapes: bool = True,
    overrides: dict[tuple[int, int], np.ndarray] | None = None,
) -> onnx.ModelProto:
    """Return ``an.model`` (modified in place) with the classes removed.

    ``overrides``: full-size replacement arrays for (node index, input) before slicing
    (recovered weights and biases); a missing bias input is added."""
    model = an.model
    g = model.graph
    gone = removed_atoms(an, removed_classes)
    ed = _Edits(g)
    for (idx, k), arr in (overrides or {}).items():
        node = g.node[idx]
        if len(node.input) > k and node.input[k]:
            ed.set(idx, k, arr)
        else:
            ed.add_input(idx, k, arr, f"{node.name or node.output[0]}_bias")
    opset = default_opset(model) or 13
    for p in an.producers:
        km = np.flatnonzero(~gone[p.atoms])
        if len(km) == p.channels:
            continue
        if len(km) == 0:
            raise PruneConflict(f"all channels of {p.op} '{p.name}' would be removed")
        node = g.node[p.index]
        ed.set(p.index, 1, _slice_axis(ed.get(p.index, 1), km, filter_axis(node)))
        if len(node.input) > 2 and node.input[2]:
            bias = ed.get(p.index, 2)
            if bias.size > 1:  # a Gemm's scalar bias broadcasts over any width
                ed.set(p.index, 2, _slice_axis(bias, km, bias.ndim - 1))
    for use in an.uses:
        keep = keep_positions(use.atoms, gone)
        if len(keep) == len(use.atoms):
            continue
        _apply_use(an, ed, use, keep, gone, opset)
    ed.commit()
    model = _finish(model, infer_shapes)
    return model


def filter_axis(node: onnx.NodeProto) -> int:
    """The weight axis of a producer's output channels: Conv 0, ConvTranspose 1, MatMul
    and Gemm the columns (Gemm with ``transB``: the rows)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm" and int(node_attr(node, "transB", 0)):  # type: ignore[arg-type]
        return 0
    return 1


def _apply_use(an: Analysis, ed: _Edits, use: Use, keep: np.ndarray, gone: np.ndarray, opset: int) -> None:
    g = an.model.graph
    node = g.node[use.node]
    kind = use.kind
    if kind == "consumer-conv":
        ed.set(use.node, 1, _slice_axis(ed.get(use.node, 1), keep, 1))
    elif kind == "consumer-convT":
        ed.set(use.node, 1, _slice_axis(ed.get(use.node, 1), keep, 0))
    elif kind == "depthwise":
        ed.set(use.node, 1, _slice_axis(ed.get(use.node, 1), keep, 0))
        if len(node.input) > 2 and node.input[2]:
            ed.set(use.node, 2, ed.get(use.node, 2)[keep])
        _set_attr(node, "group", int(len(keep)))
    elif kind == "norm":
        for k in range(1, len(node.input)):
            if node.input[k]:
                ed.set(use.node, k, ed.get(use.node, k)[keep])
    elif kind == "const":
        arr = ed.get(use.node, use.input)
        out_rank = len(an.shapes[node.output[0]])
        ed.set(use.node, use.input, _slice_axis(arr, keep, use.axis - (out_rank - arr.ndim)))
    elif kind == "gemm":
        trans_b = int(node_attr(node, "transB", 0))  # type: ignore[arg-type]
        ed.set(use.node, 1, _slice_axis(ed.get(use.node, 1), keep, 1 if trans_b else 0))
    elif kind == "matmul":
        ed.set(use.node, 1, _slice_axis(ed.get(use.node, 1), keep, 0))
    elif kind == "split":
        sizes = []
        for o in node.output:
            out_atoms = an.atoms[o]
            sizes.append(len(keep_positions(out_atoms, gone)))
        if min(sizes) == 0:
            raise PruneConflict(f"Split '{node.name}' would get an empty output")
        if opset >= 13:
            ed.add_input(use.node, 1, np.array(sizes, dtype=np.int64), f"{node.name or node.output[0]}_split")
        else:
            _set_attr(node, "split", sizes)
    elif kind == "slice":
        starts = ed.get(use.node, 1)
        ends = ed.get(use.node, 2)
        rank = len(an.shapes[node.input[0]])
        axes = ed.get(use.node, 3) if len(node.input) > 3 and node.input[3] else np.arange(len(starts))
        axes_n = [int(a) + rank if int(a) < 0 else int(a) for a in axes]
        k = axes_n.index(1)
        s, e, _ = slice(int(starts[k]), int(ends[k])).indices(len(use.atoms))
        new_s = int(np.searchsorted(keep, s))
        new_e = int(np.searchsorted(keep, e))
        if new_e <= new_s:
            raise PruneConflict(f"Slice '{node.name}' would get an empty output")
        starts = starts.copy()
        ends = ends.copy()
        starts[k], ends[k] = new_s, new_e
        ed.set(use.node, 1, starts)
        ed.set(use.node, 2, ends)
    elif kind == "resize":
        sizes = ed.get(use.node, 3).copy()
        sizes[1] = len(keep)
        ed.set(use.node, 3, sizes)
    elif kind == "reshape-dim":  # a constant target (or a Concat's part of one) naming the channel or head count
        target = ed.get(use.node, use.input).copy()
        target[use.axis] = len(keep)
        ed.set(use.node, use.input, target)
    elif kind == "reshape":
        ed.add_input(use.node, 1, np.array([0, -1], dtype=np.int64), f"{node.name or node.output[0]}_flat")
        if any(a.name == "allowzero" for a in node.attribute):  # [0, -1] means "copy dim 0"
            _set_attr(node, "allowzero", 0)
    else:  # pragma: no cover - every kind above
        raise ValueError(kind)


def apply_mask(an: Analysis, removed_classes: np.ndarray) -> onnx.ModelProto:
    """The reference: zero the consumer weights that read the removed channels."""
    g = an.model.graph
    gone = removed_atoms(an, removed_classes)
    ed = _Edits(g)
    for use in an.uses:
        safe = np.where(use.atoms >= 0, use.atoms, 0)
        drop = np.flatnonzero((use.atoms >= 0) & gone[safe])
        if not len(drop):
            continue
        node = g.node[use.node]
        if use.kind == "consumer-conv":
            w = ed.get(use.node, 1)
            w[:, drop] = 0
        elif use.kind == "consumer-convT":
            w = ed.get(use.node, 1)
            w[drop] = 0
        elif use.kind == "gemm":
            w = ed.get(use.node, 1)
            if int(node_attr(node, "transB", 0)):  # type: ignore[arg-type]
                w[:, drop] = 0
            else:
                w[drop] = 0
        elif use.kind == "matmul":
            w = ed.get(use.node, 1)
            w[drop] = 0
    ed.commit()
    return _finish(an.model, infer_shapes=False)


def _finish(model: onnx.ModelProto, infer_shapes: bool) -> onnx.ModelProto:
    g = model.graph
    del g.value_info[:]
    remove_dead_code(g)
    if infer_shapes:
        model, _ = infer_model_shapes(model)
    return model
