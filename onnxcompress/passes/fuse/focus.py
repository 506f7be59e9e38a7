"""Focus layers (``space_to_depth``): YOLOv5 (before v6) and YOLOX start with
``Concat(x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2])``
and a Conv, exported as eight Slices and a Concat. onnxruntime's Slices copy one strided
element at a time. A k×k Conv (strides s, pads p) on the four sub-grids is one 2k×2k Conv
(strides 2s, pads 2p) on x (``focus_conv``, as YOLOv5 v6 rewrote its stem by hand): the
sub-grid starting at row a, column b supplies kernel rows 2i + a and columns 2j + b, so
``W'[o, c, 2i + a, 2j + b] = W[o, g·C + c, i, j]`` for the sub-grid's place g in the
Concat (derivation at :func:`fuse_space_to_depth`). Where a reader of the Concat is not
such a Conv (dilated, ``auto_pad``), ``SpaceToDepth(x, 2)`` makes the same four
sub-grids, as channel (2a + b)·C + c, and the Convs' weight input channels are reordered
to match. Both exact: the same products and sums in another order; folding into the
Conv saves the most (one strided pass fewer).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...graph import fresh_namer, graph_index, used_names
from ...model import node_attr
from .match import MatchResult, _decline, _index, _splice, _std

log = logging.getLogger(__name__)


_OPEN_END = 2**31 - 1  #: a Slice end at least this large runs to the end of the axis


def _focus_branch(t: str, producer: dict[str, onnx.NodeProto], readers: dict[str, int],
                  inits: dict[str, onnx.TensorProto]) -> tuple[str, tuple[int, int], list[onnx.NodeProto]] | None:
    """``t`` = ``x[:, :, a::2, b::2]`` through one or two Slices of a 4-D ``x``, each
    inner tensor read once: (x, (a, b), the Slices), or None."""
    spec: dict[int, int] = {}
    nodes: list[onnx.NodeProto] = []
    x = t
    while len(nodes) < 2:
        n = producer.get(x)
        if not _std(n, "Slice") or len(n.input) != 5 or readers.get(x) != 1:
            break
        vals = []
        for name in n.input[1:]:
            if name not in inits:
                return None
            vals.append(numpy_helper.to_array(inits[name]).reshape(-1).tolist())
        starts, ends, axes, steps = vals
        if not len(starts) == len(ends) == len(axes) == len(steps):
            return None
        for st, en, ax, sp in zip(starts, ends, axes, steps):
            ax = ax + 4 if ax < 0 else ax  # 4-D: the Convs reading the Concat must have 4-D weights
            if ax not in (2, 3) or ax in spec or sp != 2 or st not in (0, 1) or en < _OPEN_END:
                return None
            spec[ax] = st
        nodes.append(n)
        x = n.input[0]
    if set(spec) != {2, 3}:
        return None
    return x, (spec[2], spec[3]), nodes


def _plain_conv(c: onnx.NodeProto) -> bool:
    """A 2-D Conv with explicit (or no) padding and dilation 1: one that a Focus layer
    can go into as a kernel twice the size at twice the stride."""
    return (node_attr(c, "auto_pad", "NOTSET") == "NOTSET"
            and all(int(d) == 1 for d in node_attr(c, "dilations", [1, 1])))


def fuse_space_to_depth(model: onnx.ModelProto, strided: bool = True,
                        declines: Counter[str] | None = None) -> tuple[int, int]:
    """Rewrite a Focus layer (YOLOv5 before v6, YOLOX): ``Concat(x[..., a::2, b::2] for
    the four (a, b) ∈ {0, 1}², axis=1)`` read only by Convs (group 1, constant weights).

    With ``strided`` and every such Conv plain (explicit padding, dilation 1), the Focus
    goes into the Convs: a k×k Conv with strides s, pads p on the Concat becomes a 2k×2k
    Conv with strides 2s, pads 2p on x, ``W'[o, c, 2i + a, 2j + b] = W[o, g(a, b)·C + c,
    i, j]`` (g: the branch's place in the Concat). Output row y of the Concat's Conv reads
    Concat row s·y + i − p, i.e. x row 2(s·y + i − p) + a = 2s·y + (2i + a) − 2p, which is
    the new Conv's kernel row 2i + a; the output sizes agree because H is even.
    Otherwise the Concat becomes ``SpaceToDepth(x, blocksize=2)``, whose channel
    (2a + b)·C + c holds the Concat's channel g(a, b)·C + c; each Conv's weight input
    channels are reordered to match. Either way the same products and sums, in another
    order. (Focus layers rewritten as SpaceToDepth, Focus layers gone into Convs.)

    Both need even H and W (the Concat's inputs differ in size otherwise). The slices must
    run to the end of their axes (end ≥ 2³¹ − 1) and each inner tensor have one reader."""
    g = model.graph
    producer, readers = _index(g)
    inits, users, outputs = graph_index(g)
    fresh = fresh_namer(g)
    replace: dict[int, list[onnx.NodeProto]] = {}
    drop: set[int] = set()
    released: set[str] = set()  # initializers the rewrite stops reading (dropped if nothing else does)
    into_convs = 0
    for cat in g.node:
        if not _std(cat, "Concat") or len(cat.input) != 4 or int(node_attr(cat, "axis", 0)) != 1:
            continue
        found = _match_focus(cat, producer, readers, inits, users, outputs)
        if not found.ok:
            _decline(declines, "space_to_depth", cat.name or cat.output[0], found)
            continue
        x, place, convs, slices = found.value
        drop.update(id(n) for n in slices)
        released.update(i for n in slices for i in n.input[1:])
        if strided and all(_plain_conv(c) for c in convs):
            for c in convs:
                _focus_into_conv(g, c, x, place, inits, fresh, released)
            replace[id(cat)] = []
            into_convs += 1
            continue
        y = cat.output[0]
        s2d = fresh(f"{y}_space_to_depth")
        for c in convs:
            w = numpy_helper.to_array(inits[c.input[1]])
            ch = w.shape[1] // 4
            new = np.empty_like(w)
            for (a, b), k in place.items():
                new[:, (2 * a + b) * ch:(2 * a + b + 1) * ch] = w[:, k * ch:(k + 1) * ch]
            name = fresh(f"{c.input[1]}_space_to_depth")
            g.initializer.append(numpy_helper.from_array(new, name))
            released.add(c.input[1])
            c.input[0], c.input[1] = s2d, name
        replace[id(cat)] = [helper.make_node("SpaceToDepth", [x], [s2d], name=f"{cat.name or y}_space_to_depth",
                                             blocksize=2)]
    if replace:
        _splice(g, replace, drop)
        used = used_names(g) | {i.name for i in g.input}
        keep = [t for t in g.initializer if t.name in used or t.name not in released]
        del g.initializer[:]
        g.initializer.extend(keep)
    return len(replace) - into_convs, into_convs


def _match_focus(cat: onnx.NodeProto, producer: dict[str, onnx.NodeProto], readers: dict[str, int],
                 inits: dict[str, onnx.TensorProto], users: dict[str, list[onnx.NodeProto]],
                 outputs: set[str]) -> MatchResult:
    """A Focus layer at ``cat`` (a 4-input Concat on axis 1): (x, each sub-grid's place in
    the Concat, the Convs reading it, the Slices), or why not."""
    y = cat.output[0]
    branches = [_focus_branch(t, producer, readers, inits) for t in cat.input]
    if any(b is None for b in branches) or len({b[0] for b in branches if b}) != 1:
        return MatchResult.fail("the inputs are not stride-2 sub-grids of one tensor, each read once")
    place = {b[1]: k for k, b in enumerate(branches) if b}
    if len(place) != 4:
        return MatchResult.fail("a sub-grid appears twice")
    if y in outputs:
        return MatchResult.fail("the Concat is a graph output")
    convs = users.get(y, [])
    for c in convs:
        w = inits.get(c.input[1]) if len(c.input) > 1 else None
        if (not _std(c, "Conv") or c.input[0] != y or y in c.input[1:] or int(node_attr(c, "group", 1)) != 1
                or w is None or len(w.dims) != 4 or w.dims[1] % 4):
            return MatchResult.fail("read by something other than group-1 Convs with constant 4-D weights")
    if not convs:
        return MatchResult.fail("no reader")
    x = branches[0][0]  # type: ignore[index]
    return MatchResult((x, place, convs, [n for b in branches if b for n in b[2]]))


def _focus_into_conv(g: onnx.GraphProto, c: onnx.NodeProto, x: str, place: dict[tuple[int, int], int],
                     inits: dict[str, onnx.TensorProto], fresh: Callable[[str], str], released: set[str]) -> None:
    """The k×k Conv ``c`` on the Focus Concat becomes a 2k×2k Conv at twice the stride on x."""
    w = numpy_helper.to_array(inits[c.input[1]])
    ch = w.shape[1] // 4
    new = np.zeros((w.shape[0], ch, 2 * w.shape[2], 2 * w.shape[3]), w.dtype)
    for (a, b), k in place.items():
        new[:, :, a::2, b::2] = w[:, k * ch:(k + 1) * ch]
    name = fresh(f"{c.input[1]}_strided")
    g.initializer.append(numpy_helper.from_array(new, name))
    released.add(c.input[1])
    c.input[0], c.input[1] = x, name
    k_h, k_w = (int(v) for v in w.shape[2:])
    s_h, s_w = (int(v) for v in node_attr(c, "strides", [1, 1]))
    pads = [2 * int(v) for v in node_attr(c, "pads", [0, 0, 0, 0])]
    for attr in list(c.attribute):
        if attr.name in ("kernel_shape", "strides", "pads", "auto_pad"):
            c.attribute.remove(attr)
    c.attribute.extend([helper.make_attribute("kernel_shape", [2 * k_h, 2 * k_w]),
                        helper.make_attribute("strides", [2 * s_h, 2 * s_w]),
                        helper.make_attribute("pads", pads)])
