"""What the default pipeline's search is configured with and produces: its options,
its trials and report, and the budget arithmetic (thresholds per output kind, a metric's
share of its allowance, a budget tightened by a reserve). The method: search.py."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import OptionError
from .pipeline import PassReport
from .ctc import is_sequence_probabilities
from .metrics import is_class_scores, is_feature_table, sample_major
from .validate import Thresholds


@dataclass(frozen=True)
class SearchOptions:
    """Settings of the default pipeline's search (``optimize`` without ``--passes``)."""

    max_drop: float = field(default=0.01, metadata={
        "help": "accuracy budget: agreement with the model as given may drop by this much (see onnxcompress.search)"})
    time_budget: float = field(default=300.0, metadata={"help": "seconds the search may take"})
    samples: int = field(default=256, metadata={"help": "most calibration samples a trial is judged on"})
    batches: tuple[int, ...] = field(default=(1, 8), metadata={
        "help": "batch sizes every trial is timed at; its latency ratio is the worst of them"})
    large_input_ms: float = field(default=20.0, metadata={
        "help": "time at batch 1 only where one batch-1 run of the model takes longer than this (ms)"})
    min_gain: float = field(default=0.03, metadata={
        "help": "a step is accepted only if it is this fraction faster than the model it starts from"})
    prune_levels: tuple[float, ...] = field(default=(0.85, 0.7, 0.55, 0.4), metadata={
        "help": "prune's MACs budgets, tried in turn"})
    lowrank_levels: tuple[float, ...] = field(default=(0.85, 0.7, 0.65), metadata={
        "help": "lowrank's MACs budgets (of the whole model), tried in turn"})
    int8: bool = field(default=True, metadata={"help": "try int8 (a probe first, then on the structural results)"})
    int8_reserve: float = field(default=1.5, metadata={
        "help": "the structural stages keep this many times the int8 probe's budget usage free for it"})
    refit_elements: float = field(default=1e7, metadata={
        "help": "prune and lowrank refit on at most this many input values' worth of samples"})
    int8_starts: int = field(default=2, metadata={"help": "structural results int8 is tried on, fastest first"})
    int8_retry_below: float = field(default=4.0, metadata={
        "help": "an int8 trial over budget held out by less than this factor is retried with more of it float"})
    int8_retries: int = field(default=2, metadata={"help": "most such int8 retries"})
    int8_max_float: float = field(default=0.75, metadata={
        "help": "int8's accuracy control may return at most this fraction of its nodes to float"})
    holdout: float = field(default=0.25, metadata={"help": "fraction of the calibration samples held out for judging"})
    bisect_max_usage: float = field(default=4.0, metadata={
        "help": "no bisection after a first level that used more than this many times the budget"})

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if not 0 < self.max_drop < 1:
            raise OptionError(f"max_drop must be in (0, 1), got {self.max_drop}")
        if not self.time_budget > 0:
            raise OptionError(f"time budget must be > 0 seconds, got {self.time_budget}")
        if self.samples < 1:
            raise OptionError(f"search samples must be ≥ 1, got {self.samples}")
        if not 0 <= self.int8_max_float <= 1:
            raise OptionError(f"int8_max_float must be in [0, 1], got {self.int8_max_float}")
        if self.int8_retries < 0:
            raise OptionError(f"int8_retries must be ≥ 0, got {self.int8_retries}")
        if not self.bisect_max_usage > 0:
            raise OptionError(f"bisect_max_usage must be > 0, got {self.bisect_max_usage}")
        if not 0 < self.holdout < 1:
            raise OptionError(f"holdout must be in (0, 1), got {self.holdout}")
        if not self.batches or min(self.batches) < 1:
            raise OptionError(f"search batch sizes must be ≥ 1, got {list(self.batches)}")
        for name, levels in (("prune", self.prune_levels), ("lowrank", self.lowrank_levels)):
            if any(not 0 < v < 1 for v in levels):
                raise OptionError(f"{name} levels must be in (0, 1), got {list(levels)}")


@dataclass
class Trial:
    """One candidate model the search built, measured and judged."""

    index: int
    stage: str
    setting: str
    macs_ratio: float | None = None
    latency: dict[int, float] = field(default_factory=dict)  # batch size → ratio to the input
    metrics: dict[str, float] = field(default_factory=dict)  # output → the budget's metric
    usage: float = math.nan
    within_budget: bool = False
    accepted: bool = False
    chosen: bool = False
    reason: str = ""
    seconds: float = 0.0
    base: int | None = None  # the trial this one started from (None: the input)
    faster_than: int | None = None  # accepted: the trial it had to beat, found slower
    step: PassReport | None = None

    @property
    def latency_ratio(self) -> float:
        return max(self.latency.values()) if self.latency else math.nan

    @property
    def drop(self) -> float:
        """1 − the worst agreement metric its budget checks (NaN when it was not judged)."""
        return 1.0 - min(self.metrics.values()) if self.metrics else math.nan

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "step"}
        d["latency"] = {str(k): round(v, 4) for k, v in self.latency.items()}
        d["latency_ratio"] = round(self.latency_ratio, 4) if self.latency else None
        d["drop"] = self.drop
        d["pass_stats"] = self.step.stats if self.step is not None else None
        return d


