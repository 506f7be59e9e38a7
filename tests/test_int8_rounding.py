"""int8 weight rounding (GPTQ), ranges chosen through SiLU, and the float tail."""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

import onnxcompress as oc
from onnxcompress.data import open_data
from onnxcompress.passes.int8 import Int8, Int8Options, ranges, write
from onnxcompress.passes.int8.calibration import StreamingHistogram
from onnxcompress.passes.int8.thresholds import low_through
from onnxcompress.passes.int8.rounding import GptqRounder, gptq_round, input_hessians
from onnxcompress.pipeline import PassContext
from onnxcompress.registry import build_pipeline

from .builders import fvi, make_model, run, tensor
from .conftest import FIXTURES


def _nearest(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    return np.clip(np.round(w / s[:, None]), -127, 127)


def _output_error(w: np.ndarray, q: np.ndarray, s: np.ndarray, x: np.ndarray) -> float:
    """Mean squared output error of the int8 weights on inputs ``x`` ([samples, n])."""
    return float(np.mean(((w - q * s[:, None]) @ x.T) ** 2))


def test_gptq_lowers_the_output_error_on_uncentred_inputs() -> None:
    rng = np.random.default_rng(0)
    out, n = 16, 108
    w = rng.normal(0, 0.05, (out, n))
    s = np.abs(w).max(1) / 127
    x = rng.uniform(100, 255, (4096, n)) + rng.normal(0, 20, (4096, n))  # raw pixels: mean ≫ spread
    h = x.T @ x / len(x)
    q = gptq_round(w, h, s)
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127
    fresh = rng.uniform(100, 255, (2048, n)) + rng.normal(0, 20, (2048, n))  # not the statistics' own samples
    e_gptq, e_near = _output_error(w, q, s, fresh), _output_error(w, _nearest(w, s), s, fresh)
    assert e_gptq < 0.2 * e_near, (e_gptq, e_near)
    assert np.abs(q - _nearest(w, s)).max() <= 3  # the same grid: neighbouring integers only


def test_gptq_with_uncorrelated_inputs_is_nearest_rounding() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (8, 20))
    s = np.abs(w).max(1) / 127
    h = np.diag(rng.uniform(0.5, 2, 20))  # diagonal H: no error is moved to other columns
    np.testing.assert_array_equal(gptq_round(w, h, s), _nearest(w, s).astype(np.int8))


