"""Accuracy control of the int8 pass: agreement with the float model on the check
samples, bias and head corrections, float prefixes cut where few tensors cross, noisy
Q/DQ pairs taken out, and the slack returned to int8 (see the package docstring, step 4–5)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ...metrics import (
    column_cosine, column_sums, cosine, is_class_scores, is_feature_table, sample_axis, value_cosine,
)
from ...model import with_outputs
from ...pipeline import PassContext
from . import qdq, write
from .options import FLOAT_STEPS, PREFIX_LEVELS, UNFLOAT_SLACK, Int8Options
from .refit import refit_convs
from .state import State, _round

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccuracyControl:
    """What the accuracy control reached, for the search to act on: whether it held
    ``max_drop`` on its check samples, its drop there, and how many of its prefix cuts
    it floated."""

    met: bool
    drop: float
    float_prefix: int


def agreement(ref: list[list[np.ndarray]], new: list[list[np.ndarray]], columns: bool = False,
              samples: Sequence[int] | None = None) -> dict[str, float]:
    """Mean per-sample cosine of every output and top-1 agreement of class-score outputs,
    and the worst cosine of a feature table's single column over all samples
    (``column_cosine``; [N, rows, F]: box coordinates, objectness, class scores — one
    cosine over the table hides its small columns; pooled over the samples as
    :func:`~onnxcompress.metrics.column_cosine` says why). An output with one value per
    sample has one cosine over all samples' values
    (:func:`~onnxcompress.metrics.value_cosine`). ``drop`` = 1 − the lowest of them (the
    column cosine only with ``columns``). ``samples``: each batch's sample count, which
    places an output's samples (:func:`~onnxcompress.metrics.sample_axis`, on its first batch)."""
    cos: dict[int, list[float]] = defaultdict(list)
    cols: dict[int, np.ndarray] = {}
    values: dict[int, np.ndarray] = {}
    top1: dict[int, list[float]] = defaultdict(list)
    axis: dict[int, int] = {}  # each output's sample axis, decided on its first batch as validation does
    for j, (a_list, b_list) in enumerate(zip(ref, new)):
        for k, (a, b) in enumerate(zip(a_list, b_list)):
            if a.dtype.kind != "f":
                continue
            n = samples[j] if samples is not None else None
            if axis.setdefault(k, sample_axis(a.shape, n)) == 1 and a.ndim >= 2:
                a, b = np.moveaxis(a, 1, 0), np.moveaxis(b, 1, 0)
            a2 = a.reshape(a.shape[0], -1).astype(np.float64) if a.ndim else a.reshape(1, -1).astype(np.float64)
            b2 = b.reshape(a2.shape).astype(np.float64)
            cos[k].extend(cosine(a2, b2, axis=1).tolist())
            if a2.shape[1] == 1:
                values[k] = values[k] + column_sums(a2, b2) if k in values else column_sums(a2, b2)
            if is_feature_table(a.shape):  # per column: cosine over the rows of all samples
                sums = column_sums(a, b)
                cols[k] = cols[k] + sums if k in cols else sums
            if is_class_scores(a.shape):
                top1[k].extend((a2.argmax(1) == b2.argmax(1)).astype(float).tolist())
    cos.update({k: [value_cosine(v)] for k, v in values.items()})
    worst = min((float(np.mean(v)) for v in cos.values()), default=1.0)
    agree = min((float(np.mean(v)) for v in top1.values()), default=1.0)
    out = {"cosine": worst, "top1": agree, "drop": max(1.0 - worst, 1.0 - agree)}
    if cols:
        out["column_cosine"] = min(float(column_cosine(v).min()) for v in cols.values())
        if columns:
            out["drop"] = max(out["drop"], 1.0 - out["column_cosine"])
    return out


def nodes_of_names(names: Iterable[str], p: qdq.Plan) -> set[str]:
    """``names`` with the activations fused into them and the nodes they are fused into,
    restricted to the plan's quantized nodes (a fused pair goes float together)."""
    out = set(names)
    out |= {f for f, src in p.fused.items() if src in out} | {p.fused[f] for f in out if f in p.fused}
    return out & p.nodes


