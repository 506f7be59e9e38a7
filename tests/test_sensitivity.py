"""The sensitivity measure (onnxcompress.sensitivity.OutputDamage) runs each candidate from
the reference's tensors before its first change: the same error as a run from the inputs,
for changes in graph order, out of order, on the first node and where an output is
computed before the change."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxcompress.frontier as frontier_mod
from onnxcompress.sensitivity import OutputDamage

from .test_frontier import _batches, _model


def _changed(model: onnx.ModelProto, weight: str, factor: float) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    t = next(t for t in m.graph.initializer if t.name == weight)
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), t.name))
    return m


# weights of the conv on the input (nothing to skip), the conv after the Split, the last conv,
# the state branch's MatMul (whose output is an output of its own), then the second conv again
# (upstream of where the reference has been run to: measured from the inputs)
ORDER = [("w1", 1.1), ("w2", 1.3), ("w3", 0.8), ("w4", 1.2), ("w2", 0.7)]


def test_staged_measures_equal_runs_from_the_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    staged = OutputDamage(model, _batches(3), samples=6)
    plain = OutputDamage(model, _batches(3), samples=6)
    monkeypatch.setattr(plain, "_from_first_change", lambda *_: None)
    rests: list[bool] = []
    real_rest = frontier_mod.Frontier.rest

    def counting(self, m, names):  # type: ignore[no-untyped-def]
        out = real_rest(self, m, names)
        rests.append(out is not None)
        return out

    monkeypatch.setattr(frontier_mod.Frontier, "rest", counting)
    got = [staged.of(_changed(model, w, f)) for w, f in ORDER]
    want = [plain.of(_changed(model, w, f)) for w, f in ORDER]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    assert all(e > 0 for e in want)
    # w2, w3 and w4 ran from kept tensors; w1 and the second w2 from the inputs
    assert rests == [True, True, True]
    assert staged.of(model) == 0.0  # the reference itself: no change found, run whole


def test_a_change_the_kept_values_cannot_feed_is_measured_from_the_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    damage = OutputDamage(model, _batches(2), samples=4)
    damage.of(_changed(model, "w3", 1.5))  # the reference has run to the last conv
    monkeypatch.setattr(frontier_mod.Frontier, "rest", lambda *_: None)
    plain = OutputDamage(model, _batches(2), samples=4)
    monkeypatch.setattr(plain, "_from_first_change", lambda *_: None)
    cand = _changed(model, "w4", 0.5)
    assert damage.of(cand) == pytest.approx(plain.of(cand), rel=1e-6)
