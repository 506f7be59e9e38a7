"""int8 pass: exact preparation rewrites, QDQ placement that onnxruntime fuses, weight
quantization, accuracy on fixtures, opset upgrade (and its fallback), the latency guard."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxcompress as oc
from onnxcompress import folds
import onnxcompress.passes.int8 as int8_mod
from onnxcompress.data import open_data
from onnxcompress.errors import OptionError
from onnxcompress.passes.int8 import Int8, Int8Options, agreement, prepare, qdq, ranges, write
from onnxcompress.pipeline import PassContext
from onnxcompress.registry import build_pipeline

from .builders import fvi, make_model, run, tensor
from .conftest import FIXTURES, shared_path


def _canon(path) -> onnx.ModelProto:
    m, _ = build_pipeline("canonicalize").run(oc.load_model(path))
    return m


def _ctx(model: onnx.ModelProto, name: str) -> PassContext:
    return PassContext(calibration=open_data(FIXTURES / f"{name}_calib.npz", model, batch_size=16))


def _val(name: str) -> np.ndarray:
    return np.load(FIXTURES / f"{name}_val.npz")


def _feeds(model: onnx.ModelProto, arrays) -> dict[str, np.ndarray]:
    return {i.name: arrays[i.name] for i in model.graph.input if i.name in arrays}


def conv_bn_affine_model(seed: int = 0) -> onnx.ModelProto:
    """Conv → BN → Relu; Conv → Mul(per-channel) → Add(scalar) → Div(6)."""
    rng = np.random.default_rng(seed)
    c = 8
    inits = [tensor(rng, "w1", (c, 3, 3, 3)), tensor(rng, "b1", (c,)),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "g"),
             tensor(rng, "beta", (c,)), tensor(rng, "mean", (c,)),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "var"),
             tensor(rng, "w2", (c, c, 1, 1)),
             numpy_helper.from_array(rng.uniform(0.5, 2, (1, c, 1, 1)).astype(np.float32), "a"),
             numpy_helper.from_array(np.array([0.3], np.float32), "sh"),
             numpy_helper.from_array(np.array(6.0, np.float32), "six")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2"),
             helper.make_node("Mul", ["c2", "a"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "sh"], ["s"], name="add"),
             helper.make_node("Div", ["s", "six"], ["y"], name="div")]
    return make_model(nodes, [fvi("x", [2, 3, 10, 10])], [fvi("y", [2, c, 10, 10])], inits)


def test_prepare_rewrites_are_exact() -> None:
    m = conv_bn_affine_model()
    x = np.random.default_rng(1).standard_normal((2, 3, 10, 10)).astype(np.float32)
    ref = run(m, {"x": x})[0]
    p = copy.deepcopy(m)
    assert folds.fold_batchnorm(p) == 1
    assert folds.fold_affine(p) == 2
    assert prepare.div_to_mul(p) == 1
    ops = [n.op_type for n in p.graph.node]
    assert ops == ["Conv", "Relu", "Conv", "Mul"], ops
    np.testing.assert_allclose(run(p, {"x": x})[0], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_plan_fuses_relu_and_quantizes_all_convs() -> None:
    m = conv_bn_affine_model()
    folds.fold_batchnorm(m)
    prepare.name_nodes(m)
    m = onnx.shape_inference.infer_shapes(m)
    p = qdq.plan(m)
    assert p.fused == {"relu": "conv1"} and p.inner == {"bn"}  # Relu folds into conv1's requantize
    assert {"conv1", "conv2", "mul", "add"} <= p.nodes and "div" not in p.nodes
    assert {"x", "r", "s"} <= p.tensors and not {"bn", "y"} & p.tensors


def test_weight_quantization_is_per_channel_within_half_a_step() -> None:
    w = np.random.default_rng(2).standard_normal((6, 4, 3, 3)).astype(np.float32)
    w[2] *= 100  # one wide channel must not coarsen the others
    q, s = write.quantize_weight(w, 0)
    assert q.dtype == np.int8 and s.shape == (6,) and np.abs(q).max() <= 127
    err = np.abs(q.astype(np.float32) * s.reshape(-1, 1, 1, 1) - w)
    assert np.all(err <= s.reshape(-1, 1, 1, 1) / 2 + 1e-7)
    assert s[0] < s[2] / 20
    qt, st = write.quantize_weight(w, None)
    assert st.shape == () and np.abs(qt.astype(np.float32) * st - w).max() <= st / 2 + 1e-6


def test_act_params_cover_the_range_with_zero_exact() -> None:
    s, z = write.act_params(-1.0, 3.0, "uint8")
    assert z == round(1.0 / s) and abs(255 * s - 4.0) < 1e-6
    assert write.act_params(0.0, 6.0, "uint8")[1] == 0  # non-negative: zero point at the bottom (Relu fusion)
    s8, z8 = write.act_params(-1.0, 3.0, "int8")
    assert z8 == 0 and abs(s8 * 127 - 3.0) < 1e-6


@pytest.mark.parametrize("name", ["resnet_block", "mobilenet_se", "concat_split"])
def test_fixture_quantizes_fuses_and_agrees(name: str) -> None:
    m = _canon(FIXTURES / f"{name}.onnx")
    res = Int8(Int8Options(guard=False)).run(copy.deepcopy(m), _ctx(m, name))
    assert res.modified and res.stats["decision"] == "quantized"
    q = res.model
    onnx.checker.check_model(q, full_check=True)
    fused = write.fused_ops(q)
    convs = sum(n.op_type == "Conv" for n in m.graph.node)
    assert fused.get("QLinearConv", 0) == convs, fused  # every Conv runs as an integer kernel
    assert "Conv" not in fused and "FusedConv" not in fused
    val = _val(name)
    feeds = _feeds(m, val)
    acc = agreement([run(m, feeds, optimize=True)], [run(q, feeds, optimize=True)])
    assert acc["cosine"] > 0.99, acc
    assert acc["top1"] >= 0.9, acc  # random weights: near-tied classes flip at cosine 0.9999


def test_agreement_sees_a_damaged_table_column_and_4d_class_scores() -> None:
    rng = np.random.default_rng(3)
    table = rng.standard_normal((2, 500, 6)) * np.array([300, 300, 50, 50, 1, 1])  # boxes dwarf the scores
    hurt = table.copy()
    hurt[:, :, 4] = rng.standard_normal((2, 500))  # objectness replaced by noise
    acc = agreement([[table]], [[hurt]])
    assert acc["cosine"] > 0.999 and acc["column_cosine"] < 0.2, acc  # reported beside the drop
    assert acc["drop"] == pytest.approx(1 - acc["cosine"])
    held = agreement([[table]], [[hurt]], columns=True)  # the pass's default: the column counts
    assert held["drop"] == pytest.approx(1 - acc["column_cosine"]) and held["drop"] > 0.8
    assert "column_cosine" not in agreement([[table.reshape(2, -1, 1)]], [[hurt.reshape(2, -1, 1)]])  # not a table
    scores = rng.standard_normal((8, 10, 1, 1))
    flipped = scores.copy()
    flipped[0, :, 0, 0] = -flipped[0, :, 0, 0]
    assert agreement([[scores]], [[flipped]])["top1"] == pytest.approx(7 / 8)



def test_agreement_judges_a_one_value_output_over_the_samples() -> None:
    """A score per sample: per-sample cosines are all 1 while a positive drops from 0.9 to 0.2."""
    a = np.full((8, 1), 0.02, np.float32)
    a[3, 0] = 0.9
    b = a.copy()
    b[3, 0] = 0.2
    acc = agreement([[a[:4]], [a[4:]]], [[b[:4]], [b[4:]]])
    assert acc["cosine"] < 0.9 and acc["drop"] > 0.1
    assert agreement([[a]], [[a]])["drop"] == pytest.approx(0.0, abs=1e-12)


def test_agreement_takes_each_sample_of_a_time_major_output() -> None:
    """[T, N, C] with sample 2 of 3 negated: one cosine per sample, (1 + 1 − 1) / 3, where
    axis 0 read as the samples would mix all three in every step."""
    a = np.random.default_rng(0).standard_normal((8, 3, 5))
    b = a.copy()
    b[:, 2] *= -1
    assert agreement([[a]], [[b]], samples=[3])["cosine"] == pytest.approx(1 / 3)
    assert agreement([[a]], [[b]])["cosine"] != pytest.approx(1 / 3)


def test_agreement_keeps_an_outputs_sample_axis_from_its_first_batch() -> None:
    """A time-major output whose second batch happens to hold as many samples as steps
    ([8, 8, C]) is still read along axis 1, as validation reads it."""
    rng = np.random.default_rng(0)
    a1, a2 = rng.standard_normal((8, 3, 5)), rng.standard_normal((8, 8, 5))
    b2 = a2.copy()
    b2[:, 2] *= -1  # sample 2 of the second batch
    got = agreement([[a1], [a2]], [[a1.copy()], [b2]], samples=[3, 8])["cosine"]
    assert got == pytest.approx((3 + 7 - 1) / 11)

def test_opset11_is_upgraded_for_per_channel_weights() -> None:
    m = _canon(FIXTURES / "resnet_block.onnx")
    assert prepare.opset_of(m) == 11
    res = Int8(Int8Options(guard=False)).run(copy.deepcopy(m), _ctx(m, "resnet_block"))
    assert prepare.opset_of(res.model) == 13 and "upgraded 11" in res.stats["opset"]
    axes = [n for n in res.model.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert axes  # per-channel weight DQs


def test_failed_upgrade_falls_back_to_per_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _canon(FIXTURES / "resnet_block.onnx")

    def boom(model, target=13):  # noqa: ANN001, ANN202
        raise RuntimeError("converter cannot handle this model")

    monkeypatch.setattr(prepare, "upgrade_opset", boom)
    res = Int8(Int8Options(guard=False)).run(copy.deepcopy(m), _ctx(m, "resnet_block"))
    assert prepare.opset_of(res.model) == 11 and "per tensor" in res.stats["opset"]
    assert res.stats["per_channel"] is False
    assert not any(a.name == "axis" for n in res.model.graph.node for a in n.attribute if n.op_type == "DequantizeLinear")
    x = _val("resnet_block")
    run(res.model, _feeds(m, x))  # loads and runs at opset 11


def test_guard_keeps_float_when_int8_is_slower(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxcompress.validate as validate

    monkeypatch.setattr(validate, "measure_latency", lambda models, feeds, **kw: [1.0, 1.5])
    m = _canon(FIXTURES / "mobilenet_se.onnx")
    res = Int8(Int8Options()).run(copy.deepcopy(m), _ctx(m, "mobilenet_se"))
    assert not res.modified and res.stats["decision"] == "kept float"
    assert res.model.SerializeToString() == m.SerializeToString()
    trials = res.stats["latency"]["trials"]
    assert trials and all(t["ratio"] == 1.5 for t in trials)
    # every batch size for the first variant; the later ones stop at the first that is not faster
    sizes = [f"b{b}" for b in res.stats["latency"]["batches"]]
    assert len(sizes) == 2 and len(trials) > 1
    assert all(k in trials[0] for k in sizes)
    assert all(sizes[0] in t and sizes[1] not in t for t in trials[1:])


def test_guard_keeps_int8_when_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxcompress.validate as validate

    monkeypatch.setattr(validate, "measure_latency", lambda models, feeds, **kw: [2.0, 1.0])
    m = _canon(FIXTURES / "resnet_block.onnx")
    res = Int8(Int8Options()).run(copy.deepcopy(m), _ctx(m, "resnet_block"))
    assert res.modified and res.stats["latency"]["ratio"] == 0.5


@pytest.mark.parametrize("margin,kept", [(0.03, True), (0.2, False)])
def test_guard_margin_is_the_gain_int8_must_show(monkeypatch: pytest.MonkeyPatch, margin: float, kept: bool) -> None:
    """int8 timed at 0.9× fp32: kept with the default ``experimental.guard_margin`` (3%),
    kept float where the margin asks for 20%."""
    import onnxcompress.validate as validate

    monkeypatch.setattr(validate, "measure_latency", lambda models, feeds, **kw: [2.0, 1.8])
    m = _canon(FIXTURES / "resnet_block.onnx")
    res = Int8(Int8Options(guard_margin=margin)).run(copy.deepcopy(m), _ctx(m, "resnet_block"))
    assert res.modified is kept and res.stats["latency"]["ratio"] == pytest.approx(0.9)


@pytest.mark.parametrize("float_tail", [True, False])
def test_float_tail_keeps_the_nodes_after_the_last_conv_float(float_tail: bool) -> None:
    """Conv → Relu → Conv → Sigmoid → output: the Sigmoid comes after the last compute layer.
    With ``experimental.float_tail`` (the default) it reads a dequantized tensor and writes
    float; without, its output is quantized too (QLinearSigmoid in onnxruntime)."""
    rng = np.random.default_rng(3)
    inits = [tensor(rng, "w1", (8, 3, 3, 3)), tensor(rng, "w2", (4, 8, 1, 1))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("Sigmoid", ["c2"], ["y"], name="sigmoid")]
    m = make_model(nodes, [fvi("x", ["N", 3, 12, 12])], [fvi("y", ["N", 4, 12, 12])], inits)
    assert ranges.tail_nodes(m) == {"sigmoid"}
    x = rng.standard_normal((16, 3, 12, 12)).astype(np.float32)
    res = Int8(Int8Options(guard=False, max_drop=0, float_tail=float_tail)).run(
        copy.deepcopy(m), PassContext(calibration=[{"x": x}]))
    sigmoid = next(n for n in res.model.graph.node if n.op_type == "Sigmoid")
    readers = [n.op_type for n in res.model.graph.node if sigmoid.output[0] in n.input]
    assert (readers == ["QuantizeLinear"]) is (not float_tail)
    assert float(np.abs(run(res.model, {"x": x[:4]})[0] - run(m, {"x": x[:4]})[0]).mean()) < 0.02


@pytest.mark.parametrize("confirm_ratio", [0.5, 1.2])
def test_guard_confirms_the_choice_over_a_longer_window(monkeypatch: pytest.MonkeyPatch, confirm_ratio: float) -> None:
    """Every trial is timed over 0.6 s; the chosen variant once more over
    ``guard_confirm_seconds``, and a confirmation that is not faster keeps float."""
    import onnxcompress.validate as validate

    windows: list[float] = []

    def timing(models, feeds, **kw):  # type: ignore[no-untyped-def]
        windows.append(kw["min_seconds"])
        return [2.0, 2.0 * confirm_ratio] if kw["min_seconds"] == 3.5 else [2.0, 1.0]

    monkeypatch.setattr(validate, "measure_latency", timing)
    m = _canon(FIXTURES / "resnet_block.onnx")
    res = Int8(Int8Options(guard_batches="1", guard_confirm_seconds=3.5)).run(copy.deepcopy(m), _ctx(m, "resnet_block"))
    assert windows[-1] == 3.5 and set(windows[:-1]) == {0.6}
    assert res.stats["latency"]["trials"][-1]["variant"] == "the chosen variant, timed again"
    assert res.modified == (confirm_ratio < 0.97)
    assert res.stats["latency"]["ratio"] == max(0.5, confirm_ratio)
    with pytest.raises(OptionError, match="guard_confirm_seconds"):
        Int8(Int8Options(guard_confirm_seconds=0)).run(copy.deepcopy(m), _ctx(m, "resnet_block"))


def test_exclude_by_op_type_name_and_regex() -> None:
    m = _canon(FIXTURES / "resnet_block.onnx")
    base = Int8(Int8Options(guard=False, max_drop=0)).run(copy.deepcopy(m), _ctx(m, "resnet_block"))
    res = Int8(Int8Options(guard=False, max_drop=0, exclude="Add")).run(copy.deepcopy(m), _ctx(m, "resnet_block"))
    assert "Add" in base.stats["quantized_ops"] and "Add" not in res.stats["quantized_ops"]
    with pytest.raises(OptionError, match="not a valid regex"):
        Int8(Int8Options(exclude="conv[")).run(copy.deepcopy(m), _ctx(m, "resnet_block"))


def test_needs_calibration_data() -> None:
    m = _canon(FIXTURES / "resnet_block.onnx")
    with pytest.raises(OptionError, match="needs calibration data"):
        Int8(Int8Options()).run(m, PassContext())


def test_concat_of_mismatched_ranges_stays_float() -> None:
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["box"], name="box_conv"),
             helper.make_node("Conv", ["x", "w2"], ["logit"], name="cls_conv"),
             helper.make_node("Sigmoid", ["logit"], ["prob"], name="sig"),
             helper.make_node("Concat", ["box", "prob"], ["y"], name="cat", axis=1)]
    m = make_model(nodes, [fvi("x", [1, 4, 6, 6])], [fvi("y", [1, 4, 6, 6])],
                   [tensor(rng, "w1", (2, 4, 1, 1)), tensor(rng, "w2", (2, 4, 1, 1))])
    m = onnx.shape_inference.infer_shapes(m)
    ranges = {"x": (-1.0, 1.0), "box": (-50.0, 80.0), "logit": (-5.0, 5.0), "prob": (0.0, 1.0), "y": (-50.0, 80.0)}
    p = qdq.plan(m, None, ranges)
    assert "cat" not in p.nodes and "mixes ranges" in p.declined["cat"]
    assert "cat" in qdq.plan(m, None, {**ranges, "prob": (0.0, 60.0)}).nodes


def _masked_attention() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """Single-head attention with an additive mask bias of 0 / −inf (as PyTorch exports
    scaled dot-product attention), and seeded batches where some keys are masked."""
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
             helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
             helper.make_node("Equal", ["mask", "zero"], ["masked"], name="eq"),
             helper.make_node("Where", ["masked", "neg_inf", "zero"], ["bias2d"], name="where"),
             helper.make_node("Unsqueeze", ["bias2d", "axis1"], ["bias"], name="unsq"),
             helper.make_node("Add", ["scores", "bias"], ["biased"], name="mask_add"),
             helper.make_node("Softmax", ["biased"], ["probs"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["probs", "v"], ["y"], name="pv")]
    inits = [tensor(rng, "wq", (16, 16), 0.3), tensor(rng, "wk", (16, 16), 0.3), tensor(rng, "wv", (16, 16), 0.3),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(-np.inf, np.float32), "neg_inf"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    m = make_model(nodes, [fvi("x", ["N", 8, 16]), fvi("mask", ["N", 8])], [fvi("y", ["N", 8, 16])], inits)
    m = onnx.shape_inference.infer_shapes(m)
    batches = []
    for _ in range(4):
        mask = np.ones((4, 8), np.float32)
        mask[:, 5:] = 0  # padded keys
        batches.append({"x": rng.standard_normal((4, 8, 16)).astype(np.float32), "mask": mask})
    return m, batches


def test_a_tensor_holding_inf_gets_no_qdq_pair() -> None:
    """An attention mask's −inf, clamped by a Q/DQ pair to the range's edge, would give
    the padded keys weight; the Add that reads it stays float, with the reason."""
    m, batches = _masked_attention()
    res = Int8(Int8Options(guard=False, max_drop=1.0)).run(copy.deepcopy(m), PassContext(calibration=batches))
    assert res.modified
    reasons = res.stats["float_reasons"]
    assert any("'bias' holds ±inf or NaN" in r for r in reasons), reasons
    quantized = {n.input[0].removesuffix("__float") for n in res.model.graph.node if n.op_type == "QuantizeLinear"}
    assert {"bias", "biased", "bias2d"}.isdisjoint(quantized) and "q" in quantized
    feeds = batches[0]
    a, b = run(m, feeds)[0], run(res.model, feeds)[0]
    assert np.isfinite(b).all()
    cos = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos > 0.99


def test_textline_opset11_quantizes_and_loads() -> None:
    path = shared_path("models", "textline_cls.onnx")
    data = shared_path("data", "textline_cls_calib.npz")
    m = _canon(path)
    assert prepare.opset_of(m) == 11
    ctx = PassContext(calibration=open_data(data, m, batch_size=16))
    res = Int8(Int8Options(guard=False)).run(copy.deepcopy(m), ctx)
    assert res.modified and prepare.opset_of(res.model) == 13
    ev = np.load(shared_path("data", "textline_cls_eval.npz"))
    x = ev["x"][:64]
    a = run(m, {m.graph.input[0].name: x}, optimize=True)[0]
    b = run(res.model, {m.graph.input[0].name: x}, optimize=True)[0]
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.98
    assert "QLinearConv" in write.fused_ops(res.model)


def _hard_activations(seed: int) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """HardSwish → HardSigmoid(0.3, 0.4), an input and its output."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("HardSwish", ["x"], ["h"], name="hs"),
             helper.make_node("HardSigmoid", ["h"], ["y"], name="hsig", alpha=0.3, beta=0.4)]
    m = make_model(nodes, [fvi("x", [2, 3, 5, 5])], [fvi("y", [2, 3, 5, 5])], opset=14)
    x = (rng.standard_normal((2, 3, 5, 5)) * 4).astype(np.float32)
    return m, x, run(m, {"x": x})[0]


