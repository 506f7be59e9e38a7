"""The default pipeline: the most compressed model that stays within an accuracy budget and
is faster than its input.

**Held-out judging.** The calibration samples are split: the passes calibrate and refit
on the first ones, every trial is judged on the last ``holdout`` fraction (at least 4
samples; with fewer than 8 samples in all, on all of them, as the report says). Judging
only on the samples a refit was fitted to is optimistic.

**Budget.** Per output, agreement with the input model on the held-out samples: mean
per-sample cosine ≥ 1 − ``max_drop``; for class-score outputs ([N, C], 2 ≤ C ≤ 100000,
or [N, C, 1, 1]) top-1 agreement ≥ 1 − ``max_drop`` and mean cosine ≥ 1 − ``max_drop``/10:
a few dozen held-out samples rarely show the top-1 flips a larger set would (at a 1% flip
rate, 16 samples show none 85% of the time), and the class scores' cosine moves before
they flip. Feature tables ([N, rows, F], 2 ≤ F ≤ 64, e.g. detections: box coordinates,
objectness, class scores as columns) also need cosine ≥ 1 − ``max_drop`` for each column
alone, pooled over all samples (:func:`~onnxcompress.metrics.column_cosine`): one cosine
over the table is dominated by its largest column. The user's
:class:`~onnxcompress.validate.Thresholds` per output replace these. A trial's *usage* is
the largest fraction of its allowance any checked metric uses, max over outputs and
metrics of (1 − value) / (1 − threshold); the budget holds when usage ≤ 1. Its *drop*
(shown) is 1 − the worst checked metric. With the user's labels (``labels``), top-1 and
the CTC metrics count only changes away from the labels (:mod:`onnxcompress.labels`).

**Speed.** Every trial is timed against the model as the user gave it (not the
canonicalized and fused one the stages start from: what fuse does to a model's speed in
onnxruntime is not predictable, it can undo onnxruntime's own fusions) in one process
(:func:`~onnxcompress.validate.measure_latency`, interleaved ABBA rounds) at each search
batch size; its latency ratio is the worst of them. A step is accepted only if it is at
least ``min_gain`` faster than the best model so far it must beat (its rival). Those two
ratios come from separate short timings, and one of them can land in a slow stretch of
the machine: a trial short of the margin, by less than half of it or by any amount while
it is ``min_gain`` faster than the model as given, or past it by less than the margin
again, is timed once more against its rival in one call, and that direct ratio decides
(a step that costs accuracy is not taken on one lucky timing). A trial found faster than its rival this way
ranks above it whatever their ratios to the model as given.

**Order** canonicalize → fuse → prune → lowrank → int8, each stage starting from the best
model of the stages before it:

0. Reference outputs of the input on the held-out samples; the batch sizes to time
   (``batches``; batch 1 only when one batch-1 run of the input takes over
   ``large_input_ms``: large inputs are deployed one at a time; a fixed batch dimension
   is used as is).
1. *int8 probe*: int8 on the search's input with the whole budget. When it is
   accepted (within budget, faster), ``int8_reserve`` × its usage u₈ is reserved: the
   structural stages must keep usage ≤ 1 − 1.5·u₈ (the stages' errors roughly add).
   int8's own accuracy control judges on the fitting samples; where the held-out ones put
   it over budget by u < ``int8_retry_below`` (4)×, it runs again at the same
   ``max_drop`` with its control made to float at least one more of its prefix cuts than
   the rejected answer had (``min_float_prefix``), up to ``int8_retries`` (2) times —
   unless its control did not hold ``max_drop`` even with its most float. A retry only
   ever floats more: cutting ``max_drop`` instead lands wherever the control's flat,
   noisy drops fall. Its control may float up to ``int8_max_float`` (0.75) of the
   quantized nodes, more than the pass's own default (0.5), because the search times
   every trial anyway, and checks on 16 of the fitting samples (each int8 trial is also
   timed). The probe runs with the pass's ``unfloat`` off: spending the slack would
   spend the structural stages' budget.
2. *prune*: MACs budgets ``prune_levels`` (0.85, 0.7, 0.55, 0.4) in turn. The prune
   pass spends a budget by removing, across all channel groups, the channels whose
   group-normalized activation importance (measured on the calibration data) is
   smallest, then refits the layers after them by least squares. The first level over
   the budget ends the stage, after one bisection between it and the last level within
   budget — none where the first level of all is over by more than ``bisect_max_usage``
   (4)×: there the error has a floor. Prune and lowrank refit on at most
   ``refit_elements`` input values' worth of samples (their time grows with it).
3. *lowrank*: ``lowrank_levels`` (0.85, 0.7, 0.65) of the model's MACs, likewise. Where
   the int8 probe was accepted, K×K convs only: int8 then quantizes the linear layers
   (MatMul, Gemm, 1×1 Conv), and a linear split under int8 gives two thin int8 layers
   whose error and speed lowrank's float measurements do not see
   (docs/decisions/hybrids.md).
4. *int8* on the fastest accepted structural model with ``max_drop`` scaled to what the
   budget has left (its own accuracy control returns the most sensitive layers to float;
   its latency guard keeps float where int8 does not pay); if that does not beat the best
   so far, on the next fastest (``int8_starts`` in all); skipped when the probe did not
   pay. The same retry as the probe's. Here ``unfloat`` is on: the slack left after the
   structural stages is int8's to spend.

The answer is the fastest accepted trial; where none is faster than the model as given,
that model itself, unchanged. Time: a trial starts only when the time it is expected to
take (the previous trial of its stage) fits in what is left of ``time_budget`` after the
time reserved for the final int8 step (the probe's). The measurements behind these
choices: docs/decisions/search.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from .data import Batch, LimitedSource, batch_count, batch_of, input_specs, model_shapes, take_samples
from .errors import OnnxCompressError, OptionError
from .labels import Labels
from .pipeline import Pass, PassContext, PassReport, Pipeline
from .report import count_macs
from .search_int8 import Int8Stages, _Stopped
from .trials import SearchOptions, SearchReport, Trial, _checked, _tighten, _usage, default_thresholds, found_slower
from .validate import (
    OutputStats,
    Thresholds,
    check_labels_used,
    judge,
    judges_decodes,
    make_session,
    measure_latency,
    run_session,
)

log = logging.getLogger(__name__)

class Search(Int8Stages):
    """Runs the search; see the module docstring."""

    def __init__(self, options: SearchOptions, ctx: PassContext,
                 thresholds: Mapping[str | None, Thresholds] | None = None, threads: int | None = None,
                 labels: Labels | None = None) -> None:
        if ctx.calibration is None:
            raise OptionError("the default pipeline searches on calibration data: give --calib (or --passes)")
        self.opts = options
        self.ctx = ctx
        self.user_thresholds = dict(thresholds) if thresholds else None
        self.threads = threads
        self.labels = labels
        self.trials: list[Trial] = []
        self.models: dict[int, onnx.ModelProto] = {}
        self.stopped: list[str] = []

    # -- measuring

    def _prepare(self, model: onnx.ModelProto, original: onnx.ModelProto) -> None:
        self.base = original  # every trial is timed against the model as given
        calib = self.ctx.calibration
        total = getattr(calib, "num_samples", None)
        if total is None:
            total = sum(batch_count(b) for b in calib)  # type: ignore[arg-type]
        held = 0 if total < 8 else min(self.opts.samples // 2, max(4, round(self.opts.holdout * total)))
        self.n_fit = total - held
        # judged on: the held-out samples, and (so that no top-1 flip on the fitting samples
        # slips through) on up to `samples` calibration samples in all
        checked_fit = min(self.n_fit, self.opts.samples - held)
        held_batches = take_samples(calib, held, skip=self.n_fit) if held else []  # type: ignore[arg-type]
        fit_batches = take_samples(calib, checked_fit)  # type: ignore[arg-type]
        self.samples: list[tuple[Batch, bool]] = [(b, False) for b in fit_batches] + [(b, True) for b in held_batches]
        at = {False: 0, True: self.n_fit}  # where each batch's samples start in the calibration data
        self.targets: list[tuple[Labels, np.ndarray] | None] = []
        for b, is_held in self.samples:  # (`held` is the held-out count)
            self.targets.append(None if self.labels is None else (self.labels, self.labels.take(at[is_held], batch_count(b))))
            at[is_held] += batch_count(b)
        self.n_samples = held
        self.n_checked = held + checked_fit
        if held == 0:
            log.warning("search: only %d calibration samples; trials are judged on the samples they were fitted to "
                        "(optimistic); give at least 8", total)
        if self.labels is not None and held and held * self.opts.max_drop < 1:
            log.warning("search: %d held-out labelled samples cannot show a share of worse samples under 1/%d; "
                        "the budget of %g holds only as far as they show it (give about %d labelled samples)",
                        held, held, self.opts.max_drop, math.ceil(4 / self.opts.max_drop))
        sess = make_session(model, self.ctx.provider, threads=self.threads, label="input model")
        self.names = [o.name for o in sess.get_outputs()]
        self.ref = [run_session(sess, b, "input model") for b, _ in self.samples]
        first = {n: np.asarray(o) for n, o in zip(self.names, self.ref[0])}
        if self.user_thresholds is None:
            self.thresholds = default_thresholds(self.opts.max_drop, first, samples=batch_count(self.samples[0][0]))
        else:
            unknown = [k for k in self.user_thresholds if k is not None and k not in self.names]
            if unknown:
                raise OptionError(f"tolerance for unknown output(s) {unknown}; outputs: {', '.join(self.names)}")
            self.thresholds = dict(self.user_thresholds)
        timing = held_batches or fit_batches
        self.pool = {k: np.concatenate([b[k] for b in timing]) for k in timing[0]}
        fixed = {s.static_batch for s in input_specs(model) if s.static_batch is not None}
        if fixed:
            self.batches = sorted(fixed)
        else:
            t1 = measure_latency([model], batch_of(self.pool, 1, model), provider=self.ctx.provider, runs=5,
                                 min_seconds=0.2, threads=self.threads)[0]
            self.batches = [1] if t1 > self.opts.large_input_ms else sorted(set(self.opts.batches))
        self.feeds = {b: batch_of(self.pool, b, model) for b in self.batches}
        self.shapes = model_shapes(model, self.pool, 1)
        # the passes fit on the first samples; prune and lowrank refit on at most
        # refit_elements input values' worth of them (their run time grows with it)
        per_sample = sum(int(np.prod(v.shape[1:])) for v in self.pool.values())
        self.refit_samples = min(self.n_fit, max(8, math.ceil(self.opts.refit_elements / max(per_sample, 1))))
        self.fit_ctx = dataclasses.replace(self.ctx, calibration=LimitedSource(calib, self.n_fit))  # type: ignore[arg-type]
        self.structural_ctx = dataclasses.replace(
            self.ctx, calibration=LimitedSource(calib, self.refit_samples))  # type: ignore[arg-type]
        self.base_macs = count_macs(model, self.shapes)[0]

    def _threshold(self, name: str) -> Thresholds:
        return self.thresholds.get(name, self.thresholds[None])

    def _judge(self, model: onnx.ModelProto, trial: Trial, reserve: float) -> None:
        """Agreement on the held-out samples and on all checked samples; the worse counts."""
        sess = make_session(model, self.ctx.provider, threads=self.threads, label=f"trial {trial.index}")
        sets = {k: [OutputStats(n, sequence=judges_decodes(self._threshold(n))) for n in self.names]
                for k in ("held-out", "all")}
        for (batch, held), ref, targets in zip(self.samples, self.ref, self.targets):
            n = batch_count(batch)
            for i, new in enumerate(run_session(sess, batch, f"trial {trial.index}")):
                a, b = np.asarray(ref[i]), np.asarray(new)
                sets["all"][i].update(a, b, samples=n, targets=targets)
                if held:
                    sets["held-out"][i].update(a, b, samples=n, targets=targets)
        check_labels_used(self.labels, sets["all"])
        failures: list[str] = []
        usage = 0.0
        for label, stats in sets.items():
            for s in stats:
                if s.samples == 0:
                    continue
                m, t = s.metrics(), self._threshold(s.name)
                checked = _checked(m, t)
                worst = min((v for v, _ in checked), default=1.0)
                trial.metrics[s.name] = round(min(trial.metrics.get(s.name, 1.0), worst), 6)
                usage = max([usage] + [_usage(v, th) for v, th in checked])
                failures += [f"{s.name} ({label}): {f}" for f in judge(s.name, m, _tighten(t, reserve))]
        trial.usage = usage
        trial.within_budget = not failures
        if failures:
            trial.reason = ("over budget" + (f" (with {reserve:.0%} of it reserved for int8)" if reserve else "")
                            + ": " + "; ".join(failures))

    def _ratios(self, ref: onnx.ModelProto, model: onnx.ModelProto, ref_label: str, trial: Trial) -> dict[int, float]:
        """Latency of ``model`` over ``ref``, timed together in one process, per batch size."""
        out = {}
        for b, feeds in self.feeds.items():
            t_ref, t_new = measure_latency([ref, model], feeds, provider=self.ctx.provider, runs=10,
                                           min_seconds=0.5, threads=self.threads,
                                           labels=[ref_label, f"trial {trial.index}"])
            out[b] = t_new / t_ref
        return out

    def _macs(self, model: onnx.ModelProto) -> float | None:
        try:
            return count_macs(model, self.shapes)[0] / max(self.base_macs, 1)
        except Exception as exc:  # MACs are informative only
            log.warning("search: could not count MACs: %s", exc)
            return None

    # -- trials

    def _left(self) -> float:
        return self.opts.time_budget - (time.perf_counter() - self.start)

    def _trial(self, stage: str, setting: str, p: Pass | None, start: tuple[int | None, onnx.ModelProto],
               rival: Trial, reserve: float, expected: float) -> Trial:
        """Build, judge and time one trial; it is accepted when within budget and at least
        ``min_gain`` faster than ``rival`` (the best model it must beat)."""
        if expected > self._left():
            raise _Stopped(stage)
        t0 = time.perf_counter()
        trial = Trial(index=len(self.trials), stage=stage, setting=setting, base=start[0])
        self.trials.append(trial)
        self.task.describe(f"search: trial {trial.index} {stage} {setting}")
        model = start[1]
        if p is not None:
            work = onnx.ModelProto()
            work.CopyFrom(model)
            try:
                ctx = self.fit_ctx if stage == "int8" else self.structural_ctx
                model, reports = Pipeline([p]).run(work, ctx)
            except OnnxCompressError as exc:
                trial.reason = f"failed: {exc}"
                trial.seconds = time.perf_counter() - t0
                log.warning("search: trial %d (%s %s) failed: %s", trial.index, stage, setting, exc)
                return trial
            trial.step = reports[0]
            if not reports[0].modified:
                st = reports[0].stats
                why = st.get("summary") or st.get("reason") or (
                    f"none of its {st['candidates']} candidate layers pays" if "candidates" in st else "nothing to change")
                trial.reason = f"the pass changed nothing: {why}"
                trial.seconds = time.perf_counter() - t0
                return trial
        trial.macs_ratio = self._macs(model)
        self._judge(model, trial, reserve)
        if trial.within_budget:
            trial.latency = self._ratios(self.base, model, "model as given", trial)
            current_ratio = rival.latency_ratio
            gain_needed = current_ratio * (1 - self.opts.min_gain)
            direct: float | None = None
            window = max(current_ratio * (1 - self.opts.min_gain / 2), 1 - self.opts.min_gain)
            clear = current_ratio * (1 - 2 * self.opts.min_gain)
            if clear < trial.latency_ratio <= window and rival.index:
                # the two ratios come from separate timings, and one short timing can land
                # in a slow stretch of the machine: where they put the trial near the
                # margin, on either side of it (a step that costs accuracy must not be
                # taken on one lucky timing), time the two in one call and let that decide
                direct = max(self._ratios(self.models[rival.index], model, f"#{rival.index}", trial).values())
            trial.accepted = (trial.latency_ratio <= gain_needed if direct is None
                              else direct <= 1 - self.opts.min_gain)
            if trial.accepted:
                self.models[trial.index] = model
                trial.faster_than = rival.index
            if direct is not None:
                trial.reason = (f"{trial.latency_ratio:.3f}× vs {current_ratio:.3f}× the model as given, "
                                f"{'accepted' if trial.accepted else 'not faster'} timed against "
                                f"#{rival.index}: {direct:.3f}×")
            elif not trial.accepted:
                trial.reason = (f"not faster: latency {trial.latency_ratio:.3f}× the model as given vs "
                                f"{current_ratio:.3f}× (needs {self.opts.min_gain:.0%} less)")
        trial.seconds = time.perf_counter() - t0
        lat = f"{trial.latency_ratio:.3f}×" if trial.latency else "—"
        macs = f"{trial.macs_ratio:.3f}×" if trial.macs_ratio is not None else "?"
        self.task.describe(f"search: trial {trial.index} {stage} {setting}: MACs {macs} latency {lat} "
                           f"budget used {trial.usage:.0%} {'✓' if trial.accepted else '✗'}")
        self.task.advance(1)
        log.info("search: trial %d %s %s: MACs %s, latency %s, drop %.4f, %s", trial.index, stage, setting, macs, lat,
                 trial.drop, "accepted" if trial.accepted else trial.reason)
        return trial

    def _levels(self, stage: str, make: Any, levels: Sequence[float], best: Trial, reserve: float,
                final_reserve: float) -> Trial:
        """Try ``levels`` in order from ``best``; bisect once after the first over budget,
        unless that was the first level and it used more than ``bisect_max_usage``× the
        budget (there the error has a floor: it does not halve with the removal, and the
        bisection would cost a trial for nothing). When the time budget
        leaves no room for a trial, the stage stops there with the best level so far."""
        start = (best.index, self.models[best.index])
        expected = 0.0
        last_ok: float | None = None
        failed: float | None = None
        failed_usage = math.inf
        try:  # a stop for time keeps the levels accepted before it
            for level in levels:
                t = self._trial(stage, f"macs_ratio={level:g}", make(level), start, best, reserve,
                                expected + final_reserve)
                expected = t.seconds
                if t.step is None or not t.step.modified:
                    return best  # the pass cannot apply here (or failed): no point in other levels
                if not t.within_budget:
                    failed, failed_usage = level, t.usage
                    break
                last_ok = level
                if t.accepted:  # faster than best
                    best = t
            if failed is not None and (last_ok is not None or failed_usage <= self.opts.bisect_max_usage):
                mid = round(((last_ok if last_ok is not None else 1.0) + failed) / 2, 3)
                if mid not in levels and mid < 0.97:
                    t = self._trial(stage, f"macs_ratio={mid:g}", make(mid), start, best, reserve,
                                    expected + final_reserve)
                    if t.accepted:
                        best = t
        except _Stopped:
            self.stopped.append(stage)
        return best

    def run(self, model: onnx.ModelProto, original: onnx.ModelProto | None = None,
            ) -> tuple[onnx.ModelProto, SearchReport]:
        """Search from ``model`` (canonicalized and fused); ``original``: the model as the
        user gave it, which every trial is timed against and which is the answer where
        nothing is faster (default: ``model``)."""
        self.start = time.perf_counter()
        given = original if original is not None else model
        with self.ctx.progress.task("search", None) as self.task:
            self._prepare(model, given)
            best, fused = self._inputs(model, given)
            probe, reserve, int8_seconds = self._probe(fused)           # 1. int8 with the whole budget
            int8_pays = probe is not None and probe.accepted
            if probe is not None and self._faster(probe, best):
                best = probe
            final_reserve = int8_seconds if int8_pays else 0.0
            structural = self._structural(fused, reserve, final_reserve, int8_pays)  # 2-3. prune, lowrank
            if self._faster(structural, best):
                best = structural
            if int8_pays:                                                   # 4. int8 on them
                best = self._int8_on_structural(best, int8_seconds)
            best.chosen = True
        report = SearchReport(
            options=dataclasses.asdict(self.opts),
            thresholds={str(k): dataclasses.asdict(self._threshold(k)) for k in self.names},
            samples=self.n_samples, checked_samples=self.n_checked, fit_samples=self.n_fit,
            refit_samples=self.refit_samples, batches=list(self.batches), trials=self.trials,
            seconds=time.perf_counter() - self.start, stopped=self.stopped)
        return self.models[best.index], report

    def _inputs(self, model: onnx.ModelProto, given: onnx.ModelProto) -> tuple[Trial, Trial]:
        """Trial 0, the model as given, and trial 1, the canonicalized and fused model the
        stages start from whether or not it is faster itself (it is an answer only where it
        is); the best of them and the start of the stages."""
        as_given = Trial(index=0, stage="input", setting="as given", macs_ratio=1.0,
                         latency={b: 1.0 for b in self.batches}, metrics={n: 1.0 for n in self.names}, usage=0.0,
                         within_budget=True, accepted=True, reason="the model as given")
        self.trials.append(as_given)
        self.models[as_given.index] = given
        if model is given:
            return as_given, as_given
        fused = self._trial("input", "canonicalized, fused", None, (0, model), as_given, 0.0, -math.inf)
        self.models[fused.index] = model
        if fused.accepted:
            return fused, fused
        if fused.latency:
            fused.reason = (f"{fused.latency_ratio:.3f}× the model as given: not an answer by itself "
                            "(the stages start from it)")
        return as_given, fused

    def _structural(self, fused: Trial, reserve: float, final_reserve: float, int8_follows: bool) -> Trial:
        """prune, then lowrank, each from the best structural model so far, within what
        the int8 reserve leaves of the budget; where int8 follows, lowrank splits K×K convs
        only (int8 takes the linear layers)."""
        from .passes.lowrank import LowRank, LowRankOptions
        from .passes.prune import Prune, PruneOptions

        structural = fused
        kinds = "spatial" if int8_follows else "all"
        stages = (("prune", lambda r: Prune(PruneOptions(macs_ratio=r)), self.opts.prune_levels),
                  ("lowrank", lambda r: LowRank(LowRankOptions(macs_ratio=r, layers=kinds)),
                   self.opts.lowrank_levels))
        for stage, make, levels in stages:
            if reserve >= 1.0:
                break
            structural = self._levels(stage, make, levels, structural, reserve, final_reserve)
        return structural

    def _faster(self, t: Trial, other: Trial) -> bool:
        """Whether accepted trial ``t`` is faster than ``other``: known where ``t`` was found
        faster than ``other`` or than a trial found faster than it (timed against it); else
        by their ratios to the model as given."""
        if not t.accepted or t.index == other.index:
            return False
        return other.index in found_slower(self.trials, t) or t.latency_ratio < other.latency_ratio

    def chain(self, report: SearchReport) -> list[PassReport]:
        """The pass steps from the input to the chosen model, in order."""
        steps: list[PassReport] = []
        t: Trial | None = report.chosen
        while t is not None:
            if t.step is not None:
                steps.append(t.step)
            t = report.trials[t.base] if t.base is not None else None
        return steps[::-1]
