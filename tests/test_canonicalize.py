"""canonicalize: exact rewrites, checked numerically with graph optimizations disabled."""

from __future__ import annotations

import copy
import tempfile
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxcompress.model import load_model
from onnxcompress.passes.canonicalize import Canonicalize, CanonicalizeOptions
from onnxcompress.pipeline import PassContext

from .builders import fvi, make_model, run, tensor
from .conftest import FIXTURES, SHARED_MODELS, shared_path


def _messy_model() -> onnx.ModelProto:
    """Constant weights, an Identity chain, an Identity into the graph output,
    duplicated initializers, a dead branch and an If whose branch captures an Identity output."""
    rng = np.random.default_rng(3)
    w = tensor(rng, "w_const", (4, 3, 3, 3), 0.3)
    dup_a = numpy_helper.from_array(np.full((1, 4, 1, 1), 0.5, np.float32), "dup_a")
    dup_b = numpy_helper.from_array(np.full((1, 4, 1, 1), 0.5, np.float32), "dup_b")
    cond = numpy_helper.from_array(np.array(True), "cond")
    bias = numpy_helper.from_array(np.arange(4, dtype=np.float32), "bias_flat")
    bshape = numpy_helper.from_array(np.array([1, 4, 1, 1], np.int64), "bshape")
    then_out = fvi("then_y", None)
    then_graph = helper.make_graph([helper.make_node("Relu", ["id2"], ["then_y"])], "then", [], [then_out])
    else_graph = helper.make_graph([helper.make_node("Neg", ["id2"], ["else_y"])], "else", [], [fvi("else_y", None)])
    nodes = [
        helper.make_node("Constant", [], ["w_const"], value=w),
        helper.make_node("Constant", [], ["scale"], value_float=2.0),
        helper.make_node("Conv", ["x", "w_const"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["conv"], ["id1"]),
        helper.make_node("Identity", ["id1"], ["id2"]),
        helper.make_node("Mul", ["id2", "dup_a"], ["m1"]),
        helper.make_node("Mul", ["m1", "dup_b"], ["m2"]),
        helper.make_node("Mul", ["m2", "scale"], ["m3_"]),
        helper.make_node("Reshape", ["bias_flat", "bshape"], ["bias4"]),  # a constant subgraph
        helper.make_node("Add", ["m3_", "bias4"], ["m3"]),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Add", ["m3", "branch"], ["sum"]),
        helper.make_node("Identity", ["sum"], ["y"]),
        helper.make_node("Sigmoid", ["x"], ["dead"]),  # reaches no output
    ]
    return make_model(nodes, [fvi("x", ["N", 3, 8, 8])], [fvi("y", ["N", 4, 8, 8])], [dup_a, dup_b, cond, bias, bshape])


def _check_same(a: onnx.ModelProto, b: onnx.ModelProto, shape: tuple[int, ...], seeds=(0, 1, 2)) -> None:
    name = a.graph.input[0].name
    for seed in seeds:
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        for ra, rb in zip(run(a, {name: x}), run(b, {name: x})):
            np.testing.assert_allclose(rb, ra, rtol=1e-5, atol=1e-6)


def test_messy_model_is_canonical_and_exact() -> None:
    m = _messy_model()
    orig = onnx.ModelProto()
    orig.CopyFrom(m)
    res = Canonicalize().run(m, PassContext())
    ops = Counter(n.op_type for n in res.model.graph.node)
    assert res.modified
    assert ops["Constant"] == 0 and ops["Identity"] == 0 and ops["Sigmoid"] == 0 and ops["Reshape"] == 0
    assert res.stats["constants_to_initializers"] == 2
    assert res.stats["identities_removed"] == 3
    assert res.stats["initializers_merged"] == 1 and res.stats["constants_folded"] == 1
    folded = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}["bias4"]
    assert folded.shape == (1, 4, 1, 1)
    assert res.stats["dead_nodes_removed"] == 1
    assert res.model.graph.output[0].name == "y"  # interface unchanged
    assert {t.name for t in res.model.graph.initializer} >= {"w_const", "scale"}
    assert res.stats["shapes_inferred"] and any(vi.name == "conv" or vi.name == "y" for vi in
                                                list(res.model.graph.value_info) + list(res.model.graph.output))
    onnx.checker.check_model(res.model)
    _check_same(orig, res.model, (2, 3, 8, 8))