def test_hard_activation_decomposition_is_exact() -> None:
    m, x, ref = _hard_activations(4)
    d = copy.deepcopy(m)
    assert prepare.decompose_hard_activations(d) == 2
    assert {n.op_type for n in d.graph.node} == {"Mul", "Add", "Clip"}
    np.testing.assert_allclose(run(d, {"x": x})[0], ref, rtol=1e-6, atol=1e-6)


def test_channel_noise_to_signal() -> None:
    from onnxcompress.passes.int8.calibration import StreamingHistogram

    h = StreamingHistogram()
    x = np.ones((4, 2, 8, 8), np.float32)
    x[:, 1] *= 100.0  # a loud channel next to a quiet one
    h.update(x)
    h.update_channels(x)
    # step 1: the quiet channel (power 1) is buried at 1/12, the loud one not at all
    assert h.noise_to_signal(1.0) == pytest.approx((1 / 12 + 1 / 12 / 1e4) / 2)
    assert h.noise_to_signal(100.0) == pytest.approx((1.0 + 1 / 12) / 2)


def test_bias_correction_never_lowers_agreement() -> None:
    m = _canon(FIXTURES / "mobilenet_se.onnx")
    base = Int8(Int8Options(guard=False, max_drop=0)).run(copy.deepcopy(m), _ctx(m, "mobilenet_se"))
    res = Int8(Int8Options(guard=False, max_drop=0, bias_correction=True)).run(copy.deepcopy(m), _ctx(m, "mobilenet_se"))
    steps = res.stats["accuracy"]["steps"]
    assert steps[-1].get("bias_corrected", 0) > 0
    before = base.stats["accuracy"]["steps"][0]["drop"]
    final = min(s["drop"] for s in steps)
    assert final <= before


