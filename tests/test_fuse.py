"""fuse: spelled-out hard-swish chains fused; the same function up to rounding."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcompress.model import load_model, node_attr
from onnxcompress.passes.fuse import Fuse, FuseOptions
from onnxcompress.pipeline import PassContext
from onnxcompress.registry import build_pipeline

from .builders import fvi, make_model, run, tensor
from .conftest import shared_path



def _hardswish_model(form: str, opset: int) -> onnx.ModelProto:
    """x → Conv → hard-swish spelled out (``form``) → Conv: paddle2onnx's Div form, Mul by
    1/6, or the /6 on the Clip."""
    rng = np.random.default_rng(7)
    c = {n: numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
         (("three", 3.0), ("zero", 0.0), ("six", 6.0), ("sixth", 1 / 6))}
    clip = (helper.make_node("Clip", ["a", "zero", "six"], ["c"]) if opset >= 11
            else helper.make_node("Clip", ["a"], ["c"], min=0.0, max=6.0))
    head = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
            helper.make_node("Add", ["h", "three"], ["a"]), clip]
    tail = {"div": [helper.make_node("Mul", ["h", "c"], ["m"]), helper.make_node("Div", ["m", "six"], ["y"])],
            "mul_sixth": [helper.make_node("Mul", ["c", "h"], ["m"]), helper.make_node("Mul", ["m", "sixth"], ["y"])],
            "clip_div": [helper.make_node("Div", ["c", "six"], ["d"]), helper.make_node("Mul", ["h", "d"], ["y"])]}[form]
    nodes = head + tail + [helper.make_node("Conv", ["y", "w2"], ["out"])]
    inits = [tensor(rng, "w1", (8, 3, 3, 3), 1.5), tensor(rng, "w2", (4, 8, 1, 1), 0.5), *c.values()]
    return make_model(nodes, [fvi("x", [2, 3, 16, 16])], [fvi("out", [2, 4, 16, 16])], inits, opset=opset)


@pytest.mark.parametrize("form", ["div", "mul_sixth", "clip_div"])
@pytest.mark.parametrize("opset", [10, 13, 14])
def test_hardswish_fused(form: str, opset: int) -> None:
    m = _hardswish_model(form, opset)
    x = np.random.default_rng(8).standard_normal((2, 3, 16, 16)).astype(np.float32) * 2
    ref = run(m, {"x": x})[0]
    res = Fuse().run(m, PassContext())
    ops = Counter(n.op_type for n in res.model.graph.node)
    assert res.stats["hardswish_fused"] == 1 and ops["Div"] == ops["Clip"] == ops["Add"] == 0
    assert ops["HardSwish" if opset >= 14 else "HardSigmoid"] == 1
    onnx.checker.check_model(res.model)
    np.testing.assert_allclose(run(res.model, {"x": x})[0], ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()))


def test_hardswish_left_alone_when_an_inner_tensor_is_read_elsewhere() -> None:
    m = _hardswish_model("div", 13)
    m.graph.output.append(fvi("c", [2, 8, 16, 16]))  # the relu6 is also a graph output
    res = Fuse().run(m, PassContext())
    assert res.stats["hardswish_fused"] == 0 and any(n.op_type == "Div" for n in res.model.graph.node)
    assert list(res.stats["declined_matches"]["hardswish"].values()) == [1]  # one candidate, declined with why


@pytest.mark.shared
@pytest.mark.parametrize("name,fused,depthwise,gated,focus", [
    ("textline_cls", 18, 0, 0, 0), ("text_det", 24, 28, 8, 0), ("doc_orientation", 0, 0, 0, 0),
    ("captcha_det", 0, 0, 0, 1)])
def test_hardswish_on_real_exports_within_onnxruntimes_own_rounding(name: str, fused: int, depthwise: int,
                                                                     gated: int, focus: int) -> None:
    """Fusing changes rounding only: the output moves less than onnxruntime's own graph
    optimizations move the original (text_det: 1.2e-4 vs 1.1e-4 of the output range)."""
    orig = load_model(shared_path("models", f"{name}.onnx"))
    batch = orig.graph.input[0].type.tensor_type.shape.dim[0].dim_value or 2  # captcha_det's is fixed at 1
    data = {orig.graph.input[0].name: np.load(shared_path("data", f"{name}_eval.npz"))["x"][:batch]}
    m, _ = build_pipeline("canonicalize").run(orig)
    res = Fuse().run(m, PassContext())
    assert res.stats["hardswish_fused"] == fused and res.stats["gate_residual_folded"] == gated
    assert res.stats["affine_depthwise"] == depthwise and res.stats["focus_conv"] == focus
    ref, ort_opt, fused_out = run(orig, data)[0], run(orig, data, optimize=True)[0], run(res.model, data)[0]
    scale = float(np.abs(ref).max())
    assert np.abs(fused_out - ref).max() <= max(2 * np.abs(ort_opt - ref).max(), 1e-6 * scale)


def test_fuse_is_validated_with_a_rounding_tolerance() -> None:
    assert build_pipeline("canonicalize").rel_range == 1e-4
    fused = build_pipeline("canonicalize,fuse")
    assert fused.exact and fused.rel_range == 1e-2
    assert not build_pipeline("canonicalize,fuse,prune").exact


def test_affine_after_conv_folded() -> None:
    """PP-LCNetV3's learnable affine block: Conv → Mul(scalar) → Add(scalar) → Relu."""
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["h", "s"], ["hs"]), helper.make_node("Add", ["t", "hs"], ["ht"]),
             helper.make_node("Relu", ["ht"], ["y"])]
    inits = [tensor(rng, "w", (8, 3, 3, 3)), numpy_helper.from_array(np.array([1.7], np.float32), "s"),
             numpy_helper.from_array(np.array([-0.4], np.float32), "t")]
    m = make_model(nodes, [fvi("x", [2, 3, 8, 8])], [fvi("y", [2, 8, 8, 8])], inits)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref = run(m, {"x": x})[0]
    res = Fuse().run(m, PassContext())
    assert res.stats["affine_folded"] == 2 and [n.op_type for n in res.model.graph.node] == ["Conv", "Relu"]
    np.testing.assert_allclose(run(res.model, {"x": x})[0], ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()))