def _conv_model(group: int) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    c = 8
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1], group=group)]
    m = make_model(nodes, [fvi("x", [1, c, 12, 12])], [fvi("y", [1, c, 12, 12])], [tensor(rng, "w", (c, c // group, 3, 3))])
    return onnx.shape_inference.infer_shapes(m)


def test_rounder_handles_grouped_convs_and_keeps_the_layout() -> None:
    rng = np.random.default_rng(3)
    for group in (1, 2, 8):
        m = _conv_model(group)
        node = m.graph.node[0]
        x = (rng.normal(0, 1, (4, 1, 8, 12, 12)) + 3).astype(np.float32)  # uncentred: GPTQ has work to do
        hs = input_hessians(m, [node], [{"x": b} for b in x], positions=64)
        n_in = 8 // group * 9
        assert hs["conv"].shape == (group, n_in, n_in)
        w = numpy_helper.to_array(m.graph.initializer[0])
        q0, s = write.quantize_weight(w, 0)
        q = GptqRounder(hs)(node, w, s, 0)
        assert q is not None and q.shape == w.shape and q.dtype == np.int8
        wq = q.astype(np.float32) * s[:, None, None, None]
        w0 = q0.astype(np.float32) * s[:, None, None, None]
        feeds = {"x": x[0]}
        ref = run(m, feeds)[0]

        def err(wv: np.ndarray) -> float:
            mm = onnx.ModelProto()
            mm.CopyFrom(m)
            mm.graph.initializer[0].CopyFrom(numpy_helper.from_array(wv, "w"))
            return float(np.mean((run(mm, feeds)[0] - ref) ** 2))

        assert err(wq) < err(w0), group
    assert GptqRounder({})(node, w, s, 0) is None  # no statistics: nearest rounding


def _hist(values: np.ndarray) -> StreamingHistogram:
    h = StreamingHistogram()
    h.update(values.astype(np.float32))
    return h


def _silu(v: np.ndarray) -> np.ndarray:
    return v / (1 + np.exp(-v))


def test_low_end_through_silu_clips_the_flat_negative_side() -> None:
    rng = np.random.default_rng(4)
    v = rng.normal(0, 3, 200_000)
    h = _hist(v)
    lo, hi = -10.0, 10.0
    new = low_through(h, _silu, lo, hi)
    assert -6.0 < new < -3.0, new  # SiLU(x) ≈ 0 below about −5: its levels go to the positive side

    def after(a: float) -> float:
        s = (hi - a) / 255
        z = np.round(-a / s)
        q = (np.clip(np.round(v / s) + z, 0, 255) - z) * s
        return float(np.mean((_silu(q) - _silu(v)) ** 2))

    assert after(new) < 0.85 * after(lo)  # (15.3/20)² of the rounding noise
    # through the identity every negative value counts: the low end stays where it was
    assert low_through(h, lambda a: a, lo, hi) < 0.9 * lo
    assert low_through(h, _silu, 0.0, hi) == 0.0  # nothing below zero to move


def _silu_tail_model() -> onnx.ModelProto:
    """x → Conv → SiLU → Conv(z2) → [SiLU; Sigmoid(z2) → Reshape → y2]; z2 also read elsewhere."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["z1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["z1"], ["g1"], name="sig1"),
             helper.make_node("Mul", ["z1", "g1"], ["a1"], name="mul1"),
             helper.make_node("Conv", ["a1", "w2"], ["z2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["z2"], ["g2"], name="sig2"),
             helper.make_node("Mul", ["z2", "g2"], ["a2"], name="mul2"),
             helper.make_node("Conv", ["a2", "w3"], ["y"], name="conv3"),
             helper.make_node("Relu", ["z2"], ["r2"], name="relu2"),
             helper.make_node("Sigmoid", ["y"], ["p"], name="sig_out"),
             helper.make_node("Reshape", ["p", "shape"], ["y2"], name="reshape")]
    inits = [tensor(rng, "w1", (4, 3, 3, 3)), tensor(rng, "w2", (4, 4, 3, 3)), tensor(rng, "w3", (2, 4, 1, 1)),
             numpy_helper.from_array(np.array([1, -1], np.int64), "shape")]
    m = make_model(nodes, [fvi("x", [1, 3, 8, 8])], [fvi("y2", [1, 128]), fvi("r2", [1, 4, 8, 8])], inits)
    return onnx.shape_inference.infer_shapes(m)


def test_through_activations_only_where_silu_is_the_only_reader() -> None:
    m = _silu_tail_model()
    through = ranges.through_activations(m, ranges.derived_tensors(m))
    assert set(through) == {"z1"}  # z2 is read by a Relu too
    v = np.linspace(-6, 6, 13)
    np.testing.assert_allclose(through["z1"](v), _silu(v), rtol=1e-12, atol=1e-15)


def test_tail_nodes_are_those_after_the_last_compute_layer() -> None:
    m = _silu_tail_model()
    assert ranges.tail_nodes(m) == {"sig_out", "reshape", "relu2"}


def test_a_second_run_with_the_same_context_reuses_the_gptq_statistics() -> None:
    m, _ = build_pipeline("canonicalize").run(oc.load_model(FIXTURES / "resnet_block.onnx"))
    ctx = PassContext(calibration=open_data(FIXTURES / "resnet_block_calib.npz", m, batch_size=16))
    runs = [Int8(Int8Options(guard=False, max_drop=0)).run(copy.deepcopy(m), ctx) for _ in range(2)]
    assert [r.stats["gptq"]["reused"] for r in runs] == [False, True]
    assert runs[0].stats["gptq"]["layers"] == sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in m.graph.node)
    assert runs[0].model.SerializeToString() == runs[1].model.SerializeToString()
    other = copy.deepcopy(m)  # another model (one weight changed): its own statistics
    w = other.graph.initializer[0]
    arr = numpy_helper.to_array(w).copy()
    arr.flat[0] += 1.0
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    assert Int8(Int8Options(guard=False, max_drop=0)).run(other, ctx).stats["gptq"]["reused"] is False
