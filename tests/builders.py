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
