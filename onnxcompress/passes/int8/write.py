"""Quantization parameters (scale, zero point) of activations and weights, and writing
the Q → DQ pairs of a :class:`~onnxcompress.passes.int8.qdq.Plan` into the model (the
formulas are in qdq.py's docstring)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...graph import drop_unused_initializers, initializers, producers, topological_order
from ...model import node_attr
from .qdq import BINARY, COMPUTE, FLOAT_SUFFIX, ActType, Plan

log = logging.getLogger(__name__)


def act_params(lo: float, hi: float, act_type: ActType) -> tuple[float, int]:
    """(scale, zero point) of an activation range."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if act_type == "int8":
        m = max(-lo, hi)
        return (m / 127.0 if m > 0 else 1.0), 0
    if hi - lo <= 0:
        return 1.0, 0
    s = (hi - lo) / 255.0
    z = int(np.clip(round(-lo / s), 0, 255))
    return s, z


def tensor_params(plan_: Plan, ranges: Mapping[str, tuple[float, float]], act_type: ActType,
                  bounds: Mapping[str, tuple[float, float]] | None = None) -> dict[str, tuple[float, int]]:
    """Scale and zero point of every planned tensor (shared groups: hull of their sources)."""
    bounds = bounds or {}
    hull: dict[str, list[float]] = {}
    for t in plan_.tensors:
        if t not in plan_.sources:
            continue
        lo, hi = ranges.get(t, (0.0, 0.0))
        if t in bounds:
            lo, hi = max(lo, bounds[t][0]), min(hi, bounds[t][1])
        r = plan_.share.get(t, t)
        h = hull.setdefault(r, [0.0, 0.0])
        h[0], h[1] = min(h[0], lo), max(h[1], hi)
    out = {}
    for t in plan_.tensors:
        r = plan_.share.get(t, t)
        lo, hi = hull.get(r, ranges.get(t, (0.0, 0.0)))
        out[t] = act_params(lo, hi, act_type)
    return out


def quantize_weight(w: np.ndarray, axis: int | None, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights in [−qmax, qmax], float32 scales) — symmetric, per channel along
    ``axis`` (None: per tensor); ``qmax`` 63 for 7-bit weights (see :mod:`onnxcompress.isa`)."""
    w = w.astype(np.float32)
    if axis is None:
        m = np.array(np.max(np.abs(w)) if w.size else 0.0, dtype=np.float64)
        s = np.where(m > 0, m / qmax, 1.0)
        q = np.clip(np.round(w / s), -qmax, qmax).astype(np.int8)
        return q, np.asarray(s, dtype=np.float32)
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    m = np.max(np.abs(moved), axis=1) if moved.shape[1] else np.zeros(w.shape[axis])
    s = np.where(m > 0, m / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / s.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, s


def weight_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if int(node_attr(node, "transB", 0)) else 1
    return 1  # MatMul: B is K × N


def _float_reader_channels(n: onnx.NodeProto, x: str, plan_: Plan, inits: Mapping[str, TensorProto]) -> int | None:
    """Channels (axis 1) of ``x`` when ``n`` is a float Conv/ConvTranspose/Gemm reading it as
    its data input with a constant weight (what onnxruntime would quantize by itself), else
    None. A single channel is left alone: its scale vector would count as per tensor."""
    if n.name in plan_.nodes or n.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(n.input) < 2:
        return None
    if n.input[0] != x or n.input[1] not in inits:
        return None
    shape = list(inits[n.input[1]].dims)
    if n.op_type == "Conv":
        c = shape[1] * int(node_attr(n, "group", 1))
    elif n.op_type == "ConvTranspose":
        c = shape[0]
    elif int(node_attr(n, "transA", 0)):
        return None  # axis 1 of Aᵀ is the batch
    else:
        c = shape[1] if int(node_attr(n, "transB", 0)) else shape[0]
    return c if c > 1 else None


@dataclass
class _Writer:
    """What :func:`insert_qdq` adds to a graph: initializers and nodes, written at the end."""

    g: onnx.GraphProto
    inits: dict[str, TensorProto]
    act_type: ActType
    new_inits: list[TensorProto] = field(default_factory=list)
    new_nodes: list[onnx.NodeProto] = field(default_factory=list)

    @property
    def npq(self) -> type:
        return np.uint8 if self.act_type == "uint8" else np.int8

    def init(self, arr: np.ndarray, name: str) -> str:
        self.new_inits.append(numpy_helper.from_array(arr, name))
        return name

    def dequantize(self, inputs: list[str], output: str, name: str, **attrs: Any) -> str:
        self.new_nodes.append(helper.make_node("DequantizeLinear", inputs, [output], name=name, **attrs))
        return output


def insert_qdq(model: onnx.ModelProto, plan_: Plan, params: Mapping[str, tuple[float, int]], *,
               act_type: ActType = "uint8", per_channel: bool = True, bias: Literal["int32", "float"] = "int32",
               bias_shift: Mapping[str, np.ndarray] | None = None,
               rounding: Callable[[onnx.NodeProto, np.ndarray, np.ndarray, int | None], np.ndarray | None] | None = None,
               keep_float: Iterable[str] = (), weight_max: int = 127,
               ) -> onnx.ModelProto:
    """A copy of ``model`` with the Q/DQ pairs, quantized weights and biases of ``plan_``
    (``bias_shift``: node → per-channel amount added to its bias before quantization;
    ``rounding``: (node, W, final scales, axis) → int8 weights, or None for nearest
    rounding — :class:`rounding.GptqRounder`; ``keep_float``: float nodes that must stay
    float in onnxruntime, see the module docstring)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    w = _Writer(g, initializers(g), act_type)
    # weights, biases and constant operands of quantized nodes
    for n in list(g.node):
        if n.name not in plan_.nodes:
            continue
        if n.op_type in COMPUTE and len(n.input) > 1 and n.input[1] in w.inits:
            _quantize_weights(w, n, params[n.input[0]][0] if n.input[0] in params else None, per_channel, bias,
                              (bias_shift or {}).get(n.name), rounding, weight_max)
        elif n.op_type in BINARY:
            _quantize_constants(w, n)
    # activations (after the weights: a graph input's readers are renamed here)
    producer = producers(g)
    float_names = set(keep_float)
    must_float = [n for n in g.node if n.name in float_names]  # looked at for every quantized tensor
    for t in sorted(plan_.tensors):
        _quantize_activation(w, t, params[t], producer, must_float, plan_)
    g.initializer.extend(w.new_inits)
    g.node.extend(w.new_nodes)
    nodes = [g.node[i] for i in topological_order(g)]
    del g.node[:]
    g.node.extend(nodes)
    drop_unused_initializers(m)
    # value_info of renamed producer outputs is stale; let shape inference redo it
    del g.value_info[:]
    return m


