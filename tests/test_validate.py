"""Validation metrics, thresholds, providers."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import numpy_helper
import pytest

from onnxcompress.data import RandomSource, input_specs
from onnxcompress.errors import OptionError, ProviderError, RuntimeModelError
from onnxcompress.metrics import column_cosine, column_sums, cosine, value_cosine
from onnxcompress.validate import (
    OutputStats, Thresholds, compare_models, judge, parse_tolerances, resolve_provider,
)

from .builders import linear_model


def _data(model, n=16, seed=0):
    return RandomSource(input_specs(model), num_samples=n, batch_size=4, seed=seed)


def test_identical_models_pass_exact() -> None:
    m = linear_model()
    r = compare_models(m, linear_model(), _data(m))
    o = r.outputs[0]
    assert r.passed and r.samples == 16 and r.batches == 4
    assert o.metrics["max_abs"] == 0 and o.metrics["cosine_mean"] == pytest.approx(1.0) and o.metrics["top1"] == 1.0


def test_offset_is_measured_exactly() -> None:
    ref, new = linear_model(), linear_model(offset=0.01)
    r = compare_models(ref, new, _data(ref))
    m = r.outputs[0].metrics
    assert m["max_abs"] == pytest.approx(0.01, rel=1e-4) and m["mean_abs"] == pytest.approx(0.01, rel=1e-4)
    assert m["rel_range"] == pytest.approx(0.01 / m["range"], rel=1e-4)
    assert not r.passed and "of the output range > 0.0001" in r.failures()[0]
    loose = compare_models(ref, new, _data(ref), thresholds=Thresholds(max_abs=0.02))
    assert loose.passed


def test_top1_and_cosine_fail_on_a_different_model() -> None:
    ref, new = linear_model(), linear_model()
    w = numpy_helper.to_array(ref.graph.initializer[0])
    new.graph.initializer[0].CopyFrom(numpy_helper.from_array(-w, "W"))  # y_new = -y_ref
    r = compare_models(ref, new, _data(ref), thresholds=Thresholds.approximate())
    m = r.outputs[0].metrics
    assert m["cosine_mean"] == pytest.approx(-1.0, abs=1e-6) and m["top1"] < 0.5
    fails = " ".join(r.failures())
    assert "mean cosine" in fails and "top-1 agreement" in fails
    n = m["top1_samples"]
    assert f"{round((1 - m['top1']) * n)} of {n} flipped" in fails
    few = judge("y", {**m, "top1": 0.9, "top1_samples": 20}, Thresholds(top1=0.99))
    many = judge("y", {**m, "top1": 0.9, "top1_samples": 200}, Thresholds(top1=0.99))
    assert "2 of 20 flipped; with 20 samples ≥ 0.99 allows none" in " ".join(few)
    assert "20 of 200 flipped)" in " ".join(many)


def test_nan_in_candidate_fails() -> None:
    ref, new = linear_model(), linear_model(nan=True)
    r = compare_models(ref, new, _data(ref), thresholds=Thresholds(cosine=None))
    assert r.outputs[0].metrics["new_nonfinite"] == 16 * 5
    assert not r.passed and "NaN/Inf" in r.failures()[0]
    allowed = compare_models(ref, new, _data(ref), thresholds=Thresholds(allow_nonfinite=True))
    assert allowed.passed


def test_output_stats_cosine_per_sample() -> None:
    s = OutputStats("y")
    a = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    b = np.array([[1.0, 0.0], [2.0, 0.0]], np.float32)
    s.update(a, b)
    m = s.metrics()
    assert m["cosine_mean"] == pytest.approx(0.5) and m["cosine_min"] == pytest.approx(0.0) and m["top1"] == 0.5
    s4 = OutputStats("prob")  # [N, C, 1, 1]: a classifier ending in a 1x1 conv (SqueezeNet)
    s4.update(a.reshape(2, 2, 1, 1), b.reshape(2, 2, 1, 1))
    assert s4.metrics()["top1"] == 0.5
    maps = OutputStats("map")  # [N, C, H, W] is not class scores
    maps.update(np.ones((2, 2, 3, 3)), np.ones((2, 2, 3, 3)))
    assert "top1" not in maps.metrics()


def test_feature_table_cosine_per_column() -> None:
    """[N, rows, F]: a small column ruined hides in the overall cosine, not in its own."""
    rng = np.random.default_rng(0)
    a = np.concatenate([100 * rng.random((3, 50, 4)), rng.random((3, 50, 2))], axis=2)
    b = a.copy()
    b[..., 4] = rng.random((3, 50))  # column 4 replaced by noise
    s = OutputStats("det")
    s.update(a, b)
    m = s.metrics()
    assert m["cosine_mean"] > 0.999
    assert m["feature_cosine"][0] == pytest.approx(1.0) and m["feature_cosine"][5] == pytest.approx(1.0)
    assert m["feature_cosine_min"] == pytest.approx(m["feature_cosine"][4]) and m["feature_cosine_min"] < 0.9
    fails = judge("det", m, Thresholds(cosine=0.99, feature_cosine=0.99))
    assert len(fails) == 1 and "feature 4" in fails[0]
    assert judge("det", m, Thresholds(cosine=0.99)) == []
    flat = OutputStats("map")
    flat.update(a.reshape(3, 1, 50, 6), b.reshape(3, 1, 50, 6))  # not a feature table: no per-column metric
    assert "feature_cosine_min" not in flat.metrics()


def test_feature_table_column_cosine_is_pooled_over_samples() -> None:
    """Images with nothing to detect hold background noise only: a new noise pattern there
    leaves the pooled column cosine near 1 (a per-image mean would fall to about 0.75),
    while a lost detection still pulls it down. Batches add up to the one-call value."""
    rng = np.random.default_rng(5)
    a = np.concatenate([10 * rng.random((4, 200, 4)), 1e-3 * rng.random((4, 200, 2))], axis=2)
    a[0, 5, 4], a[1, 17, 4] = 0.9, 0.8  # detections on images 0 and 1; images 2, 3 empty
    b = a.copy()
    b[2:, :, 4] = 1e-3 * rng.random((2, 200))  # another background pattern on the empty images
    assert cosine(a[2:, :, 4], b[2:, :, 4], axis=1).mean() < 0.85
    s = OutputStats("det")
    s.update(a[:2], b[:2])
    s.update(a[2:], b[2:])
    m = s.metrics()
    assert m["feature_cosine"][4] > 0.999
    assert m["feature_cosine"][4] == pytest.approx(float(column_cosine(column_sums(a, b))[4]), rel=1e-6)
    lost = b.copy()
    lost[1, 17, 4] = 0.1
    s2 = OutputStats("det")
    s2.update(a, lost)
    assert s2.metrics()["feature_cosine_min"] < 0.9
    assert judge("det", s2.metrics(), Thresholds(feature_cosine=0.99)) != []


def test_a_one_value_output_is_judged_by_one_cosine_over_the_samples() -> None:
    """A score per sample ([N, 1]: wake word, VAD, regression): the cosine of one value is
    its sign, so a per-sample mean passes any model that keeps the signs. One cosine over
    all samples' values (batches adding up) sees a score moved from 0.9 to 0.2."""
    from onnxcompress.validate import judged_by

    rng = np.random.default_rng(3)
    a = rng.uniform(0.01, 0.05, (16, 1))
    a[[2, 9], 0] = 0.9, 0.8  # two positives
    moved = a.copy()
    moved[2, 0] = 0.2
    assert cosine(a, moved, axis=1).mean() == 1.0  # what a per-sample cosine says
    s = OutputStats("score")
    s.update(a[:8], moved[:8])
    s.update(a[8:], moved[8:])
    m = s.metrics()
    assert m["cosine_pooled"] and m["cosine_samples"] == 16
    assert m["cosine_mean"] == pytest.approx(value_cosine(column_sums(a, moved))) and m["cosine_mean"] < 0.9
    assert judge("score", m, Thresholds.approximate()) != []
    assert "one value per sample" in judged_by(m, Thresholds.approximate())[0]
    halved = OutputStats("score")  # a common scale: cosine 1, relative error 0.5
    halved.update(a, a / 2)
    assert halved.metrics()["cosine_mean"] == pytest.approx(1 / np.sqrt(1.25))
    close = OutputStats("score")
    close.update(a, a * (1 + 1e-4 * rng.standard_normal(a.shape)))
    assert judge("score", close.metrics(), Thresholds.approximate()) == []
    vec = OutputStats("y")  # two values per sample: per-sample cosines, as before
    vec.update(np.hstack([a, 1 - a]), np.hstack([moved, 1 - moved]))
    assert "cosine_pooled" not in vec.metrics() and vec.metrics()["cosine_min"] < 0.9


