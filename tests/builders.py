"""Small ONNX graphs for tests, built from seeded random weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 13, ir_version: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version
    return m


def fvi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def tensor(rng: np.random.Generator, name: str, shape, scale: float = 1.0) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = False) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def linear_model(offset: float = 0.0, classes: int = 5, nan: bool = False) -> onnx.ModelProto:
    """y = x @ W (+ offset) with x [N, 8]; optional NaN injection via Log of -1."""
    rng = np.random.default_rng(7)
    w = numpy_helper.from_array(rng.standard_normal((8, classes)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"])]
    inits = [w]
    last = "mm"
    if offset:
        inits.append(numpy_helper.from_array(np.array(offset, dtype=np.float32), "off"))
        nodes.append(helper.make_node("Add", [last, "off"], ["shifted"]))
        last = "shifted"
    if nan:
        inits.append(numpy_helper.from_array(np.array(-1.0, dtype=np.float32), "neg"))
        nodes.append(helper.make_node("Log", ["neg"], ["nanval"]))
        nodes.append(helper.make_node("Add", [last, "nanval"], ["withnan"]))
        last = "withnan"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    return make_model(nodes, [fvi("x", ["N", 8])], [fvi("y", ["N", classes])], inits)


def hybrid_recognizer(d: int = 32, heads: int = 2, hidden: int = 64, classes: int = 12, seed: int = 0,
                      ctc: bool = True) -> onnx.ModelProto:
    """A CNN stem and one transformer block, as in a text recognizer: x [N, 3, 8, W] → Conv
    3×3 (stride 2) → ReLU → Conv 1×1 → [N, d, 1, W/2] after a mean over height → tokens
    [N, T, d] → LayerNorm spelled out (ReduceMean/Sub/Pow/Sqrt/Div, as PaddlePaddle
    exports it) → multi-head attention (Q, K, V MatMul + Add, Reshape to [N, T, h, d/h],
    Softmax) → output projection → residual → LayerNorm → MLP (MatMul + Add, GELU by Erf,
    MatMul + Add) → residual → classifier MatMul + Add → Softmax over ``classes`` (a CTC
    head; ``ctc=False``: the logits)."""
    rng = np.random.default_rng(seed)
    dh = d // heads
    inits = [tensor(rng, "stem_w", (d, 3, 3, 3), 0.3), tensor(rng, "stem_b", (d,), 0.1),
             tensor(rng, "pw_w", (d, d, 1, 1), 1 / np.sqrt(d)), tensor(rng, "pw_b", (d,), 0.1)]
    nodes = [helper.make_node("Conv", ["x", "stem_w", "stem_b"], ["c1"], name="stem", kernel_shape=[3, 3],
                              strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "pw_w", "pw_b"], ["c2"], name="pointwise", kernel_shape=[1, 1]),
             helper.make_node("ReduceMean", ["c2"], ["pooled"], axes=[2], keepdims=0),  # [N, d, T]
             helper.make_node("Transpose", ["pooled"], ["tok"], perm=[0, 2, 1])]  # [N, T, d]
    consts = {"two": 2.0, "eps": 1e-5, "half": 0.5, "one": 1.0, "sqrt2": float(np.sqrt(2.0)),
              "scale": float(1 / np.sqrt(dh))}
    inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items()]
    inits += [numpy_helper.from_array(np.array(s, np.int64), n) for n, s in
              (("heads_shape", [0, 0, heads, dh]), ("merge_shape", [0, 0, d]))]

    def layer_norm(x: str, tag: str) -> str:
        inits.extend([numpy_helper.from_array((1 + 0.1 * rng.standard_normal(d)).astype(np.float32), f"{tag}_g"),
                      tensor(rng, f"{tag}_b", (d,), 0.1)])
        nodes.extend([helper.make_node("ReduceMean", [x], [f"{tag}_mu"], axes=[-1]),
                      helper.make_node("Sub", [x, f"{tag}_mu"], [f"{tag}_xc"]),
                      helper.make_node("Pow", [f"{tag}_xc", "two"], [f"{tag}_sq"]),
                      helper.make_node("ReduceMean", [f"{tag}_sq"], [f"{tag}_var"], axes=[-1]),
                      helper.make_node("Add", [f"{tag}_var", "eps"], [f"{tag}_ve"]),
                      helper.make_node("Sqrt", [f"{tag}_ve"], [f"{tag}_sd"]),
                      helper.make_node("Div", [f"{tag}_xc", f"{tag}_sd"], [f"{tag}_n"]),
                      helper.make_node("Mul", [f"{tag}_n", f"{tag}_g"], [f"{tag}_s"]),
                      helper.make_node("Add", [f"{tag}_s", f"{tag}_b"], [f"{tag}_out"])])
        return f"{tag}_out"

    def linear(x: str, tag: str, k: int, n: int) -> str:
        inits.extend([tensor(rng, f"{tag}_w", (k, n), 1 / np.sqrt(k)), tensor(rng, f"{tag}_b", (n,), 0.1)])
        nodes.extend([helper.make_node("MatMul", [x, f"{tag}_w"], [f"{tag}_mm"], name=tag),
                      helper.make_node("Add", [f"{tag}_mm", f"{tag}_b"], [f"{tag}_out"])])
        return f"{tag}_out"

    h = layer_norm("tok", "ln1")
    q, k, v = (linear(h, t, d, d) for t in ("q", "k", "v"))
    for t, src in (("qh", q), ("kh", k), ("vh", v)):
        nodes.extend([helper.make_node("Reshape", [src, "heads_shape"], [f"{t}_r"]),
                      helper.make_node("Transpose", [f"{t}_r"], [t], perm=[0, 2, 1, 3])])  # [N, h, T, dh]
    nodes.extend([helper.make_node("Transpose", ["kh"], ["khT"], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", ["qh", "khT"], ["scores"]),
                  helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
                  helper.make_node("Softmax", ["scaled"], ["attn"], axis=-1),
                  helper.make_node("MatMul", ["attn", "vh"], ["ctx_h"]),
                  helper.make_node("Transpose", ["ctx_h"], ["ctx_t"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["ctx"])])
    o = linear("ctx", "proj", d, d)
    nodes.append(helper.make_node("Add", ["tok", o], ["res1"]))
    h2 = layer_norm("res1", "ln2")
    f1 = linear(h2, "fc1", d, hidden)
    nodes.extend([helper.make_node("Div", [f1, "sqrt2"], ["g_s"]), helper.make_node("Erf", ["g_s"], ["g_e"]),
                  helper.make_node("Add", ["g_e", "one"], ["g_1"]), helper.make_node("Mul", [f1, "g_1"], ["g_m"]),
                  helper.make_node("Mul", ["g_m", "half"], ["gelu"])])
    f2 = linear("gelu", "fc2", hidden, d)
    nodes.append(helper.make_node("Add", ["res1", f2], ["res2"]))
    logits = linear("res2", "head", d, classes)
    if ctc:
        nodes.append(helper.make_node("Softmax", [logits], ["y"], axis=-1))
    else:
        nodes.append(helper.make_node("Identity", [logits], ["y"]))
    return make_model(nodes, [fvi("x", ["N", 3, 8, 16])], [fvi("y", ["N", 8, classes])], inits)
