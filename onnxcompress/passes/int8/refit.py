"""Sequential refit of the int8 convolutions to the float model's outputs, from the
inputs the int8 model really gives them (in the spirit of GPTQ's successors that
correct for quantized inputs: GPTAQ, Qronos).

A quantized Conv computes y = W·x + b (x: its input patch, W: [out, n]). In the int8
model it reads x̂, its input after every rounding before it. In graph order, each
quantized Conv with one group gets W' = W + Δ, b' = b + δ minimising, over input
patches at sampled output positions of the check samples,

    E‖W'·x̂ + b' − (W·x + b)‖² + λ‖Δ‖²,    with a = [x̂; 1]:
    [Δ δ]ᵀ = (E[a·aᵀ] + λ·diag(1, …, 1, 0))⁻¹ · E[a·(W·(x − x̂))ᵀ],
    λ = damp · mean(diag E[x̂·x̂ᵀ])

(the float bias term is not damped). W' is then rounded to int8 with per-channel
scales max|W'|/qmax (GPTQ on E[x̂·x̂ᵀ]), b' to int32 at s_x̂·s_W', and the next layer's
x̂ is read from the model with this layer's new weights. In order, each layer corrects
what reaches it: fitting every layer from one run of the unrefitted int8 model
compounds the corrections. Experimental (``experimental.refit``): it lowers the mean
error but not a detector's worst column, whose error sits at a few anchors that any
small perturbation flips (docs/decisions/int8-findings.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ...data import batch_count
from ...graph import initializers, producers
from ...model import node_attr, with_outputs
from .rounding import gptq_round

log = logging.getLogger(__name__)

DAMP = 0.1  #: λ = DAMP · mean diagonal of E[x̂·x̂ᵀ]
POSITIONS = 256  #: most sampled output positions per image and layer
BUDGET = 128 * 2**20  #: most float32 values of float-model patches held at once (positions shrink to fit)


def _inits(m: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return initializers(m.graph)


def refit_convs(float_model: onnx.ModelProto, q: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]], *,
                provider: str = "cpu", seed: int = 0, damp: float = DAMP, qmax: int = 127) -> int:
    """Refit, in place, the int8 weights and biases of ``q``'s quantized Convs (one group,
    per-channel or per-tensor int8 weights from initializers) in graph order (module
    docstring); ``float_model`` is the float model ``q`` was built from (same node and
    tensor names; ``qmax``: the largest |q| of the refitted weights). Returns the number of
    layers refitted."""
    from ...fitting import patches_at, sample_patches
    from ...validate import make_session, run_session

    qi, fi = _inits(q), _inits(float_model)
    prod = producers(q.graph)
    fnodes = {n.name: n for n in float_model.graph.node}

    def dq_of(t: str) -> onnx.NodeProto | None:
        n = prod.get(t)
        return n if n is not None and n.op_type == "DequantizeLinear" and n.input[0] in qi else None

    todo = []
    for n in q.graph.node:
        f = fnodes.get(n.name)
        if n.op_type != "Conv" or f is None or int(node_attr(n, "group", 1)) != 1:  # type: ignore[arg-type]
            continue
        wdq, xdq = dq_of(n.input[1]), prod.get(n.input[0])
        if wdq is None or xdq is None or xdq.op_type != "DequantizeLinear" or f.input[1] not in fi:
            continue
        if len(n.input) > 2 and n.input[2] and (len(f.input) < 3 or f.input[2] not in fi):
            continue  # a bias we cannot read: an int32 one must be rewritten at the new weight scales
        w = numpy_helper.to_array(fi[f.input[1]])
        if w.ndim != 4 or numpy_helper.to_array(qi[wdq.input[0]]).dtype != np.int8:
            continue
        todo.append((n, f, wdq, w))
    if not todo:
        return 0

    # float inputs (patches at sampled positions) and outputs, all layers, one float run per batch
    names = [t for _, f, _, _ in todo for t in (f.input[0], f.output[0])]
    sess = make_session(with_outputs(float_model, names), provider, label="int8 refit: float model")
    images = sum(batch_count(b) for b in batches)
    per = int(np.clip(BUDGET // max(images * sum(w[0].size for *_, w in todo), 1), 16, POSITIONS))
    rng = np.random.default_rng(seed)
    fx: dict[str, list[np.ndarray]] = {n.name: [] for n, *_ in todo}
    where: dict[str, list[tuple]] = {n.name: [] for n, *_ in todo}
    yshape: dict[str, list[tuple[int, ...]]] = {n.name: [] for n, *_ in todo}
    for b in batches:
        vals = dict(zip([o.name for o in sess.get_outputs()], run_session(sess, b, "int8 refit: float model")))
        for n, f, _, w in todo:
            p, ni, oy, ox = sample_patches(f, vals[f.input[0]], vals[f.output[0]].shape, w.shape, rng, per)
            fx[n.name].append(p.reshape(len(p), -1))
            where[n.name].append((ni, oy, ox))
            yshape[n.name].append(vals[f.output[0]].shape)
    del sess

    done = 0
    for n, f, wdq, w in todo:
        outs = [o.name for o in q.graph.output]
        extra = n.input[0] not in outs
        if extra:  # read this layer's input, then put the outputs back as they were
            q.graph.output.append(onnx.ValueInfoProto(name=n.input[0]))
        try:
            sq = make_session(q, provider, label="int8 refit: int8 model")
        finally:
            if extra:
                q.graph.output.pop()
        k = len(outs) if extra else outs.index(n.input[0])
        xh = np.concatenate([patches_at(n, run_session(sq, b, "int8 refit: int8 model")[k], ys, w.shape, *wh)
                             .reshape(len(wh[0]), -1) for b, wh, ys in zip(batches, where[n.name], yshape[n.name])])
        x = np.concatenate(fx.pop(n.name)).astype(np.float64)
        b = numpy_helper.to_array(fi[f.input[2]]).astype(np.float64) if len(n.input) > 2 and n.input[2] else None
        if _refit_layer(n, wdq, w, xh.astype(np.float64), x, b, qi, prod, damp, qmax):
            done += 1
    return done


def _refit_layer(n: onnx.NodeProto, wdq: onnx.NodeProto, w: np.ndarray, xh: np.ndarray, x: np.ndarray,
                 b: np.ndarray | None, qi: dict[str, onnx.TensorProto], prod: dict[str, onnx.NodeProto],
                 damp: float, qmax: int) -> bool:
    """One layer: the weight (and bias) change that maps the int8 input patches ``xh`` to
    what the float input ``x`` gave, by damped least squares, then GPTQ-rounded at new
    scales and written into ``q``'s initializers; False where the statistics are singular."""
    w2 = w.reshape(w.shape[0], -1).astype(np.float64)
    # a Conv without a bias keeps none (a float bias input would stop onnxruntime's QLinearConv fusion)
    a = np.concatenate([xh, np.ones((len(xh), 1))], 1) if b is not None else xh
    h = a.T @ a / len(a)
    hx = h[:-1, :-1] if b is not None else h
    lam = damp * float(np.mean(np.diag(hx)))
    reg = np.full(len(h), lam)
    if b is not None:
        reg[-1] = 0.0
    r = (x - xh) @ w2.T  # what the upstream rounding changed in this layer's output
    try:
        d = np.linalg.solve(h + np.diag(reg), a.T @ r / len(a))
    except np.linalg.LinAlgError:
        log.debug("int8 refit: %s: singular statistics, left as it is", n.name)
        return False
    if not np.all(np.isfinite(d)):
        return False
    w_new = w2 + (d[:-1] if b is not None else d).T
    old_scale = numpy_helper.to_array(qi[wdq.input[1]])
    amax = np.abs(w_new).max(axis=1) if old_scale.size > 1 else np.full(len(w_new), np.abs(w_new).max())
    scale = np.maximum(amax, 1e-12) / qmax
    qw = gptq_round(w_new, hx, scale, qmax=qmax)
    qi[wdq.input[0]].CopyFrom(numpy_helper.from_array(qw.reshape(w.shape).astype(np.int8), wdq.input[0]))
    new_scale = (scale if old_scale.size > 1 else scale[:1].reshape(old_scale.shape)).astype(np.float32)
    qi[wdq.input[1]].CopyFrom(numpy_helper.from_array(new_scale, wdq.input[1]))
    if b is not None:
        _write_bias(qi, prod, n, b + d[-1], new_scale, prod[n.input[0]])
    return True


def _write_bias(qi: dict[str, onnx.TensorProto], prod: dict[str, onnx.NodeProto], n: onnx.NodeProto,
                b: np.ndarray, w_scale: np.ndarray, xdq: onnx.NodeProto) -> None:
    """Store bias ``b`` of ``n``: int32 at s_x·s_W where it is quantized, else float."""
    bdq = prod.get(n.input[2])
    if bdq is not None and bdq.op_type == "DequantizeLinear" and bdq.input[0] in qi:
        sx = float(numpy_helper.to_array(qi[xdq.input[1]]).reshape(-1)[0])
        bs = (sx * np.broadcast_to(w_scale.reshape(-1), b.shape)).astype(np.float32)
        qb = np.clip(np.round(b / bs), -(2**31), 2**31 - 1).astype(np.int32)
        qi[bdq.input[0]].CopyFrom(numpy_helper.from_array(qb, bdq.input[0]))
        qi[bdq.input[1]].CopyFrom(numpy_helper.from_array(bs, bdq.input[1]))
    elif n.input[2] in qi:
        qi[n.input[2]].CopyFrom(numpy_helper.from_array(b.astype(np.float32), n.input[2]))
