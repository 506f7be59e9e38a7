"""Labels: a change toward a sample's label is free, a change away from it counts, and
harm is never netted against gains (onnxcompress.labels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxcompress as oc
from onnxcompress.ctc import greedy_decode
from onnxcompress.errors import DataError, OptionError
from onnxcompress.labels import Labels, read_labels
from onnxcompress.validate import OutputStats, Thresholds, judge

from .builders import hybrid_recognizer
from .test_ctc import one_hot

CHARS = tuple("abcdefghijk")  # hybrid_recognizer's 12 classes: blank, then 11 characters


def test_a_change_toward_the_label_is_free_and_one_away_counts_unnetted() -> None:
    labels = Labels(np.array(["ab", "ca", "b"]), "t.npz['y']", ("a", "b", "c"))  # classes: blank, a, b, c, space
    ref = one_hot([[1, 0, 3, 0], [3, 0, 1, 0], [2, 0, 0, 0]])  # "ac" (wrong), "ca", "b"
    new = one_hot([[1, 0, 2, 0], [3, 0, 1, 2], [2, 0, 0, 0]])  # "ab" (fixed), "cab" (broken), "b"
    s = OutputStats("o")
    s.update(ref, new, samples=3, targets=(labels, labels.values))
    m = s.metrics()
    assert m["against_labels"] and m["ctc_edits"] == 1 and m["ctc_lines"] == pytest.approx(2 / 3)
    fails = judge("o", m, Thresholds(ctc=0.99, ctc_lines=0.99))
    assert "1 edits away from the labels" in fails[0] and "closer to their labels" in fails[1], fails
    plain = OutputStats("o")
    plain.update(ref, new, samples=3)
    assert plain.metrics()["ctc_edits"] == 2 and plain.metrics()["ctc_lines"] == pytest.approx(1 / 3)
    fixed_only = OutputStats("o")
    fixed_only.update(ref[:1], new[:1], samples=1, targets=(labels, labels.values[:1]))
    assert fixed_only.metrics()["ctc"] == 1.0 and fixed_only.metrics()["ctc_lines"] == 1.0


def test_class_labels_count_only_flips_away_from_the_label() -> None:
    labels = Labels(np.array([0, 1, 2, 0]), "t")
    ref = np.eye(3, dtype=np.float32)[[0, 1, 1, 2]] + 0.1  # right, right, wrong, wrong
    new = np.eye(3, dtype=np.float32)[[1, 1, 2, 1]] + 0.1  # broken, kept, fixed, wrong to wrong
    s = OutputStats("p")
    s.update(ref, new, samples=4, targets=(labels, labels.values))
    assert s.metrics()["top1"] == pytest.approx(0.75)
    plain = OutputStats("p")
    plain.update(ref, new, samples=4)
    assert plain.metrics()["top1"] == pytest.approx(0.25)


def _strings(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    out = oc.runtime.make_session(model, label="t").run(None, {"x": x})[0]
    return np.array(["".join(CHARS[k - 1] for k in seq) for seq in greedy_decode(out)])


@pytest.mark.parametrize("labels_from", ["candidate", "original"])
def test_validation_against_labels_passes_a_model_that_reads_them(tmp_path: Path, labels_from: str) -> None:
    """A lossy result judged against labels: where the labels are what it reads, its
    changes are all toward them and it passes (it fails by agreement with the original);
    where the labels are what the original reads, every change counts."""
    m = hybrid_recognizer()
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 16)).astype(np.float32)
    spec = "canonicalize,prune:ratio=0.5"
    lossy, rep = oc.optimize(m, spec, calibration=[{"x": x}], latency=False, validation=[{"x": x}])
    assert not rep.validation.passed  # by agreement with the original's decodes
    y = _strings(lossy if labels_from == "candidate" else m, x)
    np.savez(tmp_path / "c.npz", x=x, y=y)
    _, rep2 = oc.optimize(m, spec, calibration=tmp_path / "c.npz", latency=False, labels="y", charset=CHARS)
    out = rep2.validation.outputs[0]
    assert out.metrics["against_labels"]
    assert rep2.validation.passed == (labels_from == "candidate"), rep2.validation.failures()
    assert any("toward the labels" in j for j in out.metrics["judged_by"])


def test_string_labels_read_the_models_character_metadata(tmp_path: Path) -> None:
    m = hybrid_recognizer()
    onnx.helper.set_model_props(m, {"character": "\n".join(CHARS[:10])})  # 10 + blank + space = 12 classes
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 3, 8, 16), np.float32), y=np.array(["ab", "k"]))
    lab = read_labels(tmp_path / "c.npz", "y", m, None, 2)
    assert lab.charset == CHARS[:10]
    codes = lab.encode(lab.values, 12)
    assert codes[0].tolist() == [1, 2] and codes[1].tolist() == [-1]  # 'k' is not in the charset
    assert lab.encode(np.array(["a b"]), 12)[0].tolist() == [1, 11, 2]  # the last class is a space


def test_a_character_listed_twice_reads_as_one() -> None:
    """Class 4 repeats class 1's character: a decode through either matches the label."""
    labels = Labels(np.array(["ab"]), "t", ("a", "b", "c", "a"))  # classes: blank, a, b, c, a
    ref = one_hot([[1, 0, 2, 0]])  # "ab"
    new = one_hot([[4, 0, 2, 0]])  # "ab" too, through the second 'a'
    s = OutputStats("o")
    s.update(ref, new, samples=1, targets=(labels, labels.values))
    assert s.metrics()["ctc_lines"] == 1.0 and s.metrics()["ctc_edits"] == 0
    assert labels.same_character(5).tolist() == [0, 1, 2, 3, 1]


