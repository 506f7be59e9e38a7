"""int8 targets and the emulation of x86 without VNNI (saturating u8·s8 pairs).

Tests that compare onnxruntime's int8 kernels with exact integer arithmetic name the ISA
they need and skip elsewhere; the rest check the emulation against a brute-force numpy
model of ``vpmaddubsw``, which holds on any machine."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import isa
from onnxcompress.data import open_data
from onnxcompress.emulate import quantized_layers, run_saturating
from onnxcompress.passes.int8 import Int8, Int8Options
from onnxcompress.pipeline import PassContext

from .builders import make_model, run
from .test_int8 import _conv_chain


def _qconv_model(w_q: np.ndarray, pads: int = 1, stride: int = 1) -> onnx.ModelProto:
    """x (float) → Q(uint8, s=0.1, z=10) → DQ → Conv(DQ(w_q int8, per channel)) → y."""
    cout, cin, kh, kw = w_q.shape
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "xs"), numpy_helper.from_array(np.array(10, np.uint8), "xz"),
             numpy_helper.from_array(w_q.astype(np.int8), "wq"),
             numpy_helper.from_array(np.full(cout, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(cout, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv", pads=[pads] * 4, strides=[stride] * 2)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 7, 7])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def _brute_force(xq: np.ndarray, w_q: np.ndarray, zp: int, pads: int, stride: int) -> np.ndarray:
    """Every output of the Conv as vpmaddubsw computes it: im2col in [kh, kw, c] order,
    each adjacent pair summed with int16 saturation, then the zero-point term."""
    n, c, h, w = xq.shape
    cout, _, kh, kw = w_q.shape
    xp = np.pad(xq.astype(np.int64), ((0, 0), (0, 0), (pads, pads), (pads, pads)), constant_values=zp)
    oh, ow = (h + 2 * pads - kh) // stride + 1, (w + 2 * pads - kw) // stride + 1
    wf = w_q.transpose(0, 2, 3, 1).reshape(cout, -1).astype(np.int64)
    out = np.zeros((n, cout, oh, ow), np.int64)
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw].transpose(0, 2, 3, 1).reshape(n, -1)
            prod = patch[:, None, :] * wf[None]  # [n, cout, K]
            if prod.shape[2] % 2:
                prod = np.concatenate([prod, np.zeros((n, cout, 1), np.int64)], axis=2)
            pairs = np.clip(prod[:, :, 0::2] + prod[:, :, 1::2], -32768, 32767)
            out[:, :, i, j] = pairs.sum(axis=2) - zp * wf.sum(axis=1)[None]
    return out


@pytest.mark.parametrize("cin,stride", [(4, 1), (3, 2)])
def test_emulation_matches_a_brute_force_model_of_saturating_pairs(cin: int, stride: int) -> None:
    rng = np.random.default_rng(cin)
    w_q = rng.integers(-127, 128, (6, cin, 3, 3))
    w_q[:, :2] = 120 * np.sign(w_q[:, :2] + 0.5)  # same-sign full-scale pairs: saturate on bright inputs
    m = _qconv_model(w_q, stride=stride)
    x = rng.uniform(-1.0, 24.0, (1, cin, 7, 7)).astype(np.float32)
    emu, info = run_saturating(m, {"x": x})
    xq = np.clip(np.round(x / 0.1) + 10, 0, 255).astype(np.int64)
    want = _brute_force(xq, w_q, 10, 1, stride) * (0.1 * 0.01)
    exact = run(m, {"x": x})[0]
    assert info["saturated_layers"] == 1 and info["risky_pairs"] > 0
    assert np.abs(want - exact).max() > 0.5  # the case saturates
    np.testing.assert_allclose(emu[0], want, rtol=1e-5, atol=1e-4)


def _built(target: str, seed: int = 1) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]]:
    m = _conv_chain(c=32)
    rng = np.random.default_rng(seed)
    calib = [{"x": (3 * rng.standard_normal((1, 3, 12, 12))).astype(np.float32)} for _ in range(16)]
    ctx = PassContext(calibration=open_data(calib, m))
    q = Int8(Int8Options(guard=False, max_drop=0, target=target)).run(copy.deepcopy(m), ctx).model
    return m, q, {"x": (3 * rng.standard_normal((1, 3, 12, 12))).astype(np.float32)}


def test_portable_weights_are_7_bit_and_cannot_saturate() -> None:
    m, q, feeds = _built("portable")
    meta = {p.key: p.value for p in q.metadata_props}
    assert meta[isa.META_TARGET] == "portable" and meta[isa.META_WEIGHT_BITS] == "7"
    layers = quantized_layers(q)
    assert len(layers) == 5 and not any(lay.pairs for lay in layers)
    w = [numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("_weight_quantized")]
    assert w and max(int(np.abs(a.astype(np.int32)).max()) for a in w) <= 63
    emu, info = run_saturating(q, feeds)
    assert info["runs"] == 1
    np.testing.assert_array_equal(emu[0], run(q, feeds)[0])


def test_a_vnni_model_loses_accuracy_on_saturating_cpus_and_a_portable_one_does_not() -> None:
    m, q8, feeds = _built("vnni")
    _, q7, _ = _built("portable")
    assert {p.key: p.value for p in q8.metadata_props}[isa.META_WEIGHT_BITS] == "8"
    ref = run(m, feeds)[0]

    def err(out: np.ndarray) -> float:
        return float(np.sqrt(np.mean((out - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))

    exact8, emu8 = run(q8, feeds)[0], run_saturating(q8, feeds)[0][0]
    emu7 = run_saturating(q7, feeds)[0][0]
    assert err(exact8) < err(emu7) < err(emu8)  # 8 bits win where they are exact, lose where they saturate
    assert err(emu8) > 2 * err(exact8)


def test_host_target_follows_the_cpu() -> None:
    host = isa.describe_host()
    want = {"x86-vnni": "vnni", "x86-avx2": "avx2", "arm64": "vnni", "arm64-dotprod": "vnni"}.get(host, "portable")
    assert isa.resolve_target("host") == want
    assert isa.resolve_target("host", "cuda") == "vnni"
    assert isa.weight_max("portable") == 63 and isa.weight_max("vnni") == 127


@pytest.mark.skipif(not isa.saturates_here(), reason="needs x86 without VNNI (onnxruntime's saturating U8S8 path)")
def test_onnxruntime_on_this_cpu_saturates_as_emulated() -> None:
    _, q8, feeds = _built("vnni")
    emu = run_saturating(q8, feeds)[0][0]
    ort_out = run(q8, feeds, optimize=True)[0]
    exact = run(q8, feeds)[0]
    assert np.abs(emu - ort_out).max() < 0.1 * np.abs(exact - ort_out).max()


@pytest.mark.skipif(isa.describe_host() != "x86-vnni", reason="needs x86 with VNNI (exact U8S8 sums)")
def test_onnxruntime_on_this_cpu_sums_8_bit_weights_exactly() -> None:
    _, q8, feeds = _built("vnni")
    np.testing.assert_allclose(run(q8, feeds, optimize=True)[0], run(q8, feeds)[0], rtol=1e-5, atol=1e-4)
