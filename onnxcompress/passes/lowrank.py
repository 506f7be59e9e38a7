"""Pass ``lowrank``: split a K×K convolution into a Kh×1 → 1×Kw chain (Tai et al. 2016).

For ``W`` of shape N×C×Kh×Kw (``group == 1``, Kh > 1 and Kw > 1) let
``M[(c, i), (n, j)] = W[n, c, i, j]``, a (C·Kh) × (N·Kw) matrix, and ``M = U Σ Vᵀ`` its
SVD. Keeping r singular values, the vertical conv ``V[k, c, i, 0] = U[(c,i), k] √σ_k``
(C → r, kernel Kh×1) followed by the horizontal conv ``H[n, k, 0, j] = √σ_k Vᵀ[k, (n,j)]``
(r → N, kernel 1×Kw) computes ``Σ_k H ∗ (V ∗ x) = Σ_{c,i,j} M_r[(c,i),(n,j)] x`` — the
closed-form optimum of ‖W − W_r‖_F for this structure, and exactly W at full rank.
Vertical stride/dilation/pads go on the first conv, horizontal ones on the second
(``auto_pad`` is copied: SAME/VALID padding is computed per axis, so it splits the same
way). The bias goes on the second conv, which keeps the original output name, so a
following BatchNormalization stays valid.

Ranks: fixed ``rank``; ``energy`` (smallest r keeping that fraction of the weights' Σσ²,
whitened or not); or a whole-model budget ``macs_ratio`` allocated greedily. Without
calibration data (or with ``sensitivity=false``) ranks are lowered step by step where the
retained energy (log) drops least per MAC saved (Zhang et al. 2015). With data, each
layer is split alone at four ranks and the std-scaled output error e_l(r) measured;
starting from the unsplit model, the move with the least Δe per MAC saved (split layer l
at its largest useful rank, or lower its rank by ``round_to``) is taken until the budget
holds, so layers whose split costs more than the budget needs stay whole. ``whiten``
(default with data and ``macs_ratio``): with Σ = L·Lᵀ the second moment of the layer's
(C·Kh) input column patches, the SVD of Lᵀ·M gives M_r = L⁻ᵀ·SVD_r(Lᵀ·M), the minimiser
of E‖(M − M_r)ᵀx‖² (cross-column terms ignored) where the plain SVD minimises ‖M − M_r‖_F
as if every input direction were equally likely. Ranks are rounded up to multiples of ``round_to``. A layer is
split only where the chain costs ``r·(C·Kh·H_out·W_in + N·Kw·H_out·W_out)`` MACs, at
least ``min_saving`` less than the original ``N·C·Kh·Kw·H_out·W_out``; with
``measure=true`` only where onnxruntime runs the chain faster than the original conv.
With calibration data the second factor and bias are refit by least squares so the
chain's output matches the original layer's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import OptionError
from ..graph import remove_dead_code
from ..model import node_attr, with_outputs
from ..pipeline import Pass, PassContext, PassResult
from ..report import layer_macs
from ..shapes import all_shapes, infer_shapes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LowRankOptions:
    rank: int = field(default=0, metadata={"help": "fixed rank for every layer (0 = use energy or macs_ratio)"})
    energy: float = field(default=0.0, metadata={"help": "keep this fraction of the weights' Σσ² per layer (0 = off)"})
    macs_ratio: float = field(default=0.0, metadata={"help": "whole-model MACs budget, e.g. 0.7 (0 = off)"})
    round_to: int = field(default=8, metadata={"help": "ranks rounded up to a multiple of this"})
    min_saving: float = field(default=0.15, metadata={"help": "split only if the chain needs this fraction fewer MACs"})
    measure: bool = field(default=False, metadata={"help": "time original and split conv; keep the split only if faster"})
    refit: Literal["auto", "none", "lstsq"] = field(default="auto", metadata={
        "help": "auto = least-squares refit of the second factor when calibration data is given"})
    ridge: float = field(default=1e-4, metadata={"experimental": True, "help": "refit ridge, relative to the mean diagonal"})
    positions: int = field(default=256, metadata={"experimental": True, "help": "sampled output positions per image for the refit"})
    sensitivity: bool = field(default=True, metadata={"experimental": True,
        "help": "with macs_ratio and calibration data: allocate ranks, and which layers to split at all, by the "
                "measured output error of splitting each layer alone (a few ranks per layer) instead of by "
                "weight energy"})
    sensitivity_samples: int = field(default=8, metadata={"experimental": True, "help": "calibration samples used to measure sensitivity"})
    data_energy: bool = field(default=False, metadata={"experimental": True,
        "help": "with calibration data, weigh each plain-SVD component by the input energy it sees (instead of "
                "whiten)"})
    whiten: Literal["auto", "true", "false"] = field(default="auto", metadata={"experimental": True,
        "help": "with calibration data, choose each layer's subspace by the SVD of Lᵀ·M (Σ = L·Lᵀ the second "
                "moment of the layer's input patches) instead of M: the rank-r optimum of the output error; "
                "auto = with macs_ratio (data_energy=true turns it off)"})

    def check(self) -> None:
        if self.rank < 0 or self.round_to < 1:
            raise ValueError("rank must be ≥ 0 and round_to ≥ 1")
        if not 0 <= self.energy <= 1:
            raise ValueError(f"energy must be in [0, 1], got {self.energy}")
        if not 0 <= self.macs_ratio < 1:
            raise ValueError(f"macs_ratio must be in [0, 1) (0 = off), got {self.macs_ratio}")
        if not 0 <= self.min_saving < 1:
            raise ValueError(f"min_saving must be in [0, 1), got {self.min_saving}")



def svd_factors(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, σ, Vᵀ) of the (C·Kh) × (N·Kw) matrix of ``w`` (N×C×Kh×Kw)."""
    n, c, kh, kw = w.shape
    m = w.transpose(1, 2, 0, 3).reshape(c * kh, n * kw).astype(np.float64)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return u, s, vt


