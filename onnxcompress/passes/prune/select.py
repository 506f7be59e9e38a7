"""Which channels go: importance scores per group, the choice by ratio or by a Conv-MACs
budget (with the exact MACs model of the pruned graph), the experimental measured
sensitivity, and the resolution of conflicting removals."""

from __future__ import annotations

import logging
import math
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...graph import initializers
from ...model import content_digest
from ...pipeline import PassContext
from ...shapes import sequence_rows
from .apply import apply_removal, filter_axis, keep_positions, removed_atoms
from .groups import Analysis, Group
from .options import PruneOptions, _parse_overrides
from .recovery import CONSUMER_KINDS, CalibrationStats, bias_compensation
from .rules import linear_weight

log = logging.getLogger(__name__)


def _init(an: Analysis, name: str) -> np.ndarray:
    t = next(t for t in an.model.graph.initializer if t.name == name)
    return numpy_helper.to_array(t).astype(np.float64)


def producer_scores(an: Analysis, pidx: int, criterion: str) -> np.ndarray | None:
    p = an.producers[pidx]
    node = an.model.graph.node[p.index]
    w = np.moveaxis(_init(an, node.input[1]), filter_axis(node), 0)  # output channels first
    w = w.reshape(w.shape[0], -1)
    if criterion == "l1":
        return np.abs(w).sum(axis=1)
    if criterion == "l2":
        return np.sqrt((w * w).sum(axis=1))
    if criterion == "bn":
        for use in an.uses:
            bn = an.model.graph.node[use.node]
            if use.kind == "norm" and bn.op_type == "BatchNormalization" and bn.input[0] == p.output:
                eps = next((helper.get_attribute_value(a) for a in bn.attribute if a.name == "epsilon"), 1e-5)
                return np.abs(_init(an, bn.input[1])) / np.sqrt(_init(an, bn.input[4]) + eps)
        return None
    raise ValueError(criterion)


def group_scores(an: Analysis, group: Group, criterion: str, stats: CalibrationStats | None) -> tuple[np.ndarray, str]:
    """Score per channel class of ``group`` (higher = more important), and the criterion used."""
    index = {int(c): i for i, c in enumerate(group.classes)}
    acc = np.zeros(group.size)
    cnt = np.zeros(group.size)
    if criterion == "act" and stats is not None:
        for use in an.uses:
            cs = stats.consumers.get(use.node)
            if use.kind not in CONSUMER_KINDS or cs is None or cs.sum_abs is None:
                continue
            reps = an.find(use.atoms)
            mask = np.array([int(r) in index for r in reps]) & (use.atoms >= 0)
            if not mask.any():
                continue
            node = an.model.graph.node[use.node]
            w = _init(an, node.input[1])
            if node.op_type == "Conv":
                wn = np.sqrt((w * w).sum(axis=(0, 2, 3)))
            elif node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
                wn = np.sqrt((w * w).sum(axis=0))
            else:
                wn = np.sqrt((w * w).sum(axis=1))
            contrib = cs.mean_abs() * wn
            pos = np.flatnonzero(mask)
            np.add.at(acc, [index[int(r)] for r in reps[pos]], contrib[pos])
            cnt[[index[int(r)] for r in reps[pos]]] = 1
        if cnt.any():
            return acc, "act"
        criterion = "l1"
    for pidx in group.producers:
        s = producer_scores(an, pidx, criterion)
        if s is None:
            continue
        s = s / max(float(s.mean()), 1e-12)
        reps = an.find(an.producers[pidx].atoms)
        ids = [index[int(r)] for r in reps]
        np.add.at(acc, ids, s)
        np.add.at(cnt, ids, 1)
    if not cnt.any():
        return group_scores(an, group, "l1", None) if criterion != "l1" else (acc, "l1")
    return acc / np.maximum(cnt, 1), criterion


def _limits(an: Analysis, g: Group, opts: PruneOptions, round_to: int) -> tuple[int, int]:
    """(fewest classes a group keeps, the multiple its kept count rounds to). A class that
    holds several channels of the group's first producer (an attention head) counts them
    toward ``min_channels`` and is not rounded."""
    per = an.per_class(g)
    if per == 1:
        return min(opts.min_channels, g.size), round_to
    return min(g.size, max(1, math.ceil(opts.min_channels / per))), 1


