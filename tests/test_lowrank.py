"""lowrank: exact at full rank for every conv geometry; rank choice; skip logic; refit."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxcompress as oc
from onnxcompress.data import LimitedSource, open_data
from onnxcompress.errors import OptionError
from onnxcompress.passes.lowrank import LowRank, LowRankOptions, split_layer, split_weights, svd_factors
from onnxcompress.pipeline import PassContext
from onnxcompress.registry import build_pipeline

from .builders import hybrid_recognizer, run
from .conftest import FIXTURES, SHARED_MODELS, on_resnet_block, shared_path


def conv_model(k, stride=1, dil=1, pads=None, auto=None, c=6, n=10, hw=(13, 17), seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, c, *k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    attrs = {"kernel_shape": list(k), "strides": [stride, stride], "dilations": [dil, dil]}
    if auto:
        attrs["auto_pad"] = auto
    elif pads:
        attrs["pads"] = pads
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c, *hw])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", "c", "h", "w"])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


CASES = {
    "3x3": dict(k=(3, 3), pads=[1, 1, 1, 1]),
    "5x5": dict(k=(5, 5), pads=[2, 2, 2, 2]),
    "3x5": dict(k=(3, 5), pads=[1, 2, 1, 2]),
    "3x3-stride2": dict(k=(3, 3), stride=2, pads=[1, 1, 1, 1]),
    "3x3-dilation2": dict(k=(3, 3), dil=2, pads=[2, 2, 2, 2]),
    "3x5-asymmetric-pads": dict(k=(3, 5), pads=[1, 2, 0, 1]),
    "5x5-stride2-dil2-asym": dict(k=(5, 5), stride=2, dil=2, pads=[2, 1, 0, 3]),
    "same-upper-stride2": dict(k=(3, 3), stride=2, auto="SAME_UPPER"),
    "same-lower-5x3-stride2": dict(k=(5, 3), stride=2, auto="SAME_LOWER"),
    "valid": dict(k=(3, 3), auto="VALID"),
    "notset-no-pads": dict(k=(3, 5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_full_rank_chain_is_exact(case: str) -> None:
    m = conv_model(**CASES[case])
    split = split_layer(copy.deepcopy(m), "conv")
    assert [n.op_type for n in split.graph.node] == ["Conv", "Conv"]
    onnx.checker.check_model(split)
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((1, 6, 13, 17)).astype(np.float32)
        ref, out = run(m, {"x": x})[0], run(split, {"x": x})[0]
        assert out.shape == ref.shape
        assert float(np.abs(out - ref).max()) <= 1e-4 * float(ref.max() - ref.min())


def test_svd_factor_shapes_and_truncation_error() -> None:
    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    u, s, vt = svd_factors(w)
    vert, horiz = split_weights(w, 5, u, s, vt)
    assert vert.shape == (5, 4, 3, 1) and horiz.shape == (8, 5, 1, 3)
    # the rank-5 chain is the best rank-5 approximation of the (C·Kh)×(N·Kw) matrix
    approx = np.einsum("kcia,nkbj->ncij", vert, horiz)
    m = lambda t: t.transpose(1, 2, 0, 3).reshape(12, 24)  # noqa: E731
    assert np.linalg.norm(m(w) - m(approx)) == pytest.approx(np.sqrt((s[5:] ** 2).sum()), rel=1e-4)


def test_1xk_and_kx1_and_grouped_are_left_alone() -> None:
    for k in ((1, 7), (7, 1)):
        res = LowRank(LowRankOptions(rank=8)).run(conv_model(k=k), PassContext())
        assert not res.modified and res.stats["candidates"] == 0
    # a 1×1 conv is a linear map: a candidate, kept where no rank saves MACs (6 → 10 channels)
    res = LowRank(LowRankOptions(rank=8)).run(conv_model(k=(1, 1)), PassContext())
    assert not res.modified and res.stats["candidates"] == 1 and "saves less" in res.stats["layers"][0]["reason"]


def gemm_model(trans_b: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((24, 16) if trans_b else (16, 24)).astype(np.float32)
    c = rng.standard_normal(24).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="gemm", alpha=0.5, beta=2.0, transB=trans_b)
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 16])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 24])],
                          [numpy_helper.from_array(b, "B"), numpy_helper.from_array(c, "C")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


LINEAR = {  # model, node, input shape
    "gemm": (lambda: gemm_model(0), "gemm", (5, 16)),
    "gemm-transB": (lambda: gemm_model(1), "gemm", (5, 16)),
    **{f"hybrid-{n}": (lambda: hybrid_recognizer(ctc=False), n, (2, 3, 8, 16))
       for n in ("pointwise", "q", "v", "proj", "fc1", "fc2", "head")},
}


@pytest.mark.parametrize("case", list(LINEAR))
def test_linear_layers_split_exactly_at_full_rank(case: str) -> None:
    """MatMul, Gemm (transB, alpha, beta, C) and 1×1 Conv: W → A·B at full rank computes the
    same outputs (onnxruntime, graph optimizations off, three seeded inputs), and the
    bias Add after a MatMul is the one that was there."""
    make, name, shape = LINEAR[case]
    m = make()
    split = split_layer(copy.deepcopy(m), name)
    onnx.checker.check_model(split, full_check=True)
    ops = [n.op_type for n in split.graph.node if n.name.startswith(f"{name}_lr")]
    assert len(ops) == 2 and ops[0] == ("Conv" if name == "pointwise" else "MatMul")
    if case.startswith("hybrid") and name != "pointwise":
        out = next(n for n in split.graph.node if n.name == f"{name}_lr_b").output[0]
        assert [n.op_type for n in split.graph.node if out in n.input] == ["Add"]
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        ref, out = run(m, {"x": x})[0], run(split, {"x": x})[0]
        assert float(np.abs(out - ref).max()) <= 1e-5 * float(np.abs(ref).max())


def test_linear_layers_are_split_within_a_macs_budget_and_timed() -> None:
    """On a transformer block: the MatMuls are candidates; at a MACs budget the pass splits
    some and meets it, a split keeps the classifier's bias Add; ``measure`` (auto) times
    each linear split at the model's shapes and says so."""
    m = hybrid_recognizer(d=64, hidden=256, classes=200)
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 16)).astype(np.float32)
    ctx = PassContext(calibration=open_data([{"x": x[:4]}, {"x": x[4:]}], m, batch_size=4))
    res = LowRank(LowRankOptions(macs_ratio=0.8, measure="false")).run(copy.deepcopy(m), ctx)
    kinds = {layer["node"]: layer["kernel"] for layer in res.stats["layers"] if "kernel" in layer}
    assert {"q", "fc1", "fc2", "head"} <= set(kinds) and kinds["head"] == "MatMul" and kinds["pointwise"] == "1x1"
    assert res.modified and res.stats["macs_ratio"] <= 0.8
    assert any(n.name.endswith("_lr_a") and n.op_type == "MatMul" for n in res.model.graph.node)
    timed = LowRank(LowRankOptions(rank=8)).run(copy.deepcopy(m), PassContext())
    assert any("measured" in layer["reason"] for layer in timed.stats["layers"])


