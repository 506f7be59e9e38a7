"""Pass ``prune``: structured filter pruning with dependency groups and recovery.

1. Shapes are resolved at the calibration data's input shape (see ``shapes.py``) and
   channel dependency groups are built (``groups.py``).
2. Each channel class of an unblocked group gets an importance score:

   * ``l1`` / ``l2``: norm of the producer filters, each producer's scores divided by
     their mean, averaged over the group's producers;
   * ``bn``: ``|γ| / √(var + ε)`` of the BatchNormalization right after each producer;
   * ``act`` (data-driven): the channel's expected contribution to its consumers,
     ``Σ_consumers E|x_c| · ‖W[:, c]‖₂`` measured on calibration data.

3. ``ratio`` of each group's classes (or, with ``global=true``, of all classes ranked
   together on group-normalized scores; or, with ``macs_ratio``, the classes with the
   least group-normalized score, across all groups, until the MACs (Conv, MatMul, Gemm) meet the budget) are removed, within
   ``max_ratio`` and ``min_channels``, and kept counts rounded to a multiple of ``round_to``
   (onnxruntime's CPU kernels only speed up at multiples of 8, or 16 with AVX-512). With
   ``macs_ratio``, calibration data and ``sensitivity=true`` (off by default), group g's normalized
   scores are multiplied by w_g = (e_g / ΔMACs_g) / median over groups, e_g the
   std-scaled output MSE of removing g's least important ``max_ratio`` alone
   (bias-compensated, no refit) and ΔMACs_g the MACs that saves: importance stands
   for a channel's rank within its group, measured damage for the group's share of the
   budget.
4. Recovery (``recovery.py``) refits the consumers on calibration data (least squares)
   or folds the removed channels' mean contribution into their biases.
5. ``apply.py`` removes the classes from every coupled tensor at once.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx

from ...errors import OptionError
from ...fitting import sequential_refit
from ...pipeline import Pass, PassContext, PassResult
from ...shapes import all_shapes
from .apply import PruneConflict, apply_removal, keep_positions, removed_atoms
from .groups import analyze
from .options import PruneOptions, default_round_to
from .recovery import CONSUMER_KINDS, bias_compensation, collect
from .select import _group_sensitivity, _resolve_conflicts, choose, choose_by_macs, group_scores

log = logging.getLogger(__name__)

__all__ = ["Prune", "PruneOptions", "analyze", "default_round_to"]


class Prune(Pass):
    name = "prune"
    summary = "structured filter pruning: remove whole Conv output channels and everything coupled to them"
    Options = PruneOptions
    exact = False

    def check_context(self, ctx: PassContext) -> None:
        opts: PruneOptions = self.options
        if ctx.calibration is None and (opts.criterion == "act" or opts.recovery == "lstsq"):
            which = "criterion=act" if opts.criterion == "act" else "recovery=lstsq"
            raise OptionError(f"pass 'prune': {which} needs calibration data (--calib)")

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        opts: PruneOptions = self.options
        round_to = opts.round_to or default_round_to()
        shapes, _ = all_shapes(model, sample=ctx.calibration_sample())
        an = analyze(model, shapes)
        groups = [g for g in an.groups if not g.blocked and g.size > 1]
        blocked = Counter(g.blocked for g in an.groups if g.blocked)
        stats_out: dict[str, object] = {
            "groups": len(an.groups),
            "prunable_groups": len(groups),
            "blocked_groups": sum(blocked.values()),
            "blocked_reasons": dict(blocked.most_common(10)),
            "round_to": round_to,
        }
        criterion = opts.criterion if opts.criterion != "auto" else ("act" if ctx.calibration is not None else "l1")
        recovery = opts.recovery if opts.recovery != "auto" else ("lstsq" if ctx.calibration is not None else "bias")
        self.check_context(ctx)
        cstats = None
        if ctx.calibration is not None and groups and (criterion == "act" or recovery in ("lstsq", "bias")):
            uses = [u for u in an.uses if u.kind in CONSUMER_KINDS]
            cstats = collect(an, ctx.calibration, uses=uses, provider=ctx.provider, progress=ctx.progress)
        scores = {}
        used = Counter()
        for g in groups:
            scores[g.id], how = group_scores(an, g, criterion, cstats)
            used[how] += 1
        if opts.macs_ratio > 0:
            weights = None
            if opts.sensitivity and ctx.calibration is not None and groups:
                weights = _group_sensitivity(an, groups, scores, opts, round_to, cstats, ctx)
                stats_out["sensitivity"] = {f"#{g.id} {an.describe(g)}": round(float(weights[g.id]), 4) for g in groups}
            removed, before, after = choose_by_macs(an, groups, scores, opts, round_to, weights)
            stats_out["macs_ratio_estimate"] = round(after / max(before, 1.0), 4)
        else:
            removed = choose(an, groups, scores, opts, round_to)
        stats_out["notes"] = _resolve_conflicts(an, removed)
        allc = np.concatenate(list(removed.values())) if removed else np.array([], np.int64)
        gone = removed_atoms(an, allc)
        rec = bias_compensation(an, gone, cstats) if recovery in ("bias", "lstsq") and len(allc) else None
        channels = sum(p.channels for p in an.producers)
        removed_ch = int(sum((gone[p.atoms]).sum() for p in an.producers))
        stats_out.update({
            "criterion": dict(used),
            "pruned_groups": len(removed),
            "channels_before": channels,
            "channels_removed": removed_ch,
            "recovery": recovery,
            "bias_compensated": rec.bias if rec else 0,
            "calibration_samples": cstats.samples if cstats else 0,
        })
        if not removed:
            return PassResult(model, False, stats_out)
        kept_out = {p.output: np.flatnonzero(~gone[p.atoms]) for p in an.producers if gone[p.atoms].any()}
        for use in an.uses:  # depthwise convs keep the channels of their input
            if use.kind == "depthwise":
                keep = keep_positions(use.atoms, gone)
                if len(keep) < len(use.atoms):
                    kept_out[an.model.graph.node[use.node].output[0]] = keep
        original = None
        if recovery == "lstsq":
            original = onnx.ModelProto()
            original.CopyFrom(model)
        try:
            model = apply_removal(an, allc, overrides=rec.arrays if rec else None)
        except PruneConflict as exc:  # _resolve_conflicts should prevent this
            raise OptionError(f"pass 'prune': {exc}") from None
        if recovery == "lstsq" and original is not None and ctx.calibration is not None:
            counts = sequential_refit(original, model, ctx.calibration, provider=ctx.provider, seed=ctx.seed,
                                      positions=opts.positions, ridge=opts.ridge, kept_out=kept_out,
                                      progress=ctx.progress)
            stats_out["refit"] = counts
        return PassResult(model, True, stats_out)
