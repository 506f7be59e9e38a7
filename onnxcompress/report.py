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
from onnx import helper

from .data import InputSpec, input_specs
from .model import default_opset, iter_tensors, serialized_size
from .passes.canonicalize import value_shapes

log = logging.getLogger(__name__)

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
DEFAULT_DYNAMIC_DIM = 64


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
    """Elements of floating-point weights: initializers and Constant-node tensors."""
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    total = 0
    for t in iter_tensors(model):
        if t.data_type in floating:
            total += int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    return total


def concrete_input_shapes(
    specs: Sequence[InputSpec], given: Mapping[str, Sequence[int]] | None = None, dynamic_dim: int = DEFAULT_DYNAMIC_DIM
) -> dict[str, list[int]]:
    """Shapes for a batch-1 MACs count: ``given`` where provided, batch 1, other dynamic dims ``dynamic_dim``."""
    shapes: dict[str, list[int]] = {}
    for s in specs:
        if given and s.name in given:
            shape = [int(d) for d in given[s.name]]
            if shape:
                shape[0] = 1
        else:
            shape = [1 if i == 0 else (d if isinstance(d, int) else dynamic_dim) for i, d in enumerate(s.shape)]
            if s.shape and isinstance(s.shape[0], int):
                shape[0] = s.shape[0]
        shapes[s.name] = shape
    return shapes


def _fixed_shape_model(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for vi in m.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[vi.name]):
                d.Clear()
                d.dim_value = int(v)
    for o in m.graph.output:  # stale output shapes would conflict with the fixed input
        o.type.tensor_type.ClearField("shape")
    try:
        return onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:
        log.info("shape inference failed for MACs (%s); falling back to onnxruntime shapes", exc)
        return m


def _runtime_shapes(model: onnx.ModelProto, names: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Shapes of ``names`` from one onnxruntime run on zeros of the given input shapes."""
    from .validate import make_session

    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for n in names:
        if n not in existing:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    sess = make_session(m, "cpu", optimize=False, label="MACs shape probe")
    specs = {s.name: s for s in input_specs(model)}
    feeds = {k: np.zeros(v, dtype=specs[k].dtype) for k, v in shapes.items() if k in specs}
    outs = sess.run(list(names), feeds)
    return {n: list(np.asarray(o).shape) for n, o in zip(names, outs)}


def count_macs(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> tuple[int, list[LayerMacs], dict[str, list[int]]]:
    """Total MACs per sample, per-layer MACs, and the input shapes used."""
    shapes_in = concrete_input_shapes(input_specs(model), input_shapes)
    inferred = _fixed_shape_model(model, shapes_in)
    shapes = value_shapes(inferred)
    for t in iter_tensors(model):
        if t.name and t.name not in shapes:
            shapes[t.name] = list(t.dims)
    for n in model.graph.node:  # Constant-node weights
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            shapes[n.output[0]] = list(n.attribute[0].t.dims)
    nodes = [n for n in model.graph.node if n.op_type in MAC_OPS]

    def known(name: str) -> bool:
        s = shapes.get(name)
        return s is not None and all(isinstance(d, int) and d >= 0 for d in s)

    needed = set()
    for n in nodes:
        for name in list(n.input[:2]) + [n.output[0]]:
            if name and not known(name):
                needed.add(name)
    if needed:
        shapes.update(_runtime_shapes(model, sorted(needed), shapes_in))
    layers: list[LayerMacs] = []
    for n in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        x, w, y = shapes[n.input[0]], shapes[n.input[1]], shapes[n.output[0]]
        if n.op_type == "Conv":
            group = int(attrs.get("group", 1))
            macs = int(np.prod(y, dtype=np.int64)) * (int(x[1]) // group) * int(np.prod(w[2:], dtype=np.int64))
        elif n.op_type == "ConvTranspose":
            group = int(attrs.get("group", 1))
            macs = int(np.prod(x, dtype=np.int64)) * (int(w[1])) * int(np.prod(w[2:], dtype=np.int64))
            del group  # W is [C, M/group, k...]: each input element feeds M/group outputs per tap
        elif n.op_type == "Gemm":
            k = x[0] if attrs.get("transA", 0) else x[-1]
            macs = int(np.prod(y, dtype=np.int64)) * int(k)
        else:  # MatMul
            macs = int(np.prod(y, dtype=np.int64)) * int(x[-1])
        layers.append(LayerMacs(n.name or n.output[0], n.op_type, int(macs), [int(d) for d in y]))
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input_path,
            "output": self.output_path,
            "written": self.written,
            "passes": [p.to_dict() for p in self.passes],
            "before": self.before.to_dict(top=20),
            "after": self.after.to_dict(top=20),
            "latency": self.latency.to_dict() if self.latency else None,
            "validation": self.validation.to_dict() if self.validation else None,
        }
