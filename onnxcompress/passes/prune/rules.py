"""Per-op channel rules for :func:`~onnxcompress.passes.prune.groups.analyze`.

One rule per op family (Torch-Pruning's table of per-op handlers): given the atom lists
of a node's inputs (see groups.py), a rule writes its outputs' atom lists, records the
uses pruning must rewrite, unites atoms that must go together, or returns a
:data:`Block` verdict: the atoms it stops and why. An op without a rule blocks what it
reads. Adding an op means adding a rule here and, where it rewrites weights, a use kind
in apply.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...graph import captured, initializers, topological_order
from . import tokens
from .groups import (
    CHANNELWISE, ELEMENTWISE, NORMS, POOLING, REDUCES, SHAPE_ONLY, Producer, Use, _UnionFind, normalize_axis,
)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


#: a rule's verdict where the node stops the channels it reads: (the atoms to block, why)
Block = tuple[np.ndarray, str]


class Walk:
    """The state of one walk over the graph: atoms per tensor, uses, the union-find over
    atoms and the blocked producers. The per-op rules below read and extend it."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
        g = model.graph
        self.model, self.shapes = model, shapes
        self.inits = initializers(g)
        self.graph_inputs = {i.name for i in g.input}
        self.uf = _UnionFind()
        self.producers: list[Producer] = []
        self.atom_owner: list[int] = []
        self.atoms: dict[str, np.ndarray] = {}
        self.uses: list[Use] = []
        self.blocked: dict[int, str] = {}
        self.axes: dict[str, int] = {}  # channel axis of each tracked tensor not on axis 1
        self.made_by = {o: node for node in g.node for o in node.output}

    def axis_of(self, name: str) -> int:
        return self.axes.get(name, 1)

    def track(self, name: str, atoms: np.ndarray, axis: int = 1, token: bool = False) -> None:
        """``name`` carries ``atoms`` on ``axis``; ``token``: off a convolution's channel
        path (token features or attention heads), wherever the axis is."""
        self.atoms[name] = atoms
        if axis != 1 or token:
            self.axes[name] = axis

    def is_token(self, name: str) -> bool:
        return name in self.axes

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits and name not in self.graph_inputs:
            return numpy_helper.to_array(self.inits[name])
        return None

    def slice_bounds(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                          np.ndarray | None] | None:
        """A Slice's constant (starts, ends, axes, steps), the last two None where absent;
        None where a bound it has is not a constant."""
        vals = [self.const(i) if i else None for i in node.input[1:5]]
        if len(node.input) < 3 or vals[0] is None or vals[1] is None or any(
                node.input[k] and vals[k - 1] is None for k in range(3, len(node.input))):
            return None
        vals += [None] * (4 - len(vals))
        return vals[0], vals[1], vals[2], vals[3]

    def block(self, lst: np.ndarray | None, reason: str) -> None:
        if lst is None:
            return
        for a in np.unique(lst[lst >= 0]):
            self.blocked.setdefault(self.atom_owner[int(a)], reason)

    def new_producer(self, idx: int, node: onnx.NodeProto, channels: int) -> np.ndarray:
        first = self.uf.add(channels)
        self.atom_owner.extend([len(self.producers)] * channels)
        self.producers.append(Producer(idx, node.name or node.output[0], node.op_type, channels, first,
                                       node.output[0]))
        return np.arange(first, first + channels)

    def channels_of(self, name: str, axis: int = 1) -> int | None:
        s = self.shapes.get(name)
        return s[axis] if s is not None and len(s) > axis else None

    def rank(self, name: str) -> int:
        return len(self.shapes.get(name, []))


@dataclass
class Node:
    """What a rule sees of one node: its index, the node, a label for reasons, its
    attributes, the atom list of each input (None: not tracked) and the tracked inputs."""

    idx: int
    node: onnx.NodeProto
    label: str
    attrs: dict[str, Any]
    ins: list[np.ndarray | None]
    tracked: list[int]

    @property
    def out0(self) -> str:
        return self.node.output[0] if self.node.output else ""

    @property
    def x(self) -> np.ndarray:
        """The first input's atoms (rules that read it have checked it is tracked)."""
        x = self.ins[0]
        assert x is not None
        return x

    def all_tracked(self) -> np.ndarray:
        return np.concatenate([a for a in self.ins if a is not None])

    def only_first_tracked(self, what: str) -> Block | None:
        return None if self.tracked == [0] else (self.all_tracked(), f"{self.label} reads a tracked {what}")