def split_weights(w: np.ndarray, r: int, u=None, s=None, vt=None) -> tuple[np.ndarray, np.ndarray]:
    """Vertical (r×C×Kh×1) and horizontal (N×r×1×Kw) factors of rank ``r``."""
    n, c, kh, kw = w.shape
    if u is None:
        u, s, vt = svd_factors(w)
    root = np.sqrt(s[:r])
    vert = (u[:, :r] * root).T.reshape(r, c, kh, 1)
    horiz = (root[:, None] * vt[:r]).reshape(r, n, kw).transpose(1, 0, 2).reshape(n, r, 1, kw)
    return vert.astype(w.dtype), horiz.astype(w.dtype)


@dataclass
class Candidate:
    index: int
    node: onnx.NodeProto
    w: np.ndarray
    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    out_hw: tuple[int, int]
    in_w: int
    original_macs: int
    rank: int = 0
    decision: str = ""
    reason: str = ""
    weights: np.ndarray | None = None  # per-component energy: σ_k² (weights) or σ_k²·E[(u_kᵀx)²]
    plain_s: np.ndarray | None = None  # the weights' own singular values, where whitening replaced s

    @property
    def full_rank(self) -> int:
        return len(self.s)

    def chain_macs(self, r: int) -> int:
        n, c, kh, kw = self.w.shape
        ho, wo = self.out_hw
        return int(r * c * kh * ho * self.in_w + n * r * kw * ho * wo)

    def energy(self, r: int) -> float:
        e = self.s**2 if self.weights is None else self.weights
        total = float(e.sum())
        return float(e[:r].sum()) / total if total > 0 else 1.0


def _round_up(r: int, step: int, cap: int) -> int:
    return min(cap, int(math.ceil(r / step) * step)) if r > 0 else 0


