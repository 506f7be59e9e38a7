"""Channel rules for token features and attention heads (see groups.py): the ops that
move a transformer's channels between axes. They apply off a convolution's channel path
only (``Walk.is_token``); on it they block, as ops without a rule do.

An attention head split is a ``Reshape`` of [..., C] to [..., h, d]: every channel of
head ``j`` (its ``d`` channels in each leading block, e.g. Q, K and V of one fused
projection) is united into one class, so only whole heads go, and the head axis carries
one atom per head. Q·Kᵀ and weights·V (MatMuls of two computed tensors) unite the heads
of their inputs on a batch axis; the merge ``Reshape`` back to [..., h·d] repeats each
head's atom ``d`` times for the output projection's rows. A constant Reshape target
that spells out the head (or channel) count is a ``reshape-dim`` use.

A linear layer on token rows ([N, T, C] reshaped to [N·T, C], a Gemm, and back to
[N, T, M]: fuse's ``linear_bias``) keeps its channels last; the target back is computed,
Concat(shape(x)[:-1], [M]), and the constant M is the use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...model import default_opset
from .groups import Use, normalize_axis

if TYPE_CHECKING:
    from .rules import Block, Node, Walk


def batched_matmul(w: Walk, n: Node) -> Block | None:
    """MatMul of two computed tensors (attention's Q·Kᵀ and weights·V): channels on a
    batch axis (attention heads) pass, and the two inputs' heads are united position by
    position; channels on the two matrix axes are mixed by the product."""
    out_rank = w.rank(n.out0)
    axes = {w.axis_of(n.node.input[k]) + out_rank - w.rank(n.node.input[k]) for k in n.tracked}
    if not all(w.is_token(n.node.input[k]) for k in n.tracked):
        return n.all_tracked(), f"{n.label} is not a constant-weight matrix product"
    if len(axes) != 1 or min(w.rank(n.node.input[k]) for k in n.tracked) < 3:
        return n.all_tracked(), f"{n.label} multiplies the channels it reads"
    axis = axes.pop()
    if axis >= out_rank - 2:
        return n.all_tracked(), f"{n.label} multiplies the channels it reads"
    if len(n.tracked) == 1:
        other = n.node.input[1 - n.tracked[0]]
        shp = w.shapes.get(other)
        ax = axis - (out_rank - len(shp)) if shp is not None else None
        if shp is None or (ax is not None and ax >= 0 and shp[ax] != 1):
            return n.x if n.tracked == [0] else n.all_tracked(), f"{n.label} pairs the heads with untracked '{other}'"
    elif len(n.ins[0]) != len(n.ins[1]):  # type: ignore[arg-type]
        return n.all_tracked(), f"{n.label}: head counts differ"
    else:
        for a, b in zip(n.ins[0], n.ins[1]):  # type: ignore[arg-type]
            if a < 0 or b < 0:
                return n.all_tracked(), f"{n.label} pairs a head that cannot be pruned"
            w.uf.union(int(a), int(b))
    w.track(n.out0, n.ins[n.tracked[0]], axis, True)  # type: ignore[arg-type]
    return None


def _off_channels(w: Walk, n: Node) -> Block | None:
    """The ops below move token features or attention heads between axes; on a
    convolution's channel axis (axis 1) they block, as ops without a rule do."""
    if not w.is_token(n.node.input[0]) or n.tracked != [0]:
        return n.all_tracked(), f"{n.label} is not supported on a channel path"
    return None


def transpose(w: Walk, n: Node) -> Block | None:
    """Transpose: the channels move to their axis's new place."""
    bad = _off_channels(w, n)
    if bad:
        return bad
    rank = w.rank(n.node.input[0])
    perm = [int(v) for v in n.attrs.get("perm", list(range(rank - 1, -1, -1)))]
    w.track(n.out0, n.x, perm.index(w.axis_of(n.node.input[0])), True)
    return None


def squeeze(w: Walk, n: Node) -> Block | None:
    """Squeeze/Unsqueeze/Gather with a scalar index: axes other than the channels' come
    or go, and the channels' axis moves with them."""
    bad = _off_channels(w, n)
    if bad:
        return bad
    node, op, channel = n.node, n.node.op_type, w.axis_of(n.node.input[0])
    rank_in, rank_out = w.rank(node.input[0]), w.rank(n.out0)
    if op == "Gather":
        index = w.const(node.input[1]) if len(node.input) > 1 else None
        axes = [normalize_axis(n.attrs.get("axis", 0), rank_in)]
        if index is None or index.ndim != 0:
            return n.x, f"{n.label} gathers with a non-scalar index"
    else:
        raw = n.attrs.get("axes")
        if raw is None and len(node.input) > 1 and node.input[1]:
            c = w.const(node.input[1])
            if c is None:
                return n.x, f"{n.label} has non-constant axes"
            raw = [int(v) for v in c.ravel()]
        if raw is None:
            return n.x, f"{n.label} has no axes"
        axes = [normalize_axis(v, rank_in if op != "Unsqueeze" else rank_out) for v in raw]
    if op == "Unsqueeze":
        kept = [p for p in range(rank_out) if p not in axes]
        w.track(n.out0, n.x, kept[channel], True)
        return None
    if channel in axes:
        return n.x, f"{n.label} removes the channel axis"
    w.track(n.out0, n.x, channel - sum(a < channel for a in axes), True)
    return None


def softmax(w: Walk, n: Node) -> Block | None:
    """Softmax over another axis than the channels' (attention weights per head)."""
    bad = _off_channels(w, n)
    if bad:
        return bad
    rank, channel = w.rank(n.node.input[0]), w.axis_of(n.node.input[0])
    if (default_opset(w.model) or 0) < 13 or normalize_axis(n.attrs.get("axis", -1), rank) == channel:
        return n.x, f"{n.label} normalizes over the channels"
    w.track(n.out0, n.x, channel, True)
    return None


def reshape(w: Walk, n: Node) -> Block | None:
    """Reshape of token features: those on the last axis may split into [..., h, d]
    (attention heads: all d channels of a head, and of every leading block such as
    Q/K/V, go together, and the head axis carries one atom per head) or merge back from
    [..., h, d]; the axes before channels on the last axis may merge or split
    (:func:`regroups_rows`, with a constant target or one :func:`_concat_target` reads);
    a reshape to the same shape passes (with a computed target only when it is the Shape
    of a tensor with the same channels). A constant target that spells out the head or
    channel count is rewritten (a use)."""
    channel = w.axis_of(n.node.input[0])
    bad = n.only_first_tracked("shape")
    if bad:
        return bad
    x = n.x
    in_shape, out_shape = w.shapes.get(n.node.input[0]), w.shapes.get(n.out0)
    target = w.const(n.node.input[1])
    if in_shape is None or out_shape is None or any(v is None or v <= 0 for v in in_shape + out_shape):
        return x, f"{n.label}: shapes unknown"
    rows = in_shape != out_shape and regroups_rows(in_shape, out_shape, channel)
    if in_shape == out_shape:
        axis, atoms = channel, x
    elif rows:
        axis, atoms = len(out_shape) - 1, x
    elif (channel == len(in_shape) - 1 and len(out_shape) >= channel + 2 and out_shape[:channel] == in_shape[:channel]
          and int(np.prod(out_shape[channel:])) == in_shape[channel]):
        axis = len(out_shape) - 2
        blocks = x.reshape(out_shape[channel:])
        heads = np.moveaxis(blocks, axis - channel, 0).reshape(out_shape[axis], -1)
        if (heads < 0).any():
            return x, f"{n.label} splits channels that cannot be pruned into heads"
        for row in heads:
            for a in row[1:]:
                w.uf.union(int(row[0]), int(a))
        atoms = heads[:, 0].copy()
    elif (len(out_shape) == channel + 1 and out_shape[:channel] == in_shape[:channel]
          and int(np.prod(in_shape[channel:])) == out_shape[channel]):
        axis, atoms = channel, np.repeat(x, int(np.prod(in_shape[channel + 1:])))
    else:
        return x, f"{n.label} reshapes token features"
    if target is None and rows:
        spelled = _concat_target(w, n.node.input[1], len(x))
        if spelled is None:
            return x, f"{n.label} has a computed target shape that does not end in the channel count"
        w.uses.append(Use(*spelled, "reshape-dim", atoms, 0))
        w.track(n.out0, atoms, axis, True)
        return None
    if target is None and not (in_shape == out_shape and _shape_of_same_channels(w, n.node.input[1], x, channel)):
        return x, f"{n.label} has a computed target shape"
    if target is not None and len(target) == len(out_shape) and int(target[axis]) > 0:
        w.uses.append(Use(n.idx, 1, "reshape-dim", atoms, axis))
    w.track(n.out0, atoms, axis, True)
    return None


def regroups_rows(in_shape: list[int], out_shape: list[int], channel: int) -> bool:
    """A Reshape that merges or splits the axes before the channels, which stay last and
    whole ([N, T, C] ↔ [N·T, C]: a linear layer on token rows, as fuse's ``linear_bias``
    writes it)."""
    return (channel == len(in_shape) - 1 and len(out_shape) >= 2 and out_shape[-1] == in_shape[-1]
            and int(np.prod(out_shape[:-1])) == int(np.prod(in_shape[:-1])))


def _concat_target(w: Walk, name: str, channels: int) -> tuple[int, int] | None:
    """``name`` is Concat(leading dims, [channels]): a constant last input that spells the
    channel count (the node and input to rewrite), after inputs that read only axes pruning
    leaves alone (:func:`_unpruned_dims`)."""
    node = w.made_by.get(name)
    if node is None or node.op_type != "Concat" or len(node.input) < 2:
        return None
    last = w.const(node.input[-1])
    if last is None or last.ndim != 1 or last.size != 1 or int(last[0]) != channels:
        return None
    if not all(_unpruned_dims(w, i) for i in node.input[:-1]):
        return None
    return next(i for i, nd in enumerate(w.model.graph.node) if nd is node), len(node.input) - 1


def _unpruned_dims(w: Walk, name: str) -> bool:
    """``name`` is the shape of a tensor, or a range of it, without the axis that tensor
    carries channels on (Shape with start/end, or Slice of a Shape). Where the range holds
    that axis, those channels are blocked: the target would follow their pruning."""
    node = w.made_by.get(name)
    if node is None:
        return False
    bounds: tuple[int, int | None] = (0, None)
    if node.op_type == "Slice":
        read = w.slice_bounds(node)
        if read is None:
            return False
        starts, ends, axes, steps = read
        if starts.size != 1 or ends.size != 1 or not (axes is None or (axes.size == 1 and int(axes.ravel()[0]) == 0)) \
                or not (steps is None or (steps.size == 1 and int(steps.ravel()[0]) == 1)):
            return False
        bounds = (int(starts.ravel()[0]), int(ends.ravel()[0]))
        node = w.made_by.get(node.input[0])
        if node is None or node.op_type != "Shape" or node.attribute:
            return False
    elif node.op_type == "Shape":
        a = {at.name: at.i for at in node.attribute}
        bounds = (a.get("start", 0), a.get("end"))
    else:
        return False
    t = node.input[0]
    if t in w.atoms and w.axis_of(t) in range(w.rank(t))[slice(*bounds)]:
        w.block(w.atoms[t], f"{node.op_type} '{node.name or name}' reads its channel count into a Reshape target")
        return False
    return True


def _shape_of_same_channels(w: Walk, name: str, atoms: np.ndarray, axis: int) -> bool:
    """``name`` is the Shape of a tensor carrying ``atoms`` on ``axis``: it follows pruning."""
    node = w.made_by.get(name)
    if node is None or node.op_type != "Shape" or len(node.attribute) or node.input[0] not in w.atoms:
        return False
    return w.axis_of(node.input[0]) == axis and np.array_equal(w.atoms[node.input[0]], atoms)
