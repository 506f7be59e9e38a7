"""fixtures/build.py is deterministic and the committed fixtures are what it builds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import pytest

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


def test_embedded_default_is_the_shared_model_and_its_first_calibration_samples(tmp_path: Path) -> None:
    from .conftest import SHARED

    if not (SHARED / "models" / "textline_cls.onnx").exists():
        pytest.skip("needs the shared set")
    spec = importlib.util.spec_from_file_location("fixtures_build", FIXTURES / "build.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for p in mod.embed_default(SHARED, tmp_path):
        assert p.read_bytes() == (FIXTURES / p.name).read_bytes(), p.name
    assert (FIXTURES / "textline_cls.LICENSE").read_text().count("Apache License") >= 2