def _split_node(model: onnx.ModelProto, cand: Candidate, r: int) -> str:
    """Replace the conv by the chain in ``model``; return the vertical conv's output name."""
    g = model.graph
    node = cand.node
    vert, horiz = split_weights(cand.w, r, cand.u, cand.s, cand.vt)
    base = node.name or node.output[0]
    names = {t.name for t in g.initializer} | {o for n in g.node for o in n.output}

    def fresh(stem: str) -> str:
        name, i = stem, 0
        while name in names:
            i += 1
            name = f"{stem}_{i}"
        names.add(name)
        return name

    v_name, h_name, mid = fresh(f"{base}_lr_v"), fresh(f"{base}_lr_h"), fresh(f"{base}_lr_mid")
    g.initializer.extend([numpy_helper.from_array(vert, v_name), numpy_helper.from_array(horiz, h_name)])
    strides = list(node_attr(node, "strides", [1, 1]))
    dil = list(node_attr(node, "dilations", [1, 1]))
    pads = list(node_attr(node, "pads", [0, 0, 0, 0]))
    auto = node_attr(node, "auto_pad", "NOTSET")
    v_attrs: dict[str, Any] = {"kernel_shape": [cand.w.shape[2], 1], "strides": [strides[0], 1], "dilations": [dil[0], 1]}
    h_attrs: dict[str, Any] = {"kernel_shape": [1, cand.w.shape[3]], "strides": [1, strides[1]], "dilations": [1, dil[1]]}
    if auto in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        v_attrs["auto_pad"] = h_attrs["auto_pad"] = auto
    else:
        v_attrs["pads"] = [pads[0], 0, pads[2], 0]
        h_attrs["pads"] = [0, pads[1], 0, pads[3]]
    v_node = helper.make_node("Conv", [node.input[0], v_name], [mid], name=f"{base}_lr_v", **v_attrs)
    h_inputs = [mid, h_name] + ([node.input[2]] if len(node.input) > 2 and node.input[2] else [])
    h_node = helper.make_node("Conv", h_inputs, [node.output[0]], name=f"{base}_lr_h", **h_attrs)
    idx = list(g.node).index(node)
    g.node.remove(node)
    g.node.insert(idx, h_node)
    g.node.insert(idx, v_node)
    cand.node = h_node
    return mid


