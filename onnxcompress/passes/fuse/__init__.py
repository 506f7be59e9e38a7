"""Pass ``fuse``: activation chains that exporters spell out, fused into one operator.

Every rule below is applied only where onnxruntime still makes all of its own fusions
of the model afterwards (its optimized graph, extended level: FusedConv, FusedMatMul,
LayerNormalization, Gelu, Attention, SkipLayerNormalization, …, counted before and after
the rule): a rewrite that breaks onnxruntime's LayerNorm or attention fusion costs more
than it saves. ``stats["declined"]`` names each rule left out and the fusion it would
have lost; ``stats["declined_matches"]`` counts, per rule and reason, the candidates a
rule looked at and declined (onnxscript's ``MatchResult.fail`` style, :class:`MatchResult`).

Hard-swish, h(x) = x·relu6(x + 3)/6, is written by paddle2onnx (opsets < 14) as
``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)``, and by other exporters with ``Mul`` by 1/6 or
with the division on the Clip. Each such chain becomes ``HardSwish(x)`` (opset ≥ 14) or
``Mul(x, HardSigmoid(x))`` with α = 1/6, β = ½, because

    relu6(x + 3)/6 = clip(x + 3, 0, 6)/6 = clip(x/6 + ½, 0, 1) = hardsigmoid(x).

Only rounding changes: one rounding per activation instead of three or four, so the
output moves by about as much as onnxruntime's own graph optimizations move the
original. The pass counts as exact, validated against a rounding tolerance of 1e-2 of
the output range instead of canonicalize's 1e-4: where an output is nearly constant (a
saturated sigmoid on random inputs), rounding alone is a visible fraction of its range.

Why it pays: onnxruntime's CPU kernels run convolutions in a blocked channel layout
(NCHWc) and reorder tensors in and out of it around operators that do not support it,
such as Div. A spelled-out hard-swish after every block thus costs two reorders plus four
elementwise passes. The measured gains of each rule: docs/passes/fuse.md.

A chain is fused only when its inner tensors have no other reader and are not graph
outputs.

Affine folding (``affine``): ``Conv(x) · a + b`` with constants a, b that are scalars or
vary only along the output channel — BatchNormalization exported as Mul/Add, learnable
affine blocks — becomes one Conv with ``W'_c = a_c W_c``, ``b'_c = a_c b_c + b_c``
(:func:`onnxcompress.folds.fold_affine`, which int8 runs too), again exact
up to rounding. onnxruntime does not fold a scalar Mul/Add into the Conv itself and
reorders out of its blocked layout for each. The same block after an activation,
``y = a·h + b`` read only by Convs that pad nothing (1×1), goes into those Convs:
``W'[o, c] = a_c·W[o, c]``, ``b'_o = b_o + Σ_{c,…} W[o, c, …]·b_c``
(:func:`~onnxcompress.folds.fold_affine_forward`; a padded Conv pads y
with zeros, not with b, so it is left alone). ConvTranspose takes its bias Add and
a BatchNormalization after it too (onnxruntime folds BatchNormalization into Conv only).

Where neither fold applies — a scale/shift after a Conv's activation read by a padded
Conv (learnable affine blocks before depthwise 3×3/5×5 convs) —
``y = a·h + b`` becomes a depthwise 1×1 Conv, ``W[c] = a_c``, ``bias[c] = b_c``,
``group = C`` (``affine_depthwise``;
:func:`~onnxcompress.folds.affine_to_depthwise`): the same product and
sum per value, but onnxruntime runs a Conv in its blocked layout where a Mul/Add costs a
reorder out and back. Only after a Conv or its activation (a
tensor already in the blocked layout) and on 4-D tensors with spatial extent.

Gated residuals (``gate_residual``): ``x + x·g`` with a gate g of one value per channel
([N, C, 1, …], e.g. the hard-sigmoid of a squeeze-excite branch in a residual SE block)
becomes ``x·(g + 1)``, exact up to rounding: the full-size Add
is gone and the + 1 runs on the N·C gate values. A full-size Add costs onnxruntime its
blocked layout like any elementwise op on both sides of a broadcast Mul. Only where the Mul's output has no other reader and is not a graph output.

Focus layers (``space_to_depth``, ``focus_conv``): a YOLOv5/YOLOX Focus becomes one strided
Conv or a SpaceToDepth, exact; the derivation is in focus.py.

Linear layers on sequences (``linear_bias``): MatMul + bias Add on [N, T, K] becomes a
Gemm between two Reshapes, exact (linear.py). Each candidate whose rewrite would lose an
onnxruntime fusion of its bias (BiasGelu, SkipLayerNormalization) is left alone, with
that reason, and the others are rewritten.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import OnnxCompressError
from ...folds import affine_to_depthwise, fold_affine, fold_affine_forward, fold_batchnorm
from ...graph import clip_bounds, drop_stale_value_info, fresh_namer, initializers
from ...model import default_opset
from ...pipeline import Pass, PassContext, PassResult
from ...validate import lost_fusions, runtime_fusions
from .focus import fuse_space_to_depth
from .linear import fuse_linear_bias_keeping
from .match import MatchResult, _copy, _decline, _index, _splice, _std

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FuseOptions:
    hardswish: bool = field(default=True, metadata={
        "help": "x·clip(x+3,0,6)/6 spelled as Add/Clip/Mul/Div → HardSwish (opset >= 14) or x·HardSigmoid(x)"})
    affine: bool = field(default=True, metadata={
        "help": "fold a constant scale/shift (per channel or scalar) into the Conv/ConvTranspose before it "
                "(and a BatchNormalization into a ConvTranspose), or into the unpadded Convs after it"})
    affine_depthwise: bool = field(default=True, metadata={"experimental": True,
        "help": "a constant scale/shift after a Conv's activation that cannot be folded (padded readers) becomes "
                "a depthwise 1x1 Conv, which onnxruntime runs in its blocked layout"})
    gate_residual: bool = field(default=True, metadata={"experimental": True,
        "help": "x + x·g with a per-channel gate g ([N, C, 1, 1]) → x·(g + 1): one full-size Add fewer"})
    linear_bias: bool = field(default=True, metadata={
        "help": "MatMul by a constant weight + bias on a sequence ([N, T, K]) → Reshape, Gemm, Reshape: "
                "onnxruntime adds the bias inside the product instead of in a pass of its own"})
    space_to_depth: bool = field(default=True, metadata={
        "help": "a Focus layer (four stride-2 Slices of x, Concat, Conv) → SpaceToDepth(x) and the Conv with its "
                "input channels reordered"})
    focus_conv: bool = field(default=True, metadata={"experimental": True,
        "help": "with space_to_depth: a Focus layer read only by Convs with explicit padding and dilation 1 goes "
                "into them instead, a k×k Conv becoming a 2k×2k Conv at twice the stride on x"})


class Fuse(Pass):
    name = "fuse"
    summary = ("fuse spelled-out hard-swish (Add/Clip/Mul/Div) into one operator, fold constant Mul/Add into the "
               "Convs around them, fold Focus layers into the Conv after them, so onnxruntime keeps its fast "
               "layout, and add sequence linear layers' bias inside the product (exact up to rounding)")
    Options = FuseOptions
    exact = True  # the same function; rounding differs (see the module doc)
    rel_range = 1e-2

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        opts: FuseOptions = self.options

        def affine(m: onnx.ModelProto) -> dict[str, int]:
            # only ConvTranspose's: onnxruntime folds Conv + BatchNormalization itself, and prune
            # did worse on the folded graph (docs/decisions). A BatchNormalization may follow
            # only after the ConvTranspose's bias Add is folded.
            bn = fold_batchnorm(m, ("ConvTranspose",))
            folded = fold_affine(m, declines["affine"])
            bn += fold_batchnorm(m, ("ConvTranspose",))
            forward = fold_affine_forward(m)
            if folded or forward or bn:
                drop_stale_value_info(m.graph)  # the folded Mul/Add/BatchNormalization outputs
            return {"affine_folded": folded, "batchnorm_folded": bn, "affine_folded_forward": forward}

        def depthwise(m: onnx.ModelProto) -> dict[str, int]:
            n = affine_to_depthwise(m)
            if n:
                drop_stale_value_info(m.graph)
            return {"affine_depthwise": n}

        declines: dict[str, Counter[str]] = {"hardswish": Counter(), "affine": Counter(), "gate_residual": Counter(),
                                             "space_to_depth": Counter(), "linear_bias": Counter()}

        def focus(m: onnx.ModelProto) -> dict[str, int]:
            a, b = fuse_space_to_depth(m, opts.focus_conv, declines["space_to_depth"])
            return {"space_to_depth": a, "focus_conv": b}

        rules: list[tuple[str, bool, Callable[[onnx.ModelProto], dict[str, int]]]] = [
            ("hardswish", opts.hardswish, lambda m: {"hardswish_fused": fuse_hardswish(m, declines["hardswish"])}),
            ("affine", opts.affine, affine),
            ("affine_depthwise", opts.affine and opts.affine_depthwise, depthwise),
            ("gate_residual", opts.gate_residual,
             lambda m: {"gate_residual_folded": fold_gate_residual(m, declines["gate_residual"])}),
            ("space_to_depth", opts.space_to_depth, focus),
            ("linear_bias", opts.linear_bias, lambda m: {"linear_bias_fused": len(
                fuse_linear_bias_keeping(m, before, ctx.provider, declines["linear_bias"]))}),
        ]
        stats: dict[str, Any] = {}
        declined: dict[str, str] = {}
        try:  # onnxruntime's own fusions of the input: a rule that loses one is not applied
            before = runtime_fusions(model, ctx.provider)
        except OnnxCompressError as exc:
            log.debug("fuse: onnxruntime's fusions unknown (%s); rules not checked against them", exc)
            before = None
        for name, enabled, apply in rules:
            if not enabled:
                continue
            trial = _copy(model)
            counts = apply(trial)
            if not any(counts.values()):
                stats.update(counts)
                continue
            lost = lost_fusions(before, trial, ctx.provider)
            if lost:
                declined[name] = f"loses onnxruntime's fusions: {lost}"
                log.debug("fuse: rule %s declined: %s", name, declined[name])
                stats.update({k: 0 for k in counts})
                continue
            model.CopyFrom(trial)
            stats.update(counts)
        changed = any(v for v in stats.values())
        if changed:
            log.info("fuse: %s", ", ".join(f"{k} {v}" for k, v in stats.items() if v))
        stats["declined"] = declined
        stats["declined_matches"] = {rule: dict(c) for rule, c in declines.items() if c}
        return PassResult(model, changed, stats)


def fold_gate_residual(model: onnx.ModelProto, declines: Counter[str] | None = None) -> int:
    """Rewrite ``Add(x, Mul(x, g))`` (either operand order) as ``Mul(x, Add(g, 1))`` where
    g has one value per channel: its inferred shape is known, of rank ≥ 3, and 1 on every
    axis after the channel axis; the number rewritten. The Mul must be read by that Add
    alone and not be a graph output. A candidate that fails is counted in ``declines`` by
    reason."""
    g = model.graph
    producer, readers = _index(g)
    shapes = {v.name: v.type.tensor_type.shape for v in [*g.value_info, *g.input, *g.output]
              if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    dtypes = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]
              if v.type.HasField("tensor_type")}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)

    def per_channel(name: str) -> bool:
        sh = shapes.get(name)
        if sh is None or len(sh.dim) < 3:
            return False
        return all(d.HasField("dim_value") and d.dim_value == 1 for d in sh.dim[2:])

    def match(add: onnx.NodeProto, a: int, b: int) -> MatchResult | None:
        """``add.input[a] + Mul(add.input[a], gate)`` (None: not that pattern at all)."""
        x, m = add.input[a], add.input[b]
        mul = producer.get(m)
        if not _std(mul, "Mul") or x not in mul.input or id(mul) in drop:
            return None
        gate = mul.input[1] if mul.input[0] == x else mul.input[0]
        if readers.get(m) != 1:
            return MatchResult.fail("the Mul has other readers")
        if gate == x or not per_channel(gate):
            return MatchResult.fail("the gate has more than one value per channel")
        if per_channel(x):
            return MatchResult.fail("x itself is per channel (no full-size Add to save)")
        if dtypes.get(gate) not in floats:
            return MatchResult.fail("the gate's element type is unknown or not floating point")
        return MatchResult((x, gate, mul))

    fresh = fresh_namer(g)
    replace: dict[int, list[onnx.NodeProto]] = {}
    drop: set[int] = set()
    ones: dict[int, str] = {}  # the constant 1 per element type (the gate's)
    for add in g.node:
        if not _std(add, "Add") or len(add.input) != 2:
            continue
        results = [r for r in (match(add, 0, 1), match(add, 1, 0)) if r is not None]
        found = next((r for r in results if r.ok), None)
        if found is None:
            for r in results:
                _decline(declines, "gate_residual", add.name or add.output[0], r)
            continue
        x, gate, mul = found.value
        et = dtypes[gate]
        if et not in ones:
            ones[et] = fresh("gate_residual_one")
            g.initializer.append(helper.make_tensor(ones[et], et, [], [1.0]))
        g1 = fresh(f"{gate}_plus_one")
        name = add.name or add.output[0]
        replace[id(add)] = [helper.make_node("Add", [gate, ones[et]], [g1], name=f"{name}_gate_plus_one"),
                            helper.make_node("Mul", [x, g1], list(add.output), name=f"{name}_gated")]
        drop.add(id(mul))
    if replace:
        _splice(g, replace, drop)
    return len(replace)


def fuse_hardswish(model: onnx.ModelProto, declines: Counter[str] | None = None) -> int:
    """Fuse ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)`` (Div may be Mul by 1/6, and the
    Div may sit on the Clip instead) into one hard-swish; the number fused."""
    g = model.graph
    opset = default_opset(model) or 0
    inits = initializers(g)
    producer, readers = _index(g)

    def scalar(name: str) -> float | None:
        t = inits.get(name)
        if t is None or int(np.prod(t.dims)) != 1:
            return None
        return float(numpy_helper.to_array(t).ravel()[0])

    def sixth(n: onnx.NodeProto) -> str | None:
        """The input of ``n`` if n is ·/6 (Div by 6 or Mul by 1/6), else None."""
        if _std(n, "Div") and scalar(n.input[1]) == 6.0:
            return n.input[0]
        if _std(n, "Mul"):
            for a, b in ((0, 1), (1, 0)):
                v = scalar(n.input[b])
                if v is not None and abs(v - 1 / 6) <= 1e-7:
                    return n.input[a]
        return None

    def relu6_of_x_plus_3(name: str) -> tuple[str, list[onnx.NodeProto]] | None:
        """(x, [Clip, Add]) if ``name`` is Clip(Add(x, 3), 0, 6), each read once, else None."""
        clip = producer.get(name)
        if not _std(clip, "Clip") or readers.get(name) != 1 or clip_bounds(clip, inits) != (0.0, 6.0):
            return None
        add = producer.get(clip.input[0])
        if not _std(add, "Add") or readers.get(clip.input[0]) != 1:
            return None
        for a, b in ((0, 1), (1, 0)):
            if scalar(add.input[b]) == 3.0 and add.input[a] not in inits:
                return add.input[a], [clip, add]
        return None

    replace: dict[int, list[onnx.NodeProto]] = {}
    drop: set[int] = set()
    fresh = fresh_namer(g)
    for last in g.node:
        # form 1: (x · relu6(x+3)) / 6        form 2: x · (relu6(x+3) / 6)
        inner = sixth(last)
        found: tuple[str, list[onnx.NodeProto]] | None = None
        if inner is not None and _std(producer.get(inner), "Mul") and readers.get(inner) == 1:
            mul = producer[inner]
            for a, b in ((0, 1), (1, 0)):
                r6 = relu6_of_x_plus_3(mul.input[b])
                if r6 is not None and r6[0] == mul.input[a]:
                    found = (r6[0], [last, mul, *r6[1]])
                    break
        elif _std(last, "Mul"):
            for a, b in ((0, 1), (1, 0)):
                div = producer.get(last.input[b])
                r = sixth(div) if div is not None and readers.get(last.input[b]) == 1 else None
                r6 = relu6_of_x_plus_3(r) if r is not None else None
                if r6 is not None and r6[0] == last.input[a]:
                    found = (r6[0], [last, div, *r6[1]])
                    break
        if found is None:
            if inner is not None and _std(producer.get(inner), "Mul"):
                _decline(declines, "hardswish", last.name or last.output[0], MatchResult.fail(
                    "a product divided by 6 that is not x·clip(x + 3, 0, 6) with each inner tensor read once"))
            continue
        x, chain = found
        if any(id(n) in drop for n in chain):
            continue
        replace[id(last)] = _hardswish_nodes(x, last, opset, fresh)
        drop.update(id(n) for n in chain)
    if replace:
        _splice(g, replace, drop)
    return len(replace)


def _hardswish_nodes(x: str, last: onnx.NodeProto, opset: int, fresh: Callable[[str], str]) -> list[onnx.NodeProto]:
    """HardSwish(x) writing ``last``'s output (before opset 14: x · HardSigmoid(x))."""
    y = last.output[0]
    if opset >= 14:
        return [helper.make_node("HardSwish", [x], [y], name=f"{last.name or y}_hardswish")]
    hs = fresh(f"{y}_hardsigmoid")
    return [helper.make_node("HardSigmoid", [x], [hs], name=f"{last.name or y}_hardsigmoid", alpha=1.0 / 6.0, beta=0.5),
            helper.make_node("Mul", [x, hs], [y], name=f"{last.name or y}_hardswish")]
