"""A fast subset of bench/zoo.py: generated edge cases through passes alone and the
default pipeline as a user runs them (the CLI, one process each). Never an internal
error; exact passes exact; a refusal is one line with exit 2 or 3. Timing is the
benchmark's job, not asserted here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import zoo  # noqa: E402


@pytest.mark.parametrize("name", ["scalar_and_state_inputs", "nhwc_tf", "fp16_weights", "loop_subgraph"])
def test_zoo_edge_case(name: str, tmp_path: Path) -> None:
    src, calib = zoo.prepare("edge", name, ROOT.parent / "shared", tmp_path / "models")
    for run in ("fuse", "prune", "int8", "default"):
        row = zoo.run_one(src, calib, run, tmp_path, time_budget=20, timeout=600, timed=False)
        assert row["exit"] != 1, row
        if row["exit"] == 0:
            assert "rel_range" in row, row
            if run in zoo.EXACT_RUNS:
                assert row["rel_range"] <= 1e-4, row
        else:
            assert row["exit"] in (2, 3) and row["one_line"], row