class LowRank(Pass):
    name = "lowrank"
    summary = "split K×K convolutions into K×1 → 1×K chains (closed-form SVD), only where it pays"
    Options = LowRankOptions
    exact = False

    def check_context(self, ctx: PassContext) -> None:
        if self.options.refit == "lstsq" and ctx.calibration is None:
            raise OptionError("pass 'lowrank': refit=lstsq needs calibration data (--calib)")

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        opts: LowRankOptions = self.options
        shapes, _ = all_shapes(model, ctx.calibration_shapes())
        inits = {t.name: t for t in model.graph.initializer}
        cands: list[Candidate] = []
        total_macs = 0
        layers: list[dict[str, Any]] = []
        for idx, node in enumerate(model.graph.node):
            if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                continue
            macs = _layer_macs(node, shapes, inits)
            total_macs += macs
            if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
                continue
            w = numpy_helper.to_array(inits[node.input[1]])
            label = node.name or node.output[0]
            if w.ndim != 4:
                continue
            if not np.all(np.isfinite(w)):
                layers.append({"node": label, "decision": "kept", "reason": "weights have NaN or Inf values"})
                continue
            if int(node_attr(node, "group", 1)) != 1:
                layers.append({"node": label, "decision": "kept", "reason": f"grouped (group={node_attr(node, 'group', 1)})"})
                continue
            if w.shape[2] < 2 or w.shape[3] < 2:
                continue  # 1×1, 1×k, k×1: nothing to split
            x_shape, y_shape = shapes.get(node.input[0]), shapes.get(node.output[0])
            if x_shape is None or y_shape is None:
                layers.append({"node": label, "decision": "kept", "reason": "shape unknown"})
                continue
            u, s, vt = svd_factors(w)
            cands.append(Candidate(idx, node, w, u, s, vt, (y_shape[2], y_shape[3]), x_shape[3], macs))
        whiten = self._whitens(opts)
        if (opts.data_energy or whiten) and ctx.calibration is not None and cands:
            _data_energy(model, cands, ctx, whiten=whiten)
        by_sensitivity = bool(opts.sensitivity and opts.macs_ratio and ctx.calibration is not None)
        self._choose_ranks(cands, opts, total_macs, budget=not by_sensitivity)
        if by_sensitivity:
            _sensitivity_budget(model, cands, opts, total_macs, ctx)
        if opts.measure:
            self._measure(cands, ctx.provider, shapes)
        original = None
        refit = opts.refit if opts.refit != "auto" else ("lstsq" if ctx.calibration is not None else "none")
        if refit == "lstsq":
            self.check_context(ctx)
            original = onnx.ModelProto()
            original.CopyFrom(model)
        split = [c for c in cands if c.decision == "split"]
        for c in split:
            _split_node(model, c, c.rank)
        after = total_macs - sum(c.original_macs - c.chain_macs(c.rank) for c in split)
        for c in cands:
            layers.append({
                "node": c.node.name, "kernel": f"{c.w.shape[2]}x{c.w.shape[3]}", "in": int(c.w.shape[1]),
                "out": int(c.w.shape[0]), "rank": c.rank, "full_rank": c.full_rank,
                "energy": round(c.energy(c.rank), 4) if c.rank else None, "macs_before": c.original_macs,
                "macs_after": c.chain_macs(c.rank) if c.decision == "split" else c.original_macs,
                "decision": c.decision, "reason": c.reason,
            })
        stats: dict[str, Any] = {
            "candidates": len(cands),
            "split": len(split),
            "macs_before": total_macs,
            "macs_after": after,
            "macs_ratio": round(after / total_macs, 4) if total_macs else 1.0,
            "refit": refit,
            "layers": layers,
        }
        if not split:
            return PassResult(model, False, stats)
        del model.graph.value_info[:]
        remove_dead_code(model.graph)
        if refit == "lstsq" and original is not None and ctx.calibration is not None:
            from ..fitting import sequential_refit

            counts = sequential_refit(original, model, ctx.calibration, provider=ctx.provider, seed=ctx.seed,
                                      ridge=opts.ridge, positions=opts.positions, progress=ctx.progress,
                                      only={c.node.output[0] for c in split})
            stats["refit_counts"] = counts
        model, _ = infer_shapes(model)
        return PassResult(model, True, stats)

    # -- rank choice -------------------------------------------------------------------

    @staticmethod
    def _max_useful_rank(c: Candidate, opts: LowRankOptions) -> int:
        """Largest rank (multiple of round_to) whose chain saves at least min_saving."""
        per_rank = c.chain_macs(1)
        limit = int((1 - opts.min_saving) * c.original_macs / per_rank) if per_rank else 0
        r = min(limit, c.full_rank)
        return (r // opts.round_to) * opts.round_to if r >= opts.round_to else 0

    @staticmethod
    def _whitens(opts: LowRankOptions) -> bool:
        """auto: with a MACs budget, where ranks are allocated by the output error they
        measure; not at a fixed energy, where the least-squares refit already adapts the
        plain split to the data and did as well or better (docs/passes/lowrank.md)."""
        if opts.data_energy or opts.whiten == "false":
            return False
        return opts.whiten == "true" or bool(opts.macs_ratio)

    def _choose_ranks(self, cands: list[Candidate], opts: LowRankOptions, total_macs: int, budget: bool = True) -> None:
        for c in cands:
            cap = self._max_useful_rank(c, opts)
            if opts.rank:
                r = min(_round_up(opts.rank, opts.round_to, c.full_rank), c.full_rank)
            elif opts.macs_ratio:
                r = cap
            else:
                e = opts.energy or 0.9  # of the weights' own spectrum, also when whitened
                sv = c.s if c.plain_s is None else c.plain_s
                cum = np.cumsum(sv**2) / max(float((sv**2).sum()), 1e-30)
                r = _round_up(int(np.searchsorted(cum, e - 1e-12) + 1), opts.round_to, c.full_rank)
            c.rank = r
            if cap == 0 or r > cap:
                c.decision, c.reason = "kept", (
                    f"rank {r} saves less than {opts.min_saving:.0%} of {c.original_macs:,} MACs" if r
                    else "no rank saves enough MACs")
            else:
                c.decision, c.reason = "split", f"chain {c.chain_macs(r):,} MACs vs {c.original_macs:,}"
        if opts.macs_ratio and budget:
            self._budget(cands, opts, total_macs)

    @staticmethod
    def _budget(cands: list[Candidate], opts: LowRankOptions, total_macs: int) -> None:
        """Greedy (Zhang et al. 2015): lower ranks where log-energy drops least per MAC."""
        active = [c for c in cands if c.decision == "split"]

        def loss(c: Candidate, r_from: int, r_to: int) -> float:
            return math.log(max(c.energy(r_from), 1e-12)) - math.log(max(c.energy(r_to), 1e-12))

        _lower_ranks(active, opts, total_macs, loss)
        for c in active:
            c.reason = f"rank {c.rank}: chain {c.chain_macs(c.rank):,} MACs vs {c.original_macs:,}"

    @staticmethod
    def _measure(cands: list[Candidate], provider: str, shapes: dict[str, list[int]]) -> None:
        from ..validate import measure_latency

        for c in cands:
            if c.decision != "split":
                continue
            x_shape = [1, *shapes[c.node.input[0]][1:]]
            single = _single_conv_model(c.node, c.w, x_shape)
            chain = onnx.ModelProto()
            chain.CopyFrom(single)
            cc = Candidate(0, chain.graph.node[0], c.w, c.u, c.s, c.vt, c.out_hw, c.in_w, c.original_macs, c.rank)
            _split_node(chain, cc, c.rank)
            feeds = {"x": np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)}
            t_orig, t_split = measure_latency([single, chain], feeds, provider=provider, runs=30, min_seconds=0.3)
            if t_split >= t_orig:
                c.decision = "kept"
                c.reason = f"measured: split {t_split:.3f} ms ≥ original {t_orig:.3f} ms"
            else:
                c.reason += f"; measured {t_split:.3f} ms vs {t_orig:.3f} ms"