def test_identity_from_graph_input_to_output_is_kept() -> None:
    m = make_model([helper.make_node("Identity", ["x"], ["y"])], [fvi("x", [2])], [fvi("y", [2])])
    res = Canonicalize().run(m, PassContext())
    assert [n.op_type for n in res.model.graph.node] == ["Identity"]
    assert res.stats["identities_removed"] == 0


def test_identities_into_two_outputs_and_a_chain() -> None:
    """One pass removes a chain and renames the producer for the first output; the second
    output of the same tensor keeps its Identity."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["a"]),
             helper.make_node("Identity", ["a"], ["b"]), helper.make_node("Identity", ["b"], ["y1"]),
             helper.make_node("Identity", ["a"], ["y2"]), helper.make_node("Neg", ["b"], ["y3"])]
    m = make_model(nodes, [fvi("x", [2, 3])], [fvi("y1", [2, 3]), fvi("y2", [2, 3]), fvi("y3", [2, 3])])
    res = Canonicalize().run(copy.deepcopy(m), PassContext())
    assert res.stats["identities_removed"] == 3
    assert [(n.op_type, list(n.input), list(n.output)) for n in res.model.graph.node] == [
        ("Relu", ["x"], ["y1"]), ("Identity", ["y1"], ["y2"]), ("Neg", ["y1"], ["y3"])]
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    for ra, rb in zip(run(m, {"x": x}), run(res.model, {"x": x})):
        np.testing.assert_array_equal(rb, ra)


def test_options_turn_steps_off() -> None:
    m = _messy_model()
    res = Canonicalize(CanonicalizeOptions(constants=False, identities=False, fold=False, dedupe=False,
                                           dead_code=False, infer_shapes=False, noops=False)).run(m, PassContext())
    assert not res.modified
    assert Counter(n.op_type for n in res.model.graph.node)["Constant"] == 2


def test_initializer_inputs_dropped_on_ir4() -> None:
    rng = np.random.default_rng(0)
    w = tensor(rng, "w", (2,))
    m = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [fvi("x", [2]), fvi("w", [2])], [fvi("y", [2])], [w])
    res = Canonicalize().run(copy.deepcopy(m), PassContext())
    assert [i.name for i in res.model.graph.input] == ["x"] and res.stats["initializer_inputs_removed"] == 1
    kept = Canonicalize(Canonicalize.Options(weight_inputs=False)).run(m, PassContext())  # a user who feeds w
    assert [i.name for i in kept.model.graph.input] == ["x", "w"] and kept.stats["initializer_inputs_removed"] == 0


def test_ir3_constants_become_graph_inputs_too() -> None:
    rng = np.random.default_rng(0)
    w = tensor(rng, "w", (2,))
    m = make_model([helper.make_node("Constant", [], ["w"], value=w), helper.make_node("Add", ["x", "w"], ["y"])],
                   [fvi("x", [2])], [fvi("y", [2])], opset=7, ir_version=3)
    res = Canonicalize().run(m, PassContext())
    assert "w" in {i.name for i in res.model.graph.input}
    onnx.checker.check_model(res.model)


def _noop_model() -> onnx.ModelProto:
    """Conv → AveragePool → paddle2onnx's ``assign`` (Unsqueeze → Add 0 → Squeeze) → Conv,
    and beside it every no-op the step removes and look-alikes it must keep."""
    rng = np.random.default_rng(5)

    def c(name: str, value: object) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value, np.float32), name)

    def i64(name: str, value: object) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value, np.int64), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["c1"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Unsqueeze", ["p", "ax0"], ["u"]),
        helper.make_node("Add", ["u", "zero"], ["u0"]),  # removed: + 0
        helper.make_node("Squeeze", ["u0", "ax0"], ["s"]),  # removed: undoes the Unsqueeze
        helper.make_node("Conv", ["s", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["one4", "c2"], ["c3"]),  # removed: 1 × x, [1, 16, 1, 1] against rank 4
        helper.make_node("Unsqueeze", ["c3", "axm1"], ["u2"]),
        helper.make_node("Squeeze", ["u2", "axm1"], ["s2"]),  # removed: negative axes, same axis
        helper.make_node("Relu", ["s2"], ["r"]),
        helper.make_node("Mul", ["r", "quarter"], ["q"]),
        helper.make_node("Shape", ["r"], ["shape_r"]),
        helper.make_node("Reshape", ["q", "shape_r"], ["y"]),  # removed: q has r's shape
        # kept: these change values or shapes
        helper.make_node("Sub", ["zero", "r"], ["neg"]),  # 0 − x
        helper.make_node("Mul", ["neg", "two"], ["neg2"]),  # 2 × x
        helper.make_node("ReduceMean", ["neg2"], ["v"], axes=[2, 3], keepdims=0),  # [N, 16]
        helper.make_node("Add", ["v", "zero3"], ["v3"]),  # + 0 of rank 3 turns [N, 16] into [1, N, 16]
        helper.make_node("Unsqueeze", ["v3", "ax0"], ["v4"]),
        helper.make_node("Squeeze", ["v4", "ax1"], ["z"]),  # a different axis than the Unsqueeze's
    ]
    inits = [tensor(rng, "w1", (16, 3, 3, 3), 0.3), tensor(rng, "w2", (16, 16, 3, 3), 0.1), c("zero", [0.0]),
             c("one4", np.ones((1, 16, 1, 1))), c("quarter", [0.25]), c("two", 2.0), c("zero3", np.zeros((1, 1, 1))),
             i64("ax0", [0]), i64("axm1", [-1]), i64("ax1", [1])]
    return make_model(nodes, [fvi("x", ["N", 3, 16, 16])], [fvi("y", None), fvi("z", None)], inits)


def test_noops_are_removed_and_the_rest_kept() -> None:
    m = _noop_model()
    res = Canonicalize().run(copy.deepcopy(m), PassContext())
    ops = Counter(n.op_type for n in res.model.graph.node)
    assert res.stats["noops_removed"] == 5
    assert ops["Identity"] == 0 and ops["Reshape"] == 0 and ops["Shape"] == 0
    assert ops["Unsqueeze"] == 1 and ops["Squeeze"] == 1  # only the pair over different axes stays
    assert ops["Add"] == 1 and ops["Sub"] == 1 and ops["Mul"] == 2  # + 0 of rank 3, 0 − x, 2 × x, x × 0.25
    pool = next(n for n in res.model.graph.node if n.op_type == "AveragePool")
    assert any(n.op_type == "Conv" and n.input[0] == pool.output[0] for n in res.model.graph.node)
    onnx.checker.check_model(res.model)
    for seed in (0, 1, 2):
        x = np.random.default_rng(seed).standard_normal((2, 3, 16, 16)).astype(np.float32)
        for ra, rb in zip(run(m, {"x": x}), run(res.model, {"x": x})):
            assert ra.shape == rb.shape
            np.testing.assert_array_equal(rb, ra)
    off = Canonicalize(CanonicalizeOptions(noops=False)).run(copy.deepcopy(m), PassContext())
    assert off.stats["noops_removed"] == 0 and Counter(n.op_type for n in off.model.graph.node)["Reshape"] == 1


def test_a_removed_assign_keeps_onnxruntime_in_its_blocked_layout() -> None:
    """The reason for the step: an Unsqueeze → Squeeze between two convolutions makes
    onnxruntime reorder the tensor out of its blocked channel layout and back."""
    m = _noop_model()
    res = Canonicalize().run(copy.deepcopy(m), PassContext())

    def reorders(model: onnx.ModelProto) -> int:
        with tempfile.TemporaryDirectory() as tmp:
            opts = ort.SessionOptions()
            opts.optimized_model_filepath = f"{tmp}/opt.onnx"
            opts.log_severity_level = 3  # its warning that the blocked layout is CPU-specific
            ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            return sum(n.op_type.startswith("Reorder") for n in onnx.load(f"{tmp}/opt.onnx").graph.node)

    before = reorders(m)
    if before == 0:
        pytest.skip("onnxruntime does not use its blocked (NCHWc) layout on this CPU")
    assert reorders(res.model) < before


@pytest.mark.parametrize("name", ["resnet_block", "mobilenet_se", "concat_split"])
def test_fixtures_exact(name: str) -> None:
    m = load_model(FIXTURES / f"{name}.onnx")
    orig = onnx.ModelProto()
    orig.CopyFrom(m)
    res = Canonicalize().run(m, PassContext())
    _check_same(orig, res.model, (3, 3, 32, 32))
    if name == "mobilenet_se":  # weights were Constant nodes, one Identity
        assert res.stats["constants_to_initializers"] > 20 and res.stats["identities_removed"] == 1


@pytest.mark.shared
@pytest.mark.parametrize("name", SHARED_MODELS)
def test_real_exports_canonical_and_exact(name: str) -> None:
    path = shared_path("models", f"{name}.onnx")
    data = np.load(shared_path("data", f"{name}_eval.npz"))["x"][:1]
    orig = load_model(path)
    m = onnx.ModelProto()
    m.CopyFrom(orig)
    res = Canonicalize().run(m, PassContext())
    before, after = Counter(n.op_type for n in orig.graph.node), Counter(n.op_type for n in res.model.graph.node)
    assert after["Constant"] == 0 and after["Identity"] == 0
    for op in ("Conv", "BatchNormalization", "ConvTranspose", "MatMul"):
        assert after[op] == before[op]  # nothing but the canonical forms changed
    onnx.checker.check_model(res.model)
    inp = orig.graph.input[0].name
    for ra, rb in zip(run(orig, {inp: data}), run(res.model, {inp: data})):
        np.testing.assert_allclose(rb, ra, rtol=1e-5, atol=1e-6 * float(np.abs(ra).max()))


def test_canonicalize_reports_onnxruntime_fusions_it_loses(monkeypatch) -> None:  # noqa: ANN001
    import onnxcompress.passes.canonicalize as canon_mod
    import onnxcompress.runtime as runtime_mod
    from onnxcompress.passes import Canonicalize
    from onnxcompress.pipeline import PassContext

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Identity", ["c"], ["i"]),
             helper.make_node("Relu", ["i"], ["y"])]
    m = make_model(nodes, [fvi("x", [1, 3, 8, 8])], [fvi("y", [1, 4, 6, 6])], [tensor(rng, "w", (4, 3, 3, 3))])
    res = Canonicalize().run(onnx.ModelProto.FromString(m.SerializeToString()), PassContext())
    assert res.stats["identities_removed"] == 1 and res.stats["runtime_fusions_lost"] == ""
    counts = iter([{"com.microsoft:FusedConv": 1}, {}])  # before, after: as if the rewrite broke the fusion
    monkeypatch.setattr(canon_mod, "runtime_fusions", lambda model, provider="cpu": next(counts))
    monkeypatch.setattr(runtime_mod, "runtime_fusions", lambda model, provider="cpu": next(counts))
    res = Canonicalize().run(m, PassContext())
    assert res.stats["runtime_fusions_lost"] == "com.microsoft:FusedConv 1 → 0"


def test_a_fusion_absorbed_by_a_larger_one_is_not_reported_lost(monkeypatch) -> None:  # noqa: ANN001
    """After canonicalize, onnxruntime made 12 of a PyTorch-exported MiniLM's 13
    LayerNormalizations into SkipLayerNormalizations with their residual Adds (its counts
    below): a LayerNormalization fewer for each Skip more is no loss. A LayerNorm that
    became nothing larger still is one."""
    import onnxcompress.runtime as runtime_mod

    counts = {"before": {"LayerNormalization": 13, "FusedMatMul or Gemm": 36},
              "after": {"LayerNormalization": 1, "com.microsoft:SkipLayerNormalization": 12, "FusedMatMul or Gemm": 36}}
    monkeypatch.setattr(runtime_mod, "runtime_fusions", lambda model, provider="cpu": counts["after"])
    m = onnx.ModelProto()
    assert runtime_mod.lost_fusions(counts["before"], m) == ""
    counts["after"] = {"LayerNormalization": 0, "com.microsoft:SkipLayerNormalization": 12, "FusedMatMul or Gemm": 36}
    assert runtime_mod.lost_fusions(counts["before"], m) == "LayerNormalization 13 → 0"
    # a Skip that was there before covers nothing: only what the rewrite gained does
    before = {"LayerNormalization": 2, "com.microsoft:SkipLayerNormalization": 1}
    counts["after"] = {"LayerNormalization": 1, "com.microsoft:SkipLayerNormalization": 1}
    assert runtime_mod.lost_fusions(before, m) == "LayerNormalization 2 → 1"
