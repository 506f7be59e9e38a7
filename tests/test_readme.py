"""The README's examples run as written: its CLI examples and its Python API block, from a
folder holding the repository's fixtures (the quick-start commands themselves run in
.ci/run)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from .conftest import FIXTURES

README = FIXTURES.parent / "README.md"


def _blocks(lang: str) -> list[str]:
    text = README.read_text()
    blocks = re.findall(rf"(<!-- quickstart:\w+ -->\n)?```{lang}\n(.*?)```", text, flags=re.S)
    return [body for marker, body in blocks if not marker]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "fixtures").symlink_to(FIXTURES)
    return tmp_path


def test_readme_is_one_page() -> None:
    assert len(README.read_text().splitlines()) <= 250


def test_readme_links_exist() -> None:
    for target in re.findall(r"\]\(((?:docs|fixtures)/[^)#]*)\)", README.read_text()):
        assert (FIXTURES.parent / target).exists(), target


def test_cli_examples_run_as_written(workdir: Path) -> None:
    commands = [line for b in _blocks("bash") for line in b.splitlines() if line.startswith("onnxcompress ")]
    assert len(commands) >= 3
    for cmd in commands:
        argv = shlex.split(cmd)
        res = subprocess.run([sys.executable, "-m", "onnxcompress", *argv[1:]], cwd=workdir,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{cmd}\n{res.stderr[-2000:]}"
    onnx.checker.check_model(onnx.load(str(workdir / "pruned.onnx")))
    assert (workdir / "pruned.json").stat().st_size > 0


def test_python_api_example_runs_as_written(workdir: Path) -> None:
    (code,) = _blocks("python")
    res = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    printed = res.stdout.splitlines()
    assert len(printed) == 3
    assert printed[1].startswith("True ")  # the fixed pipeline validated within its tolerance
    assert float(printed[1].split()[1]) < 0.9  # and removed MACs


def test_pass_pages_list_the_options_the_code_has() -> None:
    """docs/passes/<pass>.md carries its options table as docs/options.py writes it from
    the options dataclasses (rerun that script after changing an option)."""
    spec = importlib.util.spec_from_file_location("docs_options", FIXTURES.parent / "docs" / "options.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from onnxcompress.registry import REGISTRY

    for name in REGISTRY:
        page = FIXTURES.parent / "docs" / "passes" / f"{name}.md"
        assert page.read_text() == mod.render(page, name), f"{page} is stale: run python docs/options.py"
