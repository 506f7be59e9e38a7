"""Weight rounding that sees the data: GPTQ (Frantar et al. 2022, after Optimal Brain
Quantization) for per-channel int8 weights.

A layer computes y = W·x (W: [out, n], x the n inputs it reads: a Conv's C/g·kh·kw patch,
a Gemm's row). With the weight scales s fixed, nearest rounding Ŵ = s·round(W/s) ignores
that the output error ‖(W − Ŵ)·x‖² weighs each column of W by the inputs it meets:
E‖(W − Ŵ)x‖² = tr((W − Ŵ)·H·(W − Ŵ)ᵀ) with H = E[x·xᵀ]. GPTQ rounds the columns one at a
time and moves each one's rounding error onto the columns not yet rounded, along H⁻¹:

    q_i = clip(round(w_i / s), −qmax, qmax),   e = (w_i − s·q_i) / U_ii,
    W[:, j>i] −= e · U_i,j>i,                 with H⁻¹ = Uᵀ·U (U upper triangular)

(lazy in blocks of 128 columns; H damped by 1% of its mean diagonal). The same int8
format, scales and kernels: only which integer each weight rounds to changes.

H comes from the float model on the check samples: input patches at up to 256 random
output positions per image (Conv, per group), input rows (Gemm/MatMul). It pays most
where a layer's input is uncentred (a first Conv on raw 0–255 pixels), which turns small
weight errors into large output errors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ...graph import initializers
from ...model import node_attr, with_outputs

log = logging.getLogger(__name__)

BLOCK = 128  #: columns rounded between two lazy updates of the rest
DAMP = 0.01  #: H += DAMP · mean(diag H) · I


def gptq_round(w: np.ndarray, h: np.ndarray, scale: np.ndarray, block: int = BLOCK, damp: float = DAMP,
               qmax: int = 127) -> np.ndarray:
    """int8 q ([out, n], in [−qmax, qmax]) for weights ``w`` ([out, n]) with per-row (or
    one) ``scale``, rounded column by column with the error moved along H⁻¹ (module
    docstring); nearest rounding where H is not positive definite or the arithmetic does
    not stay finite."""
    w0 = np.asarray(w, np.float64)
    s = np.asarray(scale, np.float64).reshape(-1)
    nearest = np.clip(np.round(w0 / s.reshape(-1, 1)), -qmax, qmax)
    n = w0.shape[1]
    h = np.asarray(h, np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(n)] += damp * float(np.mean(np.diag(h)))
    q = np.zeros_like(w0)
    with np.errstate(all="ignore"):
        try:
            u = np.linalg.cholesky(np.linalg.inv(h)).T  # H⁻¹ = Uᵀ·U
        except np.linalg.LinAlgError:
            log.debug("gptq: H is not positive definite; nearest rounding")
            return nearest.astype(np.int8)
        w1 = w0.copy()
        w1[:, dead] = 0.0
        _gptq_columns(w1, u, s, q, block, qmax)
    if not np.all(np.isfinite(q)):
        return nearest.astype(np.int8)
    q[:, dead] = nearest[:, dead]  # columns no input reaches: any value does; keep nearest
    return q.astype(np.int8)


def _gptq_columns(w: np.ndarray, u: np.ndarray, s: np.ndarray, q: np.ndarray, block: int, qmax: int) -> None:
    """The column loop of :func:`gptq_round`: fills ``q``, updates ``w`` in place."""
    n = w.shape[1]
    for a in range(0, n, block):
        b = min(a + block, n)
        w1 = w[:, a:b].copy()
        e1 = np.zeros_like(w1)
        u1 = u[a:b, a:b]
        for i in range(b - a):
            qi = np.clip(np.round(w1[:, i] / s), -qmax, qmax)
            q[:, a + i] = qi
            e = (w1[:, i] - qi * s) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            e1[:, i] = e
        w[:, b:] -= e1 @ u[a:b, b:]


def _layout(node: onnx.NodeProto, w: np.ndarray, axis: int | None) -> tuple[np.ndarray, int] | None:
    """(W as [groups, out/g, n], groups) when ``axis`` (None: per tensor) is W's output
    axis; None where the layer is not handled."""
    if node.op_type == "Conv" and w.ndim == 4 and axis in (0, None):
        g = int(node_attr(node, "group", 1))  # type: ignore[arg-type]
        return w.reshape(g, w.shape[0] // g, -1), g
    if node.op_type not in ("Gemm", "MatMul") or w.ndim != 2 or int(node_attr(node, "transA", 0)):  # type: ignore[arg-type]
        return None
    if node.op_type == "Gemm" and int(node_attr(node, "transB", 0)):  # type: ignore[arg-type]
        return (w[None], 1) if axis in (0, None) else None
    return (w.T[None], 1) if axis in (1, None) else None


class GptqRounder:
    """Rounds a node's weights by GPTQ where its input's second moment is known; caches
    by (node, scales), since the accuracy control rebuilds the model many times."""

    def __init__(self, hessians: Mapping[str, np.ndarray], qmax: int = 127) -> None:
        self.hessians = dict(hessians)
        self.qmax = qmax
        self._cache: dict[tuple[str, bytes], np.ndarray] = {}

    def __call__(self, node: onnx.NodeProto, w: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray | None:
        h = self.hessians.get(node.name)
        lay = _layout(node, w, axis)
        if h is None or lay is None or not (np.all(np.isfinite(w)) and np.all(np.isfinite(h))):
            return None  # non-finite weights or inputs: nearest rounding, as without statistics
        key = (node.name, np.asarray(scale, np.float32).tobytes())
        if key not in self._cache:
            wg, g = lay
            rows = wg.shape[1]
            s = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (g * rows,)).reshape(g, rows)
            q = np.stack([gptq_round(wg[k], h[k], s[k], qmax=self.qmax) for k in range(g)])
            if node.op_type == "Conv":
                q = q.reshape(w.shape)
            elif node.op_type == "Gemm" and int(node_attr(node, "transB", 0)):  # type: ignore[arg-type]
                q = q[0]
            else:
                q = q[0].T
            self._cache[key] = np.ascontiguousarray(q)
        return self._cache[key]


def input_hessians(model: onnx.ModelProto, nodes: Iterable[onnx.NodeProto], batches: Iterable[dict[str, np.ndarray]],
                   *, provider: str = "cpu", seed: int = 0, positions: int = 256) -> dict[str, np.ndarray]:
    """{node: E[x·xᵀ] per group ([g, n, n])} of each Conv/Gemm/MatMul's input on the float
    ``model``, from input patches (rows) at up to ``positions`` sampled output positions per
    image of ``batches``."""
    from ...fitting import sample_patches
    from ...validate import make_session, run_named

    inits = initializers(model.graph)
    todo = []
    for n in nodes:
        if len(n.input) < 2 or n.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if _layout(n, w, None) is not None:
            todo.append((n, w.shape))
    if not todo:
        return {}
    names = list(dict.fromkeys([n.input[0] for n, _ in todo] + [n.output[0] for n, ws in todo if n.op_type == "Conv"]))
    sess = make_session(with_outputs(model, names), provider, label="int8: GPTQ statistics model")
    rng = np.random.default_rng(seed)
    acc: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    for batch in batches:
        vals = dict(zip(names, run_named(sess, names, batch)))
        for n, ws in todo:
            x = np.asarray(vals[n.input[0]], np.float32)
            if n.op_type == "Conv":
                if x.ndim != 4:
                    continue
                g = int(node_attr(n, "group", 1))  # type: ignore[arg-type]
                p, *_ = sample_patches(n, x, vals[n.output[0]].shape, ws, rng, positions)
                p = p.reshape(len(p), g, -1).transpose(1, 0, 2)  # [g, S, n]
            else:
                rows = x.reshape(-1, x.shape[-1])
                if len(rows) > positions * max(x.shape[0], 1):
                    rows = rows[rng.choice(len(rows), positions * x.shape[0], replace=False)]
                p = rows[None]
            with np.errstate(over="ignore", invalid="ignore"):  # huge inputs: H not finite, nearest rounding
                hh = np.matmul(p.transpose(0, 2, 1), p).astype(np.float64)
            acc[n.name] = acc[n.name] + hh if n.name in acc else hh
            count[n.name] = count.get(n.name, 0) + p.shape[1]
    return {k: v / max(count[k], 1) for k, v in acc.items()}