def _kept_count(an: Analysis, g: Group, remove: int, opts: PruneOptions, round_to: int) -> int:
    n = g.size
    least, round_to = _limits(an, g, opts, round_to)
    kept = max(n - min(remove, int(np.floor(opts.max_ratio * n))), least)
    if round_to > 1 and n >= 2 * round_to:
        kept = min(n, max(round_to, int(round(kept / round_to)) * round_to))
        while kept < least:
            kept = min(n, kept + round_to)
    return kept


def choose(an: Analysis, groups: list[Group], scores: dict[int, np.ndarray], opts: PruneOptions, round_to: int
           ) -> dict[int, np.ndarray]:
    """Classes to remove per group id."""
    overrides = _parse_overrides(opts.overrides)

    def ratio_of(g: Group) -> float:
        for regex, r in overrides:
            if any(regex.search(an.producers[p].name) for p in g.producers):
                return r
        return opts.ratio

    want: dict[int, int] = {}
    if opts.global_:
        pool = []
        for g in groups:
            s = scores[g.id]
            norm = s / max(float(s.mean()), 1e-12)
            pool.extend((float(v), g.id) for v in norm)
        pool.sort()
        budget = int(round(opts.ratio * len(pool)))
        counts: Counter[int] = Counter(gid for _, gid in pool[:budget])
        want = {g.id: counts.get(g.id, 0) for g in groups}
        for g in groups:  # explicit overrides still win
            r = ratio_of(g)
            if r != opts.ratio:
                want[g.id] = int(round(r * g.size))
    else:
        want = {g.id: int(round(ratio_of(g) * g.size)) for g in groups}
    removed = {}
    for g in groups:
        kept = _kept_count(an, g, want[g.id], opts, round_to) if want[g.id] > 0 else g.size
        if kept >= g.size:
            continue
        order = np.argsort(scores[g.id], kind="stable")
        removed[g.id] = g.classes[order[: g.size - kept]]
    return removed


