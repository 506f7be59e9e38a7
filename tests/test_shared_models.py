"""Done-when of the foundation on the real models in ../shared.

``onnxcompress optimize IN OUT --passes canonicalize --calib <model>_calib.npz`` writes a
model whose outputs match the original (max abs error ≤ 1e-4 of the output range) on the
matching ``_eval.npz``, and whose report shows MACs and latency for both.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import SHARED_MODELS, shared_path

pytestmark = pytest.mark.shared


@pytest.mark.parametrize("name", SHARED_MODELS)
def test_canonicalize_cli_matches_original_on_eval(cli, tmp_path: Path, name: str) -> None:
    model = shared_path("models", f"{name}.onnx")
    calib = shared_path("data", f"{name}_calib.npz")
    evalset = shared_path("data", f"{name}_eval.npz")
    out, rep = tmp_path / f"{name}.onnx", tmp_path / "report.json"
    res = cli("optimize", model, out, "--passes", "canonicalize", "--calib", calib, "--report", rep,
              "--latency-runs", 5, "--quiet", "--allow-slower")  # the rewrite itself, whatever its speed
    assert res.code == 0, res.err
    r = json.loads(rep.read_text())
    assert r["written"] and r["before"]["macs"] > 0 and r["after"]["macs"] == r["before"]["macs"]
    assert r["latency"]["before_ms"] > 0 and r["latency"]["after_ms"] > 0
    assert r["after"]["op_counts"].get("Constant", 0) == 0 and r["after"]["op_counts"].get("Identity", 0) == 0
    check = tmp_path / "eval.json"
    res = cli("validate", model, out, "--val", evalset, "--report", check, "--tol", "rel_range=1e-4", "--quiet")
    assert res.code == 0, res.err
    v = json.loads(check.read_text())
    assert v["passed"] and v["samples"] == {"textline_cls": 500, "doc_orientation": 200, "text_det": 32,
                                            "captcha_det": 64}[name]
    for o in v["outputs"]:
        assert o["metrics"]["rel_range"] <= 1e-4 and o["metrics"]["new_nonfinite"] == 0


@pytest.mark.parametrize("name", SHARED_MODELS)
def test_inspect_prints_pinned_macs(cli, name: str) -> None:
    from .test_report import SHARED_MACS

    shape, macs = SHARED_MACS[name]
    model = shared_path("models", f"{name}.onnx")
    import onnx

    inp = onnx.load(str(model), load_external_data=False).graph.input[0].name
    res = cli("inspect", model, "--shape", f"{inp}={'x'.join(map(str, shape))}")
    assert res.code == 0, res.err
    assert f"MACs {macs:,} per sample" in res.out
