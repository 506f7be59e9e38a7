"""Linear layers on sequences (``linear_bias``): ``Add(MatMul(x, W), b)`` with x of rank
≥ 3 ([N, T, K]), a constant W [K, M] and a constant bias b of M values becomes

    Reshape(Gemm(Reshape(x, [-1, K]), W, b), shape(x)[:-1] + [M])

the same products and sums, so exact up to float rounding. onnxruntime folds a bias into
the matrix product (Gemm, one pass over the output) only where x is 2-D; on a sequence
it runs the MatMul, or FusedMatMul where it absorbed a Transpose before it, and then a
full-size Add. A recognizer's classifier head over thousands of classes spends a fifth
of its product's time again in that Add (docs/passes/fuse.md). The reshapes are
views; the output shape is read from x at run time (Shape with start/end from opset 15,
else Shape and Slice; once per x, for the layers that share it), so batch and sequence
length stay dynamic. prune follows channels through the rewrite: M is the constant it
rewrites. x's rank comes from the model's shapes, or where onnx's inference leaves it
open (Reshape targets computed at run time), from one onnxruntime run on zeros.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import OnnxCompressError
from ...graph import fresh_namer, graph_index
from ...model import default_opset
from ...runtime import lost_fusions
from ...shapes import all_shapes
from .match import MatchResult, _copy, _decline, _splice, _std

log = logging.getLogger(__name__)

_GEMM_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)  #: what onnxruntime's CPU Gemm runs


def _ranks(model: onnx.ModelProto, tensors: list[str]) -> dict[str, int]:
    """Tensor → rank, from the model's shapes; for those of ``tensors`` they leave open
    (Reshape targets computed at run time), from the core's concrete shapes (inference at
    fixed input shapes, else one onnxruntime run on zeros). Unknown where neither resolves it."""
    g = model.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.value_info, *g.input, *g.output]
             if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    missing = [t for t in dict.fromkeys(tensors) if t not in ranks]
    if missing:
        try:
            shapes, _ = all_shapes(model, need=missing)
        except (OnnxCompressError, ValueError, RuntimeError) as exc:
            log.debug("fuse: linear_bias: input ranks unknown (%s)", exc)
            return ranks
        ranks.update({k: len(shapes[k]) for k in missing if k in shapes})
    return ranks


def bias_contexts(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[str, ...]]:
    """MatMul name → what reads its bias Add, two levels deep (op types): onnxruntime's
    fusions of a bias (BiasGelu, SkipLayerNormalization) depend on that alone, so one
    candidate per context tells whether the rewrite loses one."""
    g = model.graph
    _, readers, _ = graph_index(g)

    def ops(tensors: list[str]) -> list[onnx.NodeProto]:
        return [r for t in tensors for r in readers.get(t, [])]

    out = {}
    for n in g.node:
        key = n.name or n.output[0]
        if key in names:
            add = ops([n.output[0]])
            first = ops([o for a in add for o in a.output])
            second = ops([o for f in first for o in f.output])
            out[key] = (*sorted(f.op_type for f in first), "|", *sorted(f.op_type for f in second))
    return out


def _match(mm: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto], readers: Mapping[str, list[onnx.NodeProto]],
           outputs: set[str], ranks: Mapping[str, int]) -> MatchResult:
    """A MatMul by a constant 2-D float weight on a sequence, read by one Add of a bias:
    (x, W, b, the Add, M), or why not."""
    x, w = mm.input[0], mm.input[1]
    wt = inits.get(w)
    if wt is None or len(wt.dims) != 2 or wt.data_type not in _GEMM_TYPES:
        return MatchResult.fail("the weight is not a constant 2-D float32/float64 matrix")
    rank = ranks.get(x)
    if rank is None:
        return MatchResult.fail("the input's rank is unknown")
    if rank < 3:
        return MatchResult.fail("the input is not a sequence (rank < 3: onnxruntime fuses a 2-D bias itself)")
    users = readers.get(mm.output[0], [])
    if mm.output[0] in outputs or len(users) != 1 or not _std(users[0], "Add"):
        return MatchResult.fail("the product is not read by one Add alone")
    add = users[0]
    b = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
    bt = inits.get(b)
    m = int(wt.dims[1])
    if bt is None or bt.data_type != wt.data_type:
        return MatchResult.fail("the added term is not a constant of the weight's type")
    if int(np.prod(bt.dims)) != m or len(bt.dims) > rank or any(d != 1 for d in bt.dims[:-1]):
        return MatchResult.fail("the added term is not one bias value per output feature")
    return MatchResult((x, w, b, add, m))


def fuse_linear_bias(model: onnx.ModelProto, declines: Counter[str] | None = None,
                     only: set[str] | None = None) -> list[str]:
    """Rewrite each ``Add(MatMul(x, W), b)`` on an x of rank ≥ 3 as a Gemm between two
    Reshapes (module doc), or only the MatMuls named in ``only``; the names of the MatMuls
    rewritten. A candidate that fails is counted in ``declines`` by reason."""
    g = model.graph
    if (default_opset(model) or 0) < 10:  # Slice with its bounds as inputs
        return []
    inits, readers, outputs = graph_index(g)
    ranks = _ranks(model, [n.input[0] for n in g.node if _std(n, "MatMul") and n.input[1] in inits])

    fresh = fresh_namer(g)
    consts: dict[tuple[int, ...], str] = {}
    leads: dict[str, str] = {}  # x → its shape less the last axis, computed once per x
    sliced_shape = (default_opset(model) or 0) >= 15  # Shape with start/end

    def const(values: tuple[int, ...]) -> str:
        if values not in consts:
            consts[values] = fresh("linear_bias_shape")
            g.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), consts[values]))
        return consts[values]

    def lead_of(x: str, name: str) -> list[onnx.NodeProto]:
        if x in leads:
            return []
        leads[x] = fresh(f"{name}_lead")
        if sliced_shape:
            return [helper.make_node("Shape", [x], [leads[x]], name=f"{name}_lead", start=0, end=-1)]
        full = fresh(f"{name}_shape")
        return [helper.make_node("Shape", [x], [full], name=f"{name}_shape"),
                helper.make_node("Slice", [full, const((0,)), const((-1,))], [leads[x]], name=f"{name}_lead")]

    replace: dict[int, list[onnx.NodeProto]] = {}
    drop: set[int] = set()
    done: list[str] = []
    for mm in list(g.node):
        if not _std(mm, "MatMul") or (only is not None and (mm.name or mm.output[0]) not in only):
            continue
        found = _match(mm, inits, readers, outputs, ranks)
        if not found.ok:
            _decline(declines, "linear_bias", mm.name or mm.output[0], found)
            continue
        x, w, b, add, m = found.value
        k = int(inits[w].dims[0])
        bias = b
        if len(inits[b].dims) != 1:
            bias = fresh(f"{b}_vector")
            g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[b]).reshape(m), bias))
        name = mm.name or mm.output[0]
        shape, x2, y2 = (fresh(f"{name}_{s}") for s in ("out_shape", "rows", "gemm"))
        replace[id(mm)] = [
            *lead_of(x, name),
            helper.make_node("Concat", [leads[x], const((m,))], [shape], name=f"{name}_out_shape", axis=0),
            helper.make_node("Reshape", [x, const((-1, k))], [x2], name=f"{name}_rows"),
            helper.make_node("Gemm", [x2, w, bias], [y2], name=mm.name or f"{name}_gemm"),  # the layer's name stays
            helper.make_node("Reshape", [y2, shape], list(add.output), name=f"{name}_linear"),
        ]
        drop.add(id(add))
        done.append(name)
    if replace:
        _splice(g, replace, drop)
    return done


def fuse_linear_bias_keeping(model: onnx.ModelProto, before: Mapping[str, int] | None, provider: str,
                             declines: Counter[str] | None = None) -> list[str]:
    """:func:`fuse_linear_bias` on ``model`` without losing any of onnxruntime's fusions
    ``before`` counts: onnxruntime fuses some bias Adds with what follows (BiasGelu,
    SkipLayerNormalization), so where the rewrite of all loses one, one candidate per
    bias context (:func:`bias_contexts`) is checked alone, and those that lose one are
    declined with it; the names of the MatMuls rewritten."""
    trial = _copy(model)
    done = fuse_linear_bias(trial, declines)
    if done and lost_fusions(before, trial, provider):
        contexts = bias_contexts(model, done)
        verdict: dict[tuple[str, ...], str] = {}
        for name in done:
            if contexts[name] not in verdict:
                one = _copy(model, lambda c: fuse_linear_bias(c, only={name}))
                verdict[contexts[name]] = lost_fusions(before, one, provider)
        keep = {name for name in done if not verdict[contexts[name]]}
        for name in sorted(set(done) - keep):
            _decline(declines, "linear_bias", name,
                     MatchResult.fail(f"loses onnxruntime's fusions: {verdict[contexts[name]]}"))
        trial = _copy(model)
        done = fuse_linear_bias(trial, only=keep) if keep else []
    model.CopyFrom(trial)
    return done