def test_an_affine_fold_that_does_not_apply_is_declined_with_its_reason() -> None:
    """Conv → Mul by a constant that varies along the rows ([1, 1, 8, 1]): not one value per
    channel, so it stays a Mul, and the stats say why."""
    rng = np.random.default_rng(10)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Mul", ["h", "s"], ["y"])]
    inits = [tensor(rng, "w", (8, 3, 3, 3)), tensor(rng, "s", (1, 1, 8, 1))]
    m = make_model(nodes, [fvi("x", [2, 3, 8, 8])], [fvi("y", [2, 8, 8, 8])], inits)
    res = Fuse().run(m, PassContext())
    assert res.stats["affine_folded"] == 0 and [n.op_type for n in res.model.graph.node] == ["Conv", "Mul"]
    assert res.stats["declined_matches"]["affine"] == {"the constant varies along an axis other than the channels": 1}


def test_a_rule_that_loses_an_onnxruntime_fusion_is_declined(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime fuses Conv + Relu into FusedConv; a rule after which it makes fewer of
    its fusions is left out, and the stats say which and why (here the count is faked
    after the affine fold, to check the mechanism on any onnxruntime build)."""
    import onnxcompress.passes.fuse as fuse_mod

    rng = np.random.default_rng(9)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["h", "s"], ["hs"]), helper.make_node("Relu", ["hs"], ["y"])]
    inits = [tensor(rng, "w", (8, 3, 3, 3)), numpy_helper.from_array(np.array([1.7], np.float32), "s")]
    m = make_model(nodes, [fvi("x", [2, 3, 8, 8])], [fvi("y", [2, 8, 8, 8])], inits)
    real = fuse_mod.runtime_fusions(m)
    assert real.get("com.microsoft:FusedConv", 0) == 0  # the Mul stands between the Conv and the Relu
    kept = Fuse().run(onnx.ModelProto.FromString(m.SerializeToString()), PassContext())
    assert kept.stats["affine_folded"] == 1 and kept.stats["declined"] == {}
    assert fuse_mod.runtime_fusions(kept.model).get("com.microsoft:FusedConv", 0) == 1  # folding gained one

    calls: list[int] = []

    def fewer(model: onnx.ModelProto, provider: str = "cpu") -> dict[str, int]:
        calls.append(len(model.graph.node))
        return {"LayerNormalization": 2 if len(model.graph.node) == 3 else 1}

    import onnxcompress.runtime as runtime_mod

    monkeypatch.setattr(fuse_mod, "runtime_fusions", fewer)
    monkeypatch.setattr(runtime_mod, "runtime_fusions", fewer)
    res = Fuse().run(m, PassContext())
    assert not res.modified and res.stats["affine_folded"] == 0
    assert res.stats["declined"] == {"affine": "loses onnxruntime's fusions: LayerNormalization 2 → 1"}
    assert [n.op_type for n in res.model.graph.node] == ["Conv", "Mul", "Relu"] and calls


def _affine_then_convs(consumer: str) -> onnx.ModelProto:
    """x → Conv → HardSwish → Mul(scalar) → Add(per channel) → ``consumer``: 'pointwise'
    (1×1 Conv), 'grouped' (unpadded 3×3, 2 groups) plus a second 1×1 reader, 'padded'
    (3×3 with pads) or 'other_reader' (1×1 Conv and a GlobalAveragePool)."""
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h0"], pads=[1, 1, 1, 1]),
             helper.make_node("HardSwish", ["h0"], ["h"]),
             helper.make_node("Mul", ["s", "h"], ["hs"]), helper.make_node("Add", ["hs", "t"], ["y"])]
    inits = [tensor(rng, "w1", (8, 3, 3, 3)), numpy_helper.from_array(np.array(1.7, np.float32), "s"),
             numpy_helper.from_array(rng.standard_normal((1, 8, 1, 1)).astype(np.float32), "t"),
             tensor(rng, "w2", (4, 8, 1, 1)), tensor(rng, "b2", (4,)), tensor(rng, "w3", (6, 4, 3, 3))]
    outs = [fvi("out", None)]
    if consumer == "pointwise":
        nodes.append(helper.make_node("Conv", ["y", "w2", "b2"], ["out"]))
    elif consumer == "grouped":
        nodes += [helper.make_node("Conv", ["y", "w3"], ["out"], group=2, pads=[0, 0, 0, 0]),
                  helper.make_node("Conv", ["y", "w2", "b2"], ["out2"])]
        outs.append(fvi("out2", None))
    elif consumer == "padded":
        nodes.append(helper.make_node("Conv", ["y", "w3"], ["out"], group=2, pads=[1, 1, 1, 1]))
    else:
        nodes += [helper.make_node("Conv", ["y", "w2", "b2"], ["out"]), helper.make_node("GlobalAveragePool", ["y"], ["out2"])]
        outs.append(fvi("out2", None))
    return make_model(nodes, [fvi("x", [2, 3, 10, 10])], outs, inits, opset=14)


@pytest.mark.parametrize("consumer,folded", [("pointwise", 2), ("grouped", 2), ("padded", 0), ("other_reader", 0)])
def test_affine_before_unpadded_convs_folded_into_them(consumer: str, folded: int) -> None:
    """A scale/shift after an activation goes into the Convs after it, W'[o,c] = a_c·W[o,c],
    b'_o = b_o + Σ W[o,c,…]·b_c, only where no Conv pads its input (padding would turn
    the shift's zeros into b) and nothing else reads it; elsewhere it becomes a depthwise
    1×1 Conv (HardSwish follows a Conv here)."""
    m = _affine_then_convs(consumer)
    rng = np.random.default_rng(12)
    xs = [rng.standard_normal((2, 3, 10, 10)).astype(np.float32) for _ in range(3)]
    refs = [run(m, {"x": x}) for x in xs]
    m = onnx.shape_inference.infer_shapes(m)
    res = Fuse().run(m, PassContext())
    assert res.stats["affine_folded_forward"] == folded
    assert res.stats["affine_depthwise"] == (0 if folded else 2)
    defined = {o for n in res.model.graph.node for o in n.output}
    assert all(vi.name in defined for vi in res.model.graph.value_info)  # no stale shapes of removed tensors
    if folded:
        assert {"hs", "y"}.isdisjoint(vi.name for vi in res.model.graph.value_info)
    left = Counter(n.op_type for n in res.model.graph.node)
    assert (left["Mul"], left["Add"]) == (0, 0)
    for x, ref in zip(xs, refs):
        for got, want in zip(run(res.model, {"x": x}), ref):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_convtranspose_bias_add_and_batchnorm_folded() -> None:
    """DB-head style: ConvTranspose (2 groups) → Add(per channel) → Mul(per channel) →
    BatchNormalization → Relu becomes ConvTranspose → Relu."""
    rng = np.random.default_rng(13)
    pos = lambda name, n: numpy_helper.from_array(rng.uniform(0.5, 1.5, n).astype(np.float32), name)  # noqa: E731
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["t"], group=2, strides=[2, 2]),
             helper.make_node("Add", ["t", "b"], ["tb"]), helper.make_node("Mul", ["tb", "s"], ["ts"]),
             helper.make_node("BatchNormalization", ["ts", "g", "beta", "mean", "var"], ["n"]),
             helper.make_node("Relu", ["n"], ["y"])]
    inits = [tensor(rng, "w", (4, 3, 2, 2)), tensor(rng, "b", (1, 6, 1, 1)), pos("s", (1, 6, 1, 1)), pos("g", 6),
             tensor(rng, "beta", (6,)), tensor(rng, "mean", (6,)), pos("var", 6)]
    m = make_model(nodes, [fvi("x", [2, 4, 5, 5])], [fvi("y", None)], inits)
    xs = [rng.standard_normal((2, 4, 5, 5)).astype(np.float32) for _ in range(3)]
    refs = [run(m, {"x": x})[0] for x in xs]
    res = Fuse().run(m, PassContext())
    assert res.stats["affine_folded"] == 2 and res.stats["batchnorm_folded"] == 1
    assert [n.op_type for n in res.model.graph.node] == ["ConvTranspose", "Relu"]
    for x, ref in zip(xs, refs):
        np.testing.assert_allclose(run(res.model, {"x": x})[0], ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def _gated_residual_model(gate_shape: str, extra_reader: bool = False) -> onnx.ModelProto:
    """x → Conv → h; y = h + h·g → Conv, with g a squeeze-excite gate ([N, C, 1, 1]) or a
    full-size one (``gate_shape`` "full")."""
    rng = np.random.default_rng(17)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1])]
    if gate_shape == "se":
        nodes += [helper.make_node("GlobalAveragePool", ["h"], ["p"]), helper.make_node("Conv", ["p", "w2"], ["z"])]
    else:
        nodes += [helper.make_node("Conv", ["h", "w2"], ["z"])]
    nodes += [helper.make_node("HardSigmoid", ["z"], ["g"], alpha=0.2, beta=0.5),
              helper.make_node("Mul", ["h", "g"], ["m"]), helper.make_node("Add", ["m", "h"], ["y"]),
              helper.make_node("Conv", ["y", "w3"], ["out"])]
    outputs = [fvi("out", None)] + ([fvi("m", None)] if extra_reader else [])
    inits = [tensor(rng, "w1", (8, 3, 3, 3)), tensor(rng, "w2", (8, 8, 1, 1)), tensor(rng, "w3", (4, 8, 1, 1))]
    return onnx.shape_inference.infer_shapes(make_model(nodes, [fvi("x", [2, 3, 12, 12])], outputs, inits))


def test_gated_residual_folded_into_one_mul() -> None:
    m = _gated_residual_model("se")
    xs = [np.random.default_rng(s).standard_normal((2, 3, 12, 12)).astype(np.float32) for s in range(3)]
    refs = [run(m, {"x": x})[0] for x in xs]
    res = Fuse().run(m, PassContext())
    assert res.modified and res.stats["gate_residual_folded"] == 1
    ops = Counter(n.op_type for n in res.model.graph.node)
    assert ops["Mul"] == 1 and ops["Add"] == 1  # the Add now runs on the [2, 8, 1, 1] gate
    gate_add = next(n for n in res.model.graph.node if n.op_type == "Add")
    assert "g" in gate_add.input
    onnx.checker.check_model(res.model)
    for x, ref in zip(xs, refs):
        np.testing.assert_allclose(run(res.model, {"x": x})[0], ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()))
    off = Fuse(Fuse.Options(gate_residual=False)).run(_gated_residual_model("se"), PassContext())  # rule off
    assert off.stats.get("gate_residual_folded", 0) == 0
    assert sum(n.op_type == "Add" and "g" not in n.input for n in off.model.graph.node) == 1  # the full-size Add


@pytest.mark.parametrize("gate_shape,extra_reader", [("full", False), ("se", True)])
def test_gated_residual_left_alone(gate_shape: str, extra_reader: bool) -> None:
    """A full-size gate saves nothing; a Mul read elsewhere must stay."""
    res = Fuse().run(_gated_residual_model(gate_shape, extra_reader), PassContext())
    assert res.stats["gate_residual_folded"] == 0
    assert [n.op_type for n in res.model.graph.node][-3:] == ["Mul", "Add", "Conv"]
    why = "the Mul has other readers" if extra_reader else "the gate has more than one value per channel"
    assert res.stats["declined_matches"]["gate_residual"] == {why: 1}  # declined with its reason


def test_gated_residual_constant_takes_the_gate_element_type() -> None:
    """A float16 graph gets a float16 1 (strict type checking would refuse a float32 one)."""
    f16 = onnx.TensorProto.FLOAT16
    nodes = [helper.make_node("Mul", ["x", "g"], ["m"]), helper.make_node("Add", ["x", "m"], ["y"])]
    m = make_model(nodes, [helper.make_tensor_value_info("x", f16, [1, 4, 6, 6]),
                           helper.make_tensor_value_info("g", f16, [1, 4, 1, 1])],
                   [helper.make_tensor_value_info("y", f16, [1, 4, 6, 6])])
    res = Fuse().run(onnx.shape_inference.infer_shapes(m), PassContext())
    assert res.stats["gate_residual_folded"] == 1
    one = next(t for t in res.model.graph.initializer if t.name.startswith("gate_residual_one"))
    assert one.data_type == f16
    onnx.shape_inference.infer_shapes(res.model, check_type=True, strict_mode=True)
    x = np.random.default_rng(5).standard_normal((1, 4, 6, 6)).astype(np.float16)
    gate = np.random.default_rng(6).random((1, 4, 1, 1)).astype(np.float16)
    from onnx.reference import ReferenceEvaluator
    got = ReferenceEvaluator(res.model).run(None, {"x": x, "g": gate})[0]
    np.testing.assert_allclose(got.astype(np.float32), (x + x * gate).astype(np.float32), rtol=2e-3, atol=2e-3)


def _affine_after_activation(producer: str, const_shape: tuple[int, ...], spatial: int = 8) -> onnx.ModelProto:
    """x → Conv → Relu (or Resize, ``producer``) → ·a + b → padded 3×3 depthwise Conv: the
    scale/shift cannot be folded into a Conv on either side."""
    rng = np.random.default_rng(31)
    first = ([helper.make_node("Conv", ["x", "w1"], ["c"]), helper.make_node("Relu", ["c"], ["h"])]
             if producer == "relu" else [helper.make_node("Resize", ["x", "", "scales"], ["h"], mode="nearest")])
    a = numpy_helper.from_array(rng.uniform(0.5, 2.0, const_shape).astype(np.float32), "a")
    b = numpy_helper.from_array(rng.standard_normal(const_shape).astype(np.float32), "b")
    nodes = [*first, helper.make_node("Mul", ["h", "a"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"]),
             helper.make_node("Conv", ["y", "w2"], ["out"], group=4, pads=[1, 1, 1, 1])]
    inits = [tensor(rng, "w1", (4, 4, 1, 1)), tensor(rng, "w2", (4, 1, 3, 3)), a, b,
             numpy_helper.from_array(np.array([1, 1, 1, 1], np.float32), "scales")]
    m = make_model(nodes, [fvi("x", [2, 4, spatial, spatial])], [fvi("out", None)], inits)
    return onnx.shape_inference.infer_shapes(m)


@pytest.mark.parametrize("const_shape", [(1,), (1, 4, 1, 1), (4, 1, 1)])
def test_affine_after_activation_becomes_depthwise_conv(const_shape: tuple[int, ...]) -> None:
    m = _affine_after_activation("relu", const_shape)
    xs = [np.random.default_rng(s).standard_normal((2, 4, 8, 8)).astype(np.float32) for s in range(3)]
    refs = [run(m, {"x": x})[0] for x in xs]
    res = Fuse().run(m, PassContext())
    assert res.stats["affine_depthwise"] == 2 and res.stats["affine_folded_forward"] == 0
    assert [n.op_type for n in res.model.graph.node] == ["Conv", "Relu", "Conv", "Conv"]
    dw = res.model.graph.node[2]
    assert dw.input[0] == "h" and dict((a.name, helper.get_attribute_value(a)) for a in dw.attribute)["group"] == 4
    onnx.checker.check_model(res.model)
    for x, ref in zip(xs, refs):
        np.testing.assert_allclose(run(res.model, {"x": x})[0], ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()))


@pytest.mark.parametrize("producer,spatial", [("resize", 8), ("relu", 1)])
def test_affine_left_alone_off_a_conv_or_on_a_per_channel_tensor(producer: str, spatial: int) -> None:
    """Not after a Conv's activation (no blocked layout to keep), or on [N, C, 1, 1] (no gain)."""
    res = Fuse().run(_affine_after_activation(producer, (1,), spatial), PassContext())
    assert res.stats["affine_depthwise"] == 0
    assert [n.op_type for n in res.model.graph.node][-3:] == ["Mul", "Add", "Conv"]


FOCUS = [(0, 0), (1, 0), (0, 1), (1, 1)]  # YOLOX's Concat order: top-left, bottom-left, top-right, bottom-right


def _focus_model(offsets: list[tuple[int, int]] = FOCUS, one_slice: bool = False, cols_first: bool = False,
                 stride: int = 1, extra_reader: bool = False, negative_axes: bool = False,
                 dilation: int = 1, pads: tuple[int, int, int, int] = (1, 1, 1, 1)) -> onnx.ModelProto:
    """x [N, 3, 16, 12] → x[:, :, a::2, b::2] for each (a, b) in ``offsets`` (two Slices, or
    one over both axes for the first branch with ``one_slice``; axes −2, −1 with
    ``negative_axes``) → Concat → Conv 3×3 (``pads`` top, left, bottom, right)."""
    neg = 4 if negative_axes else 0
    rng = np.random.default_rng(23)
    big = np.iinfo(np.int64).max
    inits = [tensor(rng, "w", (6, 12, 3, 3)), tensor(rng, "bias", (6,))]

    def const(name: str, vals: list[int]) -> str:
        if name not in {t.name for t in inits}:
            inits.append(numpy_helper.from_array(np.array(vals, np.int64), name))
        return name

    nodes, parts = [], []
    for k, (a, b) in enumerate(offsets):
        if one_slice and k == 0:
            nodes.append(helper.make_node("Slice", ["x", const(f"s{a}{b}", [a, b]), const("ee", [big, big]),
                                                    const("a23", [2 - neg, 3 - neg]), const("t22", [2, 2])], [f"p{k}"]))
        else:
            first, second = ((3 - neg, b), (2 - neg, a)) if cols_first else ((2 - neg, a), (3 - neg, b))
            nodes.append(helper.make_node("Slice", ["x", const(f"s{first[1]}", [first[1]]), const("e", [big]),
                                                    const(f"ax{first[0]}", [first[0]]), const("t2", [2])], [f"h{k}"]))
            nodes.append(helper.make_node("Slice", [f"h{k}", const(f"s{second[1]}", [second[1]]), const("e", [big]),
                                                    const(f"ax{second[0]}", [second[0]]), const("t2", [2])], [f"p{k}"]))
        parts.append(f"p{k}")
    nodes += [helper.make_node("Concat", parts, ["cat"], axis=1),
              helper.make_node("Conv", ["cat", "w", "bias"], ["y"], pads=list(pads), strides=[stride, stride],
                               dilations=[dilation, dilation])]
    out_h = (8 + pads[0] + pads[2] - 2 * dilation - 1) // stride + 1
    out_w = (6 + pads[1] + pads[3] - 2 * dilation - 1) // stride + 1
    outputs = [fvi("y", ["N", 6, out_h, out_w])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["cat"], ["r"]))
        outputs.append(fvi("r", ["N", 12, 8, 6]))
    return make_model(nodes, [fvi("x", ["N", 3, 16, 12])], outputs, inits)


