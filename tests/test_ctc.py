"""Sequence outputs judged by their greedy CTC decodes: decoding, edit distance, the
validation metrics and the default budget."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxcompress as oc
from onnxcompress.ctc import (changed_margins, edit_distance, greedy_decode, is_sequence_probabilities,
                              sequence_agreement)
from onnxcompress.trials import default_thresholds
from onnxcompress.validate import OutputStats, Thresholds, judge

from .builders import hybrid_recognizer


def one_hot(paths: list[list[int]], classes: int = 5) -> np.ndarray:
    """[N, T, C] probabilities putting 0.9 on each step's class."""
    p = np.full((len(paths), len(paths[0]), classes), 0.1 / (classes - 1), np.float32)
    for i, path in enumerate(paths):
        p[i, np.arange(len(path)), path] = 0.9
    return p


def test_greedy_decode_collapses_repeats_and_drops_blanks() -> None:
    seqs = greedy_decode(one_hot([[0, 1, 1, 0, 1, 2, 2, 0], [3, 3, 3, 3, 0, 0, 0, 0]]))
    assert [s.tolist() for s in seqs] == [[1, 1, 2], [3]]


@pytest.mark.parametrize("a,b,d", [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "abc", 0), ("abcd", "acbd", 2),
                                   ("flaw", "lawn", 2)])
def test_edit_distance(a: str, b: str, d: int) -> None:
    enc = lambda s: np.array([ord(c) for c in s], np.int64)  # noqa: E731
    assert edit_distance(enc(a), enc(b)) == edit_distance(enc(b), enc(a)) == d


def test_sequence_outputs_are_recognized_by_their_values() -> None:
    probs = one_hot([[0, 1, 2, 0]])
    assert is_sequence_probabilities(probs)
    assert is_sequence_probabilities(np.log(probs))  # a log_softmax head
    assert not is_sequence_probabilities(np.log(probs) + 1.5)  # logits: not told apart from a hidden state
    assert not is_sequence_probabilities(np.log(probs) - 0.5)  # values ≤ 0 that are no log-probabilities
    assert not is_sequence_probabilities(probs[:, :, :2] / probs[:, :, :2].sum(-1, keepdims=True))  # C < 3
    assert not is_sequence_probabilities(probs.reshape(1, -1))


def test_validation_reports_decode_agreement_and_judges_it() -> None:
    ref = one_hot([[0, 1, 0, 2, 2, 0, 3, 0], [0, 4, 4, 0, 1, 0, 0, 0]])
    new = one_hot([[0, 1, 0, 2, 2, 0, 4, 0], [0, 4, 4, 0, 1, 0, 0, 0]])  # one substitution in 4 characters
    assert sequence_agreement(ref, new) == (1, 5, 1)
    s = OutputStats("y")
    s.update(ref, new)
    m = s.metrics()
    assert m["ctc"] == pytest.approx(0.8) and m["ctc_lines"] == 0.5 and (m["ctc_edits"], m["ctc_chars"]) == (1, 5)
    assert judge("y", m, Thresholds(ctc=0.8, ctc_lines=0.5)) == []
    fails = judge("y", m, Thresholds(ctc=0.9, ctc_lines=0.75))
    assert len(fails) == 2 and "1 edits in 5 characters" in fails[0]
    logits = OutputStats("y", sequence=True)  # a ctc tolerance decodes logits too
    logits.update(np.log(ref), np.log(new))
    assert logits.metrics()["ctc"] == pytest.approx(0.8)
    plain = OutputStats("y")
    plain.update(np.log(ref) + 1.5, np.log(new) + 1.5)
    assert "ctc" not in plain.metrics()


def test_a_changed_decode_names_the_reference_gap_and_what_few_samples_can_resolve() -> None:
    """A refusal on the decoded-line share says how many samples changed, how nearly the
    input model itself decoded them otherwise, and when the sample count cannot resolve
    the threshold."""
    ref = one_hot([[0, 1, 0, 2, 2, 0, 3, 0], [0, 4, 4, 0, 1, 0, 0, 0], [0, 2, 0, 0, 0, 0, 0, 0]])
    ref[0, 6] = [0.02, 0.02, 0.02, 0.48, 0.46]  # a near-tie between classes 3 and 4
    new = ref.copy()
    new[0, 6] = [0.02, 0.02, 0.02, 0.46, 0.48]
    new[2, 1] = [0.9, 0.025, 0.025, 0.025, 0.025]  # a confident step lost: 2 → blank
    assert changed_margins(ref, new) == pytest.approx([0.02, 0.875])
    s = OutputStats("y")
    s.update(ref, new)
    m = s.metrics()
    assert m["ctc_samples"] == 3 and m["ctc_changed_margins"] == pytest.approx([0.02, 0.875])
    (fail,) = judge("y", m, Thresholds(ctc_lines=0.99))
    assert "2 of 3 differ" in fail and "0.02, 0.875" in fail and "with 3 samples ≥ 0.99 allows none" in fail
    (fail,) = judge("y", {**m, "ctc_samples": 300}, Thresholds(ctc_lines=0.99))
    assert "allows none" not in fail
    assert changed_margins(ref, ref) == []


