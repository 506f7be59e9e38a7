"""Pass ``lowrank``: split a K×K convolution into a Kh×1 → 1×Kw chain (Tai et al. 2016),
and a linear layer (MatMul, Gemm, 1×1 Conv; W [K, N]) into two thinner ones, W ≈ A·B.

A linear layer is the K×K case with Kh = Kw = 1 on the [N, K, 1, 1] view of its weight,
so one SVD (whitened, rank choice, refit) serves both; only the nodes written differ.
The chain saves MACs where r·(K + N) < K·N, and two small MatMuls are not always faster
than one in onnxruntime, so linear splits are timed alone at the model's shapes
(``measure=auto``) and kept only where faster.

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
as if every input direction were equally likely; Σ is shrunk toward its mean variance
(3%), so directions the few calibration samples barely excite are not truncated for
free at the cost of inputs that do excite them. Ranks are rounded up to multiples of ``round_to``. A layer is
split only where the chain costs ``r·(C·Kh·H_out·W_in + N·Kw·H_out·W_out)`` MACs, at
least ``min_saving`` less than the original ``N·C·Kh·Kw·H_out·W_out``; with
``measure=true`` (linear layers: ``auto``) only where onnxruntime runs it faster.
With calibration data the second factor and bias are refit by least squares so the
chain's output matches the original layer's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ...errors import OptionError
from ...graph import initializers, remove_dead_code
from ...model import node_attr
from ...pipeline import Pass, PassContext, PassResult
from ...report import layer_macs
from ...shapes import all_shapes, infer_shapes, sequence_rows
from .factors import (Candidate, LowRankOptions, _round_up, _split_node, is_linear, linear_view, split_weights,
                      svd_factors)
from .ranks import _data_energy, _lower_ranks, _sensitivity_budget, _single_layer_model

log = logging.getLogger(__name__)

_TIMINGS: dict[tuple[Any, ...], tuple[float, float]] = {}  # (layer alone, its chain) ms, by _timing_key


def _timing_key(models: list[onnx.ModelProto], provider: str, x_shape: list[int]) -> tuple[Any, ...]:
    """What a split layer's timing depends on: the provider, the input shape, and the ops,
    attributes and weight shapes (not the weights' values) of the layer and its chain."""
    return provider, tuple(x_shape), tuple(
        (tuple((n.op_type, tuple(a.SerializeToString() for a in n.attribute)) for n in m.graph.node),
         tuple(tuple(t.dims) for t in m.graph.initializer)) for m in models)


class LowRank(Pass):
    name = "lowrank"
    summary = ("split K×K convolutions into K×1 → 1×K chains and linear layers into two thinner ones (SVD), "
               "where it pays")
    Options = LowRankOptions
    exact = False

    def check_context(self, ctx: PassContext) -> None:
        if self.options.refit == "lstsq" and ctx.calibration is None:
            raise OptionError("pass 'lowrank': refit=lstsq needs calibration data (--calib)")

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        opts: LowRankOptions = self.options
        shapes, _ = all_shapes(model, sample=ctx.calibration_sample())
        cands, total_macs, layers = self._candidates(model, shapes, opts.layers)
        whiten = self._whitens(opts)
        if (opts.data_energy or whiten) and ctx.calibration is not None and cands:
            _data_energy(model, cands, ctx, whiten=whiten)
        by_sensitivity = bool(opts.sensitivity and opts.macs_ratio and ctx.calibration is not None)
        self._choose_ranks(cands, opts, total_macs, budget=not by_sensitivity)
        reused = _sensitivity_budget(model, cands, opts, total_macs, ctx) if by_sensitivity else 0
        if opts.measure != "false":
            self._measure([c for c in cands if opts.measure == "true" or c.linear], model, ctx.provider, shapes)
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
                "node": c.label, "kernel": c.op if c.op != "Conv" else f"{c.w.shape[2]}x{c.w.shape[3]}",
                "in": int(c.w.shape[1]),
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
        if by_sensitivity:
            stats["sensitivity_reused"] = reused
        if not split:
            return PassResult(model, False, stats)
        del model.graph.value_info[:]
        remove_dead_code(model.graph)
        if refit == "lstsq" and original is not None and ctx.calibration is not None:
            from ...fitting import sequential_refit

            counts = sequential_refit(original, model, ctx.calibration, provider=ctx.provider, seed=ctx.seed,
                                      ridge=opts.ridge, positions=opts.positions, progress=ctx.progress,
                                      only={c.node.output[0] for c in split})
            stats["refit_counts"] = counts
        model, _ = infer_shapes(model)
        return PassResult(model, True, stats)

    @staticmethod
    def _candidates(model: onnx.ModelProto, shapes: dict[str, list[int]], kinds: str = "all",
                    ) -> tuple[list[Candidate], int, list[dict[str, Any]]]:
        """The K×K group-1 Convs and linear layers (``kinds``: all, spatial or linear) with
        constant finite weights and known shapes; the model's total MACs over its compute
        layers; a report row for each such layer left out."""
        inits = initializers(model.graph)
        cands: list[Candidate] = []
        total_macs = 0
        layers: list[dict[str, Any]] = []
        for idx, node in enumerate(model.graph.node):
            if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                continue
            macs = _layer_macs(node, shapes, inits)
            total_macs += macs
            if node.op_type == "ConvTranspose" or len(node.input) < 2 or node.input[1] not in inits:
                continue
            w = numpy_helper.to_array(inits[node.input[1]])
            label = node.name or node.output[0]
            reason = _declines(node, w)
            if reason:
                if reason != "-":
                    layers.append({"node": label, "decision": "kept", "reason": reason})
                continue
            x_shape, y_shape = shapes.get(node.input[0]), shapes.get(node.output[0])
            if x_shape is None or y_shape is None:
                layers.append({"node": label, "decision": "kept", "reason": "shape unknown"})
                continue
            if node.op_type == "Conv":
                out_hw, in_w = (y_shape[2], y_shape[3]), x_shape[3]
            else:  # a linear map at each of the output's positions (all axes but the last; a sequence's rows)
                w = linear_view(node, w)
                out_hw, in_w = (_positions(model.graph, shapes, node.input[0], y_shape), 1), 1
            if kinds != "all" and is_linear(node.op_type, w) != (kinds == "linear"):
                layers.append({"node": label, "decision": "kept", "reason": f"layers={kinds}"})
                continue
            u, s, vt = svd_factors(w)
            cands.append(Candidate(idx, node, w, u, s, vt, out_hw, in_w, macs, op=node.op_type, label=label))
        return cands, total_macs, layers

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
    def _measure(cands: list[Candidate], model: onnx.ModelProto, provider: str, shapes: dict[str, list[int]]) -> None:
        """Time each layer to split alone against its chain, at the model's shapes (batch 1)."""
        from ...runtime import DECISION_QUANTILE
        from ...validate import measure_latency

        inits = initializers(model.graph)
        for c in cands:
            if c.decision != "split":
                continue
            x_shape = [1, *shapes[c.node.input[0]][1:]]
            if c.op != "Conv" and len(x_shape) == 2:  # a sequence's rows: T of them per sample
                x_shape[0] = c.out_hw[0]
            single = _single_layer_model(c.node, inits, x_shape)
            chain = onnx.ModelProto()
            chain.CopyFrom(single)
            _split_node(chain, dataclasses.replace(c, index=0, node=chain.graph.node[0]), c.rank)
            key = _timing_key([single, chain], provider, x_shape)
            if key not in _TIMINGS:  # layers of one shape and rank time alike: the search splits them again
                feeds = {"x": np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)}
                t = measure_latency([single, chain], feeds, provider=provider, runs=20, min_seconds=0.15,
                                    warmup_seconds=0.05, quantile=DECISION_QUANTILE)
                _TIMINGS[key] = (t[0], t[1])
            t_orig, t_split = _TIMINGS[key]
            if t_split >= t_orig:
                c.decision = "kept"
                c.reason = f"measured: split {t_split:.3f} ms ≥ original {t_orig:.3f} ms"
            else:
                c.reason += f"; measured {t_split:.3f} ms vs {t_orig:.3f} ms"


