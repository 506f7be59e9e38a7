"""Latency guard of the int8 pass: int8 is kept only where onnxruntime runs it faster
than fp32 at every guarded batch size (see the package docstring, step 6)."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from ...data import batch_of
from ...model import node_attr
from ...pipeline import PassContext
from . import qdq
from .options import GUARD_REGIONS_UNDER, GUARD_TRIAL_SECONDS, GUARD_TRIALS, Int8Options, guard_batch_sizes
from .state import State, _round

log = logging.getLogger(__name__)


def _guard_sizes(opts: Int8Options, model: onnx.ModelProto) -> list[int]:
    """The batch sizes the latency guard times (checked before any work is done)."""
    from ...data import input_specs

    sizes = guard_batch_sizes(opts.guard_batches)
    fixed = {sp.static_batch for sp in input_specs(model) if sp.static_batch is not None}
    return sorted(fixed) if fixed else sizes


def _timer(original: onnx.ModelProto, check: list[dict[str, np.ndarray]], sizes: list[int], provider: str,
           trials: list[dict[str, Any]]) -> Callable[..., float]:
    """A function that times a candidate against fp32 at every guarded batch size (on the
    check samples; the worst ratio counts) and records each timing in ``trials``. Given
    ``needs``, it stops at the first batch size whose ratio is not below it: the worst
    ratio cannot be either."""
    from ...runtime import DECISION_QUANTILE
    from ...validate import measure_latency

    pool = {k: np.concatenate([b[k] for b in check]) for k in check[0]}
    feeds_by_batch = {bsz: batch_of(pool, bsz) for bsz in sizes}

    def timed(cand: onnx.ModelProto, label: str, seconds: float = GUARD_TRIAL_SECONDS,
              needs: float = math.inf) -> float:
        worst = 0.0
        row: dict[str, Any] = {"variant": label}
        for bsz, feeds in feeds_by_batch.items():
            t_f, t_q = measure_latency([original, cand], feeds, provider=provider, runs=20,
                                       min_seconds=seconds, labels=["fp32 model", f"int8 model ({label})"],
                                       quantile=DECISION_QUANTILE)
            row[f"b{bsz}"] = {"fp32_ms": round(t_f, 3), "int8_ms": round(t_q, 3), "ratio": round(t_q / t_f, 3)}
            worst = max(worst, t_q / t_f)
            if worst >= needs:
                break
        row["ratio"] = round(worst, 3)
        trials.append(row)
        return worst

    return timed


class GuardSteps:
    """The latency guard's steps of :class:`~onnxcompress.passes.int8.Int8`: fp32 and int8
    timed in one process, float regions tried, the choice confirmed."""

    def _regions(self, state: State, p: qdq.Plan) -> list[set[str]]:
        """Connected quantized nodes (through quantized tensors)."""
        uf = qdq.UnionFind()
        for n in state.model.graph.node:
            if n.name not in p.nodes:
                continue
            uf.find(n.name)
            if n.name in p.fused:
                uf.union(n.name, p.fused[n.name])
            for x in n.input:
                src = state.producer.get(x)
                if src is not None and src.name in p.nodes and (x in p.tensors or x in p.inner):
                    uf.union(n.name, src.name)
        groups: dict[str, set[str]] = defaultdict(set)
        for n in p.nodes:
            groups[uf.find(n)].add(n)
        return list(groups.values())

    def _guard(self, state: State, opts: Int8Options, method: str, floated: set[str], original: onnx.ModelProto,
               q: onnx.ModelProto, p: qdq.Plan, check: list[dict[str, np.ndarray]], ctx: PassContext,
               stats: dict[str, Any], evaluate, drop_now: float, sizes: list[int]):  # type: ignore[no-untyped-def]
        """Time int8 against fp32; try the usual culprits in float; keep a variant only if it
        is faster by ``guard_margin`` and its agreement drop stays within
        max(``max_drop``, the drop before the guard) — moving a float boundary can cost
        accuracy."""
        drop_limit = max(opts.max_drop, drop_now) + 1e-4 if opts.max_drop > 0 else None
        rejected: list[str] = []
        accepted_acc: list[dict[str, float]] = []  # agreement of the variant last accepted

        def accurate(cand: onnx.ModelProto, label: str) -> bool:
            if drop_limit is None:
                return True
            a = evaluate(cand)
            if a["drop"] > drop_limit:
                rejected.append(f"{label}: drop {a['drop']:.4f} > {drop_limit:.4f}")
                return False
            accepted_acc[:] = [a]
            return True

        trials: list[dict[str, Any]] = []
        timed = _timer(original, check, sizes, ctx.provider, trials)
        best_ratio = timed(q, "all quantized")
        best = (q, p)
        spread = opts.concat_spread
        if opts.guard_concat_spread > spread and any("mixes ranges" in r for r in p.declined.values()):
            # quantize more first: Concats of ranges up to guard_concat_spread apart, under one scale
            q2, p2 = self._build(state, opts, method, floated, spread=opts.guard_concat_spread)
            label = f"Concats spread up to {opts.guard_concat_spread:g}x quantized"
            need = best_ratio * (1.0 - opts.guard_margin)
            r = timed(q2, label, needs=need) if len(p2.nodes) > len(p.nodes) else math.inf
            if r < need and accurate(q2, label):
                best_ratio, best, spread, p = r, (q2, p2), opts.guard_concat_spread, p2
        nodes = {n.name: n for n in state.model.graph.node}
        drop: set[str] = set()
        for label, cand_set in self._culprits(state, p, nodes):
            cand_set = cand_set - drop
            if not cand_set:
                continue
            q2, p2 = self._build(state, opts, method, floated, drop | cand_set, spread)
            if not any(nodes[x].op_type in qdq.COMPUTE for x in p2.nodes):
                continue
            need = best_ratio * (1.0 - opts.guard_margin)
            r = timed(q2, label, needs=need)
            if r < need and accurate(q2, label):
                best_ratio, best, drop = r, (q2, p2), drop | cand_set
        regions_skipped = best_ratio >= GUARD_REGIONS_UNDER
        if 1.0 - opts.guard_margin <= best_ratio < GUARD_REGIONS_UNDER:  # close: regions to float, smallest first
            for reg in sorted(self._regions(state, best[1]), key=len)[:GUARD_TRIALS]:
                q2, p2 = self._build(state, opts, method, floated, drop | reg, spread)
                label = f"region of {len(reg)} nodes float"
                if not any(nodes[x].op_type in qdq.COMPUTE for x in p2.nodes):
                    continue  # nothing heavy left in int8: that is the float model
                need = best_ratio * (1.0 - opts.guard_margin)
                r = timed(q2, label, needs=need)
                if r < need and accurate(q2, label):
                    best_ratio, best, drop = r, (q2, p2), drop | reg
        if best_ratio < 1.0 - opts.guard_margin:
            # the best of several noisy timings is optimistic: time the choice again, over
            # a longer window, and keep the worse
            best_ratio = max(best_ratio, timed(best[0], "the chosen variant, timed again", opts.guard_confirm_seconds))
        stats["latency"] = {"batches": sizes, "provider": ctx.provider, "trials": trials,
                            "ratio": round(best_ratio, 3), "rejected_for_accuracy": rejected}
        if regions_skipped:
            stats["latency"]["regions"] = (f"not tried: the best variant is {best_ratio:.3f}× of fp32, not under "
                                           f"{GUARD_REGIONS_UNDER}× (floating small regions does not win that back)")
        if best_ratio >= 1.0 - opts.guard_margin:
            log.warning("int8: no quantized variant is faster than the float model (best %.3f×); keeping float",
                        best_ratio)
            stats["reason"] = f"int8 not faster (best {best_ratio:.3f}× of fp32; needs < {1 - opts.guard_margin:.2f}×)"
            return None
        if drop or spread != opts.concat_spread:
            stats["accuracy"]["after_guard"] = _round(accepted_acc[0] if accepted_acc else evaluate(best[0]))
        return best

    def _culprits(self, state: State, p: qdq.Plan, nodes: dict[str, onnx.NodeProto]) -> list[tuple[str, set[str]]]:
        """The usual causes of slow int8 in onnxruntime, each a set of nodes to try in float:
        depthwise convs, squeeze-excite branches, pooling/resize/data movement, and
        quantized regions without a Conv/Gemm/MatMul."""
        def depthwise(n: onnx.NodeProto) -> bool:
            if n.op_type != "Conv":
                return False
            w = state.inits.get(n.input[1])
            return w is not None and int(node_attr(n, "group", 1)) > 1 and w.dims[1] == 1

        regions = self._regions(state, p)
        no_compute = set().union(*[r for r in regions if not any(nodes[x].op_type in qdq.COMPUTE for x in r)] or [set()])
        dw = {x for x in p.nodes if depthwise(nodes[x])}
        dw |= {f for f, src in p.fused.items() if src in dw}
        moving = {x for x in p.nodes if nodes[x].op_type in qdq.PASSTHROUGH and nodes[x].op_type != "Reshape"}
        return [("depthwise convs float", dw), ("squeeze-excite float", self._squeeze_excite(state, p)),
                ("pooling/resize/data movement float", moving), ("elementwise-only regions float", no_compute)]

    def _squeeze_excite(self, state: State, p: qdq.Plan) -> set[str]:
        """Quantized nodes of squeeze-excite branches: from a GlobalAveragePool through the
        ops on its 1×1 output to the Mul that rescales the feature map."""
        out: set[str] = set()
        for n in state.model.graph.node:
            if n.op_type != "GlobalAveragePool":
                continue
            stack, seen = [n], set()
            while stack:
                cur = stack.pop()
                if cur.name in seen or len(seen) > 16:
                    continue
                seen.add(cur.name)
                if cur.op_type == "Mul" and cur is not n and len(seen) > 1:
                    continue  # the rescale: stop here (kept in the set)
                for o in cur.output:
                    stack.extend(state.readers.get(o, []))
            out |= seen
        return out & p.nodes