def test_linear_layers_on_a_sequences_rows_cost_and_time_as_the_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    """fuse's linear_bias writes a linear layer on tokens as a Gemm on [N·T, K] rows: lowrank
    counts T positions per sample there and times the split at T rows, as for the MatMul on
    [N, T, K] (one position and one row before), so a MACs budget splits the same layers at
    the same ranks."""
    from onnxcompress import validate
    from onnxcompress.passes import lowrank as lowrank_mod

    m = hybrid_recognizer(d=64, hidden=256, classes=200)
    plain, _ = build_pipeline("canonicalize,fuse:linear_bias=false").run(copy.deepcopy(m))
    fused, _ = build_pipeline("canonicalize,fuse").run(copy.deepcopy(m))
    assert sum(n.op_type == "Gemm" for n in fused.graph.node) == 6
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 16)).astype(np.float32)
    shapes: list[tuple[str, tuple[int, ...]]] = []
    monkeypatch.setattr(lowrank_mod, "_TIMINGS", {})
    monkeypatch.setattr(validate, "measure_latency", lambda models, feeds, **kw: shapes.append(
        (models[0].graph.node[0].op_type, feeds["x"].shape)) or [1.0, 0.5])
    chosen = []
    for model in (plain, fused):
        ctx = PassContext(calibration=open_data([{"x": x[:4]}, {"x": x[4:]}], model, batch_size=4))
        res = LowRank(LowRankOptions(macs_ratio=0.8, layers="linear")).run(copy.deepcopy(model), ctx)
        chosen.append({layer["node"]: (layer["decision"], layer.get("rank")) for layer in res.stats["layers"]})
        assert res.stats["macs_ratio"] <= 0.8
    assert chosen[0] == chosen[1] and ("split", 24) in chosen[1].values()
    rows = {shape for op, shape in shapes if op == "Gemm"}
    assert rows and all(shape[:-1] == (8,) for shape in rows)  # T = 8 tokens, not 1