def _conv(w: Walk, n: Node) -> Block | None:
    """Conv/ConvTranspose: group 1 makes a producer (its input channels a contracting
    use), a depthwise Conv passes its input's atoms on, a grouped one blocks."""
    node, op = n.node, n.node.op_type
    weight = w.const(node.input[1]) if len(node.input) > 1 else None
    group = int(n.attrs.get("group", 1))
    x = n.ins[0]
    for k in n.tracked[1:]:
        w.block(n.ins[k], f"{n.label} reads it as a weight or bias")
    if weight is None:
        return (x, f"{n.label} has non-constant weights") if x is not None else None
    if weight.ndim < 3:
        return (x, f"{n.label} has a weight of rank {weight.ndim}") if x is not None else None
    if weight.dtype.kind == "f" and not np.all(np.isfinite(weight)):
        return (x, f"{n.label} has NaN or Inf weights") if x is not None else None
    cout, cin = ((weight.shape[0], weight.shape[1] * group) if op == "Conv"
                 else (weight.shape[1] * group, weight.shape[0]))
    if x is not None and len(x) != cin:
        return x, f"{n.label}: channel count mismatch"
    if group == 1:
        if x is not None:
            w.uses.append(Use(n.idx, 0, "consumer-conv" if op == "Conv" else "consumer-convT", x))
        w.atoms[n.out0] = w.new_producer(n.idx, node, cout)
        return None
    if op == "Conv" and group == cin == cout and x is not None:
        w.uses.append(Use(n.idx, 0, "depthwise", x))
        w.atoms[n.out0] = x
        return None
    return (x, f"{n.label} is a grouped convolution (group={group})") if x is not None else None


def _channelwise(w: Walk, n: Node) -> Block | None:
    """Activations and pooling: each channel on its own; extra inputs must be scalars."""
    if n.node.op_type == "MaxPool" and len(n.node.output) > 1 and n.node.output[1]:
        return n.ins[0], f"{n.label} returns indices"  # type: ignore[return-value]
    if any(k != 0 for k in n.tracked):
        return n.all_tracked(), f"{n.label} reads a tracked tensor as a parameter"
    for i in n.node.input[1:]:
        c = w.const(i) if i else None
        if i and (c is None or c.size != 1):
            return n.x, f"{n.label} has non-scalar parameters"
    w.track(n.out0, n.x, w.axis_of(n.node.input[0]), w.is_token(n.node.input[0]))
    return None


def _norm(w: Walk, n: Node) -> Block | None:
    """BatchNormalization/InstanceNormalization with constant per-channel parameters."""
    if n.tracked != [0] or any(w.const(i) is None for i in n.node.input[1:]):
        return n.all_tracked(), f"{n.label} has non-constant parameters"
    w.uses.append(Use(n.idx, 0, "norm", n.x))
    w.atoms[n.out0] = n.x
    return None


def _elementwise(w: Walk, n: Node) -> Block | None:
    """Add/Mul/...: tracked inputs of full channel width unite their atoms position by
    position; constants vary per channel (a use) or broadcast; untracked computed tensors
    must broadcast over channels (a residual stream we do not track stops the group)."""
    out_rank = w.rank(n.out0)
    out_axes = {w.axis_of(n.node.input[k]) + out_rank - w.rank(n.node.input[k]) for k in n.tracked}
    if len(out_axes) != 1:
        return n.all_tracked(), f"{n.label} combines channels on different axes"
    axis = out_axes.pop()
    c_out = w.channels_of(n.out0, axis)
    if c_out is None:
        return n.all_tracked(), f"{n.label}: output shape unknown"
    full = [k for k in n.tracked if len(n.ins[k]) == c_out]  # type: ignore[arg-type]
    if len(full) != len(n.tracked):
        return n.all_tracked(), f"{n.label} broadcasts a tracked tensor over channels"
    first = n.ins[full[0]]
    assert first is not None
    for k, name in enumerate(n.node.input):
        if not name or k in n.tracked:
            continue
        c = w.const(name)
        if c is not None:
            ax = axis - (out_rank - c.ndim)
            if c.size == 1 or ax < 0 or c.shape[ax] == 1:
                continue
            if c.shape[ax] == c_out:
                w.uses.append(Use(n.idx, k, "const", first, axis))
                continue
            return n.all_tracked(), f"{n.label} has a constant of shape {list(c.shape)}"
        shp = w.shapes.get(name)  # a computed tensor we do not track: fine only if it broadcasts over channels
        if shp is not None:
            ax = axis - (out_rank - len(shp))
            if ax < 0 or shp[ax] == 1:
                continue
        stream = " (a residual stream)" if n.node.op_type in ("Add", "Sub") and shp == w.shapes.get(n.out0) else ""
        return n.all_tracked(), f"{n.label} mixes in untracked tensor '{name}'{stream}"
    for k in full[1:]:
        for a, b in zip(first, n.ins[k]):  # type: ignore[arg-type]
            if a >= 0 and b >= 0:
                w.uf.union(int(a), int(b))
            elif a != b:
                w.block(np.array([a, b]), f"{n.label} adds a channel that cannot be pruned")
    w.track(n.out0, first, axis, any(w.is_token(n.node.input[k]) for k in n.tracked))
    return None