def _data_energy(model: onnx.ModelProto, cands: list[Candidate], ctx: PassContext, positions: int = 512,
                 whiten: bool = False) -> None:
    """Weigh component k of each candidate by σ_k²·E[(u_kᵀ x)²], x the (C·Kh) column patch
    of the layer's input at sampled output positions (second moment from calibration data)."""
    from ..validate import run_named
    from ..fitting import conv_geometry
    from ..validate import make_session

    names = list(dict.fromkeys(c.node.input[0] for c in cands))
    sess = make_session(with_outputs(model, names), ctx.provider, label="calibration model (lowrank)")
    rng = np.random.default_rng(ctx.seed)
    moments: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    with ctx.progress.task("calibrating (lowrank)", ctx.calibration.num_samples if ctx.calibration else None) as task:
        for batch in ctx.calibration or []:
            vals = dict(zip(names, run_named(sess, names, batch)))
            for i, c in enumerate(cands):
                x = np.asarray(vals[c.node.input[0]], np.float32)
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
                p = patches.reshape(len(ni), cin * kh).astype(np.float64)  # (c, i) order matches U's rows
                moments[i] = moments.get(i, 0) + p.T @ p
                counts[i] = counts.get(i, 0) + len(ni)
            task.advance(next(iter(batch.values())).shape[0] if batch else 1)
    for i, c in enumerate(cands):
        if i in moments:
            sigma = moments[i] / max(counts[i], 1)
            if whiten:
                _whiten(c, sigma)
            else:
                c.weights = c.s**2 * np.einsum("ik,ij,jk->k", c.u, sigma, c.u)