def _quantize_weights(w_: _Writer, n: onnx.NodeProto, sx: float | None, per_channel: bool,
                      bias: Literal["int32", "float"], shift: np.ndarray | None,
                      rounding: Callable[[onnx.NodeProto, np.ndarray, np.ndarray, int | None], np.ndarray | None] | None,
                      weight_max: int) -> None:
    """A compute node's weights as int8 (per output channel, or per tensor) behind a
    DequantizeLinear, and its bias as int32 at scale s_x·s_w (``shift`` added first)."""
    inits = w_.inits
    w = numpy_helper.to_array(inits[n.input[1]])
    axis = weight_axis(n) if per_channel else None
    q, ws = quantize_weight(w, axis, weight_max)
    b_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
    if b_name is None and shift is not None and bias == "int32" and n.op_type == "Conv":
        b_name = f"{n.name}_bias_zero"  # a bias to carry the correction
        inits[b_name] = numpy_helper.from_array(np.zeros(w.shape[0], np.float32), b_name)
        n.input.append(b_name)
    if b_name is not None and bias == "int32" and b_name in inits and sx is not None:
        q, ws = _quantize_bias(w_, n, b_name, w, q, ws, axis, sx, shift, weight_max)
    if rounding is not None:
        rq = rounding(n, w, ws, axis)
        q = rq if rq is not None else q
    base = f"{n.name}_weight"
    wq = w_.init(q, f"{base}_quantized")
    wsn = w_.init(ws.reshape(-1) if axis is not None else np.asarray(ws, np.float32).reshape(()), f"{base}_scale")
    wzn = w_.init(np.zeros(ws.size, dtype=np.int8) if axis is not None else np.array(0, dtype=np.int8),
                  f"{base}_zero_point")
    attrs = {"axis": axis} if axis is not None else {}
    n.input[1] = w_.dequantize([wq, wsn, wzn], f"{base}_dequantized", f"{base}_DequantizeLinear", **attrs)