class MacModel:
    """Exact Conv/ConvTranspose/MatMul/Gemm MACs as a function of the removed atoms.

    Per layer: ``base · kept_out · kept_in / group`` with ``base = H_out·W_out·kh·kw``
    (ConvTranspose: ``H_in·W_in·kh·kw``; a matrix product with a constant 2-D weight: the
    rows per sample, e.g. the tokens); a depthwise layer costs ``base · kept``."""

    def __init__(self, an: Analysis) -> None:
        self.layers: list[tuple[float, np.ndarray | int, np.ndarray | int, bool]] = []
        g = an.model.graph
        inits = initializers(g)
        prod_out = {p.output: p.atoms for p in an.producers}
        use_in = {u.node: u.atoms for u in an.uses
                  if u.kind in ("consumer-conv", "consumer-convT", "depthwise", "matmul", "gemm")}
        for idx, n in enumerate(g.node):
            if n.op_type in ("MatMul", "Gemm"):
                self._matrix(an, idx, n, inits, prod_out, use_in)
                continue
            if n.op_type not in ("Conv", "ConvTranspose") or n.input[1] not in inits:
                continue
            w = list(inits[n.input[1]].dims)
            group = next((a.i for a in n.attribute if a.name == "group"), 1) or 1
            out_shape = an.shapes.get(n.output[0])
            in_shape = an.shapes.get(n.input[0])
            if out_shape is None or in_shape is None:
                continue
            sp = out_shape[2:] if n.op_type == "Conv" else in_shape[2:]
            base = float(np.prod(sp)) * float(np.prod(w[2:]))
            dw = n.op_type == "Conv" and group > 1 and idx in use_in and group == len(use_in[idx])
            cout = w[0] if n.op_type == "Conv" else w[1] * group
            cin = w[1] * group if n.op_type == "Conv" else w[0]
            out_atoms = prod_out.get(n.output[0], use_in.get(idx) if dw else cout)
            in_atoms = use_in.get(idx, cin)
            self.layers.append((base / (1 if dw else group), out_atoms, in_atoms, dw))
        self.n_atoms = len(an.parent)

    def _matrix(self, an: Analysis, idx: int, n: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                prod_out: dict[str, np.ndarray], use_in: dict[int, np.ndarray]) -> None:
        w = linear_weight(n, inits, {i.name for i in an.model.graph.input})
        out_shape = an.shapes.get(n.output[0])
        if w is None or not out_shape:
            return
        cols = w.dims[filter_axis(n)]
        k = w.dims[1 - filter_axis(n)]
        base = float(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else float(
            sequence_rows(an.model.graph, an.shapes, n.input[0]) or 1)  # a sequence's rows: T per sample
        self.layers.append((base, prod_out.get(n.output[0], int(cols)), use_in.get(idx, int(k)), False))

    @staticmethod
    def _kept(atoms: np.ndarray | int, gone: np.ndarray) -> float:
        if isinstance(atoms, (int, np.integer)):
            return float(atoms)
        safe = np.where(atoms >= 0, atoms, 0)
        return float(((atoms < 0) | ~gone[safe]).sum())

    def macs(self, gone: np.ndarray) -> float:
        total = 0.0
        for base, out_a, in_a, dw in self.layers:
            if dw:
                total += base * self._kept(in_a, gone)
            else:
                total += base * self._kept(out_a, gone) * self._kept(in_a, gone)
        return total


def choose_by_macs(an: Analysis, groups: list[Group], scores: dict[int, np.ndarray], opts: PruneOptions, round_to: int,
                   weights: dict[int, float] | None = None) -> tuple[dict[int, np.ndarray], float, float]:
    """Remove the classes with the least group-normalized importance until the MACs (Conv, MatMul, Gemm)
    are at most ``opts.macs_ratio`` of the original; returns (removed, before, after)."""
    mm = MacModel(an)
    none = np.zeros(len(an.parent), dtype=bool)
    total = mm.macs(none)
    entries = []  # (priority, group id, class index)
    for g in groups:
        s = scores[g.id] / max(float(scores[g.id].mean()), 1e-12)  # normalized within the group
        if weights is not None:
            s = s * weights[g.id]
        entries.extend((float(s[i]), g.id, i) for i in range(g.size))
    entries.sort()
    caps = {g.id: g.size - max(_limits(an, g, opts, round_to)[0], g.size - int(np.floor(opts.max_ratio * g.size)))
            for g in groups}
    taken: Counter[int] = Counter()
    order = []
    for prio, gid, i in entries:
        if taken[gid] < caps[gid]:
            taken[gid] += 1
            order.append((gid, i))
    by_id = {g.id: g for g in groups}

    def removal(k: int) -> dict[int, np.ndarray]:
        per: dict[int, list[int]] = {}
        for gid, i in order[:k]:
            per.setdefault(gid, []).append(i)
        out = {}
        for gid, idxs in per.items():
            g = by_id[gid]
            kept = _kept_count(an, g, len(idxs), opts, round_to)
            if kept >= g.size:
                continue
            rank = {i: r for r, i in enumerate(idxs)}  # removal order within the group
            ordered = sorted(range(g.size), key=lambda i: (rank.get(i, len(idxs)), scores[gid][i]))
            out[gid] = g.classes[ordered[: g.size - kept]]
        return out

    def macs_of(rem: dict[int, np.ndarray]) -> float:
        allc = np.concatenate(list(rem.values())) if rem else np.array([], np.int64)
        return mm.macs(removed_atoms(an, allc))

    target = opts.macs_ratio * total
    lo, hi = 0, len(order)
    while lo < hi:  # smallest prefix whose MACs meet the budget
        mid = (lo + hi) // 2
        if macs_of(removal(mid)) <= target:
            hi = mid
        else:
            lo = mid + 1
    best = removal(lo)
    return best, total, macs_of(best)


def _group_sensitivity(an: Analysis, groups: list[Group], scores: dict[int, np.ndarray], opts: PruneOptions,
                       round_to: int, cstats: CalibrationStats | None, ctx: PassContext) -> dict[int, float]:
    """Each group's output error per MAC saved when its least important ``max_ratio`` of
    channels go alone (bias-compensated, no refit): std-scaled output MSE on the first
    ``sensitivity_samples`` calibration samples, divided by the MACs saved; returned
    relative to the median over groups (a group that saves nothing gets the largest)."""
    import copy
    import dataclasses

    from ...sensitivity import OutputDamage

    damage = OutputDamage(an.model, ctx.calibration or [], opts.sensitivity_samples, ctx.provider,
                          label="prune sensitivity")
    # the channel scores and statistics come from all the calibration data, the measurement
    # from its first samples: both are in the key
    key = content_digest(an.model, [*damage.feeds, {str(g): np.asarray(v) for g, v in scores.items()}],
                         opts.max_ratio, opts.min_channels, opts.criterion, opts.sensitivity_samples, round_to,
                         cstats.samples if cstats is not None else None)
    memo = ctx.cache.get("prune.sensitivity")
    if memo is not None and memo[0] == key:
        return dict(memo[1])
    damage.reference()  # outside the per-group try: a reference that fails is an error, not a weight
    mm = MacModel(an)
    none = np.zeros(len(an.parent), dtype=bool)
    total = mm.macs(none)
    raw: dict[int, float] = {}
    with ctx.progress.task("prune sensitivity", len(groups)) as task:
        # in graph order of their first producer: each removal then runs from the tensors before it
        for g in sorted(groups, key=lambda g: min(an.producers[i].index for i in g.producers)):
            kept = _kept_count(an, g, int(np.floor(opts.max_ratio * g.size)), opts, round_to)
            if kept >= g.size:
                raw[g.id] = math.inf
                task.advance()
                continue
            order = np.argsort(scores[g.id], kind="stable")
            classes = g.classes[order[: g.size - kept]]
            gone = removed_atoms(an, classes)
            saved = total - mm.macs(gone)
            trial = dataclasses.replace(an, model=copy.deepcopy(an.model))
            rec = bias_compensation(trial, gone, cstats)
            try:
                err = damage.of(apply_removal(trial, classes, overrides=rec.arrays))
            except Exception as exc:  # noqa: BLE001 - a group that cannot be pruned alone is left last
                log.debug("prune sensitivity: %s: %s", an.describe(g), exc)
                err = math.inf
            raw[g.id] = err / saved if saved > 0 else math.inf
            task.advance()
    finite = [v for v in raw.values() if math.isfinite(v)]
    med = float(np.median(finite)) if finite else 1.0
    top = max(finite) / max(med, 1e-30) if finite else 1.0
    weights = {gid: (v / max(med, 1e-30) if math.isfinite(v) else top * 10) for gid, v in raw.items()}
    ctx.cache["prune.sensitivity"] = (key, weights)  # the search prunes one model at several budgets
    return dict(weights)


def _resolve_conflicts(an: Analysis, removed: dict[int, np.ndarray]) -> list[str]:
    """Drop groups whose removal would empty a Split/Slice output."""
    notes = []
    gof = an.group_of_producer()
    while True:
        allc = np.concatenate(list(removed.values())) if removed else np.array([], np.int64)
        gone = removed_atoms(an, allc)
        bad = None
        for use in an.uses:
            if use.kind not in ("split", "slice"):
                continue
            node = an.model.graph.node[use.node]
            outs = node.output if use.kind == "split" else node.output[:1]
            for o in outs:
                if o in an.atoms and len(keep_positions(an.atoms[o], gone)) == 0:
                    bad = use
        if bad is None:
            return notes
        prods = {int(an.atom_producer[a]) for a in bad.atoms if a >= 0}
        for p in prods:
            gid = gof[p].id
            if gid in removed:
                del removed[gid]
                notes.append(f"group of {an.describe(gof[p])} left alone: it would empty an output of "
                              f"{an.model.graph.node[bad.node].op_type} '{an.model.graph.node[bad.node].name}'")
