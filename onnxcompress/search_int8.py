"""The default pipeline's int8 steps (the method: search.py's docstring, steps 1 and 4):
the probe on the stages' start, int8 on the structural results, and the retry of an int8
trial that its held-out samples put over budget."""

from __future__ import annotations

import onnx

from .pipeline import Pass
from .trials import SearchOptions, Trial

INT8_CHECK_SAMPLES = 16  #: samples int8's accuracy control checks on inside the search


class _Stopped(Exception):
    """The time budget leaves no room for the next trial."""


class Int8Stages:
    """The int8 steps of :class:`~onnxcompress.search.Search`, which provides the trials."""

    opts: SearchOptions
    trials: list[Trial]
    models: dict[int, onnx.ModelProto]
    stopped: list[str]
    batches: list[int]

    def _trial(self, stage: str, setting: str, p: Pass | None, start: tuple[int | None, onnx.ModelProto],
               rival: Trial, reserve: float, expected: float) -> Trial:
        raise NotImplementedError

    def _faster(self, t: Trial, other: Trial) -> bool:
        raise NotImplementedError

    def _int8_trial(self, max_drop: float, label: str, start: Trial, expected: float, unfloat: bool = True) -> Trial:
        """int8 judged on the held-out samples; where it misses the budget there by less
        than ``int8_retry_below``× (its own control judged it on the fitting samples),
        again with at least one more of its control's float-prefix cuts than the rejected
        one had, at most ``int8_retries`` times."""
        from .passes.int8 import AccuracyControl, Int8, Int8Options

        def make(floor: int) -> Pass:
            return Int8(Int8Options(max_drop=round(max_drop, 5), guard_batches=",".join(str(b) for b in self.batches),
                                    max_float=self.opts.int8_max_float, unfloat=unfloat,
                                    check_samples=INT8_CHECK_SAMPLES, min_float_prefix=floor))

        source = (start.index, self.models[start.index])
        t = self._trial("int8", f"max_drop={max_drop:.4g}{label}", make(0), source, start, 0.0, expected)
        for _ in range(self.opts.int8_retries):
            if t.step is None or t.within_budget or not 1.0 < t.usage < self.opts.int8_retry_below:
                break
            control = t.step.outcome
            if not isinstance(control, AccuracyControl) or not control.met:
                break  # its control could not hold max_drop even with its most float: more changes nothing
            floor = control.float_prefix + 1
            t = self._trial("int8", f"max_drop={max_drop:.4g}{label} float prefix ≥ {floor} (retry: "
                            f"#{t.index} over budget held out)", make(floor), source, start, 0.0,
                            t.seconds)
        return t

    def _probe(self, fused: Trial) -> tuple[Trial | None, float, float]:
        """int8 on the stages' start with the whole budget, its control's slack kept
        (``unfloat`` off); (the probe, the share of the budget reserved for int8, its seconds)."""
        if not self.opts.int8:
            return None, 0.0, 0.0
        try:
            probe = self._int8_trial(self.opts.max_drop, " (probe)", fused, 0.0, unfloat=False)
        except _Stopped:
            self.stopped.append("int8")
            return None, 0.0, 0.0
        reserve = min(1.0, self.opts.int8_reserve * probe.usage) if probe.accepted else 0.0
        return probe, reserve, probe.seconds

    def _int8_on_structural(self, best: Trial, int8_seconds: float) -> Trial:
        """int8 with what the budget has left on the fastest accepted structural result; if
        it does not beat the best so far, on the next (int8 does not pay alike on every
        structure), ``int8_starts`` in all."""
        starts = sorted((t for t in self.trials if t.accepted and t.stage in ("prune", "lowrank")),
                        key=lambda t: t.latency_ratio)[: self.opts.int8_starts]
        for start in starts:
            left = self.opts.max_drop * (1.0 - start.usage)
            if left <= 0.0005:
                continue
            try:
                t = self._int8_trial(left, f" on #{start.index}", start, int8_seconds if start is not starts[0] else 0.0)
            except _Stopped:
                self.stopped.append("int8")
                break
            if self._faster(t, best):
                return t
        return best