@pytest.mark.parametrize("one_slice,cols_first,stride,order,negative_axes,dilation,pads,focus_conv", [
    (False, False, 1, FOCUS, False, 1, (1, 1, 1, 1), False), (True, False, 1, FOCUS, False, 1, (1, 1, 1, 1), False),
    (False, True, 2, FOCUS, False, 1, (1, 1, 1, 1), False),
    (False, False, 1, FOCUS[::-1], False, 1, (1, 1, 1, 1), False),
    (True, True, 1, FOCUS, True, 1, (1, 1, 1, 1), False),
    (False, False, 1, FOCUS, False, 2, (2, 2, 2, 2), True),  # dilated: no 2k×2k kernel, SpaceToDepth instead
])
def test_focus_becomes_space_to_depth(one_slice: bool, cols_first: bool, stride: int, order: list[tuple[int, int]],
                                      negative_axes: bool, dilation: int, pads: tuple[int, int, int, int],
                                      focus_conv: bool) -> None:
    m = _focus_model(order, one_slice, cols_first, stride, negative_axes=negative_axes, dilation=dilation, pads=pads)
    xs = [np.random.default_rng(s).standard_normal((2, 3, 16, 12)).astype(np.float32) for s in range(3)]
    refs = [run(m, {"x": x})[0] for x in xs]
    res = Fuse(FuseOptions(focus_conv=focus_conv)).run(m, PassContext())
    assert res.modified and res.stats["space_to_depth"] == 1 and res.stats["focus_conv"] == 0
    ops = Counter(n.op_type for n in res.model.graph.node)
    assert ops == Counter({"SpaceToDepth": 1, "Conv": 1})
    assert {t.name for t in res.model.graph.initializer} == {"bias", "w_space_to_depth"}  # Slice constants gone
    onnx.checker.check_model(res.model)
    onnx.shape_inference.infer_shapes(res.model, strict_mode=True)
    for x, ref in zip(xs, refs):
        np.testing.assert_allclose(run(res.model, {"x": x})[0], ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()))


