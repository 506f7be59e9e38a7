"""Run a QDQ int8 model as onnxruntime's U8S8 kernels compute it on x86 without VNNI.

There, ``vpmaddubsw`` adds each pair of adjacent uint8·int8 products (along the reduction
axis) into int16 with saturation before the int32 sums (see :mod:`onnxcompress.isa`).
This module reproduces that on any machine, so that a test or benchmark can check what a
model built for one CPU does on the other:

* quantized layers are Conv/MatMul/Gemm fed by a DequantizeLinear of uint8 activations
  and a DequantizeLinear of constant int8 weights;
* the reduction axis is ordered as onnxruntime's channels-last im2col lays it out, kernel
  row, kernel column, input channel (a MatMul's K as it is), and split into pairs
  (0, 1), (2, 3), …; a pair can saturate only where its weights share a sign and
  |w_a| + |w_b| ≥ 129 (255·128.5 > 32767), so only those pairs are evaluated;
* depthwise convolutions (one input channel per group) are left exact: onnxruntime runs
  them with a kernel that widens to 16 bits before multiplying;
* the rest of the model runs in onnxruntime with graph optimizations off (a DQ → Conv is
  then a float Conv of the dequantized values: the exact integer result up to float
  rounding), with each layer's saturation error added to its output as an extra input.
  The error of a layer depends on its int8 input, which depends on the errors upstream:
  the model runs again until no layer's input changes (at most once per layer, in
  topological order).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import producers
from .model import node_attr

log = logging.getLogger(__name__)

INT16_MIN, INT16_MAX = -32768, 32767
#: |w_a| + |w_b| from which a same-sign pair times uint8 inputs can leave int16
RISKY_SUM = 129


@dataclass
class Layer:
    """One quantized layer and its weight pairs that can saturate."""

    node: onnx.NodeProto
    x_q: str            # the uint8 tensor the layer reads (before its DequantizeLinear)
    x_scale: float
    x_zero: int
    w_scale: np.ndarray  # per output channel
    pairs: list[tuple[int, int, int, int, int]]  # (out channel, k_a, k_b, w_a, w_b)
    kernel: tuple[int, ...]  # Conv: (Cin/g, KH, KW); MatMul/Gemm: (K,)


def _init_or_const(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    vals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            vals[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return vals


def _risky_pairs(wf: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """(row, k_a, k_b, w_a, w_b) of the adjacent pairs of ``wf`` ([out, K] int) that can
    saturate with uint8 inputs."""
    k = wf.shape[1]
    if k % 2:
        wf = np.concatenate([wf, np.zeros((wf.shape[0], 1), wf.dtype)], axis=1)
    a, b = wf[:, 0::2].astype(np.int32), wf[:, 1::2].astype(np.int32)
    risky = (a * b > 0) & (np.abs(a) + np.abs(b) >= RISKY_SUM)
    rows, ps = np.nonzero(risky)
    return [(int(r), 2 * int(p), 2 * int(p) + 1, int(a[r, p]), int(b[r, p])) for r, p in zip(rows, ps)]


def quantized_layers(model: onnx.ModelProto) -> list[Layer]:
    """The model's U8S8 layers (Conv/MatMul/Gemm reading DQ(uint8) and DQ(int8 const)),
    each with its weight pairs that can saturate, in graph order."""
    vals = _init_or_const(model)
    prod = producers(model.graph)
    out = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm") or len(n.input) < 2:
            continue
        xdq, wdq = prod.get(n.input[0]), prod.get(n.input[1])
        if xdq is None or wdq is None or xdq.op_type != "DequantizeLinear" or wdq.op_type != "DequantizeLinear":
            continue
        if wdq.input[0] not in vals or xdq.input[1] not in vals:
            continue
        wq = vals[wdq.input[0]]
        zp_x = vals.get(xdq.input[2]) if len(xdq.input) > 2 and xdq.input[2] else np.array(0, np.uint8)
        if wq.dtype != np.int8 or zp_x is None or zp_x.dtype != np.uint8 or np.asarray(vals[xdq.input[1]]).size != 1:
            continue
        ws = np.asarray(vals[wdq.input[1]], np.float64).reshape(-1)
        if n.op_type == "Conv":
            if wq.ndim != 4:
                continue
            group = int(node_attr(n, "group", 1))
            if wq.shape[1] == 1 and group > 1:
                continue  # depthwise: not paired (module docstring)
            wf = wq.transpose(0, 2, 3, 1).reshape(wq.shape[0], -1)  # [out, kh, kw, c]
            kernel: tuple[int, ...] = (wq.shape[1], wq.shape[2], wq.shape[3])
        else:
            if wq.ndim != 2 or int(node_attr(n, "transA", 0)):
                continue
            wf = wq if (n.op_type == "Gemm" and int(node_attr(n, "transB", 0))) else wq.T
            kernel = (wf.shape[1],)
        ws = np.broadcast_to(ws, (wf.shape[0],)).copy()
        out.append(Layer(n, xdq.input[0], float(np.asarray(vals[xdq.input[1]]).reshape(-1)[0]),
                         int(np.asarray(zp_x).reshape(-1)[0]), ws, _risky_pairs(wf), kernel))
    return out


def _conv_correction(layer: Layer, x: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    """The saturation error of a Conv layer's output ([N, Cout, OH, OW]) for int8 input ``x``."""
    n = layer.node
    cin_g, kh, kw = layer.kernel
    cout = out_shape[1]
    group = int(node_attr(n, "group", 1))
    strides = list(node_attr(n, "strides", [1, 1]))
    dil = list(node_attr(n, "dilations", [1, 1]))
    pads = list(node_attr(n, "pads", [0, 0, 0, 0]))
    if str(node_attr(n, "auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        oh, ow = out_shape[2], out_shape[3]
        ph = max(0, (oh - 1) * strides[0] + (kh - 1) * dil[0] + 1 - x.shape[2])
        pw = max(0, (ow - 1) * strides[1] + (kw - 1) * dil[1] + 1 - x.shape[3])
        upper = str(node_attr(n, "auto_pad")) == "SAME_UPPER"
        pads = [ph // 2 if upper else ph - ph // 2, pw // 2 if upper else pw - pw // 2,
                ph - ph // 2 if upper else ph // 2, pw - pw // 2 if upper else pw // 2]
    xp = np.pad(x.astype(np.int32), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])),
                constant_values=layer.x_zero)
    oh, ow = out_shape[2], out_shape[3]
    corr = np.zeros(out_shape, np.float64)

    def tap(k: int, c_base: int) -> np.ndarray:
        r, rest = divmod(k, kw * cin_g)
        s, c = divmod(rest, cin_g)
        return xp[:, c_base + c, r * dil[0]: r * dil[0] + (oh - 1) * strides[0] + 1: strides[0],
                  s * dil[1]: s * dil[1] + (ow - 1) * strides[1] + 1: strides[1]]

    k_total = cin_g * kh * kw
    for o, ka, kb, wa, wb in layer.pairs:
        c_base = (o // (cout // group)) * cin_g
        pair = tap(ka, c_base) * wa + (tap(kb, c_base) * wb if kb < k_total else 0)
        err = np.clip(pair, INT16_MIN, INT16_MAX) - pair
        if err.any():
            corr[:, o] += err * (layer.x_scale * layer.w_scale[o])
    return corr.astype(np.float32)


def _matmul_correction(layer: Layer, x: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    corr = np.zeros(out_shape, np.float64)
    xi = x.astype(np.int32)
    k_total = layer.kernel[0]
    for o, ka, kb, wa, wb in layer.pairs:
        pair = xi[..., ka] * wa + (xi[..., kb] * wb if kb < k_total else 0)
        err = np.clip(pair, INT16_MIN, INT16_MAX) - pair
        if err.any():
            corr[..., o] += err * (layer.x_scale * layer.w_scale[o])
    return corr.astype(np.float32)


def run_saturating(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], provider: str = "cpu",
                   ) -> tuple[list[np.ndarray], dict[str, int]]:
    """The model's outputs as x86 without VNNI computes them (module docstring), and
    ``{"layers", "risky_pairs", "saturated_layers", "runs"}``."""
    from .validate import make_session, run_session

    layers = [lay for lay in quantized_layers(model) if lay.pairs]
    info = {"layers": len(layers), "risky_pairs": sum(len(lay.pairs) for lay in layers), "saturated_layers": 0,
            "runs": 1}
    n_out = len(model.graph.output)
    if not layers:
        sess = make_session(model, provider, optimize=False, label="emulated model")
        return run_session(sess, dict(feeds), "emulated model"), info
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = {n.name: n for n in m.graph.node}
    names = []
    for i, lay in enumerate(layers):
        node = nodes[lay.node.name]
        raw, corr = f"{node.output[0]}__emu_raw", f"__emu_corr_{i}"
        add = helper.make_node("Add", [raw, corr], [node.output[0]], name=f"{node.name}__emu_add")
        node.output[0] = raw
        m.graph.node.insert(list(m.graph.node).index(node) + 1, add)
        m.graph.input.append(helper.make_tensor_value_info(corr, onnx.TensorProto.FLOAT, None))
        names.append(corr)
    extra = [lay.x_q for lay in layers] + [f"{lay.node.output[0]}__emu_raw" for lay in layers]
    for t in extra:
        m.graph.output.append(onnx.ValueInfoProto(name=t))
    sess = make_session(m, provider, optimize=False, label="emulated model")
    corrs = {c: np.zeros((1,), np.float32) for c in names}
    prev: list[np.ndarray] | None = None
    for run in range(len(layers) + 1):
        outs = run_session(sess, {**feeds, **corrs}, "emulated model")
        xs = outs[n_out:n_out + len(layers)]
        raws = outs[n_out + len(layers):]
        info["runs"] = run + 1
        if prev is not None and all(np.array_equal(a, b) for a, b in zip(xs, prev)):
            break
        for i, (lay, x, raw) in enumerate(zip(layers, xs, raws)):
            if prev is not None and np.array_equal(x, prev[i]):
                continue
            fix = (_conv_correction if lay.node.op_type == "Conv" else _matmul_correction)(lay, x, raw.shape)
            corrs[names[i]] = fix if fix.any() else np.zeros((1,), np.float32)
        info["saturated_layers"] = sum(1 for c in corrs.values() if c.size > 1)
        prev = xs
    return outs[:n_out], info