def _declines(node: onnx.NodeProto, w: np.ndarray) -> str:
    """Why a layer with constant weights is not a candidate ("-": silently, nothing to
    split); "" where it is one."""
    if not np.issubdtype(w.dtype, np.floating):
        return "-"
    if node.op_type == "Conv":
        if w.ndim != 4 or (w.shape[2] == 1) != (w.shape[3] == 1):
            return "-"  # 1-D, 3-D, 1×k and k×1 convolutions
        if int(node_attr(node, "group", 1)) != 1:
            return f"grouped (group={node_attr(node, 'group', 1)})"
    elif w.ndim != 2 or (node.op_type == "Gemm" and int(node_attr(node, "transA", 0))):
        return "-"
    if not np.all(np.isfinite(w)):
        return "weights have NaN or Inf values"
    return ""


def _positions(graph: onnx.GraphProto, shapes: dict[str, list[int]], x: str, y_shape: list[int]) -> int:
    """Positions per sample a linear layer maps: the output's axes between the first and
    the last, or for a 2-D input that is a sequence's rows, T."""
    if len(y_shape) == 2:
        return sequence_rows(graph, shapes, x) or 1
    return int(np.prod(y_shape[1:-1], dtype=np.int64))


def _layer_macs(node: onnx.NodeProto, shapes: dict[str, list[int]], inits: dict[str, onnx.TensorProto]) -> int:
    x = shapes.get(node.input[0])
    y = shapes.get(node.output[0])
    w = list(inits[node.input[1]].dims) if len(node.input) > 1 and node.input[1] in inits else shapes.get(node.input[1])
    return 0 if x is None or y is None or w is None else layer_macs(node, x, w, y)


def split_layer(model: onnx.ModelProto, node_name: str, rank: int | None = None) -> onnx.ModelProto:
    """Split the named Conv, MatMul or Gemm at ``rank`` (default: full rank) regardless of
    cost; in place."""
    inits = initializers(model.graph)
    node = next((n for n in model.graph.node if n.name == node_name and n.op_type in ("Conv", "MatMul", "Gemm")),
                None)
    if node is None or len(node.input) < 2 or node.input[1] not in inits:
        raise OptionError(f"no Conv, MatMul or Gemm node with constant weights named '{node_name}'")
    w = numpy_helper.to_array(inits[node.input[1]])
    reason = _declines(node, w)
    if reason:
        raise OptionError(f"node '{node_name}': nothing to split ({reason.strip('-') or 'its shape'})")
    if node.op_type != "Conv":
        w = linear_view(node, w)
    u, s, vt = svd_factors(w)
    cand = Candidate(0, node, w, u, s, vt, (0, 0), 0, 0, op=node.op_type)
    _split_node(model, cand, rank or len(s))
    remove_dead_code(model.graph)
    return model


__all__ = ["Candidate", "LowRank", "LowRankOptions", "split_layer", "split_weights", "svd_factors"]