def _concat(w: Walk, n: Node) -> Block | None:
    """Concat on the channel axis: the atom lists in order (-1 for untracked inputs)."""
    axis = normalize_axis(n.attrs.get("axis", 0), w.rank(n.node.input[n.tracked[0]]))
    if axis != 1:
        return n.all_tracked(), f"{n.label} concatenates on axis {axis}"
    parts = []
    for k, name in enumerate(n.node.input):
        a = n.ins[k]
        c = w.channels_of(name) if a is None else len(a)
        if c is None:
            return n.all_tracked(), f"{n.label}: input shape unknown"
        parts.append(a if a is not None else np.full(c, -1, dtype=np.int64))
    w.atoms[n.out0] = np.concatenate(parts)
    return None


def _split(w: Walk, n: Node) -> Block | None:
    """Split on the channel axis: consecutive sub-lists; on other axes every output keeps all."""
    bad = n.only_first_tracked("split size")
    if bad:
        return bad
    x, channel = n.x, w.axis_of(n.node.input[0])
    if normalize_axis(n.attrs.get("axis", 0), w.rank(n.node.input[0])) != channel:
        for o in n.node.output:
            w.track(o, x, channel, w.is_token(n.node.input[0]))
        return None
    if channel != 1:
        return x, f"{n.label} splits token features"
    sizes = [w.channels_of(o) for o in n.node.output]
    if any(s is None for s in sizes) or sum(s or 0 for s in sizes) != len(x):
        return x, f"{n.label}: output shapes unknown"
    w.uses.append(Use(n.idx, 0, "split", x))
    start = 0
    for o, size in zip(n.node.output, sizes):
        w.atoms[o] = x[start : start + (size or 0)]
        start += size or 0
    return None


def _slice(w: Walk, n: Node) -> Block | None:
    """Slice with constant bounds: a channel range with step 1, or no channel axis at all."""
    bad = n.only_first_tracked("slice bound")
    if bad:
        return bad
    x, node = n.x, n.node
    bounds = w.slice_bounds(node)
    if bounds is None:
        return x, f"{n.label} has non-constant bounds"
    starts, ends, axes_c, steps_c = bounds
    rank = w.rank(node.input[0])
    axes_v = axes_c if axes_c is not None else np.arange(len(starts))
    steps = steps_c if steps_c is not None else np.ones(len(starts), np.int64)
    axes = [normalize_axis(ax, rank) for ax in axes_v]
    channel = w.axis_of(node.input[0])
    if channel not in axes:
        w.track(n.out0, x, channel, w.is_token(node.input[0]))
        return None
    if channel != 1:
        return x, f"{n.label} slices token features"
    k = axes.index(1)
    if int(steps[k]) != 1:
        return x, f"{n.label} slices channels with a step"
    s, e, _ = slice(int(starts[k]), int(ends[k])).indices(len(x))
    w.uses.append(Use(n.idx, 0, "slice", x))
    w.atoms[n.out0] = x[s:e]
    return None


def _resize(w: Walk, n: Node) -> Block | None:
    """Resize/Upsample with constant scales or sizes that leave the channel axis alone."""
    bad = n.only_first_tracked("parameter")
    if bad:
        return bad
    node, op = n.node, n.node.op_type
    scales_name = node.input[2] if op == "Resize" and len(node.input) > 2 else (
        node.input[1] if op == "Upsample" else "")
    sc = w.const(scales_name) if scales_name else None
    if scales_name and sc is not None and sc.size >= 2 and float(sc[1]) != 1.0:
        return n.x, f"{n.label} scales the channel axis"
    if scales_name and sc is None:
        return n.x, f"{n.label} has non-constant scales"
    sizes_name = node.input[3] if op == "Resize" and len(node.input) > 3 else ""
    if sizes_name:
        if w.const(sizes_name) is None:
            return n.x, f"{n.label} has non-constant sizes"
        w.uses.append(Use(n.idx, 3, "resize", n.x))
    w.atoms[n.out0] = n.x
    return None