def test_layers_option_limits_the_candidates() -> None:
    """``layers=spatial`` splits K×K convs only, ``linear`` MatMul, Gemm and 1×1 Conv only;
    together they are the candidates of ``all``, and each says why it left the others."""
    m = hybrid_recognizer(d=64, hidden=256, classes=200)
    cands = {}
    for kinds in ("all", "spatial", "linear"):
        res = LowRank(LowRankOptions(rank=8, layers=kinds, measure="false")).run(copy.deepcopy(m), PassContext())
        cands[kinds] = {layer["node"]: layer["kernel"] for layer in res.stats["layers"] if "kernel" in layer}
        assert res.stats["candidates"] == len(cands[kinds]) > 0
        if kinds != "all":
            assert any(layer["reason"] == f"layers={kinds}" for layer in res.stats["layers"])
    assert set(cands["spatial"]) == {"stem"} and cands["spatial"]["stem"] == "3x3"
    assert {"pointwise", "q", "fc1", "head"} <= set(cands["linear"]) and "stem" not in cands["linear"]
    assert cands["all"] == {**cands["spatial"], **cands["linear"]}


def test_skip_when_not_cheaper_and_split_when_cheaper() -> None:
    big = conv_model(k=(3, 3), c=64, n=64, pads=[1, 1, 1, 1])
    full = LowRank(LowRankOptions(rank=192)).run(copy.deepcopy(big), PassContext())  # full rank: more MACs
    assert not full.modified and "saves less than 15%" in full.stats["layers"][0]["reason"]
    low = LowRank(LowRankOptions(rank=16)).run(copy.deepcopy(big), PassContext())
    layer = low.stats["layers"][0]
    assert low.modified and layer["decision"] == "split" and layer["macs_after"] < 0.85 * layer["macs_before"]
    assert low.stats["macs_after"] < low.stats["macs_before"]


def test_energy_and_budget() -> None:
    big = conv_model(k=(3, 3), c=64, n=64, pads=[1, 1, 1, 1], seed=3)
    res = LowRank(LowRankOptions(energy=0.5, round_to=1)).run(copy.deepcopy(big), PassContext())
    layer = res.stats["layers"][0]
    assert layer["energy"] >= 0.5 and layer["rank"] % 1 == 0
    budget = LowRank(LowRankOptions(macs_ratio=0.5)).run(copy.deepcopy(big), PassContext())
    assert budget.stats["macs_ratio"] <= 0.5 and budget.stats["layers"][0]["rank"] % 8 == 0


def test_options_checked() -> None:
    with pytest.raises(OptionError, match="energy must be in"):
        LowRank.from_mapping({"energy": "2"})
    with pytest.raises(OptionError, match="refit=lstsq needs calibration data"):
        LowRank(LowRankOptions(rank=8, refit="lstsq")).run(conv_model(k=(3, 3), c=64, n=64), PassContext())


def test_refit_beats_pure_svd_on_fixture() -> None:
    cos = {}
    for refit in ("none", "lstsq"):
        rep, cos[refit] = on_resnet_block(f"lowrank:rank=8:refit={refit}")
        assert rep.passes[-1].stats["split"] > 0
    assert cos["lstsq"] > cos["none"]


