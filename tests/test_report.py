"""MACs and parameters, pinned against an independent count.

The independent count runs the model once in onnxruntime with every Conv/ConvTranspose/
Gemm/MatMul input and output exposed, and applies the textbook formulas to the *actual*
tensor shapes (no ONNX shape inference involved).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from onnxcompress.model import load_model
from onnxcompress.report import count_macs, count_params, summarize

from .conftest import FIXTURES, shared_path

# per-sample MACs at the shapes of ../shared/data (batch 1), counted independently below
SHARED_MACS = {
    "textline_cls": ([1, 3, 48, 192], 16_315_376),
    "doc_orientation": ([1, 3, 224, 224], 154_425_600),
    "text_det": ([1, 3, 480, 640], 1_726_479_744),
    "captcha_det": ([1, 3, 416, 416], 3_179_352_384),
}


def independent_macs(model: onnx.ModelProto, shape: list[int]) -> int:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    consts = {n.output[0]: list(n.attribute[0].t.dims) for n in m.graph.node if n.op_type == "Constant"}
    nodes = [n for n in m.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    probe = []
    for n in nodes:
        for t in (n.input[0], n.input[1], n.output[0]):
            if t not in inits and t not in consts and t not in probe:
                probe.append(t)
    outs = {o.name for o in m.graph.output}
    for t in probe:
        if t not in outs:
            m.graph.output.append(onnx.ValueInfoProto(name=t))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.zeros(shape, np.float32)
    vals = dict(zip(probe, sess.run(probe, {m.graph.input[0].name: x})))

    def shp(t: str) -> list[int]:
        return inits.get(t) or consts.get(t) or list(vals[t].shape)

    total = 0
    for n in nodes:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        X, W, Y = shp(n.input[0]), shp(n.input[1]), shp(n.output[0])
        if n.op_type == "Conv":
            # each output element: (C_in / group) * kh * kw multiply-adds
            total += int(np.prod(Y)) * W[1] * int(np.prod(W[2:]))
        elif n.op_type == "ConvTranspose":
            total += int(np.prod(X)) * W[1] * int(np.prod(W[2:]))
        elif n.op_type == "Gemm":
            total += Y[0] * Y[1] * (X[0] if a.get("transA", 0) else X[1])
        else:
            total += int(np.prod(Y)) * X[-1]
    return total


def test_fixture_macs_by_hand() -> None:
    # resnet_block at 1x3x32x32: stem 16·32·32·3·9; block 2× 16·32·32·16·9; strided 32·16·16·16·9,
    # 32·16·16·32·9; projection 32·16·16·16; Gemm 32·10
    expected = (16 * 1024 * 27) + 2 * (16 * 1024 * 144) + (32 * 256 * 144) + (32 * 256 * 288) + (32 * 256 * 16) + 320
    total, layers, shapes = count_macs(load_model(FIXTURES / "resnet_block.onnx"))
    assert shapes == {"input": [1, 3, 32, 32]}
    assert total == expected
    assert len(layers) == 7


@pytest.mark.parametrize("name", ["resnet_block", "mobilenet_se", "concat_split"])
def test_fixture_macs_independent(name: str) -> None:
    m = load_model(FIXTURES / f"{name}.onnx")
    assert count_macs(m)[0] == independent_macs(m, [1, 3, 32, 32])


@pytest.mark.shared
@pytest.mark.parametrize("name", list(SHARED_MACS))
def test_shared_model_macs(name: str) -> None:
    shape, pinned = SHARED_MACS[name]
    m = load_model(shared_path("models", f"{name}.onnx"))
    s = summarize(m, {m.graph.input[0].name: shape})
    assert s.macs == pinned
    assert independent_macs(m, shape) == pinned


def test_params_and_summary() -> None:
    m = load_model(FIXTURES / "mobilenet_se.onnx")  # weights in Constant nodes
    expected = sum(int(np.prod(n.attribute[0].t.dims)) for n in m.graph.node
                   if n.op_type == "Constant" and n.attribute[0].t.data_type == onnx.TensorProto.FLOAT)
    s = summarize(m)
    assert s.params == count_params(m) == expected
    assert s.batchnorm == 5 and s.op_counts["Conv"] == 7 and s.opset == 14
    assert s.inputs == [{"name": "image", "dtype": "float32", "shape": ["N", 3, 32, 32]}]
    assert s.file_size == m.ByteSize()