@dataclass
class SearchReport:
    options: dict[str, Any]
    thresholds: dict[str, dict[str, Any]]
    samples: int
    checked_samples: int
    fit_samples: int
    refit_samples: int
    batches: list[int]
    trials: list[Trial]
    seconds: float
    stopped: list[str] = field(default_factory=list)  # stages cut short by the time budget

    @property
    def chosen(self) -> Trial:
        return next(t for t in self.trials if t.chosen)

    def to_dict(self) -> dict[str, Any]:
        return {"options": self.options, "thresholds": self.thresholds, "samples": self.samples,
                "checked_samples": self.checked_samples, "fit_samples": self.fit_samples, "refit_samples": self.refit_samples,
                "batches": self.batches, "seconds": round(self.seconds, 2), "stopped": self.stopped,
                "chosen": self.chosen.index, "trials": [t.to_dict() for t in self.trials]}


#: the Thresholds fields a trial's budget usage is computed from
AGREEMENT = ("cosine", "top1", "feature_cosine", "ctc", "ctc_lines")


#: class-score outputs: the share of max_drop their mean cosine may lose (see the module docstring)
CLASS_COSINE_SHARE = 0.1

#: sequence outputs: the share of max_drop their decodes' character agreement may lose
CTC_SHARE = 0.5


def found_slower(trials: list[Trial], t: Trial) -> list[int]:
    """The trials ``t`` was found faster than, in turn (its rival, the rival's rival, ...)."""
    out: list[int] = []
    k = t.faster_than
    while k is not None:
        out.append(k)
        k = trials[k].faster_than
    return out


def default_thresholds(max_drop: float, outputs: Mapping[str, np.ndarray],
                       samples: int | None = None) -> dict[str | None, Thresholds]:
    """Mean cosine ≥ 1 − max_drop; class-score outputs: top-1 ≥ 1 − max_drop and mean
    cosine ≥ 1 − max_drop · CLASS_COSINE_SHARE; feature tables: also each column's
    cosine over all samples ≥ 1 − max_drop; sequence outputs ([N, T, C] probabilities,
    :mod:`onnxcompress.ctc`): their greedy decodes, 1 − edits / characters ≥ 1 − max_drop ·
    CTC_SHARE and the share of identically decoded samples ≥ 1 − max_drop, instead of a
    cosine (which passes changes users read and fails changes they do not). ``outputs``
    hold ``samples`` samples each, on the axis :func:`~onnxcompress.metrics.sample_axis` says."""
    result: dict[str | None, Thresholds] = {None: Thresholds(cosine=1 - max_drop)}
    for name, arr in outputs.items():
        arr = sample_major(arr, samples)
        if is_sequence_probabilities(arr):
            result[name] = Thresholds(ctc=1 - max_drop * CTC_SHARE, ctc_lines=1 - max_drop)
        elif is_class_scores(arr.shape):
            result[name] = Thresholds(top1=1 - max_drop, cosine=1 - max_drop * CLASS_COSINE_SHARE)
        elif is_feature_table(arr.shape):
            result[name] = Thresholds(cosine=1 - max_drop, feature_cosine=1 - max_drop)
        else:
            result[name] = Thresholds(cosine=1 - max_drop)
    return result


def describe_budget(thresholds: Mapping[str, Mapping[str, Any]]) -> str:
    """'output: cosine ≥ 0.99, top1 ≥ 0.99; ...' from ``SearchReport.thresholds``."""
    return "; ".join(f"{name}: " + ", ".join(f"{m} ≥ {v:g}" for m, v in t.items() if m in AGREEMENT and v is not None)
                     for name, t in thresholds.items())


def _checked(metrics: Mapping[str, Any], t: Thresholds) -> list[tuple[float, float]]:
    """(value, threshold) of each agreement metric ``t`` checks on one output."""
    out = []
    if t.top1 is not None and "top1" in metrics:
        out.append((float(metrics["top1"]), t.top1))
    if t.cosine is not None:
        out.append((float(metrics["cosine_mean"]), t.cosine))
    if t.feature_cosine is not None and "feature_cosine_min" in metrics:
        out.append((float(metrics["feature_cosine_min"]), t.feature_cosine))
    if t.ctc is not None and "ctc" in metrics:
        out.append((float(metrics["ctc"]), t.ctc))
    if t.ctc_lines is not None and "ctc_lines" in metrics:
        out.append((float(metrics["ctc_lines"]), t.ctc_lines))
    return out


def _usage(value: float, threshold: float) -> float:
    allowance = 1.0 - threshold
    return (1.0 - value) / allowance if allowance > 0 else (0.0 if value >= 1.0 else math.inf)


def _tighten(t: Thresholds, reserve: float) -> Thresholds:
    """Thresholds with only (1 − reserve) of each agreement allowance left."""
    def f(v: float | None) -> float | None:
        return None if v is None else 1.0 - (1.0 - v) * (1.0 - reserve)

    return t.updated(**{k: f(getattr(t, k)) for k in AGREEMENT})