@pytest.mark.shared
@pytest.mark.parametrize("name", SHARED_MODELS)
def test_shared_models_go_through(name: str) -> None:
    m, _ = build_pipeline("canonicalize").run(oc.load_model(shared_path("models", f"{name}.onnx")))
    res = LowRank(LowRankOptions(energy=0.9, min_saving=0.0)).run(m, PassContext())
    onnx.checker.check_model(res.model, full_check=True)
    x = np.load(shared_path("data", f"{name}_eval.npz"))["x"][:1]
    out = run(res.model, {res.model.graph.input[0].name: x}, optimize=True)
    assert np.isfinite(out[0]).all()


@pytest.mark.parametrize("name", ["resnet50", "inception_v1", "inception_v2"])
def test_light_models_go_through(name: str) -> None:
    from .light import LIGHT, realize

    if not (LIGHT / f"light_{name}.onnx").exists():
        pytest.skip("onnx package without light models")
    m, _ = build_pipeline("canonicalize").run(realize(name))
    res = LowRank(LowRankOptions(energy=0.8)).run(m, PassContext())
    assert res.modified and res.stats["split"] > 0
    onnx.checker.check_model(res.model, full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    assert np.isfinite(run(res.model, {res.model.graph.input[0].name: x}, optimize=True)[0]).all()


def test_data_energy_weights_components_by_input() -> None:
    """With inputs that only excite one input channel, components acting there dominate."""
    from onnxcompress.data import open_data
    from onnxcompress.passes.lowrank import Candidate, _data_energy

    m = conv_model(k=(3, 3), c=4, n=8, pads=[1, 1, 1, 1])
    x = np.zeros((16, 4, 13, 17), np.float32)
    x[:, 0] = np.random.default_rng(0).standard_normal((16, 13, 17))
    data = open_data([{"x": x[i : i + 1]} for i in range(16)], m)
    w = numpy_helper.to_array(m.graph.initializer[0])
    u, s, vt = svd_factors(w)
    cand = Candidate(0, m.graph.node[0], w, u, s, vt, (13, 17), 17, 0)
    _data_energy(m, [cand], PassContext(calibration=data))
    assert cand.weights is not None and cand.weights.shape == s.shape
    # i.i.d. unit-variance input on channel 0 only: E[(u_kᵀx)²] = ‖u_k[rows of channel 0]‖²
    # (rows (c=0, i=0..2) of U), a little less near the zero-padded borders
    expected = s**2 * (u[:3] ** 2).sum(axis=0)
    big = expected > 1e-3 * expected.max()
    np.testing.assert_allclose(cand.weights[big], expected[big], rtol=0.25)
    assert (cand.weights[~big] < 1e-2 * expected.max()).all()


def test_sensitivity_budget_meets_macs_and_measures_every_layer() -> None:
    m = oc.load_model(FIXTURES / "resnet_block.onnx")
    _, rep = oc.optimize(m, "lowrank:macs_ratio=0.9:experimental.sensitivity=true:refit=none", calibration=FIXTURES / "resnet_block_calib.npz",
                         validation=False, latency=False)
    st = rep.passes[-1].stats
    split = [layer for layer in st["layers"] if layer["decision"] == "split"]
    assert st["macs_ratio"] <= 0.9 and split
    assert all("sensitivity" in layer["reason"] for layer in split)


def test_sensitivity_keeps_a_layer_whole_when_splitting_it_costs_most() -> None:
    """Two parallel 3×3 convs of equal cost: 'flat' has a flat spectrum (any split hurts),
    'lowrank' is rank 4 plus tiny noise (a split at rank 8 is nearly free). A budget one
    split can meet must split 'lowrank' and leave 'flat' whole, saying why; the energy
    allocation (no calibration data) splits both."""
    rng = np.random.default_rng(7)
    c, n = 32, 32
    flat = rng.standard_normal((n, c, 3, 3)).astype(np.float32)
    low = (rng.standard_normal((c * 3, 4)) @ rng.standard_normal((4, n * 3))).reshape(c, 3, n, 3).transpose(2, 0, 1, 3)
    low = (low + 1e-3 * rng.standard_normal(low.shape)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", name], [f"y_{name}"], name=name, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
             for name in ("flat", "lowrank")]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c, 16, 16])],
                          [helper.make_tensor_value_info(f"y_{nm}", onnx.TensorProto.FLOAT, None) for nm in ("flat", "lowrank")],
                          [numpy_helper.from_array(flat, "flat"), numpy_helper.from_array(low, "lowrank")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    data = [{"x": rng.standard_normal((1, c, 16, 16)).astype(np.float32)} for _ in range(8)]
    _, rep = oc.optimize(m, "lowrank:macs_ratio=0.75:refit=none", calibration=data, validation=False, latency=False)
    layers = {layer["node"].split("_lr_")[0]: layer for layer in rep.passes[-1].stats["layers"]}
    assert rep.passes[-1].stats["macs_ratio"] <= 0.75
    assert layers["lowrank"]["decision"] == "split"
    assert layers["flat"]["decision"] == "kept" and "too sensitive" in layers["flat"]["reason"]
    _, rep = oc.optimize(m, "lowrank:macs_ratio=0.75:refit=none", validation=False, latency=False)
    assert {layer["decision"] for layer in rep.passes[-1].stats["layers"]} == {"split"}


def test_a_second_budget_on_the_same_model_reuses_the_measured_sensitivities(monkeypatch: pytest.MonkeyPatch) -> None:
    """The search splits one model at several budgets with one context: the second run
    measures no layer again (no OutputDamage.of call) and writes the model a fresh
    context writes; a layer whitened on other samples, or a changed model, is measured
    again."""
    import onnxcompress.sensitivity as sensitivity_mod

    m = oc.load_model(FIXTURES / "resnet_block.onnx")
    calib = open_data(FIXTURES / "resnet_block_calib.npz", m)
    calls = {"n": 0}
    real_of = sensitivity_mod.OutputDamage.of

    def counting_of(self, model):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real_of(self, model)

    monkeypatch.setattr(sensitivity_mod.OutputDamage, "of", counting_of)

    def run_lowrank(ratio: float, ctx: PassContext, model: onnx.ModelProto = m):
        calls["n"] = 0
        res = LowRank(LowRankOptions(macs_ratio=ratio, refit="none", measure="false")).run(copy.deepcopy(model), ctx)
        return res, calls["n"]

    shared = PassContext(calibration=calib)
    first, measured = run_lowrank(0.9, shared)
    active = sum(1 for layer in first.stats["layers"] if "sensitivity" in layer["reason"])
    assert measured > 0 and first.stats["sensitivity_reused"] == 0
    second, remeasured = run_lowrank(0.7, shared)
    assert remeasured == 0 and second.stats["sensitivity_reused"] == active
    fresh, _ = run_lowrank(0.7, PassContext(calibration=calib))
    assert fresh.stats["sensitivity_reused"] == 0
    assert [layer["rank"] for layer in fresh.stats["layers"]] == [layer["rank"] for layer in second.stats["layers"]]
    assert fresh.model.SerializeToString() == second.model.SerializeToString()
    # the same first 8 samples (the measurement's) but fewer to whiten with: other factors
    fewer = dataclasses.replace(shared, calibration=LimitedSource(calib, 12))
    refactored, measured_again = run_lowrank(0.7, fewer)
    assert measured_again > 0 and refactored.stats["sensitivity_reused"] < active
    changed = copy.deepcopy(m)
    w = next(t for t in changed.graph.initializer if len(t.dims) == 4)
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.5, w.name))
    other, measured_again = run_lowrank(0.7, shared, changed)
    assert measured_again > 0 and other.stats["sensitivity_reused"] == 0


