"""Corpus of unusual but valid models (issue 6), generated here: each goes through
``onnxcompress optimize`` with every registered pass and must end in a validated output
that loads, or a clean one-line refusal (exit 2) — never a traceback, a partial output or
a modified input. (Broken files — random bytes, truncation, cycles, dangling inputs,
short initializers, unknown domains, bad external data — are in test_cli.py/test_model.py.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from .builders import fvi, make_model, tensor

PASSES = "canonicalize,prune:ratio=0.3,lowrank:rank=2,int8:guard=false,max_drop=0,experimental.bias_correction=false,experimental.head_correction=false"


def conv_net(opset: int, dtype: int = TensorProto.FLOAT, seed: int = 0) -> onnx.ModelProto:
    """Conv → Relu → Conv(3×3) → GlobalAveragePool → Flatten → Gemm, valid at opsets 7–21."""
    rng = np.random.default_rng(seed)
    np_t = np.float16 if dtype == TensorProto.FLOAT16 else np.float32

    def t(name: str, shape) -> onnx.TensorProto:  # noqa: ANN001
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np_t), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    inits = [t("w1", (16, 3, 3, 3)), t("b1", (16,)), t("w2", (16, 16, 3, 3)), t("b2", (16,)), t("wf", (5, 16)),
             t("bf", (5,))]
    ir = 3 if opset <= 8 else (4 if opset <= 10 else 7 if opset <= 14 else 8)
    m = make_model(nodes, [helper.make_tensor_value_info("x", dtype, [2, 3, 12, 12])],
                   [helper.make_tensor_value_info("y", dtype, [2, 5])], inits, opset=opset, ir_version=ir)
    if ir < 4:  # before IR 4 every initializer must also be a graph input
        m.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits)
    return m


def with_if() -> onnx.ModelProto:
    m = conv_net(13)
    then_g = helper.make_graph([helper.make_node("Relu", ["y"], ["t_out"])], "then", [], [fvi("t_out", [2, 5])])
    else_g = helper.make_graph([helper.make_node("Neg", ["y"], ["e_out"])], "else", [], [fvi("e_out", [2, 5])])
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    m.graph.node.append(helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then_g, else_branch=else_g))
    m.graph.output.append(fvi("z", [2, 5]))
    return m


def with_if_capture() -> onnx.ModelProto:
    """An If whose branches read, by outer-scope name, a tensor in the middle of the conv
    chain (r1) and a Constant node's output (k), as exported VAD models do."""
    m = conv_net(13)

    def branch(name: str, op: str) -> onnx.GraphProto:
        nodes = [helper.make_node("ReduceMean", ["r1"], [f"{name}_m"], axes=[1, 2, 3], keepdims=0),
                 helper.make_node(op, [f"{name}_m", "k"], [f"{name}_out"])]
        return helper.make_graph(nodes, name, [], [fvi(f"{name}_out", [2])])

    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    m.graph.node.extend([
        helper.make_node("Constant", [], ["k"], name="k", value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=branch("then", "Mul"),
                         else_branch=branch("else", "Sub"))])
    m.graph.output.append(fvi("z", [2]))
    return m


def with_loop() -> onnx.ModelProto:
    """y accumulated three times by a Loop whose body adds the Gemm output."""
    m = conv_net(13)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "y"], ["acc_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), fvi("acc_in", [2, 5])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), fvi("acc_out", [2, 5])])
    m.graph.initializer.extend([numpy_helper.from_array(np.array(3, np.int64), "trips"),
                                numpy_helper.from_array(np.array(True), "keep"),
                                numpy_helper.from_array(np.zeros((2, 5), np.float32), "acc0")])
    m.graph.node.append(helper.make_node("Loop", ["trips", "keep", "acc0"], ["z"], name="loop", body=body))
    m.graph.output.append(fvi("z", [2, 5]))
    return m


def conv_integer() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
             helper.make_node("ConvInteger", ["xq", "wq", "zp"], ["acc"], name="convint", kernel_shape=[3, 3]),
             helper.make_node("Cast", ["acc"], ["y"], to=TensorProto.FLOAT, name="cast")]
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "zp"),
             numpy_helper.from_array(rng.integers(0, 255, (4, 3, 3, 3)).astype(np.uint8), "wq")]
    return make_model(nodes, [fvi("x", [2, 3, 8, 8])], [fvi("y", [2, 4, 6, 6])], inits)


def already_qdq() -> onnx.ModelProto:
    m = conv_net(13)
    g = m.graph
    g.initializer.extend([numpy_helper.from_array(np.array(0.02, np.float32), "s"),
                          numpy_helper.from_array(np.array(128, np.uint8), "z")])
    g.node.insert(0, helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"))
    g.node.insert(1, helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xdq"], name="dq"))
    g.node[2].input[0] = "xdq"
    return m


def dynamic_quantized() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql"),
             helper.make_node("MatMulInteger", ["xq", "wq", "xz", "wz"], ["acc"], name="mmi"),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["accf", "xs"], ["y0"], name="rescale"),
             helper.make_node("Mul", ["y0", "ws"], ["y"], name="rescale_w")]
    inits = [numpy_helper.from_array(rng.integers(0, 255, (8, 4)).astype(np.uint8), "wq"),
             numpy_helper.from_array(np.array(128, np.uint8), "wz"),
             numpy_helper.from_array(np.array(0.01, np.float32), "ws")]
    return make_model(nodes, [fvi("x", [2, 8])], [fvi("y", [2, 4])], inits)