def test_the_default_budget_judges_a_ctc_head_by_its_decodes() -> None:
    """A softmax'd [N, T, C] output gets decode thresholds instead of a cosine; its logits
    (nothing says they are decoded) keep the cosine."""
    t = default_thresholds(0.01, {"y": one_hot([[0, 1, 2, 0]]), "z": np.log(one_hot([[0, 1, 2, 0]])) + 1.5})
    assert t["y"].ctc == pytest.approx(0.995) and t["y"].ctc_lines == pytest.approx(0.99) and t["y"].cosine is None
    assert t["z"].ctc is None and t["z"].cosine == pytest.approx(0.99)


def test_a_time_major_log_softmax_head_is_decoded_per_sample() -> None:
    """[T, N, C] log-probabilities (a PyTorch CRNN's export): decoded sample by sample
    along axis 0 once the batch's sample count says axis 1 holds the samples, in
    validation and in the default budget; the gap at a changed step is in probabilities."""
    ref = one_hot([[0, 1, 0, 2, 2, 0, 3, 0], [0, 4, 4, 0, 1, 0, 0, 0], [0, 2, 0, 0, 0, 0, 0, 0]])
    new = ref.copy()
    new[2, 1] = [0.9, 0.025, 0.025, 0.025, 0.025]  # sample 2 loses its character
    tm_ref, tm_new = np.log(ref).transpose(1, 0, 2), np.log(new).transpose(1, 0, 2)  # [T=8, N=3, C=5]
    s = OutputStats("y")
    s.update(tm_ref, tm_new, samples=3)
    m = s.metrics()
    assert (m["ctc_samples"], m["ctc_lines"], m["ctc_edits"], m["ctc_chars"]) == (3, pytest.approx(2 / 3), 1, 6)
    assert m["ctc_changed_margins"] == pytest.approx([0.875])
    t = default_thresholds(0.01, {"y": tm_ref}, samples=3)
    assert t["y"].ctc_lines == pytest.approx(0.99) and t["y"].cosine is None
    flat = OutputStats("y")  # without the count, axis 0 is taken for the samples: 8 "lines" of 3 steps
    flat.update(tm_ref, tm_new)
    assert flat.metrics()["ctc_samples"] == 8


def test_compare_models_decodes_a_recognizer_and_a_tolerance_names_logits() -> None:
    m = hybrid_recognizer()
    x = np.random.default_rng(0).standard_normal((6, 3, 8, 16)).astype(np.float32)
    rep = oc.validate_models(m, m, [{"x": x}], thresholds=Thresholds(ctc=1.0, ctc_lines=1.0))
    out = rep.outputs[0]
    assert rep.passed and out.metrics["ctc"] == 1.0 and out.metrics["ctc_lines"] == 1.0
    assert any("CTC" in j for j in out.metrics["judged_by"])
    logits = hybrid_recognizer(ctc=False)
    other = hybrid_recognizer(ctc=False, seed=1)
    rep2 = oc.validate_models(logits, other, [{"x": x}], thresholds=Thresholds(ctc=0.999))
    assert not rep2.passed and "greedy CTC decodes differ" in rep2.failures()[0]


def test_a_fixed_lossy_pipeline_judges_a_ctc_head_by_its_decodes() -> None:
    """Without --tol, a fixed pipeline with a lossy pass holds a CTC head to its decodes
    (as the default budget does), not to a cosine; other outputs keep the cosine."""
    m = hybrid_recognizer()
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 16)).astype(np.float32)
    _, rep = oc.optimize(m, "canonicalize,lowrank:rank=2", calibration=[{"x": x}], latency=False)
    judged = " ".join(rep.validation.outputs[0].metrics["judged_by"])
    assert "CTC" in judged and "identically decoded" in judged and "cosine" not in judged, judged
    logits = hybrid_recognizer(ctc=False)
    _, rep2 = oc.optimize(logits, "canonicalize,lowrank:rank=2", calibration=[{"x": x}], latency=False)
    judged2 = " ".join(rep2.validation.outputs[0].metrics["judged_by"])
    assert "cosine" in judged2 and "CTC" not in judged2, judged2


def test_the_cli_leaves_a_fixed_pipelines_defaults_to_the_api(cli, tmp_path) -> None:  # noqa: ANN001
    """`optimize --passes` without --tol: the CTC head is judged by its decodes there too."""
    import json

    src = tmp_path / "in.onnx"
    onnx.save(hybrid_recognizer(), str(src))
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 3, 8, 16)).astype(np.float32))
    cli("optimize", src, tmp_path / "out.onnx", "--calib", tmp_path / "calib.npz", "--passes",
        "canonicalize,lowrank:rank=2", "--no-latency", "--report", tmp_path / "r.json", "-q")
    out = json.loads((tmp_path / "r.json").read_text())["validation"]["outputs"][0]
    judged = " ".join(out["metrics"]["judged_by"])
    assert "CTC" in judged and "cosine" not in judged, judged