def _anisotropic_inputs(seed: int, count: int, c: int = 8) -> list[dict[str, np.ndarray]]:
    """Inputs whose channels have very different scales (channel k: 4^-k) and are mixed,
    as real activations are: the directions the plain SVD treats alike are not alike."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).standard_normal((c, c)) * (4.0 ** -np.arange(c))[None, :]
    return [{"x": np.einsum("dc,nchw->ndhw", mix, rng.standard_normal((1, c, 13, 17))).astype(np.float32)}
            for _ in range(count)]


def test_whiten_lowers_output_error_and_stays_exact_at_full_rank() -> None:
    """At the same rank (no refit), the whitened subspace's output error on held-out
    inputs from the calibration distribution is well below the plain SVD's (its rank-r
    optimum is for those inputs); at full rank (C·Kh = 24) its factors give back W."""
    from onnxcompress.data import open_data
    from onnxcompress.passes.lowrank import Candidate, _data_energy

    m = conv_model(k=(3, 3), c=8, n=16, pads=[1, 1, 1, 1], seed=3)
    calib, held = _anisotropic_inputs(0, 16), _anisotropic_inputs(1, 4)
    ref = np.concatenate([run(m, h)[0] for h in held])
    err = {}
    for whiten in (False, True):
        out, rep = oc.optimize(m, f"lowrank:rank=4:min_saving=0:refit=none:experimental.whiten={str(whiten).lower()}",
                               calibration=calib, validation=False, latency=False)
        assert rep.passes[-1].stats["split"] == 1
        got = np.concatenate([run(out, h)[0] for h in held])
        err[whiten] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert err[True] < 0.5 * err[False], err

    w = numpy_helper.to_array(m.graph.initializer[0])
    cand = Candidate(0, m.graph.node[0], w, *svd_factors(w), (13, 17), 17, 0)
    _data_energy(m, [cand], PassContext(calibration=open_data(calib, m)), whiten=True)
    vert, horiz = split_weights(w, len(cand.s), cand.u, cand.s, cand.vt)
    np.testing.assert_allclose(np.einsum("kcia,nkbj->ncij", vert, horiz), w, rtol=0, atol=1e-4 * np.abs(w).max())


def test_whitening_shrinks_the_few_samples_second_moment() -> None:
    """Two strong weight directions that the calibration inputs barely excite (sd 0.01),
    beside weak ones they excite more (sd 0.4): whitening with a bare numerical ε keeps the
    weak ones at rank 6, so inputs that do excite the strong ones (the same samples plus
    isotropic noise) lose far more; the default shrinkage keeps the strong ones, at a small
    cost on the calibration inputs themselves."""
    from onnxcompress.passes.lowrank import Candidate
    from onnxcompress.passes.lowrank.ranks import _whiten

    rng = np.random.default_rng(0)
    c = 16
    q, _ = np.linalg.qr(rng.standard_normal((c, c)))
    calib = q @ (np.array([3.0] * 4 + [0.01] * 2 + [0.4] * (c - 6))[:, None] * rng.standard_normal((c, 2000)))
    shifted = calib[:, :500] + 0.3 * rng.standard_normal((c, 500))
    u, _ = np.linalg.qr(rng.standard_normal((c, c)))
    m = u @ np.diag([1.0] * 4 + [3.0] * 2 + [0.5] * (c - 6)) @ q.T
    w = m[:, :, None, None].astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"])

    def errors(eps: float | None) -> tuple[float, float]:
        cand = Candidate(0, node, w, *svd_factors(w), (1, 1), 1, 0)
        _whiten(cand, calib @ calib.T / calib.shape[1], eps)
        vert, horiz = split_weights(w, 6, cand.u, cand.s, cand.vt)
        d = np.einsum("kcia,nkbj->ncij", vert, horiz)[:, :, 0, 0] - m
        return tuple(float(np.linalg.norm(d @ x) / np.linalg.norm(m @ x)) for x in (calib, shifted))  # type: ignore[return-value]

    bare, shrunk = errors(1e-3), errors(None)
    assert shrunk[1] < 0.6 * bare[1], (bare, shrunk)
    assert shrunk[0] < 1.25 * bare[0], (bare, shrunk)


def test_whiten_auto_follows_the_macs_budget() -> None:
    whitens = LowRank._whitens
    assert whitens(LowRankOptions(macs_ratio=0.7)) and not whitens(LowRankOptions(energy=0.9))
    assert whitens(LowRankOptions(energy=0.9, whiten="true")) and not whitens(LowRankOptions(macs_ratio=0.7, whiten="false"))
    assert not whitens(LowRankOptions(macs_ratio=0.7, data_energy=True))


def test_ridge_measure_and_sensitivity_samples_take_effect(monkeypatch: pytest.MonkeyPatch) -> None:
    """``experimental.ridge``: a ridge far above the data's scale shrinks the refit factor
    toward zero, so the output is worse than with the default; ``measure=true`` times every
    candidate split and says so in its reason; ``experimental.sensitivity_samples`` is the
    number of samples the sensitivity measurement runs on."""
    import onnxcompress.sensitivity as sensitivity_mod

    cos = {ridge: on_resnet_block(f"lowrank:rank=8:experimental.ridge={ridge}")[1] for ridge in ("0.01", "10000")}
    assert cos["0.01"] > cos["10000"] + 1e-3
    reasons = {}
    for measure in ("false", "true"):  # every split the MACs allow is timed, and kept only if faster
        _, rep = oc.optimize(FIXTURES / "resnet_block.onnx", f"lowrank:rank=8:measure={measure}:refit=none",
                             validation=False, latency=False)
        reasons[measure] = [(layer["decision"], layer["reason"]) for layer in rep.passes[-1].stats["layers"]]
    assert not any("measured" in r for _, r in reasons["false"])
    timed = [r for _, r in reasons["true"] if "measured" in r]
    assert len(timed) == sum(d == "split" for d, _ in reasons["false"]) > 0
    assert all("measured" in r for d, r in reasons["true"] if d == "split")
    seen: list[int] = []
    real = sensitivity_mod.OutputDamage

    def counting(model, data, samples, *a, **kw):  # type: ignore[no-untyped-def]
        seen.append(samples)
        return real(model, data, samples, *a, **kw)

    monkeypatch.setattr(sensitivity_mod, "OutputDamage", counting)
    oc.optimize(FIXTURES / "resnet_block.onnx",
                "lowrank:macs_ratio=0.9:experimental.sensitivity=true:experimental.sensitivity_samples=3:refit=none",
                calibration=FIXTURES / "resnet_block_calib.npz", validation=False, latency=False)
    assert seen == [3]


def test_recognizer_linear_layers_split_exactly_at_full_rank() -> None:
    """On the shared transformer-hybrid recognizer: its classifier MatMul, an attention
    MatMul and a 480 → 480 pointwise conv, each split at full rank, leave the output within
    1e-5 of its scale (onnxruntime, graph optimizations off, eval lines)."""
    import onnxcompress.model as model_mod

    m = model_mod.load_model(shared_path("models", "ppocrv5_rec.onnx"))
    x = np.load(shared_path("data", "ppocrv5_rec_eval.npz"))["x"][:3]
    feeds = {m.graph.input[0].name: x}
    ref = run(m, feeds)[0]
    inits = {t.name for t in m.graph.initializer}
    linear = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    wide = max(linear, key=lambda n: next(np.prod(t.dims) for t in m.graph.initializer if t.name == n.input[1]))
    pointwise = next(n for n in m.graph.node if n.op_type == "Conv" and any(
        t.name == n.input[1] and list(t.dims) == [480, 480, 1, 1] for t in m.graph.initializer))
    for name in (wide.name, linear[0].name, pointwise.name):
        split = split_layer(copy.deepcopy(m), name)
        assert sum(n.name.startswith(f"{name}_lr") for n in split.graph.node) == 2
        out = run(split, feeds)[0]
        assert float(np.abs(out - ref).max()) <= 1e-5 * float(np.abs(ref).max()), name


def test_layers_of_one_shape_and_rank_are_timed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two 64→64 MatMuls split at one rank are timed once, and a second run of the pass (as
    the search does) reuses the timing; each layer's reason still says it was measured."""
    from onnxcompress import validate
    from onnxcompress.passes import lowrank as lowrank_mod

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w{i}") for i in (1, 2)]
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["h"], name="m1"),
                           helper.make_node("MatMul", ["h", "w2"], ["y"], name="m2")], "two",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 64])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 64])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    calls: list[int] = []
    monkeypatch.setattr(lowrank_mod, "_TIMINGS", {})
    monkeypatch.setattr(validate, "measure_latency", lambda models, feeds, **kw: calls.append(1) or [1.0, 0.5])
    for _ in range(2):
        res = LowRank(LowRankOptions(rank=8)).run(copy.deepcopy(m), PassContext())
        assert res.modified and all("measured 0.500 ms vs 1.000 ms" in layer["reason"] for layer in res.stats["layers"])
    assert len(calls) == 1