def _pad(w: Walk, n: Node) -> Block | None:
    """Pad with constant pads that leave the channel axis alone."""
    node, x = n.node, n.ins[0]
    pads = w.const(node.input[1]) if len(node.input) > 1 and node.input[1] else np.asarray(n.attrs.get("pads", []))
    axes_in = w.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if n.tracked != [0] or pads is None or x is None:
        return n.all_tracked(), f"{n.label} has non-constant pads"
    rank = w.rank(node.input[0])
    n_ax = rank if axes_in is None else len(axes_in)
    axes = list(range(rank)) if axes_in is None else [normalize_axis(v, rank) for v in axes_in]
    if 1 in axes:
        k = axes.index(1)
        if int(pads[k]) != 0 or int(pads[k + n_ax]) != 0:
            return x, f"{n.label} pads the channel axis"
    w.atoms[n.out0] = x
    return None


def _reduce(w: Walk, n: Node) -> Block | None:
    """A reduction over spatial axes only, with the channel axis kept in place."""
    x = n.ins[0]
    if x is None:
        return n.all_tracked(), f"{n.label} reads a tracked axes input"
    axes_val = n.attrs.get("axes")
    if axes_val is None and len(n.node.input) > 1 and n.node.input[1]:
        c = w.const(n.node.input[1])
        axes_val = None if c is None else [int(v) for v in c]
    if axes_val is None:
        return x, f"{n.label} reduces over all axes"
    axes = [normalize_axis(v, w.rank(n.node.input[0])) for v in axes_val]
    if 1 in axes or 0 in axes or (not int(n.attrs.get("keepdims", 1)) and min(axes) < 1):
        return x, f"{n.label} reduces the channel axis"
    w.atoms[n.out0] = x
    return None


def _flatten(w: Walk, n: Node) -> Block | None:
    """Flatten (axis 1) or a flatten-like Reshape to [N, C·H·W]: each atom repeats H·W
    times, so the Gemm/MatMul after it loses a block of rows per channel."""
    bad = n.only_first_tracked("shape")
    if bad:
        return bad
    x, op = n.x, n.node.op_type
    in_shape, out_shape = w.shapes.get(n.node.input[0]), w.shapes.get(n.out0)
    if op == "Flatten" and int(n.attrs.get("axis", 1)) != 1:
        return x, f"{n.label} flattens from axis {n.attrs.get('axis')}"
    if in_shape is None or out_shape is None or len(out_shape) != 2 or len(in_shape) < 2:
        return x, f"{n.label} reshapes channels"
    hw = int(np.prod(in_shape[2:], dtype=np.int64))
    if out_shape[1] != len(x) * hw or out_shape[0] != in_shape[0]:
        return x, f"{n.label} reshapes channels"
    if op == "Reshape":
        w.uses.append(Use(n.idx, 1, "reshape", x))
    w.atoms[n.out0] = np.repeat(x, hw)
    return None


def linear_weight(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto],
                  graph_inputs: set[str]) -> onnx.TensorProto | None:
    """The constant 2-D weight of a MatMul/Gemm whose data input is not a constant (a
    linear layer), else None: the walk's rule and the MACs model both decide with this.
    An initializer that is also a graph input is not a constant."""
    def const(name: str) -> bool:
        return name in inits and name not in graph_inputs

    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or not const(node.input[1]) \
            or const(node.input[0]):
        return None
    t = inits[node.input[1]]
    return t if len(t.dims) == 2 else None


