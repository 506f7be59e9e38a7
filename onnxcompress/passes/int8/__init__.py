"""Pass ``int8``: QuantizeLinear/DequantizeLinear insertion with streaming calibration,
an accuracy control and a latency guard.

1. **Prepare** (prepare.py, exact float rewrites): opset ≥ 13 for per-channel weights
   (validated upgrade, or per-tensor weights), BatchNormalization and constant
   per-channel Mul/Add folded into the Conv before them, ``x / c`` → ``x · (1/c)``, HardSigmoid and
   HardSwish as Mul/Add/Clip (put back as one node wherever no part ends up quantized).
2. **Place** (qdq.py): which nodes onnxruntime can run as integer kernels, which
   tensors get one Q → DQ pair, which share a scale.
3. **Calibrate** (calibration.py): one onnxruntime session exposing the tensors that may
   need a range, run batch by batch; a 2048-bin histogram per tensor, so memory does
   not depend on the number of samples. Ranges by ``kl`` (TensorRT's entropy method;
   ``kl_guard`` swaps in the MSE threshold where KL's error is far from the best),
   ``minmax``, ``percentile`` or ``mse``. Tensors that no quantized node reads (the
   edge back to float, graph outputs), and graph inputs (raw data: pixels), get their
   min/max: clipping there reaches the output directly. A tensor whose range follows
   from a binned one (scalar Mul/Add, Clip/Relu, Sigmoid, data movement, Concat:
   :func:`ranges.derived_tensors`) is not binned itself.
   A tensor read only by SiLU/HardSwish (``through``) gets its low end from the error
   after the activation (:func:`thresholds.low_through`).
   **Weights** are 7-bit (|q| ≤ 63) for ``target=portable`` (the default) and ``avx2``,
   8-bit for ``vnni``: x86 CPUs without VNNI add pairs of uint8·int8 products into
   saturating int16 sums, which 7-bit weights never overflow (:mod:`onnxcompress.isa`);
   the target goes into the model's metadata. They are rounded by GPTQ (``gptq``, :mod:`rounding`): each layer's columns in
   turn, the rounding error moved onto the columns not yet rounded along H⁻¹, H = E[x·xᵀ]
   of its input on the check samples. Nodes after the last compute layer stay float
   (``float_tail``, :func:`ranges.tail_nodes`).
4. **Head correction** (``head_correction``, on): the last quantized Conv/Gemm before
   each output gets its bias shifted by minus its total mean error per channel on the
   check samples (upstream error included — nothing downstream absorbs it): a detector's
   objectness logits otherwise sit systematically low or high. Kept only if agreement does not get worse.
   **Bias correction** (``bias_correction``): each quantized Conv/Gemm's bias is shifted
   by minus the mean error per output channel its own quantized weights and bias add
   (against a float twin reading the same dequantized input, on the check samples;
   the empirical correction of Nagel et al. 2019). Kept only if agreement does not get
   worse: it helps some models and hurts others (a first Conv on an uncentred 0–255
   input turns tiny weight errors into a large mean shift). Correcting each layer's total
   error (upstream included) at once over-corrects.
5. **Accuracy control** (``max_drop``): agreement with the float model on held-out
   calibration samples, ``1 − min over outputs of the mean per-sample cosine`` and
   ``1 −`` top-1 agreement for class scores, and with ``columns`` (on) ``1 −`` the worst
   cosine of a feature table's single column over all samples (see :func:`agreement`: one
   cosine over a detection table hides a lost objectness column). If it exceeds
   ``max_drop`` the other range methods are tried on the same histograms; then the first
   1/16, 2/16, … of the quantized nodes in graph order go float (error made early is
   amplified by every later layer), each cut
   moved by up to half a sixteenth to where the fewest tensors cross (:func:`prefix_cuts`),
   each prefix kept only if agreement improves (at least ``min_float_prefix`` of them
   float regardless); then, from the best prefix, the Q/DQ pairs that bury
   the most signal (mean over channels of min(1, (s²/12)/E[x_c²]), from per-channel mean squares
   kept during calibration) are taken out — their producers and readers go float — a
   chunk (1/32 of them) at a time, greedily: a chunk stays float only if agreement
   improves (moving a float boundary can make it worse), until the drop holds,
   ``FLOAT_STEPS`` (12) chunks were tried, or ``max_float`` of the quantized nodes are float.
   Where the float set holds agreement within half of ``max_drop`` (a prefix that
   overshot), its graph-order sixteenths return to int8 one at a time, the most MACs
   first, each kept while agreement holds (``unfloat``).
6. **Latency guard** (``guard``): fp32 and int8 timed in one process (ABBA blocks,
   medians). The usual culprits are tried in float one group at a time, each kept only
   if it makes int8 at least ``guard_margin`` faster: depthwise convs (onnxruntime's
   uint8 depthwise kernel runs ~5× slower than its fp32 one on an AVX-512 CPU),
   squeeze-excite branches, pooling/resize/data movement (uint8 NCHW MaxPool ~10×
   slower), and quantized regions without a Conv/Gemm/MatMul. If int8 is then close to
   fp32 but not faster (under 1.25×), regions go back to float one at a time (smallest
   first) while that helps; further off, a few small regions cannot win it back. The
   chosen variant is then timed once more, over ``guard_confirm_seconds`` (2 s) per batch
   size instead of 0.6 s, and the worse of its two ratios counts (the best of several
   noisy timings is optimistic). If no variant is faster than the input,
   the input is returned unchanged and the report says so. Every timing the decision
   used is in the report. Before the float variants, one that quantizes *more* is
   tried: Concats whose inputs' ranges differ by more than ``concat_spread`` (4) but at
   most ``guard_concat_spread`` (16), with their readers, under one shared scale. Kept
   like the others, only if faster and within the drop limit: a heavy conv after an FPN
   Concat otherwise stays float.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from ... import isa
from ...data import LimitedSource, batch_count, take_samples
from ...errors import OptionError
from ...folds import fold_affine, fold_batchnorm
from ...graph import initializers
from ...model import content_digest
from ...pipeline import Pass, PassContext, PassResult
from . import prepare, qdq, ranges, write
from .calibration import collect_histograms
from .control import AccuracyControl, ControlSteps, agreement, nodes_of_names, prefix_cuts
from .guard import GuardSteps, _guard_sizes
from .options import ALREADY_QUANTIZED, Int8Options
from .rounding import GptqRounder, input_hessians
from .state import State, _excluded, _layer_macs, _record_target, _round
from .thresholds import low_through, tensor_range

log = logging.getLogger(__name__)


class Int8(ControlSteps, GuardSteps, Pass):
    name = "int8"
    summary = "QDQ int8 quantization: streaming KL calibration, accuracy control, never slower than its input"
    Options = Int8Options
    exact = False

    def check_context(self, ctx: PassContext) -> None:
        if ctx.calibration is None:
            raise OptionError("pass 'int8' needs calibration data (--calib)")

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        opts: Int8Options = self.options
        self.check_context(ctx)
        guard_sizes = _guard_sizes(opts, model) if opts.guard else []
        stats: dict[str, Any] = {}
        done = sorted({n.op_type for n in model.graph.node if n.op_type in ALREADY_QUANTIZED})
        if done:
            return PassResult(model, False, {"decision": "kept", "summary": f"already quantized ({', '.join(done)})"})
        t_start = time.perf_counter()
        state = self._prepare(model, ctx, opts, stats)
        if not self._calibrate(state, opts, ctx, stats):
            stats.update(decision="kept float", reason="no quantizable node")
            return PassResult(model, False, stats)
        check = take_samples(ctx.calibration, max(opts.check_samples, 1))
        self._reference(state, model, check, opts, ctx, stats)

        def evaluate(q: onnx.ModelProto) -> dict[str, float]:
            from ...validate import make_session, run_session

            sess = make_session(q, ctx.provider, label="int8 model")
            return agreement(state.ref, [run_session(sess, b, "int8 model") for b in check], opts.columns,
                             samples=[batch_count(b) for b in check])

        floated: set[str] = set()
        q, p, acc, method, control = self._control(state, opts, check, ctx, stats, floated, evaluate)
        if opts.guard:
            best = self._guard(state, opts, method, floated, model, q, p, check, ctx, stats, evaluate, acc["drop"],
                               guard_sizes)
            if best is None:
                stats.update(decision="kept float", seconds=round(time.perf_counter() - t_start, 3),
                             summary=f"kept float: {stats.get('reason', '')}")
                return PassResult(model, False, stats, control)
            q, p = best
        if opts.refit:
            q, acc = self._refit(state, q, check, ctx, acc, evaluate, stats)
        self._finish(state, q, p, method, acc, stats)
        stats["seconds"] = round(time.perf_counter() - t_start, 3)
        return PassResult(q, True, stats, control)

    def _calibrate(self, state: State, opts: Int8Options, ctx: PassContext, stats: dict[str, Any]) -> bool:
        """Histograms of every tensor the widest placement could quantize, through the
        sources of those whose range is derived (an output hidden by a fused Relu/Clip
        never needs a range: fused pairs go float together, see _build); False where
        nothing is quantizable."""
        widest = state.widest = qdq.plan(state.model, state.allowed)
        if not widest.nodes:
            return False
        names = ranges.calibrated_tensors(widest.tensors, state.derived)
        t0 = time.perf_counter()
        pushed = ranges.pushed_forward(state.derived, names)
        state.hists = collect_histograms(state.model, names, LimitedSource(ctx.calibration, opts.samples),
                                         provider=ctx.provider, seed=ctx.seed, progress=ctx.progress,
                                         channels=opts.max_drop > 0, functions=pushed)
        stats["calibration"] = {"tensors": len(names), "pushed_forward": len(pushed),
                                "seconds": round(time.perf_counter() - t0, 3)}
        return True

    def _reference(self, state: State, model: onnx.ModelProto, check: list[dict[str, np.ndarray]],
                   opts: Int8Options, ctx: PassContext, stats: dict[str, Any]) -> None:
        """The float model's outputs on the check samples, GPTQ's input statistics (reused
        from the context's cache for the same model and samples), and per-layer MACs."""
        from ...validate import make_session, run_session

        ref_sess = make_session(model, ctx.provider, label="int8: float model")
        state.ref = [run_session(ref_sess, b, "int8: float model") for b in check]
        del ref_sess
        if opts.gptq:
            t0 = time.perf_counter()
            compute = [n for n in state.model.graph.node if n.name in state.widest.nodes and n.op_type in qdq.COMPUTE]
            key = content_digest(state.model, check, ctx.seed, state.weight_max, sorted(n.name for n in compute))
            cached = ctx.cache.get("int8.gptq")
            reused = cached is not None and cached[0] == key
            state.rounder = cached[1] if reused else GptqRounder(
                input_hessians(state.model, compute, check, provider=ctx.provider, seed=ctx.seed), state.weight_max)
            ctx.cache["int8.gptq"] = (key, state.rounder)  # only the latest: its statistics can be large
            stats["gptq"] = {"layers": len(state.rounder.hessians), "reused": reused,
                             "seconds": round(time.perf_counter() - t0, 3)}
        if opts.max_drop > 0 and opts.unfloat:
            state.macs = _layer_macs(state.model, check[0])

    def _control(self, state: State, opts: Int8Options, check: list[dict[str, np.ndarray]], ctx: PassContext,
                 stats: dict[str, Any], floated: set[str], evaluate: Callable[[onnx.ModelProto], dict[str, float]],
                 ) -> tuple[onnx.ModelProto, qdq.Plan, dict[str, float], str, AccuracyControl]:
        """The accuracy control: the other range methods, the corrections, then nodes back
        to float until ``max_drop`` holds; the model, its plan, agreement, method and outcome."""
        method = opts.method
        q, p = self._build(state, opts, method, floated)
        acc = evaluate(q)
        steps = [{"method": method, "float_nodes": 0, **_round(acc)}]
        if opts.max_drop > 0 and acc["drop"] > opts.max_drop:
            for other in [m for m in ("mse", "percentile", "kl", "minmax") if m != method]:
                q2, p2 = self._build(state, opts, other, floated)
                acc2 = evaluate(q2)
                steps.append({"method": other, "float_nodes": 0, **_round(acc2)})
                if acc2["drop"] < acc["drop"]:
                    q, p, acc, method = q2, p2, acc2, other
                if acc["drop"] <= opts.max_drop:
                    break
        for enabled, label, correct in ((opts.head_correction, "heads_corrected", self._correct_heads),
                                        (opts.bias_correction, "bias_corrected", self._correct_bias)):
            if not enabled or opts.bias != "int32":
                continue
            saved = dict(state.bias_shift)
            shifted = correct(state, p, q, check, ctx)
            if not shifted:
                continue
            q2, p2 = self._build(state, opts, method, floated)
            acc2 = evaluate(q2)
            steps.append({"method": method, label: shifted, **_round(acc2)})
            if acc2["drop"] <= acc["drop"]:
                q, p, acc = q2, p2, acc2
            else:  # it made things worse: forget this correction, keep the earlier ones
                state.bias_shift = saved
        prefix = 0
        if opts.max_drop > 0 and (acc["drop"] > opts.max_drop or opts.min_float_prefix > 0):
            q, p, acc, prefix = self._return_to_float(state, opts, method, q, p, acc, floated, steps, evaluate)
        control = AccuracyControl(met=acc["drop"] <= opts.max_drop or opts.max_drop == 0,
                                  drop=round(float(acc["drop"]), 6), float_prefix=prefix)
        stats["accuracy"] = {"method": method, "max_drop": opts.max_drop, "drop": control.drop, "met": control.met,
                             "float_prefix": prefix, "steps": steps}
        if not control.met:
            log.warning("int8: agreement drop %.4f on calibration samples exceeds max_drop %.4f even with %d "
                        "nodes in float", acc["drop"], opts.max_drop, len(floated))
        return q, p, acc, method, control

    def _finish(self, state: State, q: onnx.ModelProto, p: qdq.Plan, method: str, acc: dict[str, float],
                stats: dict[str, Any]) -> None:
        """The report of a quantized result, and its target in the model's metadata."""
        stats.update(self._describe(state, p))
        stats["decision"] = "quantized"
        _record_target(q, stats["target"])
        lat = stats.get("latency", {}).get("ratio")
        stats["summary"] = (f"{len(p.nodes)} nodes int8 ({method} ranges), agreement drop {acc['drop']:.4f}"
                            + (f" (worst table column cosine {acc['column_cosine']:.4f})" if "column_cosine" in acc
                               else "")
                            + (f", {lat:.3f}× fp32 latency" if lat is not None else ""))

    # -- steps

    def _prepare(self, model: onnx.ModelProto, ctx: PassContext, opts: Int8Options,
                 stats: dict[str, Any]) -> State:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        per_channel = opts.per_channel
        opset = prepare.opset_of(m)
        if opset < prepare.PER_CHANNEL_OPSET and (per_channel or opset < 10):
            why = None
            try:
                up = prepare.upgrade_opset(m)
                from ...validate import make_session, run_session

                batch = take_samples(ctx.calibration, 1)[0]
                a = run_session(make_session(m, ctx.provider), batch)
                b = run_session(make_session(up, ctx.provider), batch)
                for x, y in zip(a, b):
                    span = float(np.max(np.abs(x))) if x.size else 0.0
                    if x.shape != y.shape or (x.size and float(np.max(np.abs(x - y))) > 1e-4 * max(span, 1e-12)):
                        why = "the upgraded model's outputs differ"
                        break
            except Exception as exc:  # the converter raises many kinds of errors
                why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            if why is None:
                m = up
                stats["opset"] = f"upgraded {opset} → {prepare.PER_CHANNEL_OPSET} (validated)"
            elif opset < 10:
                raise OptionError(f"pass 'int8': opset {opset} has no QuantizeLinear (needs ≥ 10) and the "
                                  f"upgrade to {prepare.PER_CHANNEL_OPSET} failed: {why}")
            else:
                per_channel = False
                stats["opset"] = f"kept {opset}: upgrade failed ({why}); weights per tensor"
                log.warning("int8: opset %d could not be upgraded to 13 (%s); weights are quantized per tensor",
                            opset, why)
        stats["batchnorm_folded"] = fold_batchnorm(m)
        stats["affine_folded"] = fold_affine(m)
        stats["div_to_mul"] = prepare.div_to_mul(m)
        hard: list[prepare.HardActivation] = []
        if opts.decompose:
            stats["hard_activations_decomposed"] = prepare.decompose_hard_activations(m, hard)
        prepare.name_nodes(m)
        m = onnx.shape_inference.infer_shapes(m)
        inits = initializers(m.graph)
        excluded = _excluded(m, opts.exclude)
        allowed = {n.name for n in m.graph.node} - excluded
        if opts.float_tail:
            tail = ranges.tail_nodes(m) & allowed
            allowed -= tail
            stats["tail_float"] = len(tail)
        bounds = {}
        for n in m.graph.node:
            if n.op_type in qdq.FUSED_ACTIVATIONS and n.output:
                bounds[n.output[0]] = qdq.fused_bounds(n, inits)
        derived = ranges.derived_tensors(m)
        target = isa.resolve_target(opts.target, ctx.provider)
        bits = 7 if isa.WEIGHT_MAX[target] < 127 else 8
        stats["target"] = {"option": opts.target, "resolved": target, "host": isa.describe_host(), "weight_bits": bits}
        stats["weights"] = f"{bits}-bit for {target}"  # the report's one-line form
        return State(m, inits, allowed, {}, bounds, per_channel, hard=hard, derived=derived,
                      through=ranges.through_activations(m, derived) if opts.through else {}, excluded=excluded,
                      weight_max=isa.WEIGHT_MAX[target])

    def _ranges(self, state: State, opts: Int8Options, method: str, p: qdq.Plan | None = None,
                ) -> dict[str, tuple[float, float]]:
        sym = opts.activations == "int8"
        if method not in state.base_ranges:  # thresholds depend only on the histograms: once per method
            state.base_ranges[method] = {
                t: tensor_range(h, method, symmetric=sym, percentile=opts.percentile,  # type: ignore[arg-type]
                                kl_guard=opts.kl_guard)
                for t, h in state.hists.items()}
            if not sym:  # a tensor read only by SiLU/HardSwish: its low end by the error after it
                base = state.base_ranges[method]
                for t, f in state.through.items():
                    if t in base and t in state.hists:
                        lo, hi = base[t]
                        base[t] = (low_through(state.hists[t], f, lo, hi), hi)
        out = dict(state.base_ranges[method])
        seen = {t: (h.min, h.max) for t, h in state.hists.items() if h.signed is not None}
        ranges.resolve_ranges(out, state.derived, seen)
        if p is not None:
            read = set()
            for n in state.model.graph.node:
                if n.name in p.nodes and n.name not in p.fused:
                    read.update(qdq.data_inputs(n, state.inits) if n.op_type not in qdq.PASSTHROUGH else n.input[:1])
            edge = (p.tensors - read) | {i.name for i in state.model.graph.input}
            if edge & p.tensors:
                mm = {t: tensor_range(h, "minmax", symmetric=sym) for t, h in state.hists.items()}
                ranges.resolve_ranges(mm, state.derived, seen)
                out.update({t: mm[t] for t in edge & p.tensors if t in mm})
        return out

    def _build(self, state: State, opts: Int8Options, method: str, floated: set[str],
               drop: set[str] | None = None, spread: float | None = None) -> tuple[onnx.ModelProto, qdq.Plan]:
        out = floated | (drop or set())
        if state.widest is not None:  # a fused activation and its producer go float together
            out = out | nodes_of_names(out, state.widest)
        allowed = state.allowed - out
        ranges = self._ranges(state, opts, method)
        nonfinite = [t for t, h in state.hists.items() if h.nonfinite]
        p = qdq.plan(state.model, allowed, ranges, spread or opts.concat_spread, nonfinite)
        if state.hists:  # calibration covers the widest placement's tensors
            missing = sorted(t for t in p.tensors if t not in ranges)
            if missing:
                raise RuntimeError(f"int8: no calibrated range for {missing[:3]} (internal error)")
        ranges = self._ranges(state, opts, method, p)
        params = write.tensor_params(p, ranges, opts.activations, state.bounds)
        q = write.insert_qdq(state.model, p, params, act_type=opts.activations, per_channel=state.per_channel,
                           bias=opts.bias, bias_shift=state.bias_shift, rounding=state.rounder,
                           keep_float=state.excluded, weight_max=state.weight_max)
        prepare.recompose_hard_activations(q, state.hard, p.nodes)
        return q, p

    def _describe(self, state: State, p: qdq.Plan) -> dict[str, Any]:
        ops = Counter(n.op_type for n in state.model.graph.node if n.name in p.nodes)
        reasons = Counter(v for v in p.declined.values())
        return {
            "quantized_nodes": len(p.nodes),
            "quantized_ops": dict(sorted(ops.items())),
            "qdq_pairs": len(p.tensors),
            "per_channel": state.per_channel,
            "float_reasons": dict(reasons.most_common()),
        }


__all__ = ["AccuracyControl", "Int8", "Int8Options", "agreement", "prefix_cuts"]
