"""Concrete shapes of every tensor at a given input shape.

ONNX shape inference runs on a copy whose inputs are fixed to the given shapes; tensors
it cannot resolve (e.g. Reshape targets computed from ``Shape`` at run time) are read
from one onnxruntime run on zeros that exposes them as extra outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

from .data import InputSpec, input_specs
from .model import PROTOBUF_LIMIT, tensor_bytes

log = logging.getLogger(__name__)

DEFAULT_DYNAMIC_DIM = 64


def value_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Map tensor name → shape (int, symbolic name, or None) from inputs, outputs, value_info."""
    out: dict[str, list[int | str | None]] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        out[vi.name] = dims
    for t in g.initializer:
        out[t.name] = list(t.dims)
    return out


def concrete_input_shapes(
    specs: Sequence[InputSpec], given: Mapping[str, Sequence[int]] | None = None, dynamic_dim: int = DEFAULT_DYNAMIC_DIM
) -> dict[str, list[int]]:
    """Batch-1 shapes: ``given`` where provided, other dynamic dims ``dynamic_dim``.
    A static batch dimension is kept as it is."""
    shapes: dict[str, list[int]] = {}
    for s in specs:
        b = s.batch_axis
        if given and s.name in given:
            shape = [int(d) for d in given[s.name]]
        else:
            shape = [d if isinstance(d, int) else dynamic_dim for d in s.shape]
        if b is not None and b < len(shape):
            shape[b] = s.static_batch or 1
        shapes[s.name] = shape
    return shapes


def _fixed_shape_model(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for vi in m.graph.input:
        if vi.name in shapes:
            for d, v in zip(vi.type.tensor_type.shape.dim, shapes[vi.name]):
                d.Clear()
                d.dim_value = int(v)
    for o in m.graph.output:  # stale output shapes would conflict with the fixed input
        o.type.tensor_type.ClearField("shape")
    try:
        return onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:
        log.info("shape inference failed (%s); using onnxruntime shapes", exc)
        return m


def runtime_shapes(model: onnx.ModelProto, names: Iterable[str], shapes: Mapping[str, Sequence[int]],
                   sample: Mapping[str, np.ndarray] | None = None) -> dict[str, list[int]]:
    """Shapes of ``names`` from one onnxruntime run on zeros of the given input shapes,
    or on ``sample``'s values where it has an input of that shape (zeros are not a valid
    value of every input: a sample rate of 0 may take an If branch that fails)."""
    from .validate import make_session

    names = list(dict.fromkeys(names))
    if not names:
        return {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for n in names:
        if n not in existing:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    sess = make_session(m, "cpu", optimize=False, label="shape probe")
    specs = {s.name: s for s in input_specs(model)}
    feeds = {k: np.zeros(v, dtype=specs[k].dtype) for k, v in shapes.items() if k in specs}
    for k, v in (sample or {}).items():
        if k in feeds and feeds[k].shape == np.shape(v):
            feeds[k] = np.asarray(v, dtype=specs[k].dtype)
    outs = sess.run(names, feeds)
    return {n: list(np.asarray(o).shape) for n, o in zip(names, outs)}


def all_shapes(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None, need: Iterable[str] | None = None,
    sample: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(shapes of tensors, input shapes used). ``need``: tensors that must be resolved
    (default: every node output); ``sample``: input values (model layout) for the
    onnxruntime probe of what inference leaves open (default: zeros), whose shapes are the
    input shapes where ``input_shapes`` is not given."""
    if input_shapes is None and sample is not None:
        input_shapes = {k: list(np.shape(v)) for k, v in sample.items()}
    shapes_in = concrete_input_shapes(input_specs(model), input_shapes)
    inferred = _fixed_shape_model(model, shapes_in)
    known: dict[str, list[int]] = {}
    for name, dims in value_shapes(inferred).items():
        if all(isinstance(d, int) and d >= 0 for d in dims):
            known[name] = [int(d) for d in dims]  # type: ignore[arg-type]
    for t in model.graph.initializer:
        known[t.name] = list(t.dims)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            known[n.output[0]] = list(n.attribute[0].t.dims)
    wanted = list(need) if need is not None else [o for n in model.graph.node for o in n.output if o]
    missing = [n for n in wanted if n not in known]
    if missing:
        known.update(runtime_shapes(model, missing, shapes_in, sample))
    return known, shapes_in


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """onnx shape inference (with data propagation) of ``model``, and whether it ran; the
    model as it is where it is too large to infer in memory or inference fails."""
    if tensor_bytes(model) > PROTOBUF_LIMIT // 2:
        log.warning("model too large for in-memory shape inference; value_info left as is")
        return model, False
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises a variety of errors on exotic graphs
        log.warning("shape inference failed (%s); value_info left as is", exc)
        return model, False
    return inferred, True


def sequence_rows(graph: onnx.GraphProto, shapes: Mapping[str, Sequence[int]], x: str) -> int | None:
    """Where the 2-D ``x`` is a sequence's rows, [N, T, K] reshaped to [N·T, K] (fuse's
    ``linear_bias`` writes a linear layer on tokens so): the rows per sample, T (the
    product of the axes between the batch and the last); else None. A product on them
    costs T rows per sample, not one as a 2-D input's first axis would say."""
    src = next((n.input[0] for n in graph.node if n.op_type == "Reshape" and n.output[0] == x), None)
    seq, rows = (shapes.get(src) if src else None), shapes.get(x)
    if seq is None or rows is None or len(rows) != 2 or len(seq) < 3 or seq[-1] != rows[1] \
            or int(np.prod(seq[:-1], dtype=np.int64)) != rows[0]:
        return None
    return int(np.prod(seq[1:-1], dtype=np.int64))
