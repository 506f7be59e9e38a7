"""int8 calibration: vectorized KL vs a straightforward loop reference; streaming histograms."""

from __future__ import annotations

import time

import numpy as np
import pytest

from onnxcompress.passes.int8.calibration import StreamingHistogram
from onnxcompress.passes.int8.thresholds import (
    kl_divergences,
    kl_threshold,
    mse_threshold,
    percentile_threshold,
    tensor_range,
)


def reference_kl_threshold(hist: np.ndarray, bin_width: float, nq: int = 128) -> float:
    """TensorRT's entropy calibration written as the plain loop of the 2017 slides."""
    hist = hist.astype(np.float64)
    hist[0] = hist[1]  # NVIDIA's zero-spike suppression
    nb = len(hist)
    best_i, best = None, np.inf
    for i in range(nq, nb + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        q = np.zeros(i)
        chunk_of = np.array([k * nq // i for k in range(i)])  # equal-width chunks
        for j in range(nq):
            members = np.flatnonzero(chunk_of == j)
            if members.size == 0:
                continue
            start, stop = members[0], members[-1] + 1
            chunk = hist[start:stop]
            nonzero = p[start:stop] > 0
            n = nonzero.sum()
            if n:
                q[start:stop][nonzero] = chunk.sum() / n
        if p.sum() == 0:
            continue
        p /= p.sum()
        if q.sum() > 0:
            q /= q.sum()
        kl = 0.0
        for a, b in zip(p, q):
            if a > 0:
                kl += a * np.log(a / (b if b > 0 else 1e-10))
        if kl < best * (1 - 1e-9):  # first minimum; later candidates must be strictly better
            best, best_i = kl, i
    return (best_i + 0.5) * bin_width


def _hist(samples: np.ndarray, bins: int = 2048) -> StreamingHistogram:
    h = StreamingHistogram(bins)
    for chunk in np.array_split(samples, 7):
        h.update(chunk)
    return h


DISTRIBUTIONS = {
    "gaussian": lambda rng: rng.standard_normal(200_000),
    "laplace": lambda rng: rng.laplace(0, 1, 200_000),
    "half-normal (post-ReLU)": lambda rng: np.maximum(rng.standard_normal(200_000), 0),
    "bimodal": lambda rng: np.concatenate([rng.normal(-3, 0.5, 100_000), rng.normal(4, 1.0, 100_000)]),
}


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_kl_matches_reference_within_one_bin(name: str) -> None:
    rng = np.random.default_rng(0)
    h = _hist(DISTRIBUTIONS[name](rng).astype(np.float32), bins=512)  # 512 bins keep the loop reference fast
    for nq in (128, 256):
        fast = kl_threshold(h.hist, h.bin_width, nq)
        ref = reference_kl_threshold(h.hist, h.bin_width, nq)
        assert abs(fast - ref) <= h.bin_width + 1e-12, (name, nq, fast, ref)


def test_kl_divergences_match_reference_curve() -> None:
    rng = np.random.default_rng(1)
    h = _hist(rng.laplace(0, 1, 50_000).astype(np.float32), bins=256)
    d = kl_divergences(h.hist, 128)
    ref_best = reference_kl_threshold(h.hist, h.bin_width, 128)
    assert (int(np.argmin(d)) + 128 + 0.5) * h.bin_width == pytest.approx(ref_best, abs=h.bin_width)


def test_kl_clips_heavy_tails_and_is_fast_at_2048_bins() -> None:
    rng = np.random.default_rng(2)
    x = rng.laplace(0, 1, 500_000).astype(np.float32)
    h = _hist(x)
    t0 = time.perf_counter()
    t = kl_threshold(h.hist, h.bin_width, 128)
    seconds = time.perf_counter() - t0
    assert 0.2 * h.range < t < h.range  # clips the tail, keeps the bulk
    assert seconds < 5.0  # 1921 candidates, vectorized


def test_streaming_histogram_rebins_exactly() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(100_000).astype(np.float32)
    x[-10:] *= 40  # a late, much larger range forces power-of-two merges
    h = _hist(x)
    assert h.merges >= 1 and h.hist.sum() == x.size and h.range >= np.abs(x).max()
    whole = np.histogram(np.abs(x), bins=h.bins, range=(0, h.range))[0]
    # merged bins can differ from a one-shot histogram only at bin edges (float rounding)
    assert np.abs(h.hist - whole).sum() <= 0.001 * x.size
    assert h.min == pytest.approx(float(x.min())) and h.max == pytest.approx(float(x.max()))


def test_memory_does_not_grow_with_samples() -> None:
    h = StreamingHistogram()
    rng = np.random.default_rng(4)
    for _ in range(50):
        h.update(rng.standard_normal(10_000))
    assert h.hist.nbytes == 2048 * 8 and h.count == 500_000


def test_other_methods_and_ranges() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal(200_000).astype(np.float32)
    h = _hist(x)
    p = percentile_threshold(h.hist, h.bin_width, 99.0)
    assert p == pytest.approx(np.percentile(np.abs(x), 99.0), abs=2 * h.bin_width)
    m = mse_threshold(h.hist, h.bin_width, 128)
    assert 2.0 < m < h.range
    lo, hi = tensor_range(h, "minmax")
    assert lo == pytest.approx(float(x.min())) and hi == pytest.approx(float(x.max()))
    lo, hi = tensor_range(h, "kl")
    assert lo == -hi and 0 < hi <= h.range
    relu = _hist(np.maximum(x, 0))
    lo, hi = tensor_range(relu, "kl")
    assert lo == 0.0 and hi > 0  # one-sided range for non-negative tensors


def test_kl_guard_swaps_in_the_mse_threshold_where_kl_clips_too_much() -> None:
    """On a Student-t(2) tensor, KL's threshold clips the heavy tail where the expected
    squared error is far above the least achievable: ``experimental.kl_guard`` (1.25, the
    default) uses the MSE threshold there; 0 keeps KL's."""
    x = np.random.default_rng(0).standard_t(2, 200_000).astype(np.float32)
    h = _hist(x)
    _, kl = tensor_range(h, "kl", kl_guard=0.0)
    _, guarded = tensor_range(h, "kl", kl_guard=1.25)
    _, mse = tensor_range(h, "mse")
    assert guarded == mse and kl < guarded / 2
    laplace = _hist(np.random.default_rng(0).laplace(size=200_000).astype(np.float32))
    assert tensor_range(laplace, "kl", kl_guard=1.25) == tensor_range(laplace, "kl", kl_guard=0.0)  # KL fine there


def test_collect_histograms_on_a_model() -> None:
    import onnxruntime as ort

    from onnxcompress.data import open_data
    from onnxcompress.model import load_model
    from onnxcompress.passes.int8.calibration import activation_tensors, collect_histograms
    from onnxcompress.registry import build_pipeline

    from .conftest import FIXTURES

    m, _ = build_pipeline("canonicalize").run(load_model(FIXTURES / "resnet_block.onnx"))
    names = activation_tensors(m, frozenset({"Conv", "Relu", "Add", "Gemm"}))
    assert "input" in names and "logits" in names
    data = open_data(FIXTURES / "resnet_block_calib.npz", m, batch_size=16)
    hists = collect_histograms(m, names, data, cap=None)
    assert set(hists) == set(names) and all(h.hist.sum() == h.count > 0 for h in hists.values())
    # exact min/max of the logits over the calibration set
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": np.load(FIXTURES / "resnet_block_calib.npz")["input"]})[0]
    assert hists["logits"].min == pytest.approx(float(logits.min()), rel=1e-5)
    assert hists["logits"].max == pytest.approx(float(logits.max()), rel=1e-5)
    relu_out = [n for n in names if n.startswith("relu")]
    assert relu_out and all(hists[n].non_negative for n in relu_out)


def test_memory_budget_splits_batches_without_changing_results() -> None:
    from onnxcompress.data import open_data
    from onnxcompress.model import load_model
    from onnxcompress.passes.int8.calibration import activation_tensors, collect_histograms
    from onnxcompress.registry import build_pipeline

    from .conftest import FIXTURES

    m, _ = build_pipeline("canonicalize").run(load_model(FIXTURES / "mobilenet_se.onnx"))
    names = activation_tensors(m)
    data = open_data(FIXTURES / "mobilenet_se_calib.npz", m, batch_size=32)
    whole = collect_histograms(m, names, data, cap=None, memory_budget=None)
    split = collect_histograms(m, names, data, cap=None, memory_budget=1)  # one sample at a time
    for n in names:
        np.testing.assert_array_equal(whole[n].hist, split[n].hist)
        assert whole[n].min == split[n].min and whole[n].max == split[n].max


def test_binning_beside_the_session_gives_the_same_histograms() -> None:
    """Overlapped (a worker bins sub-batch k while onnxruntime runs k+1) and serial
    calibration agree exactly, with sampling (the worker draws from the one generator in
    batch order) and without, chunked updates included (a chunk-sized range growth)."""
    from onnxcompress.data import open_data
    from onnxcompress.model import load_model
    from onnxcompress.passes.int8 import calibration
    from onnxcompress.registry import build_pipeline

    from .conftest import FIXTURES

    m, _ = build_pipeline("canonicalize").run(load_model(FIXTURES / "mobilenet_se.onnx"))
    names = calibration.activation_tensors(m)
    data = open_data(FIXTURES / "mobilenet_se_calib.npz", m, batch_size=4)
    for cap in (None, 500):
        serial = calibration.collect_histograms(m, names, data, cap=cap, overlap_limit=0, channels=True)
        overlap = calibration.collect_histograms(m, names, data, cap=cap, overlap_limit=2**40, channels=True)
        for n in names:
            np.testing.assert_array_equal(serial[n].hist, overlap[n].hist)
            np.testing.assert_array_equal(serial[n].channel_sq, overlap[n].channel_sq)
            assert (serial[n].min, serial[n].max, serial[n].count) == (overlap[n].min, overlap[n].max,
                                                                        overlap[n].count)


def test_chunked_update_equals_one_histogram_of_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 1,000 values whose range grows chunk by chunk give the histogram of the
    whole batch binned at its final range."""
    from onnxcompress.passes.int8 import calibration

    rng = np.random.default_rng(11)
    x = rng.standard_normal(10_000).astype(np.float32) * np.repeat(2.0 ** np.arange(10), 1000).astype(np.float32)
    monkeypatch.setattr(calibration, "_CHUNK", 1000)
    calibration._lane_offsets.cache_clear()
    try:
        h = calibration.StreamingHistogram()
        h.update(x)
    finally:
        calibration._lane_offsets.cache_clear()
    assert h.merges >= 5  # the range grew inside the batch
    r = 2.0 ** np.ceil(np.log2(np.abs(x).max()))
    expect = np.bincount(np.minimum(np.floor(np.abs(x).astype(np.float64) * 2048 / r), 2047).astype(int),
                         minlength=2048)
    assert h.range == r
    np.testing.assert_array_equal(h.hist, expect)


def test_signed_slots_fold_to_the_histogram_of_abs() -> None:
    """Slot t counts trunc(x·bins/R) = t on x's side, across power-of-two merges; folding
    the sides gives the histogram of |x|."""
    rng = np.random.default_rng(12)
    x = (rng.standard_normal(60_000) * np.repeat([1.0, 3.0, 50.0], 20_000)).astype(np.float32)
    x[-5:] = [0.0, -0.0, 1e-9, -1e-9, -float(np.abs(x).max())]  # zeros, tiny values, −max|x|
    h = StreamingHistogram()
    for chunk in np.array_split(x, 9):
        h.update(chunk)
    assert h.merges >= 2
    r = 2.0 ** np.ceil(np.log2(np.abs(x).max()))
    t = np.clip(np.trunc(x.astype(np.float64) * 2048 / r), -2047, 2047).astype(int)
    np.testing.assert_array_equal(h.signed, np.bincount(t + 2047, minlength=4095))
    np.testing.assert_array_equal(h.hist, np.bincount(np.abs(t), minlength=2048))
    assert h.signed[:2047].sum() == np.count_nonzero(t < 0)


def _silu(v: np.ndarray) -> np.ndarray:
    return v * (0.5 * (1.0 + np.tanh(0.5 * v)))


def _hardswish(v: np.ndarray) -> np.ndarray:
    return v * np.clip(v / 6 + 0.5, 0, 1)


@pytest.mark.parametrize("f", [_silu, _hardswish], ids=["silu", "hardswish"])
@pytest.mark.parametrize("name", ["gaussian", "laplace", "bimodal"])
def test_pushforward_matches_binning_the_function(f, name: str) -> None:  # type: ignore[no-untyped-def]
    """y = f(x)'s histogram pushed forward from x's gives the thresholds of binning y
    itself to within a bin, by every method, and y's count, min and max."""
    from onnxcompress.passes.int8.calibration import pushforward

    x = (DISTRIBUTIONS[name](np.random.default_rng(13)) * 2).astype(np.float32)
    hx, hy = StreamingHistogram(), StreamingHistogram()
    y = f(x.astype(np.float64)).astype(np.float32)
    for a, b in zip(np.array_split(x, 5), np.array_split(y, 5)):
        hx.update(a)
        hy.update(b)
    hp = pushforward(hx, f)
    assert hp.range == hy.range and hp.count == hy.count == x.size
    assert hp.min == pytest.approx(hy.min, abs=hy.bin_width) and hp.max == pytest.approx(hy.max, rel=1e-5)
    assert np.abs(hp.hist - hy.hist).sum() < 0.05 * x.size  # moved only across bin edges
    for method in ("mse", "percentile", "minmax"):
        direct, pushed = tensor_range(hy, method), tensor_range(hp, method)  # type: ignore[arg-type]
        assert np.abs(np.subtract(direct, pushed)).max() <= hy.bin_width, (method, direct, pushed)
    _assert_kl_agrees(hy, hp)


def _assert_kl_agrees(direct: StreamingHistogram, pushed: StreamingHistogram) -> None:
    """KL thresholds agree to within a bin, or, where the divergence has two near-equal
    minima, the pushed threshold is as good on the direct histogram: its divergence there
    within 0.1% of the least."""
    q = 256 if direct.non_negative else 128
    a, b = kl_threshold(direct.hist, direct.bin_width, q), kl_threshold(pushed.hist, pushed.bin_width, q)
    if abs(a - b) <= direct.bin_width:
        return
    h = direct.hist.astype(np.float64)
    h[0] = h[1]
    d = kl_divergences(h, q)
    at = d[min(int(round(b / direct.bin_width - 0.5)) - q, len(d) - 1)]
    assert at <= d.min() * 1.001, (a, b, at, d.min())


def test_calibration_pushes_hardswish_outputs_forward() -> None:
    """On mobilenet_se (HardSwish decomposed to x · clip(x/6 + 1/2, 0, 1)) the products
    are not binned; their pushed-forward histograms and per-channel mean squares match
    binning them."""
    from onnxcompress.data import open_data
    from onnxcompress.model import load_model
    from onnxcompress.passes.int8 import Int8, Int8Options, qdq, ranges
    from onnxcompress.passes.int8.calibration import collect_histograms
    from onnxcompress.pipeline import PassContext
    from onnxcompress.registry import build_pipeline

    from .conftest import FIXTURES

    m, _ = build_pipeline("canonicalize").run(load_model(FIXTURES / "mobilenet_se.onnx"))
    data = open_data(FIXTURES / "mobilenet_se_calib.npz", m, batch_size=8)
    p = Int8(Int8Options())
    state = p._prepare(m, PassContext(calibration=data), p.options, {})
    names = ranges.calibrated_tensors(qdq.plan(state.model, state.allowed).tensors, state.derived)
    funcs = ranges.pushed_forward(state.derived, names)
    assert len(funcs) == 4 and not set(funcs) & set(names)
    pushed = collect_histograms(state.model, names, data, channels=True, functions=funcs)
    direct = collect_histograms(state.model, names + list(funcs), data, channels=True)
    assert set(pushed) == set(direct)
    for y in funcs:
        a, b = direct[y], pushed[y]
        assert (a.count, a.range) == (b.count, b.range)
        assert b.min == pytest.approx(a.min, abs=1e-3 * a.range) and b.max == pytest.approx(a.max, rel=1e-5)
        np.testing.assert_allclose(b.channel_sq, a.channel_sq, rtol=1e-5)
        np.testing.assert_allclose(tensor_range(b, "mse"), tensor_range(a, "mse"), atol=a.bin_width)
        _assert_kl_agrees(a, b)
