"""fixtures/build.py is deterministic and the committed fixtures are what it builds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx

from .conftest import FIXTURES


def test_build_is_deterministic_and_matches_committed(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("fixtures_build", FIXTURES / "build.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    written = mod.build(tmp_path)
    assert len(written) == 9
    for p in written:
        assert p.read_bytes() == (FIXTURES / p.name).read_bytes(), p.name
    for name in ("resnet_block", "mobilenet_se", "concat_split"):
        onnx.checker.check_model(onnx.load(str(FIXTURES / f"{name}.onnx")), full_check=True)