def test_parse_tolerances() -> None:
    t = parse_tolerances("cosine=0.999,top1=none; y: max_abs=0.1", Thresholds.approximate())
    assert t[None].cosine == 0.999 and t[None].top1 is None
    assert t["y"].max_abs == 0.1 and t["y"].cosine == 0.999
    with pytest.raises(OptionError, match="key one of rel_range, max_abs"):
        parse_tolerances("cosin=0.9", Thresholds())
    with pytest.raises(OptionError, match="'abc' is not a number"):
        parse_tolerances("cosine=abc", Thresholds())


def test_tolerance_for_unknown_output() -> None:
    m = linear_model()
    with pytest.raises(OptionError, match=r"unknown output\(s\) \['logits'\]; outputs: y"):
        compare_models(m, m, _data(m), thresholds={None: Thresholds(), "logits": Thresholds()})


def test_models_with_different_outputs() -> None:
    m = linear_model()
    other = linear_model()
    other.graph.output[0].name = "z"
    other.graph.node[-1].output[0] = "z"
    with pytest.raises(RuntimeModelError, match="the models' outputs differ"):
        compare_models(m, other, _data(m))


def test_missing_provider_is_a_clear_error() -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    with pytest.raises(ProviderError, match=r"execution provider 'cuda' \(CUDAExecutionProvider\) is not available.*onnxcompress\[gpu\]"):
        resolve_provider("cuda")
    with pytest.raises(OptionError, match="unknown provider 'tpu'"):
        resolve_provider("tpu")
    assert resolve_provider("auto") in ("cpu", "cuda", "tensorrt")


