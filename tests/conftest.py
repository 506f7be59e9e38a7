"""Shared test helpers: paths, the real models in ../shared, running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
SHARED = Path(os.environ.get("ONNXCOMPRESS_SHARED", ROOT.parent / "shared"))
SHARED_MODELS = ["textline_cls", "doc_orientation", "text_det", "captcha_det"]


def on_resnet_block(spec: str):  # type: ignore[no-untyped-def]
    """``spec`` run on the resnet_block fixture with its calibration data, judged on its
    validation data with no tolerance (every metric is reported, none fails): the report
    and the output's mean cosine."""
    import onnxcompress as oc

    _, rep = oc.optimize(FIXTURES / "resnet_block.onnx", spec, calibration=FIXTURES / "resnet_block_calib.npz",
                         validation=FIXTURES / "resnet_block_val.npz", latency=False,
                         thresholds=oc.Thresholds(cosine=None, top1=None, rel_range=None))
    return rep, rep.validation.outputs[0].metrics["cosine_mean"]


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available (set ONNXCOMPRESS_SHARED)")
    return p


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run the CLI in-process: cli("optimize", ...) -> CliResult."""
    from onnxcompress.cli import main

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def run_cli_subprocess(*args: object, timeout: float = 300) -> CliResult:
    """Run the CLI in a fresh interpreter (real exit code, real stderr)."""
    proc = subprocess.run([sys.executable, "-m", "onnxcompress.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)
