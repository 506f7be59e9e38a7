"""The refit's staged runs (onnxcompress.frontier): each stage starts from the tensors the
last one kept and gives what a run from the model's inputs gives, with the weights
changed between stages, through a skip connection, a multi-output node, a subgraph that
captures an outer tensor, and an input whose batch axis is 1."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxcompress.frontier as frontier_mod
from onnxcompress.frontier import Frontier

from .builders import fvi, make_model, tensor


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    then = helper.make_graph([helper.make_node("Identity", ["b"], ["branch"])], "then", [], [fvi("branch", None)])
    other = helper.make_graph([helper.make_node("Neg", ["b"], ["branch_neg"])], "else", [], [fvi("branch_neg", None)])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Split", ["r1"], ["a", "b"], axis=1),  # two outputs
        helper.make_node("Conv", ["a", "w2"], ["c2"], kernel_shape=[1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["skip"]),  # r1 is read again, stages later
        helper.make_node("If", ["flag"], ["cond_out"], then_branch=then, else_branch=other),  # captures b
        helper.make_node("Conv", ["skip", "w3"], ["c3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["state"], ["st"], perm=[1, 0, 2]),  # state [2, N, 4] → [N, 2, 4]
        helper.make_node("MatMul", ["st", "w4"], ["y_state"]),
        helper.make_node("Mul", ["c3", "scale"], ["y"]),
    ]
    inits = [tensor(rng, "w1", (4, 4, 3, 3), 0.3), tensor(rng, "w2", (4, 2, 1, 1), 0.5),
             tensor(rng, "w3", (3, 4, 3, 3), 0.3), tensor(rng, "w4", (4, 4), 0.5),
             numpy_helper.from_array(np.array(True), "flag"), numpy_helper.from_array(np.float32(2.0), "scale")]
    return make_model(nodes, [fvi("x", ["N", 4, 6, 6]), fvi("state", [2, "N", 4])],
                      [fvi("y", None), fvi("cond_out", None), fvi("y_state", None)], inits)


# each stage: what it asks for, and the nodes (by first output) whose weights then change
STAGES = [(["x", "c1"], {"c1"}), (["a", "c2", "st", "y_state"], {"c2", "y_state"}), (["skip", "c3", "cond_out"], {"c3"})]


def _batches(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)  # samples on axis 0, as a data source yields them (state too)
    return [{"x": rng.standard_normal((2, 4, 6, 6)).astype(np.float32),
             "state": rng.standard_normal((2, 2, 4)).astype(np.float32)} for _ in range(count)]


def _staged(frontier: Frontier, nodes_run: list[int] | None = None) -> list[list[list[np.ndarray]]]:
    model = _model()
    weights = {"c1": "w1", "c2": "w2", "c3": "w3", "y_state": "w4"}
    out = []
    for i, (names, changing) in enumerate(STAGES):
        out.append(frontier.run(model, names, changing))
        for node in changing:  # what a refit does between stages
            t = next(t for t in model.graph.initializer if t.name == weights[node])
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * (1.5 + i), t.name))
    return out


def _assert_same(got: list[list[list[np.ndarray]]], want: list[list[list[np.ndarray]]]) -> None:
    assert len(got) == len(want) == len(STAGES)
    for stage_got, stage_want in zip(got, want):
        for batch_got, batch_want in zip(stage_got, stage_want, strict=True):
            for a, b in zip(batch_got, batch_want, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_stages_give_what_runs_from_the_inputs_give_and_run_fewer_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = frontier_mod.make_session

    def counting(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(len(model.graph.node))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(frontier_mod, "make_session", counting)
    staged = Frontier(_batches(3))
    got = _staged(staged)
    staged_sizes, sizes[:] = list(sizes), []
    plain = Frontier(_batches(3))
    plain.enabled = False
    want = _staged(plain)
    _assert_same(got, want)
    # the last stage recomputes c2 (its weights changed) but not the first conv
    assert staged_sizes[-1] < sizes[-1]
    assert "c1" in staged.done and "c2" in staged.done and "c3" not in staged.done
    # kept: only the inputs of changed nodes no stage has recomputed (r1, a, b are read no more)
    assert set(staged.values) == {"skip", "st"}


def test_past_the_memory_limit_the_stages_run_from_the_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frontier_mod, "FRONTIER_BYTES", 0)
    limited = Frontier(_batches(2))
    got = _staged(limited)
    assert not limited.enabled and not limited.values
    plain = Frontier(_batches(2))
    plain.enabled = False
    _assert_same(got, _staged(plain))


def test_a_stage_onnxruntime_cannot_build_falls_back_to_runs_from_the_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept value that cannot be declared as an input (a sequence, a string; here every
    stage after the first refused) ends the staging; the stages still give what runs
    from the inputs give."""
    real = Frontier._stage

    def refuse(self, model, names):  # type: ignore[no-untyped-def]
        if self.values:
            raise TypeError("no tensor type for a kept value")
        return real(self, model, names)

    monkeypatch.setattr(Frontier, "_stage", refuse)
    staged = Frontier(_batches(2))
    got = _staged(staged)
    assert not staged.enabled
    plain = Frontier(_batches(2))
    plain.enabled = False
    _assert_same(got, _staged(plain))