def test_accuracy_control_floats_prefixes_first_within_max_float() -> None:
    m = _canon(FIXTURES / "mobilenet_se.onnx")
    opts = dict(guard=False, max_drop=1e-6, bias_correction=False, head_correction=False)
    res = Int8(Int8Options(max_float=0.5, **opts)).run(copy.deepcopy(m), _ctx(m, "mobilenet_se"))
    acc = res.stats["accuracy"]
    steps = acc["steps"]
    assert not acc["met"]
    quantized = steps[0]
    prefixes = [s for s in steps if "float_prefix" in s]
    assert prefixes, steps
    sizes = [s["float_nodes"] for s in prefixes]
    assert sizes == sorted(sizes) and sizes[0] > 0
    # every prefix tried stays within max_float of the quantized nodes
    res0 = Int8(Int8Options(max_float=0.0, **opts)).run(copy.deepcopy(m), _ctx(m, "mobilenet_se"))
    assert not any("float_prefix" in s or "float_tensors" in s for s in res0.stats["accuracy"]["steps"])
    assert max(sizes) <= 0.5 * res0.stats["quantized_nodes"]
    assert res.stats["float_reasons"]["excluded"] <= 0.5 * res0.stats["quantized_nodes"]
    # a step is kept only when it improves on the best so far, and the result is the best kept
    best = quantized["drop"]
    for s in steps[1:]:
        if s.get("kept"):
            assert s["drop"] < best
            best = s["drop"]
    assert best < quantized["drop"]
    assert float(res.stats["summary"].split("agreement drop ")[1].split()[0].rstrip(",")) == pytest.approx(best, abs=1e-4)


