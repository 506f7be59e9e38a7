"""Choosing ranks with calibration data: each layer's input statistics (whitening the
SVD), and the MACs budget spent where the measured output error grows least per MAC
saved (see the package docstring)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math

import numpy as np
import onnx
from onnx import helper

from ...data import batch_count
from ...model import content_digest, with_outputs
from ...pipeline import PassContext
from .factors import Candidate, LowRankOptions, _split_node

log = logging.getLogger(__name__)


def _data_energy(model: onnx.ModelProto, cands: list[Candidate], ctx: PassContext, positions: int = 512,
                 whiten: bool = False) -> None:
    """Weigh component k of each candidate by σ_k²·E[(u_kᵀ x)²], x the (C·Kh) column patch
    of the layer's input at sampled output positions (second moment from calibration data)."""
    from ...validate import make_session, run_named

    names = list(dict.fromkeys(c.node.input[0] for c in cands))
    sess = make_session(with_outputs(model, names), ctx.provider, label="calibration model (lowrank)")
    rng = np.random.default_rng(ctx.seed)
    moments: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    with ctx.progress.task("calibrating (lowrank)", ctx.calibration.num_samples if ctx.calibration else None) as task:
        for batch in ctx.calibration or []:
            vals = dict(zip(names, run_named(sess, names, batch)))
            for i, c in enumerate(cands):
                p = _column_patches(c, np.asarray(vals[c.node.input[0]], np.float32), rng, positions)
                moments[i] = moments.get(i, 0) + p.T @ p
                counts[i] = counts.get(i, 0) + len(p)
            task.advance(batch_count(batch))
    for i, c in enumerate(cands):
        if i in moments:
            sigma = moments[i] / max(counts[i], 1)
            if whiten:
                _whiten(c, sigma)
            else:
                c.weights = c.s**2 * np.einsum("ik,ij,jk->k", c.u, sigma, c.u)


def _column_patches(c: Candidate, x: np.ndarray, rng: np.random.Generator, positions: int) -> np.ndarray:
    """The rows of M's input a layer sees, at up to ``positions`` sampled output positions
    per sample: a linear layer's input rows, a conv's (C·Kh) column patches in the (c, i)
    order of U's rows."""
    if c.op != "Conv":
        rows = x.reshape(-1, x.shape[-1])
        return rows[rng.choice(len(rows), min(len(rows), positions * x.shape[0]), replace=False)].astype(np.float64)
    from ...fitting import conv_geometry

    n_, cin, kh = c.w.shape[0], c.w.shape[1], c.w.shape[2]
    _, _, strides, dil, pads = conv_geometry(c.node, x.shape, c.w.shape, (x.shape[0], n_, *c.out_hw))
    ho = c.out_hw[0]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    b, wp = x.shape[0], xp.shape[3]
    per = min(positions, ho * wp)
    ni = np.repeat(np.arange(b), per)
    flat = np.concatenate([rng.choice(ho * wp, per, replace=False) for _ in range(b)])
    oy, col = flat // wp, flat % wp
    rows = oy[:, None] * strides[0] + np.arange(kh)[None, :] * dil[0]
    patches = xp[ni[:, None, None], np.arange(cin)[None, :, None], rows[:, None, :], col[:, None, None]]
    return patches.reshape(len(ni), cin * kh).astype(np.float64)


#: whitening's shrinkage: the input second moment is taken as Σ + ε·mean(diag Σ)·I
WHITEN_SHRINK = 3e-2


def _whiten(c: Candidate, sigma: np.ndarray, eps: float | None = None) -> None:
    """Replace the candidate's SVD of M by the data-aware one: with Σ + εI = L·Lᵀ,
    ‖Lᵀ(M − M_r)‖_F (the expected output error when patches have second moment Σ,
    ignoring cross-column terms) is minimised by M_r = L⁻ᵀ·SVD_r(Lᵀ·M). At full rank
    L⁻ᵀ·Lᵀ·M = M, so the chain stays exact.

    ε (relative to the mean variance) is shrinkage, not only numerical care: Σ comes from
    a few calibration samples, and directions they barely excite would otherwise be
    truncated for free, to the cost of inputs that do excite them."""
    eps = WHITEN_SHRINK if eps is None else eps
    n, cin, kh, kw = c.w.shape
    m = c.w.transpose(1, 2, 0, 3).reshape(cin * kh, n * kw).astype(np.float64)
    reg = sigma + eps * max(float(np.trace(sigma)) / len(sigma), 1e-12) * np.eye(len(sigma))
    l = np.linalg.cholesky(reg)
    u, s, vt = np.linalg.svd(l.T @ m, full_matrices=False)
    c.plain_s = c.s
    c.u = np.linalg.solve(l.T, u)
    c.s, c.vt = s, vt
    c.weights = None