def _quantize_bias(w_: _Writer, n: onnx.NodeProto, b_name: str, w: np.ndarray, q: np.ndarray, ws: np.ndarray,
                   axis: int | None, sx: float, shift: np.ndarray | None, weight_max: int,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The bias as int32 at scale s_x·s_w behind a DequantizeLinear; a weight scale is
    raised where the bias would not fit int32 (the weights requantized): (q, scales)."""
    b = numpy_helper.to_array(w_.inits[b_name]).astype(np.float64)
    if shift is not None:
        b = b + shift
    need = np.abs(b) / (sx * (2**31 - 1))
    if axis is None:
        need_s = float(np.max(need)) if need.size else 0.0
        if need_s > float(ws):
            ws = np.asarray(need_s, dtype=np.float32)
            q = np.clip(np.round(w / ws), -weight_max, weight_max).astype(np.int8)
    else:
        grow = need > ws
        if np.any(grow):
            ws = np.where(grow, need, ws).astype(np.float32)
            shape = [1] * w.ndim
            shape[axis] = -1
            q = np.clip(np.round(w / ws.reshape(shape)), -weight_max, weight_max).astype(np.int8)
    bs = (sx * ws.astype(np.float64)).astype(np.float32)
    qb = np.clip(np.round(b / bs), -(2**31 - 1), 2**31 - 1).astype(np.int32)
    base = f"{n.name}_bias"
    bsn = w_.init(bs.reshape(-1) if axis is not None else bs.reshape(()), f"{base}_scale")
    bzn = w_.init(np.zeros(bs.shape, dtype=np.int32).reshape(-1) if axis is not None
                  else np.array(0, dtype=np.int32), f"{base}_zero_point")
    bq = w_.init(qb, f"{base}_quantized")
    attrs = {"axis": 0} if axis is not None else {}
    n.input[2] = w_.dequantize([bq, bsn, bzn], f"{base}_dequantized", f"{base}_DequantizeLinear", **attrs)
    return q, ws


def _quantize_constants(w_: _Writer, n: onnx.NodeProto) -> None:
    """A binary node's constant operands at the activation type, behind DequantizeLinear."""
    for i, x in enumerate(n.input[:2]):
        if x not in w_.inits:
            continue
        c = numpy_helper.to_array(w_.inits[x]).astype(np.float32)
        s, z = act_params(float(c.min(initial=0.0)), float(c.max(initial=0.0)), w_.act_type)
        lo, hi = (0, 255) if w_.act_type == "uint8" else (-128, 127)
        qc = np.clip(np.round(c / s) + z, lo, hi).astype(w_.npq)
        base = f"{n.name}_const{i}"
        names = [w_.init(qc, f"{base}_quantized"), w_.init(np.array(s, np.float32), f"{base}_scale"),
                 w_.init(np.array(z, w_.npq), f"{base}_zero_point")]
        n.input[i] = w_.dequantize(names, f"{base}_dequantized", f"{base}_DequantizeLinear")


def _quantize_activation(w_: _Writer, t: str, sz: tuple[float, int], producer: dict[str, onnx.NodeProto],
                         must_float: list[onnx.NodeProto], plan_: Plan) -> None:
    """One Q → DQ pair on tensor ``t``: its producer writes ``t__float`` and the
    DequantizeLinear writes ``t`` again (a graph input's readers are renamed instead)."""
    s, z = sz
    sn = w_.init(np.array(s, dtype=np.float32), f"{t}_scale")
    zn = w_.init(np.array(z, dtype=w_.npq), f"{t}_zero_point")
    if t in producer:
        src = t + FLOAT_SUFFIX
        node = producer[t]
        for i, o in enumerate(node.output):
            if o == t:
                node.output[i] = src
        dq_out = t
    else:  # graph input
        src = t
        dq_out = t + "__dq"
        for n in w_.g.node:
            for i, x in enumerate(n.input):
                if x == t:
                    n.input[i] = dq_out
    w_.new_nodes.append(helper.make_node("QuantizeLinear", [src, sn, zn], [t + "__q"], name=f"{t}_QuantizeLinear"))
    w_.dequantize([t + "__q", sn, zn], dq_out, f"{t}_DequantizeLinear")
    for n in must_float:
        c = _float_reader_channels(n, dq_out, plan_, w_.inits)
        if c is None:
            continue
        # onnxruntime's WeightBiasQuantization turns a float Conv/ConvTranspose/Gemm whose
        # input comes from a per-tensor DequantizeLinear into an int8 one (its own
        # per-tensor weights): the node would not run float. A per-channel DQ of
        # equal scales gives the same values and is not matched.
        name = f"{t}__float_reader_{n.name}"
        sv = w_.init(np.full(c, s, dtype=np.float32), f"{name}_scale")
        zv = w_.init(np.full(c, z, dtype=w_.npq), f"{name}_zero_point")
        n.input[0] = w_.dequantize([t + "__q", sv, zv], name, f"{name}_DequantizeLinear", axis=1)


def fused_ops(model: onnx.ModelProto, provider: str = "cpu") -> dict[str, int]:
    """Op histogram of the graph onnxruntime actually runs (after its QDQ fusions)."""
    from ...validate import runtime_ops

    return runtime_ops(model, provider)