def test_float_hard_activations_are_put_back_whole() -> None:
    """decompose → recompose is the identity where no part is quantized, and leaves the
    quantized ones decomposed."""
    m, x, ref = _hard_activations(5)
    d = copy.deepcopy(m)
    acts: list[prepare.HardActivation] = []
    assert prepare.decompose_hard_activations(d, acts) == 2
    assert [a.node.op_type for a in acts] == ["HardSwish", "HardSigmoid"]
    assert all(p in {n.name for n in d.graph.node} for a in acts for p in a.parts)
    half = copy.deepcopy(d)
    assert prepare.recompose_hard_activations(d, acts, set()) == 2
    assert [n.op_type for n in d.graph.node] == ["HardSwish", "HardSigmoid"]
    assert not d.graph.initializer  # the decomposition's constants went with it
    np.testing.assert_allclose(run(d, {"x": x})[0], ref, rtol=1e-6, atol=1e-6)
    # one part of the HardSwish "quantized": it stays decomposed, the HardSigmoid does not
    assert prepare.recompose_hard_activations(half, acts, {acts[0].parts[2]}) == 1
    assert sorted(n.op_type for n in half.graph.node) == ["Add", "Clip", "HardSigmoid", "Mul", "Mul"]
    np.testing.assert_allclose(run(half, {"x": x})[0], ref, rtol=1e-6, atol=1e-6)


