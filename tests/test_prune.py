"""prune: dependency groups, exact removal (vs masking), options, recovery.

Equivalence: removing channel classes gives the same outputs as the unpruned model with
the consumers' weights for those channels zeroed (see passes/prune/apply.py), checked in
onnxruntime with graph optimizations off, on several seeded inputs (fixtures) or real
eval samples (shared models; N(0,1) noise drives those detectors into ranges where
float32 summation order alone changes outputs).
"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxcompress as oc
from onnxcompress.errors import OptionError
from onnxcompress.model import load_model
from onnxcompress.passes.prune import Prune, PruneOptions
from onnxcompress.passes.prune.apply import apply_mask, apply_removal
from onnxcompress.passes.prune.groups import analyze
from onnxcompress.pipeline import PassContext
from onnxcompress.registry import build_pipeline
from onnxcompress.shapes import all_shapes

from .builders import fvi, make_model, run, tensor
from .conftest import FIXTURES, SHARED_MODELS, shared_path

FIXTURE_MODELS = ["resnet_block", "mobilenet_se", "concat_split"]


def canonical(path) -> onnx.ModelProto:
    m, _ = build_pipeline("canonicalize").run(load_model(path))
    return m


def random_removal(an, fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = [rng.choice(g.classes, size=int(g.size * fraction), replace=False)
             for g in an.groups if not g.blocked and g.size >= 4]
    return np.concatenate(parts) if parts else np.array([], np.int64)


def assert_removal_equals_mask(model: onnx.ModelProto, shape: list[int], feeds: list[np.ndarray], seed: int = 0,
                               fraction: float = 0.4) -> onnx.ModelProto:
    shapes, _ = all_shapes(model, {model.graph.input[0].name: shape})
    removed = random_removal(analyze(model, shapes), fraction, seed)
    assert len(removed) > 0
    pruned = apply_removal(analyze(copy.deepcopy(model), shapes), removed)
    masked = apply_mask(analyze(copy.deepcopy(model), shapes), removed)
    onnx.checker.check_model(pruned, full_check=True)
    name = model.graph.input[0].name
    for x in feeds:
        ref = run(model, {name: x})  # the unpruned model sets the scale: 1e-5 of its output range
        for a, b, r in zip(run(pruned, {name: x}), run(masked, {name: x}), ref):
            scale = max(float(r.max() - r.min()), 1e-6)
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale)
    return pruned


@pytest.mark.parametrize("name", FIXTURE_MODELS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixture_removal_equals_masking(name: str, seed: int) -> None:
    m = canonical(FIXTURES / f"{name}.onnx")
    rng = np.random.default_rng(100 + seed)
    feeds = [rng.standard_normal((2, 3, 32, 32)).astype(np.float32) for _ in range(3)]
    pruned = assert_removal_equals_mask(m, [1, 3, 32, 32], feeds, seed=seed)
    assert oc.inspect_model(pruned).params < oc.inspect_model(m).params


@pytest.mark.shared
@pytest.mark.parametrize("name", SHARED_MODELS)
def test_shared_removal_equals_masking(name: str) -> None:
    m = canonical(shared_path("models", f"{name}.onnx"))
    x = np.load(shared_path("data", f"{name}_eval.npz"))["x"]
    feeds = [x[i : i + 1] for i in (0, len(x) // 2, len(x) - 1)]
    assert_removal_equals_mask(m, list(feeds[0].shape), feeds, fraction=0.3)


def test_groups_of_fixtures() -> None:
    # resnet_block: stem+block convs+residual adds are one group (stem, conv-2, ... united by Add)
    m = canonical(FIXTURES / "resnet_block.onnx")
    an = analyze(m, all_shapes(m)[0])
    convs = [g for g in an.groups if an.producers[g.producers[0]].op == "Conv"]
    sizes = sorted((len(g.producers), g.size) for g in convs)
    assert sizes == [(1, 16), (1, 32), (2, 16), (2, 32)]  # two inner convs, two residual groups
    assert not any(g.blocked for g in convs)
    head = [g for g in an.groups if g not in convs]  # the classifier's Gemm: its outputs are the model's
    assert len(head) == 1 and "reaches graph output" in str(head[0].blocked)
    # mobilenet_se: expand conv, depthwise, SE expand are one group (SE Mul unites them)
    m = canonical(FIXTURES / "mobilenet_se.onnx")
    an = analyze(m, all_shapes(m)[0])
    by_size = Counter(len(g.producers) for g in an.groups)
    assert by_size[2] == 1  # expand conv + SE second conv
    # concat_split: the head conv reaches the graph output and is blocked
    m = canonical(FIXTURES / "concat_split.onnx")
    an = analyze(m, all_shapes(m)[0])
    blocked = [g for g in an.groups if g.blocked]
    assert len(blocked) == 1 and "reaches graph output 'heatmap'" in blocked[0].blocked


def _unsupported_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("LRN", ["c1"], ["lrn"], size=3),  # mixes channels: not understood
        helper.make_node("Conv", ["lrn", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["y"]),
    ]
    inits = [tensor(rng, "w1", (16, 3, 3, 3)), tensor(rng, "w2", (16, 16, 3, 3)), tensor(rng, "w3", (4, 16, 1, 1))]
    return make_model(nodes, [fvi("x", [1, 3, 8, 8])], [fvi("y", [1, 4, 8, 8])], inits)


def test_unknown_op_stops_its_group_and_is_reported() -> None:
    m = _unsupported_model()
    an = analyze(m, all_shapes(m)[0])
    blocked = {an.describe(g): g.blocked for g in an.groups if g.blocked}
    assert any("LRN" in r and "not supported on a channel path" in r for r in blocked.values())
    res = Prune(PruneOptions(ratio=0.5, min_channels=1, round_to=1)).run(m, PassContext())
    assert res.modified
    convs = {n.output[0]: n for n in res.model.graph.node if n.op_type == "Conv"}
    w = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert w[convs["c1"].input[1]].shape[0] == 16  # the blocked group keeps its channels
    assert w[convs["c2"].input[1]].shape[0] == 8  # the free group lost half
    assert res.stats["blocked_reasons"]


def test_grouped_conv_is_left_alone() -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"]), helper.make_node("Conv", ["c1", "w2"], ["y"], group=2)]
    m = make_model(nodes, [fvi("x", [1, 3, 4, 4])], [fvi("y", [1, 8, 4, 4])],
                   [tensor(rng, "w1", (16, 3, 1, 1)), tensor(rng, "w2", (8, 8, 1, 1))])
    an = analyze(m, all_shapes(m)[0])
    assert all(g.blocked for g in an.groups)
    assert any("grouped convolution (group=2)" in g.blocked for g in an.groups)


def test_round_to_and_min_channels() -> None:
    m = canonical(FIXTURES / "resnet_block.onnx")
    res = Prune(PruneOptions(ratio=0.3, round_to=8, min_channels=8)).run(copy.deepcopy(m), PassContext())
    counts = Counter(numpy_helper.to_array(t).shape[0] for t in res.model.graph.initializer
                     if len(t.dims) == 4)
    assert set(counts) <= {8, 16, 24, 32, 10}  # conv filters: multiples of 8 (the Gemm is 2-D)
    res = Prune(PruneOptions(ratio=0.9 - 1e-9, max_ratio=0.95, round_to=1, min_channels=12)).run(
        copy.deepcopy(m), PassContext())
    convs = [numpy_helper.to_array(t).shape[0] for t in res.model.graph.initializer if len(t.dims) == 4]
    assert min(convs) >= 12


def test_overrides_and_global() -> None:
    m = canonical(FIXTURES / "mobilenet_se.onnx")
    none = Prune(PruneOptions(ratio=0.5, overrides=".*=0", round_to=1)).run(copy.deepcopy(m), PassContext())
    assert not none.modified
    glob = Prune(PruneOptions(ratio=0.3, global_=True, round_to=1, min_channels=1)).run(copy.deepcopy(m), PassContext())
    assert glob.modified and glob.stats["channels_removed"] > 0
    with pytest.raises(OptionError, match="override 'conv=abc'"):
        Prune.from_mapping({"overrides": "conv=abc"})
    with pytest.raises(OptionError, match="ratio must be in"):
        Prune.from_mapping({"ratio": "1.2"})
    assert Prune.from_mapping({"global": "true"}).options.global_ is True


def test_act_and_lstsq_need_calibration() -> None:
    m = canonical(FIXTURES / "resnet_block.onnx")
    with pytest.raises(OptionError, match="criterion=act needs calibration data"):
        Prune(PruneOptions(criterion="act")).run(m, PassContext())


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn"])
def test_criteria_without_data(criterion: str) -> None:
    m = canonical(FIXTURES / "resnet_block.onnx")
    res = Prune(PruneOptions(ratio=0.5, criterion=criterion, round_to=1, min_channels=1)).run(m, PassContext())
    assert res.modified and res.stats["criterion"] == {criterion: 4}
    onnx.checker.check_model(res.model)


def test_recovery_improves_fixture_outputs() -> None:
    """With calibration data, least-squares recovery beats plain removal on held-out data."""
    calib = FIXTURES / "resnet_block_calib.npz"
    val = FIXTURES / "resnet_block_val.npz"
    cos = {}
    for rec in ("none", "bias", "lstsq"):
        _, rep = oc.optimize(FIXTURES / "resnet_block.onnx", f"prune:ratio=0.5:criterion=l1:recovery={rec}:round_to=1",
                             calibration=calib, validation=val, latency=False,
                             thresholds=oc.Thresholds(cosine=None, top1=None))
        cos[rec] = rep.validation.outputs[0].metrics["cosine_mean"]
    assert cos["lstsq"] > cos["none"] + 0.01 and cos["bias"] >= cos["none"] - 1e-3


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet", "squeezenet"])
def test_light_models_prune_check_and_run(name: str) -> None:
    from .light import LIGHT, realize

    if not (LIGHT / f"light_{name}.onnx").exists():
        pytest.skip("onnx package without light models")
    m, _ = build_pipeline("canonicalize").run(realize(name, seed=0))
    res = Prune(PruneOptions(ratio=0.3)).run(copy.deepcopy(m), PassContext())
    onnx.checker.check_model(res.model, full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    inp = m.graph.input[0].name
    out_new = run(res.model, {inp: x}, optimize=True)[0]
    assert out_new.shape == run(m, {inp: x}, optimize=True)[0].shape
    if name != "shufflenet":  # shufflenet's grouped 1x1 convs are left alone (reported)
        assert res.modified and res.stats["channels_removed"] > 0.15 * res.stats["channels_before"]
    else:
        assert any("grouped convolution" in r for r in res.stats["blocked_reasons"])


def _many_ops_model() -> onnx.ModelProto:
    """Conv → PRelu(per-channel) → Pad → Slice(channels 2:14) → ConvTranspose → Resize(sizes)
    → Mul(per-channel const) → Conv → Flatten → Gemm: every channel mapping in one graph."""
    rng = np.random.default_rng(5)
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("PRelu", ["c1", "slope"], ["p1"]),
        helper.make_node("Pad", ["p1", "pads"], ["pad1"], mode="constant"),
        helper.make_node("Slice", ["pad1", "s_start", "s_end", "s_axes"], ["sl"]),
        helper.make_node("ConvTranspose", ["sl", "wt"], ["ct"], strides=[2, 2]),
        helper.make_node("Resize", ["ct", "", "", "sizes"], ["rs"], mode="nearest"),
        helper.make_node("Mul", ["rs", "chscale"], ["ms"]),
        helper.make_node("Conv", ["ms", "w2"], ["c2"], strides=[4, 4]),
        helper.make_node("Flatten", ["c2"], ["fl"], axis=1),
        helper.make_node("Gemm", ["fl", "fc", "fcb"], ["y"], transB=1),
    ]
    inits = [
        tensor(rng, "w1", (16, 3, 3, 3), 0.3), tensor(rng, "b1", (16,), 0.1),
        numpy_helper.from_array(rng.uniform(0.05, 0.3, (16, 1, 1)).astype(np.float32), "slope"),
        i64("pads", [0, 0, 1, 1, 0, 0, 1, 1]),
        i64("s_start", [2]), i64("s_end", [14]), i64("s_axes", [1]),
        tensor(rng, "wt", (12, 8, 2, 2), 0.3),
        i64("sizes", [1, 8, 16, 16]),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, 8, 1, 1)).astype(np.float32), "chscale"),
        tensor(rng, "w2", (8, 8, 4, 4), 0.2),
        tensor(rng, "fc", (5, 8 * 4 * 4), 0.2), tensor(rng, "fcb", (5,), 0.1),
    ]
    return make_model(nodes, [fvi("x", [1, 3, 8, 8])], [fvi("y", [1, 5])], inits)


def test_every_channel_mapping_removal_equals_masking() -> None:
    m = _many_ops_model()
    onnx.checker.check_model(m, full_check=True)
    an = analyze(m, all_shapes(m)[0])
    blocked = {an.describe(g): g.blocked for g in an.groups if g.blocked}
    assert list(blocked.values()) == ["reaches graph output 'y'"]  # the Gemm's own outputs only
    kinds = Counter(u.kind for u in an.uses)
    assert {"slice", "resize", "const", "consumer-convT", "consumer-conv", "gemm"} <= set(kinds)
    rng = np.random.default_rng(9)
    feeds = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(3)]
    for seed in range(3):
        pruned = assert_removal_equals_mask(m, [1, 3, 8, 8], feeds, seed=seed, fraction=0.25)
    sizes = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    slice_node = next(n for n in pruned.graph.node if n.op_type == "Slice")
    assert sizes[slice_node.input[2]][0] - sizes[slice_node.input[1]][0] < 12  # the channel slice shrank


def test_sensitivity_weighs_every_group_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """sensitivity=true with macs_ratio and data: every prunable group gets a measured weight; a second
    budget on the same model and samples with the same context (as the search runs it)
    reuses them (no new sensitivity sessions); other samples, or a fresh context, measure again."""
    import onnxcompress.frontier as frontier
    import onnxcompress.sensitivity as sensitivity
    from onnxcompress.data import open_data

    labels: list[str] = []
    real = sensitivity.make_session

    def counting(model, provider="cpu", label="model", **kw):
        labels.append(label)
        return real(model, provider, label=label, **kw)

    monkeypatch.setattr(sensitivity, "make_session", counting)
    monkeypatch.setattr(frontier, "make_session", counting)  # measurements run from the reference's tensors
    model = load_model(FIXTURES / "mobilenet_se.onnx")
    model, _ = build_pipeline("canonicalize").run(model)
    ctx = PassContext(calibration=open_data(FIXTURES / "mobilenet_se_calib.npz", model))

    def prune(spec: str, context: PassContext) -> tuple[dict, int]:
        labels.clear()
        _, reports = build_pipeline(spec).run(copy.deepcopy(model), context)
        return reports[-1].stats, sum(lb.startswith("prune sensitivity") for lb in labels)

    st, first = prune("prune:macs_ratio=0.8:experimental.sensitivity=true", ctx)
    assert len(st["sensitivity"]) == st["prunable_groups"] > 1
    assert all(v > 0 for v in st["sensitivity"].values())
    assert st["macs_ratio_estimate"] <= 0.8
    assert first >= st["prunable_groups"]
    again, sessions = prune("prune:macs_ratio=0.7:experimental.sensitivity=true", ctx)
    assert sessions == 0 and again["sensitivity"] == st["sensitivity"]
    _, sessions = prune("prune:macs_ratio=0.7:experimental.sensitivity=true:experimental.sensitivity_samples=4", ctx)
    assert sessions >= st["prunable_groups"]  # measured on other samples: measured again
    fresh, sessions = prune("prune:macs_ratio=0.7:experimental.sensitivity=true", PassContext(calibration=ctx.calibration))
    assert sessions >= st["prunable_groups"] and fresh["sensitivity"] == st["sensitivity"]


def _conv_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.output[0]: w[n.input[1]] for n in model.graph.node if n.op_type == "Conv"}


def test_a_large_ridge_keeps_the_pruned_weights() -> None:
    """The refit's ridge pulls toward each layer's current (pruned) weights, not toward
    zero: with ``experimental.ridge`` far above the data's scale the weights stay what
    pruning left (only the unregularized bias moves), and the default ridge agrees better."""
    cos, weights = {}, {}
    for spec in ("recovery=none", "experimental.ridge=10000", "experimental.ridge=0.01"):
        model, rep = oc.optimize(FIXTURES / "resnet_block.onnx", f"prune:ratio=0.3:{spec}",
                                 calibration=FIXTURES / "resnet_block_calib.npz",
                                 validation=FIXTURES / "resnet_block_val.npz", latency=False,
                                 thresholds=oc.Thresholds(cosine=None, top1=None, rel_range=None))
        cos[spec], weights[spec] = rep.validation.outputs[0].metrics["cosine_mean"], _conv_weights(model)
    for name, w in weights["recovery=none"].items():
        np.testing.assert_allclose(weights["experimental.ridge=10000"][name], w, rtol=0,
                                   atol=1e-3 * float(np.abs(w).max()))
    assert any(not np.allclose(weights["experimental.ridge=0.01"][k], w, atol=1e-3 * float(np.abs(w).max()))
               for k, w in weights["recovery=none"].items())
    assert cos["experimental.ridge=0.01"] > cos["experimental.ridge=10000"]


def test_refit_keeps_a_layer_whose_input_did_not_change() -> None:
    """Refitting an unmodified model against itself leaves every weight as it was (a ridge
    toward zero would shrink them: on a real recognizer that cost 1.6% of its lines)."""
    from onnxcompress.data import IterableSource, input_specs
    from onnxcompress.fitting import sequential_refit

    m = canonical(FIXTURES / "resnet_block.onnx")
    data = np.load(FIXTURES / "resnet_block_calib.npz")
    name = m.graph.input[0].name
    source = IterableSource([{name: data[name][i:i + 8]} for i in range(0, 32, 8)], input_specs(m))
    refit = copy.deepcopy(m)
    counts = sequential_refit(m, refit, source)
    assert counts["dense"] > 0
    after = _conv_weights(refit)
    for name, w in _conv_weights(m).items():
        np.testing.assert_allclose(after[name], w, rtol=0, atol=1e-4 * float(np.abs(w).max()))


@pytest.mark.parametrize("kind", ["dense", "bias"])
def test_refit_of_a_matmul_on_token_rows(kind: str) -> None:
    """A MatMul reading [N, T, K] (a transformer's tokens): each of the N·T rows is one
    equation, its features the last axis. The refit puts back weights perturbed by a
    pruning step (it failed on a shape mismatch before, treating T·K as the features)."""
    from onnxcompress.fitting import sequential_refit

    rng = np.random.default_rng(0)
    k, h, d = 12, 24, 8
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"]), helper.make_node("Add", ["m", "b2"], ["y"])]
    inits = [tensor(rng, "w1", (k, h)), tensor(rng, "w2", (h, d), 0.3), tensor(rng, "b2", (d,), 0.1)]
    m = make_model(nodes, [fvi("x", ["N", "T", k])], [fvi("y", ["N", "T", d])], inits)
    pruned = copy.deepcopy(m)
    w2 = next(t for t in pruned.graph.initializer if t.name == "w2")
    w2.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(w2) * 1.3 + 0.05).astype(np.float32), "w2"))
    data = [{"x": rng.standard_normal((4, 10, k)).astype(np.float32)} for _ in range(8 if kind == "dense" else 1)]
    probe = {"x": rng.standard_normal((2, 10, k)).astype(np.float32)}
    before = np.abs(run(pruned, probe)[0] - run(m, probe)[0]).mean()
    counts = sequential_refit(m, pruned, data, only={"m"})
    after = np.abs(run(pruned, probe)[0] - run(m, probe)[0]).mean()
    assert counts[kind] == 1
    assert after < (0.1 if kind == "dense" else 0.9) * before, (before, after)


def _mlp_group(an):  # type: ignore[no-untyped-def]
    return [g for g in an.groups if not g.blocked and an.producers[g.producers[0]].op in ("MatMul", "Gemm")
            and an.producers[g.producers[0]].channels == g.size]


def _head_groups(an):  # type: ignore[no-untyped-def]
    return [g for g in an.groups if not g.blocked and an.producers[g.producers[0]].op in ("MatMul", "Gemm")
            and an.producers[g.producers[0]].channels > g.size]


def test_transformer_mlp_hidden_channels_are_a_group() -> None:
    """In a transformer block (LayerNorm, 2-head attention, GELU MLP) the MLP's hidden
    channels (fc1 → GELU → fc2) are one free MatMul group and the attention heads
    another; the output projections stop at the residual streams and the classifier at
    the graph output, each with its reason."""
    from .builders import hybrid_recognizer

    m = hybrid_recognizer(ctc=False)
    an = analyze(m, all_shapes(m, {"x": [1, 3, 8, 16]})[0])
    (mlp,) = _mlp_group(an)
    assert an.describe(mlp) == "fc1" and mlp.size == 64
    reasons = {an.describe(g): g.blocked for g in an.groups if an.producers[g.producers[0]].op == "MatMul"}
    assert reasons["q, k, v"] is None
    assert all("residual stream" in reasons[t] for t in ("proj", "fc2"))
    assert "graph output" in reasons["head"]
    kinds = {(u.kind, m.graph.node[u.node].name) for u in an.uses}
    assert ("matmul", "fc2") in kinds


def test_attention_heads_are_one_group_of_whole_heads() -> None:
    """Q, K and V reshaped to [N, T, h, d]: each head's d channels of Q, K and V are one
    channel class, the head count in each constant Reshape target is a use, and the
    output projection reads d rows per head. With a Softmax over the heads instead of
    over the keys, the heads stop there."""
    from .builders import hybrid_recognizer

    m = hybrid_recognizer(heads=4, ctc=False)
    an = analyze(m, all_shapes(m, {"x": [1, 3, 8, 16]})[0])
    (heads,) = _head_groups(an)
    assert an.describe(heads) == "q, k, v" and heads.size == 4
    q = an.producers[heads.producers[0]]
    assert [len(set(an.find(q.atoms[j * 8:(j + 1) * 8]).tolist())) for j in range(4)] == [1, 1, 1, 1]
    dims = sorted((m.graph.node[u.node].output[0], u.axis, len(u.atoms)) for u in an.uses if u.kind == "reshape-dim")
    assert dims == [("ctx", 2, 32), ("kh_r", 2, 4), ("qh_r", 2, 4), ("vh_r", 2, 4)]
    (proj,) = [u for u in an.uses if m.graph.node[u.node].name == "proj"]
    assert len(set(an.find(proj.atoms).tolist())) == 4
    for node in m.graph.node:
        if node.op_type == "Softmax":
            node.attribute[0].i = 1  # over the heads
    an = analyze(m, all_shapes(m, {"x": [1, 3, 8, 16]})[0])
    assert not _head_groups(an)
    reasons = {an.describe(g): g.blocked for g in an.groups}
    assert "normalizes over the channels" in reasons["q, k"] and "pairs the heads" in reasons["v"]


def fused_qkv_attention(take: str, heads: int = 4, d: int = 32, seed: int = 0) -> onnx.ModelProto:
    """Tokens [N, T, d] → one QKV MatMul + bias → Reshape [0, 0, 3, h, d/h] → Transpose to
    [3, N, h, T, d/h] → Q, K, V taken apart by ``take`` (``gather``: Gather with a scalar
    index, as PyTorch exports it; ``split``: Split and Squeeze) → softmax(Q·Kᵀ·s)·V →
    Transpose, Reshape [0, 0, d] → output projection."""
    rng = np.random.default_rng(seed)
    dh = d // heads
    inits = [tensor(rng, "wqkv", (d, 3 * d), 1 / np.sqrt(d)), tensor(rng, "bqkv", (3 * d,), 0.1),
             tensor(rng, "wo", (d, d), 1 / np.sqrt(d)),
             numpy_helper.from_array(np.array([0, 0, 3, heads, dh], np.int64), "split_shape"),
             numpy_helper.from_array(np.array([0, 0, d], np.int64), "merge_shape"),
             numpy_helper.from_array(np.array(1 / np.sqrt(dh), np.float32), "scale"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    nodes = [helper.make_node("MatMul", ["x", "wqkv"], ["qkv_mm"], name="qkv"),
             helper.make_node("Add", ["qkv_mm", "bqkv"], ["qkv_b"]),
             helper.make_node("Reshape", ["qkv_b", "split_shape"], ["qkv_r"]),
             helper.make_node("Transpose", ["qkv_r"], ["qkv_t"], perm=[2, 0, 3, 1, 4])]
    if take == "gather":
        for i, t in enumerate("qkv"):
            inits.append(numpy_helper.from_array(np.array(i, np.int64), f"i{t}"))
            nodes.append(helper.make_node("Gather", ["qkv_t", f"i{t}"], [t], axis=0))
    else:
        nodes.append(helper.make_node("Split", ["qkv_t"], ["q3", "k3", "v3"], axis=0))
        nodes += [helper.make_node("Squeeze", [f"{t}3", "axis0"], [t]) for t in "qkv"]
    nodes += [helper.make_node("Transpose", ["k"], ["kT"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kT"], ["scores"]),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
              helper.make_node("Softmax", ["scaled"], ["attn"], axis=-1),
              helper.make_node("MatMul", ["attn", "v"], ["ctx_h"]),
              helper.make_node("Transpose", ["ctx_h"], ["ctx_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["ctx"]),
              helper.make_node("MatMul", ["ctx", "wo"], ["y"], name="proj")]
    return make_model(nodes, [fvi("x", ["N", 6, d])], [fvi("y", ["N", 6, d])], inits)


@pytest.mark.parametrize("take", ["gather", "split"])
def test_fused_qkv_heads_taken_apart_by_gather_or_split(take: str) -> None:
    """One fused QKV projection taken apart by Gather or by Split + Squeeze: its heads are
    one group of whole heads, and removing half of them equals masking them."""
    m = fused_qkv_attention(take)
    an = analyze(m, all_shapes(m, {"x": [1, 6, 32]})[0])
    (heads,) = _head_groups(an)
    assert an.describe(heads) == "qkv" and heads.size == 4
    rng = np.random.default_rng(7)
    feeds = [rng.standard_normal((2, 6, 32)).astype(np.float32) for _ in range(3)]
    pruned = assert_removal_equals_mask(m, [1, 6, 32], feeds, fraction=0.5)
    w = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    shapes = {n.name: w[n.input[1]].shape for n in pruned.graph.node if n.name in ("qkv", "proj")}
    assert shapes == {"qkv": (32, 48), "proj": (16, 32)}  # 2 of 4 heads of 8, in Q, K and V


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attention_head_removal_equals_masking(seed: int) -> None:
    """Removing whole heads (Q/K/V columns and biases, the head count in the Reshape
    targets, the output projection's rows) computes what zeroing the projection's rows
    for those heads computes, on seeded inputs, in onnxruntime without optimizations."""
    from .builders import hybrid_recognizer

    m = hybrid_recognizer(heads=4, ctc=False, seed=seed)
    rng = np.random.default_rng(50 + seed)
    feeds = [rng.standard_normal((2, 3, 8, 16)).astype(np.float32) for _ in range(3)]
    pruned = assert_removal_equals_mask(m, [1, 3, 8, 16], feeds, seed=seed, fraction=0.5)
    w = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    cols = {n.name: w[n.input[1]].shape for n in pruned.graph.node if n.name in ("q", "k", "v", "proj")}
    assert cols == {"q": (32, 16), "k": (32, 16), "v": (32, 16), "proj": (16, 32)}  # 2 of 4 heads of 8
    targets = sorted(w[n.input[1]].tolist() for n in pruned.graph.node if n.op_type == "Reshape")
    assert targets == [[0, 0, 2, 8], [0, 0, 2, 8], [0, 0, 2, 8], [0, 0, 16]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_transformer_mlp_removal_equals_masking(seed: int) -> None:
    """Removing MLP hidden channels (fc1's columns and bias, fc2's rows) computes what
    zeroing fc2's rows computes, on seeded inputs, in onnxruntime without optimizations."""
    from .builders import hybrid_recognizer

    m = hybrid_recognizer(ctc=False, seed=seed)
    rng = np.random.default_rng(40 + seed)
    feeds = [rng.standard_normal((2, 3, 8, 16)).astype(np.float32) for _ in range(3)]
    pruned = assert_removal_equals_mask(m, [1, 3, 8, 16], feeds, seed=seed)
    w = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    fc1 = next(n for n in pruned.graph.node if n.name == "fc1")
    fc2 = next(n for n in pruned.graph.node if n.name == "fc2")
    assert w[fc1.input[1]].shape[1] == w[fc2.input[1]].shape[0] < 64


def test_prune_pass_on_an_mlp_with_calibration() -> None:
    """The pass with a MACs budget and calibration data prunes the MLP (its MatMul MACs
    count) and refits fc2 by least squares: closer to the original than without refit."""
    from onnxcompress.data import IterableSource, input_specs

    from .builders import hybrid_recognizer

    m = hybrid_recognizer(d=32, hidden=128, ctc=False)
    rng = np.random.default_rng(3)
    calib = [{"x": rng.standard_normal((8, 3, 8, 16)).astype(np.float32)} for _ in range(16)]
    x = rng.standard_normal((4, 3, 8, 16)).astype(np.float32)
    ref = run(m, {"x": x})[0]
    err = {}
    for recovery in ("lstsq", "none"):
        ctx = PassContext(calibration=IterableSource(calib, input_specs(m)))
        res = Prune(PruneOptions(macs_ratio=0.8, recovery=recovery, round_to=8)).run(copy.deepcopy(m), ctx)
        assert res.modified and res.stats["macs_ratio_estimate"] <= 0.8
        fc1 = next(n for n in res.model.graph.node if n.name == "fc1")
        hidden = {t.name: t for t in res.model.graph.initializer}[fc1.input[1]].dims[1]
        assert hidden < 128
        err[recovery] = float(np.abs(run(res.model, {"x": x})[0] - ref).mean())
    assert err["lstsq"] < err["none"]


def _groups(m: onnx.ModelProto) -> list[tuple[str, int, str | None]]:
    an = analyze(m, all_shapes(m, {"x": [1, 3, 8, 16]})[0])
    return sorted((an.describe(g), g.size, g.blocked) for g in an.groups)


@pytest.mark.parametrize("opset", [13, 17])
def test_prune_follows_channels_through_linear_bias(opset: int) -> None:
    """fuse's linear_bias writes a linear layer on tokens as Reshape(x, [-1, K]) → Gemm →
    Reshape to Concat(shape(x)[:-1], [M]) (Shape and Slice, or from opset 15 Shape with
    start/end): prune finds the same groups through it as through MatMul + Add, removing
    channels equals masking, and the pass at a MACs budget removes the same channels and
    computes the same outputs as on the model without the rewrite."""
    from onnxcompress.data import IterableSource, input_specs

    from .builders import hybrid_recognizer

    m = hybrid_recognizer(heads=4, hidden=128)
    m.opset_import[0].version = opset
    plain, _ = build_pipeline("canonicalize,fuse:linear_bias=false").run(copy.deepcopy(m))
    fused, res = build_pipeline("canonicalize,fuse").run(copy.deepcopy(m))
    assert res[-1].stats["linear_bias_fused"] == 6
    assert sum(n.op_type == "Slice" for n in fused.graph.node) == (4 if opset < 15 else 0)  # one per input x
    assert _groups(fused) == _groups(plain)
    assert sum(size for _, size, blocked in _groups(fused) if blocked is None) == 32 + 4 + 128
    rng = np.random.default_rng(5)
    assert_removal_equals_mask(fused, [1, 3, 8, 16], [rng.standard_normal((2, 3, 8, 16)).astype(np.float32)
                                                      for _ in range(3)], fraction=0.5)
    calib = [{"x": rng.standard_normal((8, 3, 8, 16)).astype(np.float32)} for _ in range(16)]
    x = rng.standard_normal((4, 3, 8, 16)).astype(np.float32)
    widths, outs = [], []
    for model in (plain, fused):
        ctx = PassContext(calibration=IterableSource(calib, input_specs(model)))
        out = Prune(PruneOptions(macs_ratio=0.7, round_to=8)).run(copy.deepcopy(model), ctx).model
        w = {t.name: tuple(t.dims) for t in out.graph.initializer}
        widths.append({n.name: w[n.input[1]] for n in out.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")
                       and n.input[1] in w})
        outs.append(run(out, {"x": x})[0])
    assert widths[0] == widths[1] and widths[1]["q"] == (32, 24) and widths[1]["fc2"][0] < 128
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-5 * float(np.ptp(outs[0])))


def test_prune_stops_at_a_linear_bias_target_it_cannot_rewrite() -> None:
    """The target of the Reshape back to [N, T, M] must end in a constant M (which pruning
    rewrites): where M is computed (here the Shape of the Gemm's output), the layer's
    channels stop there, with the reason."""
    from .builders import hybrid_recognizer

    m = hybrid_recognizer(heads=4, hidden=128, ctc=False)
    m.opset_import[0].version = 17
    fused, _ = build_pipeline("canonicalize,fuse").run(m)
    assert {d: b for d, _, b in _groups(fused)}["q, k, v"] is None
    g = fused.graph
    target = next(n for n in g.node if n.name == "q_linear").input[1]
    concat = next(n for n in g.node if n.output[0] == target)
    nodes = [n for n in g.node if n is not concat]
    at = next(i for i, n in enumerate(nodes) if n.name == "q") + 1
    nodes[at:at] = [helper.make_node("Shape", [nodes[at - 1].output[0]], ["q_m"], start=1), concat]
    concat.input[1] = "q_m"
    del g.node[:]
    g.node.extend(nodes)
    run(fused, {"x": np.zeros((2, 3, 8, 16), np.float32)})  # still a valid model
    reasons = {d: b for d, _, b in _groups(fused)}
    assert reasons["q"] == "Reshape 'q_linear' has a computed target shape that does not end in the channel count"
    assert "pairs the heads" in reasons["k"] and "pairs the heads" in reasons["v"]


def test_token_features_reshaped_to_their_own_shape_still_pass() -> None:
    """Reshape(h, Shape(h)) of an MLP's hidden tokens keeps its group free: the rule for
    linear_bias's computed targets reads only a reshape that regroups the rows (it blocked
    this one before the mend, with "does not end in the channel count")."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Shape", ["h"], ["hs"]),
             helper.make_node("Reshape", ["h", "hs"], ["hr"]), helper.make_node("Relu", ["hr"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    m = make_model(nodes, [fvi("x", ["N", 5, 8])], [fvi("y", ["N", 5, 4])],
                   [tensor(rng, "w1", (8, 16)), tensor(rng, "w2", (16, 4))])
    an = analyze(m, all_shapes(m, {"x": [1, 5, 8]})[0])
    assert {an.describe(g): g.blocked for g in an.groups} == {"fc1": None, "fc2": "reaches graph output 'y'"}
    assert_removal_equals_mask(m, [1, 5, 8], [rng.standard_normal((2, 5, 8)).astype(np.float32) for _ in range(3)],
                               fraction=0.5)


@pytest.mark.shared
@pytest.mark.parametrize("spec", ["canonicalize", "canonicalize,fuse"])
def test_recognizer_mlp_removal_equals_masking(spec: str) -> None:
    """On the shared transformer-hybrid recognizer, as given and fused (its linear layers
    then Gemms between Reshapes): both MLPs' hidden channels and both blocks' attention
    heads are free groups, and removing 30% of every free group (stem convs, MLPs, heads)
    equals masking."""
    m, _ = build_pipeline(spec).run(load_model(shared_path("models", "ppocrv5_rec.onnx")))
    assert sum(n.op_type == "Gemm" for n in m.graph.node) == (0 if spec == "canonicalize" else 9)
    x = np.load(shared_path("data", "ppocrv5_rec_eval.npz"))["x"]
    feeds = [x[i : i + 1] for i in (0, len(x) // 2, len(x) - 1)]
    an = analyze(m, all_shapes(m, {m.graph.input[0].name: list(feeds[0].shape)})[0])
    assert [g.size for g in _mlp_group(an)] == [240, 240]
    assert [g.size for g in _head_groups(an)] == [8, 8]  # one fused QKV projection per block
    pruned = assert_removal_equals_mask(m, list(feeds[0].shape), feeds, fraction=0.3)
    widths = [t.dims[1] for n in pruned.graph.node if n.op_type in ("MatMul", "Gemm")
              for t in pruned.graph.initializer if t.name == n.input[1] and list(t.dims)[0] == 120]
    assert sorted(widths).count(168) == 2  # 240 hidden channels less 30% (72) in each MLP
    assert sorted(widths).count(270) == 2  # QKV: 8 heads of 3 × 15 less 2 heads
    targets = [numpy_helper.to_array(t).tolist() for n in pruned.graph.node if n.op_type == "Reshape"
               for t in pruned.graph.initializer if t.name == n.input[1]]
    assert targets.count([0, -1, 3, 6, 15]) == 2 and targets.count([0, -1, 90]) == 2


def _branch_on_sample_rate() -> onnx.ModelProto:
    """conv1 → If(sr == 16000: r1 as is; else: r1 reshaped to [-1, 7], which fails) →
    conv2 → conv3, with a 0-d int64 input sr: zeros are not a value this model runs on."""
    from onnx import TensorProto

    rng = np.random.default_rng(11)
    then_g = helper.make_graph([helper.make_node("Identity", ["r1"], ["t_out"])], "then", [], [fvi("t_out", None)])
    else_g = helper.make_graph([helper.make_node("Reshape", ["r1", "bad_shape"], ["e_out"])], "else", [],
                               [fvi("e_out", None)])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Equal", ["sr", "sr16k"], ["is16k"], name="eq"),
             helper.make_node("If", ["is16k"], ["f"], name="branch", then_branch=then_g, else_branch=else_g),
             helper.make_node("Conv", ["f", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="conv3", kernel_shape=[1, 1])]
    inits = [tensor(rng, "w1", (8, 3, 3, 3), 0.3), tensor(rng, "b1", (8,), 0.1), tensor(rng, "w2", (16, 8, 3, 3), 0.2),
             tensor(rng, "b2", (16,), 0.1), tensor(rng, "w3", (4, 16, 1, 1), 0.3), tensor(rng, "b3", (4,), 0.1),
             numpy_helper.from_array(np.array(16000, np.int64), "sr16k"),
             numpy_helper.from_array(np.array([-1, 7], np.int64), "bad_shape")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8]),
                              helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                      [fvi("y", ["N", 4, 8, 8])], inits)


def test_shapes_are_probed_on_the_calibration_values(tmp_path) -> None:
    """The onnxruntime shape probe feeds a calibration sample, not zeros: a scalar sample
    rate of 0 takes the branch that fails. prune then prunes conv2 and keeps conv1, whose
    output the If reads."""
    model = _branch_on_sample_rate()
    shapes = {"x": [2, 3, 8, 8], "sr": []}
    with pytest.raises(Exception):
        all_shapes(model, shapes)  # zeros: sr = 0
    known, _ = all_shapes(model, shapes, sample={"sr": np.array(16000, np.int64)})
    assert known["f"][1:] == [8, 8, 8]
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32), sr=np.array(16000, np.int64))
    out, rep = oc.optimize(model, "prune:ratio=0.5", calibration=calib, validation=False, latency=False)
    w = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    convs = {n.name: n for n in out.graph.node if n.op_type == "Conv"}
    assert w[convs["conv1"].input[1]].shape[0] == 8
    assert w[convs["conv2"].input[1]].shape[0] == 8


def test_a_1d_conv_is_refit_by_its_bias(tmp_path) -> None:
    """Pruning a Conv1d chain (audio front ends): the refit's patch sampling covers two
    spatial axes, so a 1-D Conv after the pruned one gets the mean-matching bias
    correction, which lowers its error against the unpruned output."""
    rng = np.random.default_rng(12)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3], pads=[1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", kernel_shape=[3], pads=[1, 1])]
    model = make_model(nodes, [fvi("x", ["N", 4, 32])], [fvi("y", ["N", 8, 32])],
                       [tensor(rng, "w1", (16, 4, 3), 0.4), tensor(rng, "b1", (16,), 0.5),
                        tensor(rng, "w2", (8, 16, 3), 0.3), tensor(rng, "b2", (8,), 0.1)])
    x = rng.standard_normal((32, 4, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    errs = {}
    for recovery in ("none", "lstsq"):
        out, rep = oc.optimize(model, f"prune:ratio=0.5:recovery={recovery}", calibration=tmp_path / "calib.npz",
                               validation=False, latency=False)
        w = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
        assert w[next(n for n in out.graph.node if n.name == "conv1").input[1]].shape[0] == 8
        errs[recovery] = float(np.abs(run(out, {"x": x})[0] - run(model, {"x": x})[0]).mean())
    assert errs["lstsq"] < errs["none"], errs