def test_cosine_counts_only_samples_with_signal_above_the_noise_floor() -> None:
    """A detector's map on images with nothing to detect: ~1e-8 everywhere. The cosine of
    two such maps is noise; an exact rewrite must not fail on it."""
    from onnxcompress.validate import judge, judged_by

    rng = np.random.default_rng(0)
    a = np.abs(rng.standard_normal((4, 1000))) * 1e-8
    a[0, :50] = 0.87  # one sample holds a detection
    b = a + rng.standard_normal(a.shape) * 1e-8  # rounding-sized errors
    s = OutputStats("maps")
    s.update(a.astype(np.float32), b.astype(np.float32))
    m = s.metrics()
    assert m["cosine_samples"] == 1 and m["cosine_mean"] > 0.9999
    every = np.mean([float(np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(a, b)])
    assert every < 0.9  # what a cosine over every sample would have said
    assert judge("maps", m, Thresholds.approximate()) == [] and judge("maps", m, Thresholds.exact()) == []
    # no sample with signal (one lit pixel in 2e6): judged by the error against the range
    big = np.abs(rng.standard_normal((2, 2_000_000))).astype(np.float32) * 1e-8
    big[0, 0] = 0.87
    none = OutputStats("empty")
    none.update(big, big + np.float32(1e-8))
    m2 = none.metrics()
    assert m2["cosine_samples"] == 0 and "cosine_note" in m2
    assert "no sample with signal" in judged_by(m2, Thresholds.approximate())[0]
    assert judge("empty", m2, Thresholds.approximate()) == []
    off = big.copy()
    off[1, 7] = 0.1  # an invented detection: 11% of the range
    worse = OutputStats("empty")
    worse.update(big, off)
    assert judge("empty", worse.metrics(), Thresholds.approximate())


def test_tolerance_booleans_are_parsed_strictly() -> None:
    from onnxcompress.errors import OptionError
    from onnxcompress.validate import parse_tolerances

    assert parse_tolerances("allow_nonfinite=yes", Thresholds())[None].allow_nonfinite is True
    assert parse_tolerances("y:allow_nonfinite=off", Thresholds())["y"].allow_nonfinite is False
    with pytest.raises(OptionError, match="'maybe' is not a boolean"):
        parse_tolerances("allow_nonfinite=maybe", Thresholds())


def test_a_decision_timing_sees_past_a_slow_stretch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Noise only adds time: with 60% of one model's runs slowed 5×, the median reports the
    slow time and the lower quartile (what decisions use) the model's own."""
    import itertools
    import time

    from onnxcompress import runtime

    slow = itertools.cycle([False, False, True, True, True])  # any 5 runs in a row (a timed block): 3 slowed
    monkeypatch.setattr(runtime, "make_session", lambda model, provider, threads=None, label="": label)

    def run(session: str, feeds: object, label: str) -> None:
        time.sleep(0.002 if session == "a" else (0.010 if next(slow) else 0.002))

    monkeypatch.setattr(runtime, "run_session", run)
    models = [None, None]
    median = runtime.measure_latency(models, {}, runs=40, min_seconds=0.0, labels=["a", "b"])  # type: ignore[arg-type]
    low = runtime.measure_latency(models, {}, runs=40, min_seconds=0.0, labels=["a", "b"],  # type: ignore[arg-type]
                                  quantile=runtime.DECISION_QUANTILE)
    assert median[1] / median[0] > 3.0
    assert low[1] / low[0] < 1.5
