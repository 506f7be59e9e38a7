"""Model statistics (parameters, MACs, size, ops) and the optimize report.

MACs are multiply-accumulates for one sample (batch 1) at a concrete input shape:

* Conv:          N · M · ∏(output spatial) · (C / group) · ∏(kernel)
* ConvTranspose: N · C · ∏(input spatial) · (M / group) · ∏(kernel)
* Gemm:          M · K · N (after transA / transB)
* MatMul:        ∏(output shape) · K

Shapes come from ONNX shape inference on a copy whose inputs are fixed to that shape;
shapes it cannot infer (e.g. Reshape targets computed at run time) are read from one
onnxruntime run that exposes the missing tensors.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from .data import input_specs
from .model import default_opset, iter_graphs, iter_tensors, node_attr, serialized_size
from .shapes import all_shapes

log = logging.getLogger(__name__)

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class LayerMacs:
    node: str
    op: str
    macs: int
    output_shape: list[int]


@dataclass
class ModelSummary:
    opset: int | None
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    params: int
    macs: int | None
    macs_input_shapes: dict[str, list[int]]
    file_size: int
    nodes: int
    op_counts: dict[str, int]
    batchnorm: int
    layers: list[LayerMacs] = field(default_factory=list)

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        d = asdict(self)
        layers = sorted(self.layers, key=lambda layer: -layer.macs)
        d["layers"] = [asdict(x) for x in (layers[:top] if top else layers)]
        return d


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        out.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None))
    return out


def count_params(model: onnx.ModelProto) -> int:
    """Elements of weights: floating-point initializers and Constant-node tensors, and the
    integer tensors a DequantizeLinear reads as data (quantized weights and biases; their
    scales and zero points are floating/integer bookkeeping and count too only if float)."""
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    quantized = {n.input[0] for g in iter_graphs(model.graph) for n in g.node
                 if n.op_type == "DequantizeLinear" and n.input}
    total = 0
    for t in iter_tensors(model):
        if t.data_type in floating or t.name in quantized:
            total += int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    return total


def layer_macs(node: onnx.NodeProto, x: Sequence[int], w: Sequence[int], y: Sequence[int]) -> int:
    """MACs of one Conv/ConvTranspose/Gemm/MatMul from its input, weight and output shapes."""
    if node.op_type == "Conv":  # W is [M, C/group, k...]
        return int(np.prod(y, dtype=np.int64)) * int(w[1]) * int(np.prod(w[2:], dtype=np.int64))
    if node.op_type == "ConvTranspose":  # W is [C, M/group, k...]: each input element feeds M/group outputs per tap
        return int(np.prod(x, dtype=np.int64)) * int(w[1]) * int(np.prod(w[2:], dtype=np.int64))
    if node.op_type == "Gemm":
        k = x[0] if node_attr(node, "transA", 0) else x[-1]
        return int(np.prod(y, dtype=np.int64)) * int(k)
    return int(np.prod(y, dtype=np.int64)) * int(x[-1])  # MatMul


def count_macs(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> tuple[int, list[LayerMacs], dict[str, list[int]]]:
    """Total MACs per sample, per-layer MACs, and the input shapes used."""
    nodes = [n for n in model.graph.node if n.op_type in MAC_OPS]
    need = [name for n in nodes for name in (n.input[0], n.input[1], n.output[0]) if name]
    shapes, shapes_in = all_shapes(model, input_shapes, need)
    layers = [LayerMacs(n.name or n.output[0], n.op_type,
                        layer_macs(n, shapes[n.input[0]], shapes[n.input[1]], shapes[n.output[0]]),
                        [int(d) for d in shapes[n.output[0]]]) for n in nodes]
    return sum(layer.macs for layer in layers), layers, {k: list(v) for k, v in shapes_in.items()}


def summarize(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> ModelSummary:
    ops = Counter(n.op_type for n in model.graph.node)
    try:
        macs, layers, used = count_macs(model, input_shapes)
    except Exception as exc:  # MACs are informative; a model we cannot probe still gets a summary
        log.warning("could not count MACs: %s", exc)
        macs, layers, used = None, [], {}
    return ModelSummary(
        opset=default_opset(model),
        inputs=[{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape)} for s in input_specs(model)],
        outputs=[{"name": o.name, "shape": _dims(o)} for o in model.graph.output],
        params=count_params(model),
        macs=macs,
        macs_input_shapes=used,
        file_size=serialized_size(model),
        nodes=len(model.graph.node),
        op_counts=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        batchnorm=ops.get("BatchNormalization", 0),
        layers=layers,
    )


@dataclass
class LatencyResult:
    provider: str
    batch: int
    before_ms: float
    after_ms: float

    @property
    def ratio(self) -> float:
        return self.after_ms / self.before_ms if self.before_ms > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class OptimizeReport:
    """Everything ``optimize`` learned: per-pass steps, before/after, latency, validation."""

    passes: list[Any]
    before: ModelSummary
    after: ModelSummary
    latency: LatencyResult | None = None
    validation: Any | None = None
    input_path: str | None = None
    output_path: str | None = None
    written: bool = False
    search: Any | None = None
    fallback: str | None = None  # why the model as given was returned instead of the rewrite

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input_path,
            "output": self.output_path,
            "written": self.written,
            "fallback": self.fallback,
            "passes": [p.to_dict() for p in self.passes],
            "before": self.before.to_dict(top=20),
            "after": self.after.to_dict(top=20),
            "latency": self.latency.to_dict() if self.latency else None,
            "validation": self.validation.to_dict() if self.validation else None,
            "search": self.search.to_dict() if self.search else None,
        }