def _whiten(c: Candidate, sigma: np.ndarray, eps: float = 1e-3) -> None:
    """Replace the candidate's SVD of M by the data-aware one: with Σ + εI = L·Lᵀ,
    ‖Lᵀ(M − M_r)‖_F (the expected output error when patches have second moment Σ,
    ignoring cross-column terms) is minimised by M_r = L⁻ᵀ·SVD_r(Lᵀ·M). At full rank
    L⁻ᵀ·Lᵀ·M = M, so the chain stays exact."""
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
                        ctx: PassContext) -> None:
    """Allocate ranks to meet the MACs budget using measured output errors.

    For each splittable layer, split it alone (pure SVD) at its largest useful rank and at
    3/4, 1/2 and 1/4 of it, and measure the std-scaled output error on a few calibration
    samples; errors between measured ranks are interpolated. Then ranks are lowered
    greedily where the error grows least per MAC saved, until the budget holds."""
    from ..validate import OutputDamage

    active = [c for c in cands if c.decision == "split"]
    if not active or ctx.calibration is None:
        return
    damage = OutputDamage(model, ctx.calibration, opts.sensitivity_samples, ctx.provider, label="lowrank sensitivity")
    curves: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    with ctx.progress.task("lowrank sensitivity", len(active)) as task:
        for c in active:
            cap = c.rank
            ranks = sorted({max(opts.round_to, (cap * f // 4) // opts.round_to * opts.round_to) for f in (1, 2, 3, 4)})
            errs = []
            for r in ranks:
                m = onnx.ModelProto()
                m.CopyFrom(model)
                node = next(nd for nd in m.graph.node if nd.output and nd.output[0] == c.node.output[0])
                cc = Candidate(0, node, c.w, c.u, c.s, c.vt, c.out_hw, c.in_w, c.original_macs, r)
                _split_node(m, cc, r)
                errs.append(damage.of(m))
            curves[id(c)] = (np.array(ranks, dtype=float), np.array(errs))
            task.advance()

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


def _single_conv_model(node: onnx.NodeProto, w: np.ndarray, x_shape: list[int]) -> onnx.ModelProto:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    g = helper.make_graph([n], "one_conv", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", "c", "h", "w"])],
                          [numpy_helper.from_array(w.astype(np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _layer_macs(node: onnx.NodeProto, shapes: dict[str, list[int]], inits: dict[str, onnx.TensorProto]) -> int:
    x = shapes.get(node.input[0])
    y = shapes.get(node.output[0])
    w = list(inits[node.input[1]].dims) if len(node.input) > 1 and node.input[1] in inits else shapes.get(node.input[1])
    return 0 if x is None or y is None or w is None else layer_macs(node, x, w, y)


def split_conv(model: onnx.ModelProto, node_name: str, rank: int | None = None) -> onnx.ModelProto:
    """Split the named Conv at ``rank`` (default: full rank) regardless of cost; in place."""
    inits = {t.name: t for t in model.graph.initializer}
    node = next((n for n in model.graph.node if n.name == node_name and n.op_type == "Conv"), None)
    if node is None:
        raise OptionError(f"no Conv node named '{node_name}'")
    w = numpy_helper.to_array(inits[node.input[1]])
    u, s, vt = svd_factors(w)
    cand = Candidate(0, node, w, u, s, vt, (0, 0), 0, 0)
    _split_node(model, cand, rank or len(s))
    remove_dead_code(model.graph)
    return model