@pytest.mark.parametrize("one_slice,cols_first,stride,order,pads", [
    (False, False, 1, FOCUS, (1, 1, 1, 1)), (True, True, 1, FOCUS[::-1], (1, 1, 1, 1)),
    (False, False, 2, FOCUS, (1, 1, 1, 1)), (False, True, 1, [FOCUS[k] for k in (2, 0, 3, 1)], (0, 1, 2, 0)),
])
def test_focus_goes_into_the_conv(one_slice: bool, cols_first: bool, stride: int, order: list[tuple[int, int]],
                                  pads: tuple[int, int, int, int]) -> None:
    """Concat of the four sub-grids → k×k Conv (strides s, pads p) becomes one 2k×2k Conv
    (strides 2s, pads 2p) on x: no Slice, Concat or SpaceToDepth left, same outputs."""
    m = _focus_model(order, one_slice, cols_first, stride, pads=pads)
    xs = [np.random.default_rng(s).standard_normal((2, 3, 16, 12)).astype(np.float32) for s in range(3)]
    refs = [run(m, {"x": x})[0] for x in xs]
    res = Fuse().run(m, PassContext())
    assert res.modified and res.stats["focus_conv"] == 1 and res.stats["space_to_depth"] == 0
    (conv,) = res.model.graph.node
    assert conv.op_type == "Conv" and conv.input[0] == "x"
    assert node_attr(conv, "kernel_shape") == [6, 6] and node_attr(conv, "strides") == [2 * stride] * 2
    assert node_attr(conv, "pads") == [2 * p for p in pads]
    assert {t.name for t in res.model.graph.initializer} == {"bias", "w_strided"}
    onnx.checker.check_model(res.model)
    onnx.shape_inference.infer_shapes(res.model, strict_mode=True)
    for x, ref in zip(xs, refs):
        out = run(res.model, {"x": x})[0]
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()))