def test_label_errors_name_the_file_array_or_option(tmp_path: Path) -> None:
    m = hybrid_recognizer()
    x = np.zeros((4, 3, 8, 16), np.float32)
    np.savez(tmp_path / "c.npz", x=x, y=np.array(["a"] * 4), f=np.zeros(4), short=np.array(["a"]))
    with pytest.raises(DataError, match=r"no array 'z' for the labels"):
        read_labels(tmp_path / "c.npz", "z", m, CHARS, 4)
    with pytest.raises(DataError, match=r"c.npz\['f'\]: labels must be one integer class or one string"):
        read_labels(tmp_path / "c.npz", "f", m, CHARS, 4)
    with pytest.raises(DataError, match=r"1 labels for 4 samples"):
        read_labels(tmp_path / "c.npz", "short", m, CHARS, 4)
    with pytest.raises(OptionError, match=r"is an input of the model"):
        read_labels(tmp_path / "c.npz", "x", m, CHARS, 4)
    with pytest.raises(OptionError, match=r"not one"):
        read_labels([{"x": x}], "y", m, CHARS, 4)
    with pytest.raises(OptionError, match=r"charset: 3 characters, so the CTC output should have 4 classes"):
        oc.optimize(m, "canonicalize", calibration=tmp_path / "c.npz", latency=False, labels="y", charset=("a", "b", "c"))
    with pytest.raises(OptionError, match=r"misalign"):
        oc.optimize(m, "canonicalize", calibration=tmp_path / "c.npz", latency=False, labels="y", nonfinite="skip")
    with pytest.raises(OptionError, match=r"fit none of the outputs"):  # integer labels, a CTC output
        np.savez(tmp_path / "i.npz", x=x, y=np.arange(4))
        oc.optimize(m, "canonicalize", calibration=tmp_path / "i.npz", latency=False, labels="y")


def test_cli_labels_and_charset(cli, tmp_path: Path) -> None:  # noqa: ANN001
    m = hybrid_recognizer()
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 16)).astype(np.float32)
    onnx.save(m, str(tmp_path / "in.onnx"))
    np.savez(tmp_path / "c.npz", x=x, y=_strings(m, x))
    (tmp_path / "chars.txt").write_text("\n".join(CHARS) + "\n", encoding="utf-8")
    r = cli("optimize", tmp_path / "in.onnx", tmp_path / "out.onnx", "--calib", tmp_path / "c.npz", "--passes",
            "canonicalize", "--labels", "y", "--charset", tmp_path / "chars.txt", "--no-latency", "--report",
            tmp_path / "r.json", "-q")
    assert r.code == 0, r.err
    out = json.loads((tmp_path / "r.json").read_text())["validation"]["outputs"][0]
    assert out["metrics"]["against_labels"] and out["metrics"]["ctc_lines"] == 1.0
    bad = cli("optimize", tmp_path / "in.onnx", tmp_path / "out2.onnx", "--calib", tmp_path / "c.npz", "--passes",
              "canonicalize", "--labels", "nope", "--no-latency", "-q")
    assert bad.code != 0 and "no array 'nope'" in bad.err and len(bad.err.strip().splitlines()) == 1, bad.err


def test_cli_validate_judges_against_labels(cli, tmp_path: Path) -> None:  # noqa: ANN001
    m = hybrid_recognizer()
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 16)).astype(np.float32)
    lossy, _ = oc.optimize(m, "canonicalize,prune:ratio=0.5", calibration=[{"x": x}], latency=False, validation=False)
    onnx.save(m, str(tmp_path / "a.onnx"))
    onnx.save(lossy, str(tmp_path / "b.onnx"))
    np.savez(tmp_path / "v.npz", x=x, y=_strings(lossy, x))
    args = ["validate", tmp_path / "a.onnx", tmp_path / "b.onnx", "--val", tmp_path / "v.npz", "--tol",
            "rel_range=none,ctc=0.995,ctc_lines=0.99", "-q"]
    assert cli(*args).code == 3  # by agreement with the original's decodes
    (tmp_path / "chars.txt").write_text("\n".join(CHARS), encoding="utf-8")
    r = cli(*args, "--labels", "y", "--charset", tmp_path / "chars.txt")
    assert r.code == 0, r.err
    none = cli("validate", tmp_path / "a.onnx", tmp_path / "b.onnx", "--labels", "y", "-q")
    assert none.code == 2 and "give calibration or validation data" in none.err


def test_the_search_gives_each_judged_batch_its_own_samples_labels(tmp_path: Path) -> None:
    """The search judges the first calibration samples and the held-out last ones, in
    batches cut at odd places: each batch's labels are those of its samples."""
    from onnxcompress.data import open_data
    from onnxcompress.pipeline import PassContext
    from onnxcompress.search import Search, SearchOptions

    m = hybrid_recognizer()
    x = np.random.default_rng(0).standard_normal((20, 3, 8, 16)).astype(np.float32)
    y = np.array([f"line {i}" for i in range(20)])
    np.savez(tmp_path / "c.npz", x=x, y=y)
    search = Search(SearchOptions(samples=12), PassContext(calibration=open_data(tmp_path / "c.npz", m, batch_size=3)),
                    labels=read_labels(tmp_path / "c.npz", "y", m, CHARS, 20))
    search._prepare(m, m)
    fit = [v for (_, held), t in zip(search.samples, search.targets) if not held for v in t[1]]
    held = [v for (_, held), t in zip(search.samples, search.targets) if held for v in t[1]]
    assert search.n_fit == 15 and fit == list(y[:7]) and held == list(y[15:])