def _lower_ranks(active: list[Candidate], opts: LowRankOptions, total_macs: int, loss,
                 start_unsplit: bool = False) -> set[int]:
    """Lower ranks by ``round_to`` where ``loss(c, rank, rank − round_to)`` per MAC saved is
    smallest, until the model's MACs meet ``opts.macs_ratio`` (or no rank can go lower).

    ``start_unsplit``: every layer starts whole, and splitting it at its largest useful
    rank is one more move, priced ``loss(c, None, rank)`` per MAC saved — a layer whose
    split costs more than the budget needs stays whole. Returns the ids of those layers."""
    target = opts.macs_ratio * total_macs
    whole = {id(c) for c in active} if start_unsplit else set()

    def current() -> int:
        return total_macs - sum(c.original_macs - c.chain_macs(c.rank) for c in active if id(c) not in whole)

    while current() > target:
        best, best_cost = None, math.inf
        for c in active:
            if id(c) in whole:
                cost = loss(c, None, c.rank) / max(c.original_macs - c.chain_macs(c.rank), 1)
            elif c.rank <= opts.round_to:
                continue
            else:
                r2 = c.rank - opts.round_to
                cost = loss(c, c.rank, r2) / max(c.chain_macs(c.rank) - c.chain_macs(r2), 1)
            if cost < best_cost:
                best, best_cost = c, cost
        if best is None:
            log.warning("lowrank: MACs budget %.2f not reachable; stopping at %.3f", opts.macs_ratio,
                        current() / total_macs)
            break
        if id(best) in whole:
            whole.discard(id(best))
        else:
            best.rank -= opts.round_to
    return whole


def _sensitivity_budget(model: onnx.ModelProto, cands: list[Candidate], opts: LowRankOptions, total_macs: int,
                        ctx: PassContext) -> int:
    """Allocate ranks to meet the MACs budget using measured output errors; returns how
    many layers' errors were reused from an earlier run on the same model and samples.

    For each splittable layer, split it alone (pure SVD) at its largest useful rank and at
    3/4, 1/2 and 1/4 of it, and measure the std-scaled output error on a few calibration
    samples; errors between measured ranks are interpolated. Then ranks are lowered
    greedily where the error grows least per MAC saved, until the budget holds."""
    from ...sensitivity import OutputDamage

    active = [c for c in cands if c.decision == "split"]
    if not active or ctx.calibration is None:
        return 0
    damage = OutputDamage(model, ctx.calibration, opts.sensitivity_samples, ctx.provider, label="lowrank sensitivity")
    # a layer's curve depends on the model, the samples and how it is split (its factors,
    # whitened by the calibration data), not on the budget: the search splits one model at
    # several budgets and measures each layer once
    key = content_digest(model, damage.feeds, dataclasses.replace(opts, macs_ratio=0.0, measure="false"))
    memo = ctx.cache.get("lowrank.sensitivity")
    known: dict[str, tuple[tuple[int, ...], str, list[float]]] = memo[1] if memo is not None and memo[0] == key else {}
    curves: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    reused = 0
    position = {n.output[0]: i for i, n in enumerate(model.graph.node) if n.output}
    with ctx.progress.task("lowrank sensitivity", len(active)) as task:
        # in graph order: each split then runs from the tensors before it (OutputDamage)
        for c in sorted(active, key=lambda c: position.get(c.node.output[0], 0)):
            cap = c.rank
            ranks = tuple(sorted({max(opts.round_to, (cap * f // 4) // opts.round_to * opts.round_to)
                                  for f in (1, 2, 3, 4)}))
            factors = hashlib.sha1(b"".join(np.ascontiguousarray(a).tobytes() for a in (c.u, c.s, c.vt))).hexdigest()
            stored = known.get(c.node.output[0])
            if stored is not None and stored[:2] == (ranks, factors):
                errs = stored[2]
                reused += 1
            else:
                errs = []
                for r in ranks:
                    m = onnx.ModelProto()
                    m.CopyFrom(model)
                    node = next(nd for nd in m.graph.node if nd.output and nd.output[0] == c.node.output[0])
                    _split_node(m, dataclasses.replace(c, index=0, node=node, rank=r), r)
                    errs.append(damage.of(m))
                known[c.node.output[0]] = (ranks, factors, errs)
            curves[id(c)] = (np.array(ranks, dtype=float), np.array(errs))
            task.advance()
    ctx.cache["lowrank.sensitivity"] = (key, known)
    if reused:
        log.info("lowrank: sensitivity of %d of %d layers reused from an earlier run on this model", reused,
                 len(active))

    def err(c: Candidate, r: int) -> float:
        rs, es = curves[id(c)]
        return float(np.interp(r, rs, es, left=es[0] * rs[0] / max(r, 1), right=es[-1]))

    for c in active:
        c.rank = int(curves[id(c)][0][-1])
    whole = _lower_ranks(active, opts, total_macs,
                         lambda c, r_from, r_to: err(c, r_to) - (0.0 if r_from is None else err(c, r_from)),
                         start_unsplit=True)
    for c in active:
        if id(c) in whole:
            c.decision = "kept"
            c.reason = (f"too sensitive for the budget (split at rank {c.rank}: sensitivity "
                        f"{err(c, c.rank):.2e} for {c.original_macs - c.chain_macs(c.rank):,} MACs)")
        else:
            c.reason = (f"rank {c.rank} (sensitivity {err(c, c.rank):.2e}): chain {c.chain_macs(c.rank):,} MACs "
                        f"vs {c.original_macs:,}")
    return reused


def _single_layer_model(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                        x_shape: list[int]) -> onnx.ModelProto:
    """The layer alone: input ``x`` of ``x_shape``, output ``y``, its constant inputs."""
    n = onnx.NodeProto()
    n.CopyFrom(node)
    n.input[0], n.output[0] = "x", "y"
    g = helper.make_graph([n], "one_layer", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [inits[i] for i in n.input[1:] if i in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m