def _matrix(w: Walk, n: Node) -> Block | None:
    """Gemm/MatMul with a constant 2-D weight: a contracting use (rows of the weight) of an
    input tracked on its last axis, and a producer of the output's last axis (columns)."""
    node, op = n.node, n.node.op_type
    weight = linear_weight(node, w.inits, w.graph_inputs)
    rank = w.rank(node.input[0])
    linear = weight is not None and rank >= 2
    if n.tracked and not linear and op == "MatMul" and all(w.const(i) is None for i in node.input):
        return tokens.batched_matmul(w, n)
    if n.tracked and (n.tracked != [0] or not linear):
        return n.all_tracked(), f"{n.label} is not a constant-weight matrix product"
    if not linear:
        return None
    assert weight is not None
    trans_a, trans_b = (int(n.attrs.get("transA", 0)), int(n.attrs.get("transB", 0))) if op == "Gemm" else (0, 0)
    if n.tracked and w.axis_of(node.input[0]) != rank - 1:
        return n.x, f"{n.label} contracts an axis other than the channels"
    if n.tracked and trans_a:
        return n.x, f"{n.label} transposes its input"
    if n.tracked:
        w.uses.append(Use(n.idx, 0, "gemm" if op == "Gemm" else "matmul", n.x, rank - 1))
    if trans_a:
        return None
    atoms = w.new_producer(n.idx, node, int(weight.dims[0] if trans_b else weight.dims[1]))
    w.track(n.out0, atoms, rank - 1)
    if op == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = w.const(node.input[2])  # a scalar, or one value per output ([N] or [1, N])
        if bias is None or not (bias.size == 1 or (bias.size == len(atoms) and bias.shape[-1] == len(atoms))):
            return atoms, f"{n.label} has a bias of another shape than its outputs"
    return None


def _reshape(w: Walk, n: Node) -> Block | None:
    """Reshape: convolution channels only flatten (:func:`_flatten`); token features,
    attention heads and a linear layer's rows regrouped with the channels last:
    :func:`~onnxcompress.passes.prune.tokens.reshape`."""
    x = n.node.input[0]
    in_shape, out_shape = w.shapes.get(x), w.shapes.get(n.out0)
    rows = (in_shape is not None and out_shape is not None and in_shape != out_shape
            and tokens.regroups_rows(in_shape, out_shape, w.axis_of(x)))
    return tokens.reshape(w, n) if w.is_token(x) or rows else _flatten(w, n)


def _shape_only(w: Walk, n: Node) -> Block | None:
    return None  # reads the shape, which pruning changes consistently


Rule = Callable[[Walk, Node], "Block | None"]

#: op type → the rule that maps the channels it reads to what it writes (or blocks them)
RULES: dict[str, Rule] = {
    "Conv": _conv, "ConvTranspose": _conv,
    **{op: _channelwise for op in CHANNELWISE}, **{op: _norm for op in NORMS},
    **{op: _elementwise for op in ELEMENTWISE}, **{op: _reduce for op in REDUCES},
    **{op: _shape_only for op in SHAPE_ONLY},
    "Concat": _concat, "Split": _split, "Slice": _slice, "Resize": _resize, "Upsample": _resize, "Pad": _pad,
    "Flatten": _flatten, "Reshape": _reshape, "Gemm": _matrix, "MatMul": _matrix,
    "Transpose": tokens.transpose, "Squeeze": tokens.squeeze, "Unsqueeze": tokens.squeeze,
    "Gather": tokens.squeeze, "Softmax": tokens.softmax,
}


#: ops whose rule creates atoms even when they read none
PRODUCERS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
#: ops whose rule handles channels on any axis (the rest need them on axis 1)
ANY_AXIS = (CHANNELWISE - POOLING) | ELEMENTWISE | SHAPE_ONLY | {
    "MatMul", "Gemm", "Reshape", "Slice", "Split", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Softmax"}


def walk(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> Walk:
    """Every node in topological order through its op's rule; the walk's final state."""
    g = model.graph
    w = Walk(model, shapes)
    for idx in topological_order(g):
        node = g.node[idx]
        ins = [w.atoms.get(i) if i else None for i in node.input]
        for name in captured(node) & w.atoms.keys():
            w.block(w.atoms[name], f"read inside the subgraph of {node.op_type} '{node.name or node.output[0]}'")
        n = Node(idx, node, f"{node.op_type} '{node.name or node.output[0]}'", _attrs(node), ins,
                  [k for k, a in enumerate(ins) if a is not None])
        if node.domain not in ("", "ai.onnx"):
            for k in n.tracked:
                w.block(ins[k], f"{n.label} (domain {node.domain})")
            continue
        if not n.tracked and node.op_type not in PRODUCERS:
            continue  # nothing of ours flows through this node
        if node.op_type not in ANY_AXIS and any(w.axis_of(node.input[k]) != 1 for k in n.tracked):
            w.block(n.all_tracked(), f"{n.label} reads channels on the last axis (token features)")
            continue
        rule = RULES.get(node.op_type)
        verdict = rule(w, n) if rule else (n.all_tracked(), f"{n.label} is not supported on a channel path")
        if verdict is not None:
            w.block(*verdict)
    for o in g.output:
        if o.name in w.atoms:
            w.block(w.atoms[o.name], f"reaches graph output '{o.name}'")
    return w