def test_int8_keeps_excluded_hard_swish_as_one_node() -> None:
    m = _canon(FIXTURES / "mobilenet_se.onnx")
    if not any(n.op_type in ("HardSwish", "HardSigmoid") for n in m.graph.node):
        pytest.skip("fixture has no hard activation")
    hard = [n.name for n in m.graph.node if n.op_type in ("HardSwish", "HardSigmoid")]
    spec = ",".join(f"{h}_.*" for h in hard)
    res = Int8(Int8Options(guard=False, max_drop=0, exclude=spec)).run(copy.deepcopy(m), _ctx(m, "mobilenet_se"))
    names = {n.name for n in res.model.graph.node}
    assert set(hard) <= names
    assert not any(n.endswith(("_mul_alpha", "_add_beta", "_clip", "_mul_x")) for n in names)
    assert "QLinearConv" in write.fused_ops(res.model)


def _derived_model() -> onnx.ModelProto:
    """x → Conv → Sigmoid; Conv → Mul(0.25) → MaxPool; Concat(sigmoid, pooled)."""
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c1"], ["s"], name="sig"),
             helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c2", "quarter"], ["m"], name="scale"),
             helper.make_node("MaxPool", ["m"], ["p"], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["s", "p"], ["cat"], name="cat", axis=1),
             helper.make_node("Conv", ["cat", "w3"], ["y"], name="conv3")]
    inits = [tensor(rng, "w1", (4, 3, 3, 3)), tensor(rng, "w2", (4, 3, 3, 3)), tensor(rng, "w3", (2, 8, 1, 1)),
             numpy_helper.from_array(np.array(0.25, np.float32), "quarter")]
    m = make_model(nodes, [fvi("x", ["N", 3, 8, 8])], [fvi("y", ["N", 2, 8, 8])], inits)
    return onnx.shape_inference.infer_shapes(m)


def test_derived_ranges_follow_their_sources_and_are_not_binned() -> None:
    m = _derived_model()
    d = ranges.derived_tensors(m)
    assert {t: (v.kind, v.sources) for t, v in d.items()} == {
        "s": ("sigmoid", ("c1",)), "m": ("scale", ("c2",)), "p": ("same", ("m",)), "cat": ("hull", ("s", "p"))}
    assert d["m"].k == 0.25
    widest = qdq.plan(m)
    assert {"s", "m", "p", "cat"} <= widest.tensors
    assert ranges.calibrated_tensors(widest.tensors, d) == ["c1", "c2", "x", "y"]  # the rest follows
    found = {"x": (0.0, 1.0), "c1": (-2.0, 3.0), "c2": (-4.0, 8.0)}
    seen = {"x": (0.0, 1.0), "c1": (-2.5, 3.5), "c2": (-4.0, 9.0)}
    ranges.resolve_ranges(found, d, seen)
    np.testing.assert_allclose(found["s"], (1 / (1 + np.exp(2.5)), 1 / (1 + np.exp(-3.5))), rtol=1e-12)  # of c1's seen
    assert found["m"] == (-1.0, 2.0) and found["p"] == (-1.0, 2.0)
    assert found["cat"] == (-1.0, 2.0)
    kept = {"c2": (-4.0, 8.0), "m": (-3.0, 3.0)}  # a tensor with its own range keeps it
    ranges.resolve_ranges(kept, d, seen)
    assert kept["m"] == (-3.0, 3.0) and kept["p"] == (-1.0, 2.25)  # cut to m's seen values (c2's ÷ 4)
    # quantization ranges include 0; a source is cut to the values seen before mapping
    neg = {"c2": (-20.0, 0.0)}
    ranges.resolve_ranges(neg, d, {"c2": (-24.0, -1.6)})
    assert neg["m"] == (-5.0, -0.4)