def zero_size() -> onnx.ModelProto:
    m = conv_net(13)
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((2, 0), np.float32), "empty"))
    m.graph.node.append(helper.make_node("Concat", ["y", "empty"], ["y2"], axis=1, name="cat_empty"))
    m.graph.output[0].CopyFrom(fvi("y2", [2, 5]))
    return m


def nonfinite_weights() -> onnx.ModelProto:
    m = conv_net(13)
    w = numpy_helper.to_array(m.graph.initializer[2]).copy()
    w[0, 0, 0, 0], w[1, 1, 1, 1] = np.nan, np.inf
    m.graph.initializer[2].CopyFrom(numpy_helper.from_array(w, "w2"))
    return m


def multi_io() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["a", "w"], ["ca"], name="conv_a", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["b", "w"], ["cb"], name="conv_b", kernel_shape=[1, 1]),
             helper.make_node("Add", ["ca", "cb"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("Sigmoid", ["ca"], ["p"], name="sig")]
    return make_model(nodes, [fvi("a", [2, 4, 6, 6]), fvi("b", [2, 4, 6, 6])],
                      [fvi("r", [2, 8, 6, 6]), fvi("p", [2, 8, 6, 6])], [tensor(rng, "w", (8, 4, 1, 1))])


def no_conv() -> onnx.ModelProto:
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Tanh", ["h"], ["y"], name="t")]
    return make_model(nodes, [fvi("x", [4, 8])], [fvi("y", [4, 3])], [tensor(rng, "w", (8, 3))])


CASES = {f"opset{v}": (lambda v=v: conv_net(v)) for v in range(7, 22)}
CASES.update({
    "float16": lambda: conv_net(13, TensorProto.FLOAT16),
    "if_subgraph": with_if,
    "if_captures_outer_tensors": with_if_capture,
    "loop_subgraph": with_loop,
    "conv_integer": conv_integer,
    "already_qdq": already_qdq,
    "dynamic_quantized": dynamic_quantized,
    "zero_size_tensor": zero_size,
    "nan_inf_weights": nonfinite_weights,
    "multiple_inputs_outputs": multi_io,
    "no_conv": no_conv,
})


def _calib(model: onnx.ModelProto, path: Path) -> None:
    rng = np.random.default_rng(0)
    inits = {t.name for t in model.graph.initializer}
    arrays = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape = [d.dim_value or 2 for d in tt.shape.dim]
        dtype = np.float16 if tt.elem_type == TensorProto.FLOAT16 else np.float32
        arrays[i.name] = np.concatenate([rng.standard_normal(shape).astype(dtype) for _ in range(4)])
    np.savez(path, **arrays)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_corpus_model(case: str, cli, tmp_path: Path) -> None:  # noqa: ANN001
    model = CASES[case]()
    src = tmp_path / "in.onnx"
    src.write_bytes(model.SerializeToString())
    calib = tmp_path / "calib.npz"
    _calib(model, calib)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "out.onnx"
    res = cli("optimize", src, out, "--calib", calib, "--passes", PASSES, "--no-latency", "-q")
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert "internal error" not in res.err and "Traceback" not in res.err, res.err
    assert sorted(p.name for p in tmp_path.iterdir()) in (["calib.npz", "in.onnx"], ["calib.npz", "in.onnx", "out.onnx"])
    if res.code == 0:
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    else:
        # 2: refused; 3: the result failed validation (random weights, 30% pruned, rank 2)
        lines = [ln for ln in res.err.splitlines() if ln.strip()]
        assert res.code in (2, 3) and len(lines) == 1 and lines[0].startswith("error: "), (res.code, res.err)
        assert not out.exists()


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_corpus_outcomes(cli, tmp_path: Path) -> None:  # noqa: ANN001
    """The cases a user would expect to work do work (not merely refuse cleanly)."""
    expect_ok = ["opset11", "opset13", "opset17", "opset21", "if_subgraph", "if_captures_outer_tensors",
                 "loop_subgraph", "already_qdq",
                 "conv_integer", "multiple_inputs_outputs",
                 "no_conv", "nan_inf_weights"]
    for case in expect_ok:
        d = tmp_path / case
        d.mkdir()
        model = CASES[case]()
        (d / "in.onnx").write_bytes(model.SerializeToString())
        _calib(model, d / "calib.npz")
        res = cli("optimize", d / "in.onnx", d / "out.onnx", "--calib", d / "calib.npz", "--passes",
                  "canonicalize,int8:guard=false,max_drop=0", "--no-latency", "-q", "--tol", "cosine=0.95,top1=0,rel_range=1")
        assert res.code == 0, (case, res.err)
        assert (d / "out.onnx").exists()


def test_a_tensor_a_subgraph_reads_is_not_pruned_and_stays_in_order() -> None:
    """A subgraph's outer reads count as reads: the If reads r1, so conv1's channels are
    a blocked group (pruning them would change what the branch averages), and a rewrite
    that re-sorts the graph keeps the Constant k and r1 ahead of the If."""
    from onnxcompress.graph import captured, topological_order
    from onnxcompress.passes.prune.groups import analyze
    from onnxcompress.shapes import all_shapes

    model = with_if_capture()
    node = next(n for n in model.graph.node if n.op_type == "If")
    assert captured(node) == {"r1", "k"}
    order = [model.graph.node[i].name for i in topological_order(model.graph)]
    assert order.index("branch") > max(order.index("relu1"), order.index("k"))
    an = analyze(model, all_shapes(model)[0])
    reasons = {an.describe(g): g.blocked for g in an.groups}
    conv1 = [r for d, r in reasons.items() if "conv1" in d]
    assert conv1 and all(r and "subgraph of If 'branch'" in r for r in conv1), reasons