def prefix_cuts(g: onnx.GraphProto, order: list[str], p: qdq.Plan, levels: int = PREFIX_LEVELS) -> list[int]:
    """Cut positions into ``order`` (the plan's quantized, non-fused nodes in graph order)
    for the float prefixes 0/levels … levels/levels: each sixteenth's cut moves by up to
    half a sixteenth to where the fewest tensors cross from the prefix to quantized nodes
    after it (nearest first), never before the previous cut. A ragged cut costs a
    Q/DQ and a layout change per crossing tensor and leaves residual Adds float beside
    int8 branches, which runs measurably slower than a one-tensor cut a few nodes away."""
    n = len(order)
    pos = {name: i for i, name in enumerate(order)}
    pos.update({f: pos[src] for f, src in p.fused.items() if src in pos})
    last: dict[str, int] = {}  # tensor → position of its last quantized reader
    for r in g.node:
        for t in r.input if r.name in pos else ():
            last[t] = max(last.get(t, -1), pos[r.name])
    cross = np.zeros(n + 2, dtype=np.int64)  # cross[k]: tensors produced in order[:k], read in order[k:]
    for node in g.node:
        a = pos.get(node.name)
        for t in node.output if a is not None else ():
            if last.get(t, -1) > a:
                cross[a + 1] += 1
                cross[last[t] + 1] -= 1
    cross = np.cumsum(cross)
    cuts, half = [0], max(1, n // (2 * levels))
    for j in range(1, levels):
        b = n * j // levels  # the window is never empty: the previous cut is ≤ its own b + half ≤ this b + half
        window = range(max(cuts[-1], b - half), min(n, b + half) + 1)
        cuts.append(min(window, key=lambda k: (int(cross[k]), abs(k - b), k)))
    return [*cuts, n]


def _shift_biases(state: State, runs: Iterable[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
                  watch: list[tuple[str, str, str]]) -> int:
    """For ``(node, quantized tensor, reference tensor)`` in ``watch``, add minus the mean
    per-channel difference over ``runs`` (pairs of quantized, reference outputs) to the
    node's bias shift; the number of nodes shifted."""
    err: dict[str, np.ndarray] = {}
    count: dict[str, int] = defaultdict(int)
    for got_q, got_f in runs:
        for node, y_q, y_f in watch:
            x, y = got_f[y_f], got_q[y_q]
            if x.ndim < 2 or x.shape != y.shape:
                continue
            with np.errstate(invalid="ignore", over="ignore"):
                d = (y.astype(np.float64) - x).reshape(x.shape[0], x.shape[1], -1)
                err[node] = err.get(node, 0.0) + d.sum(axis=(0, 2))
            count[node] += d.shape[0] * d.shape[2]
    shifted = 0
    for node, e in err.items():
        mean = e / max(count[node], 1)
        if np.all(np.isfinite(mean)):  # NaN/Inf activations: nothing sensible to correct
            state.bias_shift[node] = state.bias_shift.get(node, 0.0) - mean
            shifted += 1
    return shifted


class ControlSteps:
    """The accuracy control's steps of :class:`~onnxcompress.passes.int8.Int8`: bias and head
    corrections, returning nodes to float, the experimental refit."""

    def _correct_bias(self, state: State, p: qdq.Plan, q: onnx.ModelProto, check: list[dict[str, np.ndarray]],
                      ctx: PassContext) -> int:
        """Empirical bias correction of each quantized Conv/Gemm's own error: a float twin
        of the layer reads the same dequantized input, and the mean difference per output
        channel, ``E[Conv(x̂, Ŵ) + b̂ − (Conv(x̂, W) + b)]`` over the check samples, is
        subtracted from the bias. Each layer corrects only what its own weights and bias
        add, so corrections do not compound. Returns the number of layers shifted."""
        from onnx import helper

        from ...validate import make_session, run_session

        convs = [n for n in q.graph.node if n.name in p.nodes and n.op_type in ("Conv", "Gemm")]
        orig = {n.name: n for n in state.model.graph.node}
        if not convs:
            return 0
        m = onnx.ModelProto()
        m.CopyFrom(q)
        have = {t.name for t in m.graph.initializer}
        watch: list[tuple[str, str, str]] = []
        for n in convs:
            o = orig[n.name]
            for x in o.input[1:]:
                if x and x not in have and x in state.inits:
                    m.graph.initializer.append(state.inits[x])
                    have.add(x)
            twin = helper.make_node(n.op_type, [n.input[0], *o.input[1:]], [f"{n.name}__twin"], name=f"{n.name}__twin")
            twin.attribute.extend(n.attribute)
            m.graph.node.append(twin)
            watch.append((n.name, n.output[0], twin.output[0]))
        outs = {o.name for o in m.graph.output}
        m.graph.output.extend(onnx.ValueInfoProto(name=t) for _, a, b in watch for t in (a, b) if t not in outs)
        sess = make_session(m, ctx.provider, optimize=False, label="int8 bias correction model")
        names = [o.name for o in m.graph.output]
        runs = ((got, got) for got in (dict(zip(names, run_session(sess, b, "int8 bias correction model")))
                                       for b in check))
        return _shift_biases(state, runs, watch)

    def _correct_heads(self, state: State, p: qdq.Plan, q: onnx.ModelProto, check: list[dict[str, np.ndarray]],
                       ctx: PassContext) -> int:
        """Head correction: the last quantized Conv/Gemm before each graph output gets its
        bias shifted by minus its *total* mean error per channel (int8 model vs float model,
        upstream errors included). Only the heads: nothing downstream absorbs the shift,
        so corrections cannot compound. Returns the number of heads corrected."""
        from ...validate import make_session, run_session

        heads: dict[str, onnx.NodeProto] = {}
        stack, seen = [o.name for o in state.model.graph.output], set()
        while stack:
            n = state.producer.get(stack.pop())
            if n is None or n.name in seen:
                continue
            seen.add(n.name)
            if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
                if n.name in p.nodes and n.op_type in ("Conv", "Gemm"):
                    heads[n.name] = n
                continue
            stack.extend(x for x in n.input if x)
        if not heads:
            return 0
        names_f = [n.output[0] for n in heads.values()]
        names_q = [t + qdq.FLOAT_SUFFIX if t in p.tensors else t for t in names_f]
        f, qq = with_outputs(state.model, names_f), with_outputs(q, names_q)
        sf = make_session(f, ctx.provider, label="int8 head correction (float)")
        sq = make_session(qq, ctx.provider, label="int8 head correction (int8)")
        of, oq = [o.name for o in f.graph.output], [o.name for o in qq.graph.output]
        runs = ((dict(zip(oq, run_session(sq, b))), dict(zip(of, run_session(sf, b)))) for b in check)
        return _shift_biases(state, runs, list(zip(heads, names_q, names_f)))

    def _return_to_float(self, state: State, opts: Int8Options, method: str, q: onnx.ModelProto, p: qdq.Plan,
                         acc: dict[str, float], floated: set[str], steps: list[dict[str, Any]],
                         evaluate):  # type: ignore[no-untyped-def]
        """Return quantized nodes to float until agreement holds (``floated`` is updated);
        the model, its plan, its agreement and how many prefix cuts it floated.

        1. Prefixes: the first 1/16, 2/16, … of the quantized nodes in graph order, each cut
           moved to where few tensors cross (:func:`prefix_cuts`), within ``max_float``,
           until one holds ``max_drop``; at least ``min_float_prefix`` of them (kept even if
           agreement is no better: held-out samples rejected fewer). Rounding error made early is
           amplified by every layer after it, and no choice of single tensors comes as
           close as a float prefix.
        2. Then, from the best prefix, the Q/DQ pairs that bury the most signal, a chunk at
           a time. A tensor's damage is the mean over its channels of
           min(1, (s²/12) / E[x_c²]): per-tensor scales wipe out the small channels of a
           tensor whose channels differ widely (they reach depthwise convs intact). Taking
           a pair out means its producer and every reader go float.
        3. With ``unfloat`` (and no ``min_float_prefix``), when the float set holds
           agreement within ``UNFLOAT_SLACK`` of ``max_drop``: its graph-order
           sixteenths (with MACs in them) return to int8,
           most MACs first, each kept while agreement holds ``max_drop``.
        A step of 1-2 is kept only if agreement improves (moving float boundaries can also
        make it worse)."""
        ranked = self._noise_ranked(state, opts, method, p)

        def nodes_of(tensors: list[str]) -> set[str]:
            out: set[str] = set()
            for t in tensors:
                if t in state.producer:
                    out.add(state.producer[t].name)
                out.update(r.name for r in state.readers.get(t, []))
            return nodes_of_names(out, p)

        def cost(nodes: set[str]) -> int:  # fused activations ride along: not counted
            return sum(1 for n in nodes if n not in p.fused)

        budget = int(opts.max_float * max(cost(p.nodes), 1))
        best: tuple[onnx.ModelProto, qdq.Plan, dict[str, float], set[str]] = (q, p, acc, set())
        # 1. prefixes in graph order
        order = [n.name for n in state.model.graph.node if n.name in p.nodes and n.name not in p.fused]

        cuts = prefix_cuts(state.model.graph, order, p)

        def sixteenths(lo: int, hi: int) -> set[str]:
            """The quantized nodes of graph-order sixteenths lo … hi − 1 (fused ones with them)."""
            return nodes_of_names(order[cuts[lo]:cuts[hi]], p)

        rung = best_rung = 0  # prefixes tried so far (distinct cuts), the one kept
        floor = opts.min_float_prefix
        for j in range(1, PREFIX_LEVELS + 1):
            if cuts[j] == cuts[j - 1]:
                continue
            rung += 1
            trial = sixteenths(0, j)
            if cost(trial) > budget or (rung > floor and best[2]["drop"] <= opts.max_drop):
                break
            if rung < floor:
                continue
            q2, p2 = self._build(state, opts, method, floated | trial)
            acc2 = evaluate(q2)
            kept = rung == floor or acc2["drop"] < best[2]["drop"] - 1e-5
            steps.append({"method": method, "float_prefix": f"{j}/{PREFIX_LEVELS}", "rung": rung,
                          "float_nodes": len(trial), **_round(acc2), "kept": kept})
            if kept:
                best, best_rung = (q2, p2, acc2, trial), rung
        # 2. greedy, a chunk of tensors at a time in ranked order
        chunk = max(1, len(ranked) // 32)
        chunks = [nodes_of(ranked[i : i + chunk]) for i in range(0, min(len(ranked), chunk * FLOAT_STEPS), chunk)]
        best = self._float_noisiest(state, opts, method, floated, best, chunks, chunk, budget, cost, steps, evaluate)
        # 3. spend the slack (a prefix that overshot: agreement within half the limit): graph-order
        #    segments of the float set back to int8, most MACs first, while agreement holds
        if opts.unfloat and not floor and best[3] and best[2]["drop"] <= UNFLOAT_SLACK * opts.max_drop:
            segments = [(j, sixteenths(j, j + 1) & best[3]) for j in range(PREFIX_LEVELS)]
            best = self._unfloat(state, opts, method, floated, best, segments, steps, evaluate)
        floated |= best[3]
        return best[0], best[1], best[2], best_rung

    def _float_noisiest(self, state: State, opts: Int8Options, method: str, floated: set[str],
                        best: tuple[onnx.ModelProto, qdq.Plan, dict[str, float], set[str]], chunks: list[set[str]],
                        chunk: int, budget: int, cost: Callable[[set[str]], int], steps: list[dict[str, Any]],
                        evaluate,  # type: ignore[no-untyped-def]
                        ) -> tuple[onnx.ModelProto, qdq.Plan, dict[str, float], set[str]]:
        """From the best prefix, the nodes around the noisiest tensors go float a chunk at a
        time, each kept only if agreement improves, until it holds or the budget is spent."""
        for i, nodes in enumerate(chunks):
            if best[2]["drop"] <= opts.max_drop:
                break
            trial = best[3] | nodes
            if cost(trial) > budget:
                break
            q2, p2 = self._build(state, opts, method, floated | trial)
            acc2 = evaluate(q2)
            better = acc2["drop"] < best[2]["drop"] - 1e-5
            steps.append({"method": method, "float_tensors": (i + 1) * chunk, "float_nodes": len(trial),
                          **_round(acc2), "kept": better})
            if better:
                best = (q2, p2, acc2, trial)
        return best

    def _noise_ranked(self, state: State, opts: Int8Options, method: str, p: qdq.Plan) -> list[str]:
        """The plan's tensors, most buried signal first: the mean over channels of
        min(1, (s²/12) / E[x_c²]) at the step s its range gives it."""
        ranges = self._ranges(state, opts, method, p)
        params = write.tensor_params(p, ranges, opts.activations, state.bounds)
        scores = {}
        for t in p.tensors:
            d = state.derived.get(t)
            src, k = (d.sources[0], d.k) if t not in state.hists and d is not None and d.kind == "scale" else (t, 1.0)
            h = state.hists.get(src)  # y = k·x: y's step s buries x's signal as x's step s/k would
            v = h.noise_to_signal(params[t][0] / k) if h is not None else None
            if v is not None:
                scores[t] = v
        return sorted(scores, key=lambda t: -scores[t])

    def _unfloat(self, state: State, opts: Int8Options, method: str, floated: set[str],
                 best: tuple[onnx.ModelProto, qdq.Plan, dict[str, float], set[str]],
                 segments: list[tuple[int, set[str]]], steps: list[dict[str, Any]], evaluate,  # type: ignore[no-untyped-def]
                 ) -> tuple[onnx.ModelProto, qdq.Plan, dict[str, float], set[str]]:
        """Spend the slack of a float set that overshot: its graph-order segments (those
        with MACs in them) back to int8, most MACs first, each kept while agreement holds."""
        work = [(sum(state.macs.get(n, 0) for n in seg), j, seg) for j, seg in segments]
        for macs, j, seg in sorted((w for w in work if w[0] > 0), key=lambda s: (-s[0], s[1])):
            trial = best[3] - seg
            q2, p2 = self._build(state, opts, method, floated | trial)
            acc2 = evaluate(q2)
            kept = acc2["drop"] <= opts.max_drop
            steps.append({"method": method, "unfloat_segment": f"{j + 1}/{PREFIX_LEVELS}", "macs": macs,
                          "float_nodes": len(trial), **_round(acc2), "kept": kept})
            if kept:
                best = (q2, p2, acc2, trial)
        return best

    def _refit(self, state: State, q: onnx.ModelProto, check: list[dict[str, np.ndarray]], ctx: PassContext,
               acc: dict[str, float], evaluate, stats: dict[str, Any],  # type: ignore[no-untyped-def]
               ) -> tuple[onnx.ModelProto, dict[str, float]]:
        """:func:`refit.refit_convs` on a copy of the final model, kept only if agreement on
        the check samples improves. Returns the model kept and its agreement."""
        t0 = time.perf_counter()
        q2 = onnx.ModelProto()
        q2.CopyFrom(q)
        layers = refit_convs(state.model, q2, check, provider=ctx.provider, seed=ctx.seed, qmax=state.weight_max)
        acc2 = evaluate(q2) if layers else acc
        kept = layers > 0 and acc2["drop"] < acc["drop"]
        stats["refit"] = {"layers": layers, "kept": kept, "drop_before": round(acc["drop"], 6),
                          "drop_after": round(acc2["drop"], 6), "seconds": round(time.perf_counter() - t0, 3)}
        return (q2, acc2) if kept else (q, acc)