@pytest.mark.parametrize("floated", [set(), {"pool"}, {"cat"}, {"sig"}, {"scale", "pool"}])
def test_int8_with_derived_ranges_agrees_in_every_placement(floated: set[str]) -> None:
    """Whatever is float, every planned tensor gets a range from the binned ones, and
    the quantized model agrees with the float one (cosine > 0.999 on seeded inputs)."""
    m = _derived_model()
    rng = np.random.default_rng(5)
    calib = rng.uniform(0, 1, (32, 3, 8, 8)).astype(np.float32)
    ctx = PassContext(calibration=open_data([{"x": calib[i : i + 8]} for i in range(0, 32, 8)], m))
    p = Int8(Int8Options(guard=False, max_drop=0, exclude=",".join(sorted(floated))))
    res = p.run(copy.deepcopy(m), ctx)
    assert res.stats["calibration"]["tensors"] == 4  # x, c1, c2, y: the rest is derived
    ops = write.fused_ops(res.model)
    assert ops.get("QLinearConv", 0) == 3
    x = rng.uniform(0, 1, (4, 3, 8, 8)).astype(np.float32)
    a, b = run(m, {"x": x})[0], run(res.model, {"x": x})[0]
    cos = float(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos > 0.999, cos


def test_a_fused_activation_goes_float_with_its_producer() -> None:
    m = conv_bn_affine_model()
    x = np.random.default_rng(2).standard_normal((2, 3, 10, 10)).astype(np.float32)
    ctx = PassContext(calibration=open_data([{"x": x}], m))
    p = Int8(Int8Options(guard=False, max_drop=0))
    state = p._prepare(m, ctx, p.options, {})
    state.widest = qdq.plan(state.model, state.allowed)
    relu = next(n.name for n in state.model.graph.node if n.op_type == "Relu")
    assert relu in state.widest.fused  # fused into conv1: its input is never binned
    from onnxcompress.passes.int8.calibration import collect_histograms
    names = ranges.calibrated_tensors(state.widest.tensors, state.derived)
    assert not set(names) & state.widest.inner
    state.hists = collect_histograms(state.model, names, iter([{"x": np.ones((2, 3, 10, 10), np.float32)}]))
    _, plan = p._build(state, p.options, "minmax", {relu})
    assert relu not in plan.nodes and state.widest.fused[relu] not in plan.nodes


def test_derivation_never_adds_a_tensor_to_bin() -> None:
    """HardSwish's x + 3, clip(·, 0, 6) and · 1/6 follow from x (binned anyway), and so
    does x · clip(x + 3, 0, 6), through x's histogram pushed forward; a fused Relu's output
    keeps its own histogram instead of following the hidden Conv output."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["h"], name="conv2"),
             helper.make_node("Add", ["h", "three"], ["a"], name="add3"),
             helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="clip"),
             helper.make_node("Mul", ["h", "c"], ["m"], name="mulx"),
             helper.make_node("Mul", ["m", "sixth"], ["hs"], name="div6"),
             helper.make_node("Conv", ["hs", "w3"], ["y"], name="conv3")]
    consts = [numpy_helper.from_array(np.array(v, np.float32), k)
              for k, v in (("three", 3.0), ("zero", 0.0), ("six", 6.0), ("sixth", 1 / 6))]
    m = make_model(nodes, [fvi("x", ["N", 3, 6, 6])], [fvi("y", ["N", 2, 6, 6])],
                   [tensor(rng, "w1", (4, 3, 1, 1)), tensor(rng, "w2", (4, 4, 1, 1)), tensor(rng, "w3", (2, 4, 1, 1)),
                    *consts])
    m = onnx.shape_inference.infer_shapes(m)
    d = ranges.derived_tensors(m)
    assert d["a"].kind == "shift" and d["a"].k == 3.0 and d["c"].bounds == (0.0, 6.0)
    assert d["r"].kind == "clamp" and d["hs"].kind == "scale"
    widest = qdq.plan(m)
    assert "relu" in widest.fused and "clip" in widest.fused
    assert d["m"].kind == "product" and d["m"].sources == ("h",)
    names = ranges.calibrated_tensors(widest.tensors, d)
    assert names == ["h", "r", "x", "y"]
    pushed = ranges.pushed_forward(d, names)
    assert list(pushed) == ["m"] and pushed["m"][0] == "h"
    v = np.linspace(-5, 5, 41)
    np.testing.assert_allclose(pushed["m"][1](v), v * np.clip(v + 3, 0, 6))
    assert ranges.pushed_forward(d, names + ["m"]) == {}  # binned itself: not pushed
    lo, hi = d["m"].apply([(-5.0, 4.0)])
    assert lo == pytest.approx(-2.25, abs=1e-3) and hi == pytest.approx(24.0)  # min at x = −1.5
    found = {"h": (-5.0, 4.0), "m": (-0.4, 20.0), "r": (0.0, 2.0), "x": (0.0, 1.0), "y": (-1.0, 1.0)}
    ranges.resolve_ranges(found, d, {t: r for t, r in found.items()})
    assert found["c"] == (0.0, 6.0) and found["a"] == (-2.0, 7.0)
    np.testing.assert_allclose(found["hs"], (-0.4 / 6, 20.0 / 6))


@pytest.mark.parametrize("all_quantized", [1.1, 1.5])
def test_guard_tries_float_regions_only_when_int8_is_close(monkeypatch: pytest.MonkeyPatch,
                                                          all_quantized: float) -> None:
    """Scripted timings: floating the depthwise convs or the data movement wins 10%, anything
    else 5%. Near break-even (1.1× fp32) the guard goes on to float regions; at 1.5× it
    stops after the culprits and the report says why."""
    import onnxcompress.validate as validate
    from onnxcompress.passes.int8.options import GUARD_REGIONS_UNDER

    def timing(models, feeds, **kw):  # type: ignore[no-untyped-def]
        label = kw["labels"][1]
        gain = 1.0 if "all quantized" in label else 0.9 if ("depthwise" in label or "movement" in label) else 0.95
        return [1.0, all_quantized * gain]

    monkeypatch.setattr(validate, "measure_latency", timing)
    m = _canon(FIXTURES / "mobilenet_se.onnx")
    res = Int8(Int8Options()).run(copy.deepcopy(m), _ctx(m, "mobilenet_se"))
    assert not res.modified
    lat = res.stats["latency"]
    regions = [t for t in lat["trials"] if t["variant"].startswith("region of")]
    close = all_quantized * 0.9 < GUARD_REGIONS_UNDER
    assert bool(regions) is close
    assert ("regions" in lat) is (not close)
    assert lat["trials"][1]["variant"] == "depthwise convs float" and lat["ratio"] == pytest.approx(all_quantized * 0.9)


def _spread_concat_model() -> onnx.ModelProto:
    """x → two Convs whose outputs differ ~8× in range → Concat → Conv: the Concat mixes
    ranges by more than concat_spread (4) and less than guard_concat_spread (16)."""
    rng = np.random.default_rng(21)
    w2 = numpy_helper.from_array((rng.standard_normal((4, 4, 1, 1)) * 8).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv_a"),
             helper.make_node("Conv", ["x", "w2"], ["b"], name="conv_b"),
             helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
             helper.make_node("Conv", ["cat", "w3"], ["y"], name="head", pads=[1, 1, 1, 1])]
    m = make_model(nodes, [fvi("x", [None, 4, 8, 8])], [fvi("y", None)],
                   [tensor(rng, "w1", (4, 4, 1, 1), 1.0), w2, tensor(rng, "w3", (4, 8, 3, 3), 0.3)])
    return onnx.shape_inference.infer_shapes(m)


@pytest.mark.parametrize("spread,head_ms,kept", [(16.0, 0.5, True), (16.0, 1.0, False), (0.0, 0.5, False)])
def test_guard_quantizes_a_mixed_concat_only_when_it_pays(monkeypatch: pytest.MonkeyPatch, spread: float,
                                                           head_ms: float, kept: bool) -> None:
    """Scripted timings: the int8 model takes 1.0 with the Concat float, ``head_ms`` with it
    quantized; the variant is kept only when enabled and faster by the guard margin."""
    import onnxcompress.validate as validate
    from onnxcompress.data import IterableSource, input_specs

    def timing(models, feeds, **kw):  # type: ignore[no-untyped-def]
        g = models[1].graph
        head = next(n for n in g.node if n.name == "head")
        quantized_cat = any(n.op_type == "DequantizeLinear" and n.output[0] == head.input[0] for n in g.node)
        return [2.0, head_ms if quantized_cat else 1.0]

    monkeypatch.setattr(validate, "measure_latency", timing)
    m = _spread_concat_model()
    rng = np.random.default_rng(22)
    data = [{"x": rng.standard_normal((4, 4, 8, 8)).astype(np.float32)} for _ in range(4)]
    ctx = PassContext(calibration=IterableSource(data, input_specs(m)))
    res = Int8(Int8Options(max_drop=0, guard_concat_spread=spread, guard_batches="1")).run(copy.deepcopy(m), ctx)
    assert res.modified
    variants = [t["variant"] for t in res.stats["latency"]["trials"]]
    assert ("Concats spread up to 16x quantized" in variants) == (spread > 0)
    assert ("Concat" in res.stats["quantized_ops"]) == kept
    assert res.stats["latency"]["ratio"] == (0.25 if kept else 0.5)


def test_pass_reports_pushed_forward_products() -> None:
    """mobilenet_se's four HardSwish products are pushed forward, not binned, and the
    report says how many."""
    m = _canon(FIXTURES / "mobilenet_se.onnx")
    res = Int8(Int8Options(guard=False, max_drop=0)).run(copy.deepcopy(m), _ctx(m, "mobilenet_se"))
    cal = res.stats["calibration"]
    assert cal["pushed_forward"] == 4 and cal["tensors"] > 0
    assert any(n.op_type == "QuantizeLinear" for n in res.model.graph.node)


def test_accuracy_control_returns_the_slack_to_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in agreement where only the nodes of the 6th of 16 graph-order segments cost
    accuracy: the prefix 6/16 in float meets max_drop with room to spare, and the next
    phase returns the float segments with MACs in them to int8 one at a time (most MACs
    first) while agreement holds, so only the costly segment stays float."""
    m = _canon(FIXTURES / "mobilenet_se.onnx")
    seen: dict[str, set[str]] = {}
    real_build = Int8._build

    def build(self, state, opts, method, floated, drop=None, spread=None):  # type: ignore[no-untyped-def]
        q, p = real_build(self, state, opts, method, floated, drop, spread)
        if "hot" not in seen:  # the first build quantizes everything it may
            order = [n.name for n in state.model.graph.node if n.name in p.nodes and n.name not in p.fused]
            cuts = int8_mod.prefix_cuts(state.model.graph, order, p)
            seen["hot"] = set(order[cuts[5]:cuts[6]])
        seen["quantized"] = set(p.nodes)
        return q, p

    def fake_agreement(ref, new, columns=False, samples=None):  # type: ignore[no-untyped-def]
        d = 0.01 * len(seen["hot"] & seen["quantized"]) + 1e-6 * len(seen["quantized"])
        return {"cosine": 1.0 - d, "top1": 1.0, "drop": d}

    monkeypatch.setattr(Int8, "_build", build)
    monkeypatch.setattr(int8_mod, "agreement", fake_agreement)
    opts = dict(guard=False, max_drop=0.005, bias_correction=False, head_correction=False)
    res = Int8(Int8Options(**opts)).run(copy.deepcopy(m), _ctx(m, "mobilenet_se"))
    assert seen["hot"]
    acc = res.stats["accuracy"]
    assert acc["met"]
    prefixes = [s for s in acc["steps"] if "float_prefix" in s]
    assert prefixes[-1]["float_prefix"] == "6/16" and prefixes[-1]["kept"]
    back = [s for s in acc["steps"] if "unfloat_segment" in s]
    assert back and all(s["macs"] > 0 for s in back)
    assert [s["macs"] for s in back] == sorted((s["macs"] for s in back), reverse=True)
    assert all(s["kept"] == (s["unfloat_segment"] != "6/16") for s in back), back
    assert any(s["kept"] for s in back)
    floated = res.stats["float_reasons"]["excluded"]
    without = Int8(Int8Options(unfloat=False, **opts)).run(copy.deepcopy(m), _ctx(m, "mobilenet_se"))
    assert not any("unfloat_segment" in s for s in without.stats["accuracy"]["steps"])
    assert floated < without.stats["float_reasons"]["excluded"]
    assert res.stats["quantized_nodes"] > without.stats["quantized_nodes"]


def test_prefix_cuts_move_to_where_one_tensor_crosses() -> None:
    """A stem node and 16 residual blocks (u = f(h), v = g(u), h' = v + h): one tensor
    crosses after the stem and after each Add, two anywhere else. Each sixteenth's cut
    (49·j // 16: 3, 6, 9, …, all inside a block) moves by at most half a sixteenth to a
    one-tensor position, and the cuts never go back."""
    nodes = [helper.make_node("Relu", ["x"], ["h0"], name="stem")]
    for i in range(16):
        h = f"h{i}"
        nodes += [helper.make_node("Relu", [h], [f"u{i}"], name=f"u{i}"),
                  helper.make_node("Neg", [f"u{i}"], [f"v{i}"], name=f"v{i}"),
                  helper.make_node("Add", [f"v{i}", h], [f"h{i + 1}"], name=f"add{i}")]
    m = make_model(nodes, [fvi("x", [1, 4])], [fvi("h16", [1, 4])])
    order = [n.name for n in m.graph.node]
    plan = qdq.Plan(nodes=set(order))
    cuts = int8_mod.prefix_cuts(m.graph, order, plan)
    assert len(cuts) == 17 and cuts[0] == 0 and cuts[-1] == len(order) == 49
    assert cuts == sorted(cuts)
    for j, k in enumerate(cuts[1:-1], 1):
        assert k % 3 == 1, cuts  # after the stem (1) or an Add (4, 7, …): one tensor crosses
        assert abs(k - 49 * j // 16) <= 1
    assert cuts[1:-1] != [49 * j // 16 for j in range(1, 16)]  # the plain cuts were ragged


def test_min_float_prefix_floats_prefixes_even_when_agreement_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """With agreement already within max_drop fully quantized, the control floats nothing;
    with ``min_float_prefix=2`` it floats the second prefix cut all the same (what the
    default pipeline asks for when held-out samples reject the first answer) and reports
    it; the option is range-checked."""
    m = _canon(FIXTURES / "mobilenet_se.onnx")
    monkeypatch.setattr(int8_mod, "agreement", lambda ref, new, columns=False, samples=None: {"cosine": 0.999, "drop": 0.001})
    opts = dict(guard=False, max_drop=0.005, bias_correction=False, head_correction=False, unfloat=True)
    plain = Int8(Int8Options(**opts)).run(copy.deepcopy(m), _ctx(m, "mobilenet_se"))
    assert plain.stats["accuracy"]["float_prefix"] == 0
    assert not any("float_prefix" in s for s in plain.stats["accuracy"]["steps"])
    res = Int8(Int8Options(min_float_prefix=2, **opts)).run(copy.deepcopy(m), _ctx(m, "mobilenet_se"))
    acc = res.stats["accuracy"]
    tried = [s for s in acc["steps"] if "float_prefix" in s]
    assert acc["float_prefix"] == 2 and [s["rung"] for s in tried] == [2] and tried[0]["kept"]
    assert res.outcome == int8_mod.AccuracyControl(met=True, drop=0.001, float_prefix=2)  # what the search reads
    assert not any("unfloat_segment" in s for s in acc["steps"])  # the floor is not handed back
    assert res.stats["quantized_nodes"] < plain.stats["quantized_nodes"]
    with pytest.raises(OptionError, match="min_float_prefix"):
        Int8(Int8Options(min_float_prefix=17, **opts)).run(copy.deepcopy(m), _ctx(m, "mobilenet_se"))


def _conv_chain(seed: int = 0, depth: int = 5, c: int = 16) -> onnx.ModelProto:
    """x → (Conv 3×3 → Relu) × depth, seeded weights."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for i in range(depth):
        cin = 3 if i == 0 else c
        inits += [numpy_helper.from_array((rng.standard_normal((c, cin, 3, 3)) / np.sqrt(cin * 9) * 1.6)
                                          .astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}" if i < depth - 1 else "y"], name=f"relu{i}")]
        x = f"r{i}"
    return make_model(nodes, [fvi("x", [1, 3, 12, 12])], [fvi("y", [1, c, 12, 12])], inits)


def test_refit_lowers_the_error_int8_layers_pass_on(tmp_path) -> None:
    from onnxcompress.passes.int8.refit import refit_convs

    m = _conv_chain()
    rng = np.random.default_rng(1)
    fit = [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(24)]
    held = [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(8)]
    np.savez(tmp_path / "fit.npz", x=np.concatenate([b["x"] for b in fit]))
    ctx = PassContext(calibration=open_data(tmp_path / "fit.npz", m, batch_size=1))
    opts = Int8Options(guard=False, max_drop=0, bias_correction=False, head_correction=False, gptq=False)
    q = Int8(opts).run(copy.deepcopy(m), ctx).model
    q2 = copy.deepcopy(q)
    assert refit_convs(m, q2, fit) == 5

    def err(model: onnx.ModelProto, data) -> float:
        return float(np.mean([np.mean((run(model, b)[0] - run(m, b)[0]) ** 2) for b in data]))

    before, after = err(q, held), err(q2, held)
    assert after < 0.9 * before, (before, after)  # 0.77× here; a refit that changes nothing: 1.0
    # only weights, scales and biases change: the same nodes, the same Q/DQ of activations
    assert [n.op_type for n in q.graph.node] == [n.op_type for n in q2.graph.node]


def test_refit_skips_a_layer_whose_float_bias_it_cannot_read(tmp_path) -> None:
    from onnxcompress.passes.int8.refit import refit_convs

    m = _conv_chain()
    rng = np.random.default_rng(1)
    fit = [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(8)]
    np.savez(tmp_path / "fit.npz", x=np.concatenate([b["x"] for b in fit]))
    ctx = PassContext(calibration=open_data(tmp_path / "fit.npz", m, batch_size=1))
    q = Int8(Int8Options(guard=False, max_drop=0)).run(copy.deepcopy(m), ctx).model
    f = copy.deepcopy(m)  # conv0's bias from a Constant node: refit cannot rescale its int32 bias with it
    b0 = next(t for t in f.graph.initializer if t.name == "b0")
    f.graph.node.insert(0, helper.make_node("Constant", [], ["b0"], value=copy.deepcopy(b0)))
    f.graph.initializer.remove(b0)
    before = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer if t.name.startswith("conv0_")}
    assert before and refit_convs(f, q, fit) == 4
    assert all(np.array_equal(numpy_helper.to_array(t), before[t.name]) for t in q.graph.initializer
               if t.name in before)


def test_refit_option_is_kept_only_when_agreement_improves() -> None:
    m = _canon(FIXTURES / "mobilenet_se.onnx")
    res = Int8(Int8Options(guard=False, max_drop=0, refit=True)).run(copy.deepcopy(m), _ctx(m, "mobilenet_se"))
    r = res.stats["refit"]
    assert r["layers"] > 0
    assert r["kept"] == (r["drop_after"] < r["drop_before"])


def test_an_excluded_conv_between_int8_layers_stays_float_in_onnxruntime(tmp_path) -> None:
    """onnxruntime quantizes a float Conv whose input comes from a per-tensor DequantizeLinear
    (its WeightBiasQuantization: per-tensor int8 weights) and then fuses it into a
    QLinearConv; the pass feeds such a Conv through a per-channel DQ so it runs float."""
    m = _conv_chain()
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "fit.npz", x=rng.standard_normal((16, 3, 12, 12)).astype(np.float32))
    ctx = PassContext(calibration=open_data(tmp_path / "fit.npz", m, batch_size=1))
    q = Int8(Int8Options(guard=False, max_drop=0, exclude="conv2")).run(copy.deepcopy(m), ctx).model
    assert write.fused_ops(q).get("QLinearConv") == 4  # conv0, 1, 3, 4; 5 without the per-channel DQ
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    dq = next(n for n in q.graph.node if conv2.input[0] in n.output)
    assert dq.op_type == "DequantizeLinear" and [a.i for a in dq.attribute if a.name == "axis"] == [1]
    for seed in range(3):  # the optimized session computes what the graph says
        feeds = {"x": np.random.default_rng(seed).standard_normal((1, 3, 12, 12)).astype(np.float32)}
        np.testing.assert_allclose(run(q, feeds, optimize=True)[0], run(q, feeds)[0], rtol=1e-5, atol=1e-4)