@pytest.mark.parametrize("offsets,extra_reader", [
    (FOCUS[:3] + [(0, 0)], False),  # one sub-grid twice, one missing
    (FOCUS, True),  # the Concat is read by a Relu too
])
def test_focus_left_alone(offsets: list[tuple[int, int]], extra_reader: bool) -> None:
    res = Fuse().run(_focus_model(offsets, extra_reader=extra_reader), PassContext())
    assert res.stats["space_to_depth"] == 0
    assert Counter(n.op_type for n in res.model.graph.node)["Slice"] == 8
    why = ("read by something other than group-1 Convs with constant 4-D weights" if extra_reader
           else "a sub-grid appears twice")
    assert res.stats["declined_matches"]["space_to_depth"] == {why: 1}


def _sequence_linear(rank: int = 3, bias_shape: tuple[int, ...] = (6,), extra_reader: bool = False,
                     transpose: bool = False) -> onnx.ModelProto:
    """x [N, T, 4] (or [N, 4, T] through a Transpose) → MatMul by W [4, 6] → Add b → Relu,
    with batch and sequence length dynamic (``rank`` 2: x [N, 4])."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["xt" if transpose else "x", "w"], ["mm"], name="linear"),
             helper.make_node("Add", ["mm", "b"], ["z"]), helper.make_node("Relu", ["z"], ["y"])]
    if transpose:
        nodes.insert(0, helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]))
    outputs = [fvi("y", ["N", "T", 6][3 - rank:] if rank == 2 else ["N", "T", 6])]
    if extra_reader:
        outputs.append(fvi("mm", ["N", "T", 6]))
    x_shape = {2: ["N", 4], 3: ["N", 4, "T"] if transpose else ["N", "T", 4]}[rank]
    return make_model(nodes, [fvi("x", x_shape)], outputs,
                      [tensor(rng, "w", (4, 6)), tensor(rng, "b", bias_shape)])


def test_linear_bias_on_a_transformer_block_is_exact() -> None:
    """The MatMul + bias Adds of a transformer block on [N, T, d] tokens (Q, K, V, output
    projection, the MLP's second layer, the classifier) become Reshape → Gemm → Reshape:
    the same products and sums, so equal in onnxruntime with its graph optimizations off
    to float32 rounding, at three batch sizes. The MLP's first layer is left alone:
    onnxruntime fuses its bias with the GELU after it (BiasGelu). So are the attention's
    MatMuls of two activations; each with its reason."""
    from .builders import hybrid_recognizer

    model = hybrid_recognizer(ctc=False)
    canon, _ = build_pipeline("canonicalize").run(model)
    res = Fuse(FuseOptions()).run(copy.deepcopy(canon), PassContext())
    assert res.stats["linear_bias_fused"] == 6 and res.stats["declined"] == {}
    assert res.stats["declined_matches"]["linear_bias"] == {
        "the weight is not a constant 2-D float32/float64 matrix": 2,
        "loses onnxruntime's fusions: com.microsoft:BiasGelu 1 → 0": 1}
    ops = Counter(n.op_type for n in res.model.graph.node)
    assert ops["Gemm"] == 6 and ops["MatMul"] == 3
    assert next(n for n in res.model.graph.node if n.op_type == "MatMul" and n.input[1] == "fc1_w")
    onnx.checker.check_model(res.model, full_check=True)
    for seed, n in ((0, 1), (1, 3), (2, 5)):
        x = np.random.default_rng(seed).standard_normal((n, 3, 8, 16)).astype(np.float32)
        ref, new = run(model, {"x": x})[0], run(res.model, {"x": x})[0]
        assert new.shape == ref.shape
        assert np.abs(new - ref).max() <= 1e-5 * max(np.ptp(ref), 1e-6)


def test_linear_bias_keeps_batch_and_sequence_length_dynamic() -> None:
    """The output shape is read from x at run time: one rewritten model runs at any N and T,
    a bias of shape [1, 1, 6] included, and a MatMul after a Transpose (which onnxruntime
    fuses into FusedMatMul) is rewritten too: a fused product traded for a fused product
    loses no onnxruntime fusion."""
    for kw in ({}, {"bias_shape": (1, 1, 6)}, {"transpose": True}):
        model = _sequence_linear(**kw)
        res = Fuse(FuseOptions()).run(copy.deepcopy(model), PassContext())
        assert res.stats["linear_bias_fused"] == 1 and res.stats["declined"] == {}, (kw, res.stats)
        for n, t in ((1, 5), (3, 9)):
            shape = (n, 4, t) if kw.get("transpose") else (n, t, 4)
            x = np.random.default_rng(n + t).standard_normal(shape).astype(np.float32)
            ref, new = run(model, {"x": x})[0], run(res.model, {"x": x})[0]
            assert new.shape == ref.shape == (n, t, 6)
            np.testing.assert_allclose(new, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw,reason", [
    ({"rank": 2}, "the input is not a sequence (rank < 3: onnxruntime fuses a 2-D bias itself)"),
    ({"extra_reader": True}, "the product is not read by one Add alone"),
    ({"bias_shape": (5, 6)}, "the added term is not one bias value per output feature"),
])
def test_linear_bias_left_alone(kw: dict[str, Any], reason: str) -> None:
    model = _sequence_linear(**kw)
    res = Fuse(FuseOptions()).run(copy.deepcopy(model), PassContext())
    assert res.stats["linear_bias_fused"] == 0
    assert res.stats["declined_matches"]["linear_bias"] == {reason: 1}
    assert [n.op_type for n in res.model.graph.node] == [n.op_type for n in model.graph.node]


def test_linear_bias_reads_ranks_onnx_cannot_infer_from_a_runtime_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """paddle2onnx computes Reshape targets at run time, where onnx's shape inference
    leaves tensors without a shape: their ranks come from the core's probe (one
    onnxruntime run on zeros); where that fails too, the candidate is declined as unknown."""
    import onnxcompress.shapes as shapes_mod
    from onnxcompress.errors import RuntimeModelError

    model = _sequence_linear(transpose=True)
    del model.graph.value_info[:]
    monkeypatch.setattr(shapes_mod.onnx.shape_inference, "infer_shapes", lambda m, **kw: m)
    res = Fuse(FuseOptions()).run(copy.deepcopy(model), PassContext())
    assert res.stats["linear_bias_fused"] == 1
    x = np.random.default_rng(0).standard_normal((2, 4, 7)).astype(np.float32)
    np.testing.assert_allclose(run(res.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-6, atol=1e-6)

    def no_probe(*args: Any, **kw: Any) -> None:
        raise RuntimeModelError("shape probe: onnxruntime cannot run it")

    monkeypatch.setattr(shapes_mod, "runtime_shapes", no_probe)
    res = Fuse(FuseOptions()).run(copy.deepcopy(model), PassContext())
    assert res.stats["linear_bias_fused"] == 0
    assert res.stats["declined_matches"]["linear_bias"] == {"the input's rank is unknown": 1}
