"""Run the original and the rewritten model on the same inputs and compare outputs.

Per output, accumulated batch by batch (nothing but running sums is kept):

* ``max_abs``  = max |a − b|,  ``mean_abs`` = mean |a − b|
* ``max_rel``  = max |a − b| / max(|a|, 1e-6 · range)   (Polygraphy-style, guarded at 0)
* ``rel_range`` = max_abs / (max(a) − min(a)): error relative to the output's range
* ``cosine``: per-sample cosine similarity of the flattened outputs; mean and min over
  the samples whose signal is above rounding noise (RMS of the reference or the candidate
  > ``NOISE_FLOOR`` × the output's range): the cosine of two near-zero vectors (a
  detector's map on an image with nothing to detect) measures only the noise. Where no
  sample has signal, cosine is not judged and the report says so (``judged_by``). An
  output with one value per sample (a wake-word or VAD score, a regression) has one
  cosine over all samples' values instead, bounded by its relative error
  (``cosine_pooled``, :func:`onnxcompress.metrics.value_cosine`): the cosine of a single
  value is only its sign
* ``nonfinite``: NaN/Inf counts in the reference and in the candidate
* ``top1``: argmax agreement, for outputs shaped like class scores ([N, C] with
  2 ≤ C ≤ 100000), over the samples whose reference top-1 leads the runner-up by more than
  the noise floor
* ``ctc``: for sequence outputs ([N, T, C] probabilities, or any [N, T, C] output given a
  ``ctc`` tolerance), 1 − the edit distance between the two models' greedy CTC decodes
  over the reference decode's length; ``ctc_lines``: the share of samples decoded
  identically (:mod:`onnxcompress.ctc`)
* with labels (``against_labels``), ``top1`` and the ``ctc`` metrics count a change only
  where it moves the answer away from the sample's label (:mod:`onnxcompress.labels`)

A :class:`Thresholds` per output decides pass/fail; the defaults depend on whether the
rewrite is exact (``rel_range ≤ 1e-4``) or approximate (mean cosine ≥ 0.99, top-1 ≥ 0.99).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import onnx

from .ctc import changed_margins, changed_note, few_samples_note, is_sequence_probabilities, sequence_agreement
from .data import DataSource, batch_count
from .errors import OptionError, RuntimeModelError
from .labels import Labels, class_harm, sequence_harm
from .metrics import (
    NOISE_FLOOR, column_cosine, column_sums, cosine, is_class_scores, is_feature_table, sample_axis, value_cosine,
)
from .progress import NullProgress, Progress
from .runtime import (  # noqa: F401
    PROVIDERS,
    RUNTIME_FUSIONS,
    lost_fusions,
    make_session,
    measure_latency,
    ort_message,
    resolve_provider,
    run_named,
    run_session,
    runtime_fusions,
    runtime_ops,
)

log = logging.getLogger(__name__)


@dataclass
class Thresholds:
    """Pass/fail limits for one output; None disables a check."""

    rel_range: float | None = None
    max_abs: float | None = None
    mean_abs: float | None = None
    cosine: float | None = None
    top1: float | None = None
    feature_cosine: float | None = None
    ctc: float | None = None
    ctc_lines: float | None = None
    allow_nonfinite: bool = False

    @classmethod
    def exact(cls, rel_range: float = 1e-4) -> "Thresholds":
        return cls(rel_range=rel_range)

    @classmethod
    def approximate(cls) -> "Thresholds":
        return cls(cosine=0.99, top1=0.99)

    def updated(self, **changes: Any) -> "Thresholds":
        values = asdict(self)
        values.update(changes)
        return Thresholds(**values)


def parse_tolerances(spec: str | None, base: Thresholds) -> dict[str | None, Thresholds]:
    """Parse ``"[output:]key=value[,key=value][;output:key=value...]"``.

    A group without an output name applies to every output; ``None`` is that default.
    Keys: rel_range, max_abs, mean_abs, cosine, top1, feature_cosine, ctc, ctc_lines (``none``
    disables), allow_nonfinite.
    """
    result: dict[str | None, Thresholds] = {None: base}
    if not spec:
        return result
    valid = [f.name for f in fields(Thresholds)]
    for group in (g.strip() for g in spec.split(";")):
        if not group:
            continue
        target: str | None = None
        body = group
        head, sep, tail = group.partition(":")
        if sep and "=" not in head:
            target, body = head.strip(), tail
        t = result.get(target, result[None])
        changes: dict[str, Any] = {}
        for item in (i.strip() for i in body.split(",")):
            if not item:
                continue
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in valid:
                raise OptionError(f"tolerance '{item}': expected key=value with key one of {', '.join(valid)}")
            if key == "allow_nonfinite":
                from .pipeline import parse_bool

                changes[key] = parse_bool(value, f"tolerance '{item}'")
            elif value.strip().lower() == "none":
                changes[key] = None
            else:
                try:
                    changes[key] = float(value)
                except ValueError:
                    raise OptionError(f"tolerance '{item}': '{value}' is not a number") from None
        result[target] = t.updated(**changes)
    return result


@dataclass
class OutputStats:
    """Running comparison statistics of one output."""

    name: str
    shape: list[int] = field(default_factory=list)
    count: int = 0
    samples: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    max_rel: float = 0.0
    ref_min: float = math.inf
    ref_max: float = -math.inf
    cos: list[np.ndarray] = field(default_factory=list)  # per-sample cosine, per batch
    rms: list[np.ndarray] = field(default_factory=list)  # per-sample max(RMS(ref), RMS(new)), per batch
    ref_nonfinite: int = 0
    new_nonfinite: int = 0
    top1: list[np.ndarray] = field(default_factory=list)  # per-sample top-1 agreement, per batch
    margin: list[np.ndarray] = field(default_factory=list)  # per-sample reference top-1 − top-2
    classes: bool = False
    feature_sums: np.ndarray | None = None  # column_sums, added up over batches
    sequence: bool | None = None  # decoded as CTC; None: decided by the first batch's reference
    ctc_edits: int = 0
    ctc_chars: int = 0
    ctc_same: int = 0
    ctc_margins: list[float] = field(default_factory=list)  # per changed sample: see ctc.changed_margins
    value_sums: np.ndarray | None = None  # one value per sample: column_sums over all samples' values
    batch_axis: int | None = None  # the output's sample axis, decided on the first batch (see update)
    labelled: bool | None = None  # judged against labels (see labels.py); decided on the first batch

    def update(self, ref: np.ndarray, new: np.ndarray, samples: int | None = None,
               targets: tuple[Labels, np.ndarray] | None = None) -> None:
        """Add one batch. ``samples``: how many samples the batch holds; an output whose
        axis 0 is not that count and whose axis 1 is (a time-major [T, N, C] sequence, a
        [layers, N, H] state) is compared sample by sample along axis 1. ``targets``: the
        batch's labels, which judge a CTC or class-score output they fit
        (:mod:`onnxcompress.labels`)."""
        if ref.shape != new.shape:
            raise RuntimeModelError(f"output '{self.name}': shape {list(new.shape)} differs from the original's {list(ref.shape)}")
        self.shape = list(ref.shape)
        if self.batch_axis is None:
            self.batch_axis = sample_axis(ref.shape, samples)
        if self.batch_axis == 1 and ref.ndim >= 2:
            ref, new = np.moveaxis(ref, 1, 0), np.moveaxis(new, 1, 0)
        if not (np.issubdtype(ref.dtype, np.number) or ref.dtype == np.bool_):
            eq = ref == new
            self.count += ref.size
            self.max_abs = max(self.max_abs, 0.0 if eq.all() else 1.0)
            return
        a = ref.astype(np.float64)
        b = new.astype(np.float64)
        fa, fb = np.isfinite(a), np.isfinite(b)
        self.ref_nonfinite += int((~fa).sum())
        self.new_nonfinite += int((~fb).sum())
        both = fa & fb
        diff = np.abs(a - b)
        diff = np.where(both, diff, 0.0)
        if a.size:
            if both.any():
                self.ref_min = min(self.ref_min, float(a[both].min()))
                self.ref_max = max(self.ref_max, float(a[both].max()))
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.sum_abs += float(diff.sum())
            self.count += a.size
            span = self.ref_max - self.ref_min if self.ref_max > self.ref_min else 1.0
            rel = diff / np.maximum(np.abs(np.where(both, a, 1.0)), 1e-6 * span)
            self.max_rel = max(self.max_rel, float(rel.max()))
        n = a.shape[0] if a.ndim else 1
        ca, cb = np.where(both, a, 0.0), np.where(both, b, 0.0)
        fa2, fb2 = ca.reshape(n, -1), cb.reshape(n, -1)
        self.cos.append(cosine(fa2, fb2, axis=1))
        if fa2.shape[1] == 1:
            sums = column_sums(fa2, fb2)
            self.value_sums = sums if self.value_sums is None else self.value_sums + sums
        size = max(fa2.shape[1], 1)
        self.rms.append(np.maximum(np.linalg.norm(fa2, axis=1), np.linalg.norm(fb2, axis=1)) / math.sqrt(size))
        self.samples += n
        if is_feature_table(a.shape):  # feature j: cosine over the rows (boxes) of all samples
            sums = column_sums(ca, cb)
            self.feature_sums = sums if self.feature_sums is None else self.feature_sums + sums
        if self.sequence is None:
            self.sequence = is_sequence_probabilities(a)
        if targets is not None and self.labelled is None:
            self.labelled = targets[0].fits(a, bool(self.sequence))
        labels = targets if self.labelled else None
        if is_class_scores(a.shape):
            self.classes = True
            sa, sb = np.where(fa, a, -np.inf).reshape(n, -1), np.where(fb, b, -np.inf).reshape(n, -1)
            ta, tb = np.argmax(sa, axis=1), np.argmax(sb, axis=1)
            self.top1.append(ta == tb if labels is None else class_harm(ta, tb, labels[1].astype(np.int64)))
            top2 = np.sort(np.where(np.isfinite(sa), sa, -np.inf), axis=1)[:, -2:]
            with np.errstate(invalid="ignore"):  # -inf − -inf where fewer than two scores are finite
                lead = top2[:, 1] - top2[:, 0]
            self.margin.append(np.nan_to_num(lead, nan=0.0, posinf=np.inf, neginf=0.0))
        if self.sequence and a.ndim == 3:
            if labels is None:
                edits, chars, same = sequence_agreement(ca, cb)
                changed = slice(None)
            else:  # only changes away from the labels count
                lab, classes = labels[0], a.shape[-1]
                edits, chars, worse = sequence_harm(ca, cb, lab.encode(labels[1], classes), lab.same_character(classes))
                same, changed = n - sum(worse), np.array(worse, dtype=bool)
            self.ctc_edits, self.ctc_chars, self.ctc_same = self.ctc_edits + edits, self.ctc_chars + chars, \
                self.ctc_same + same
            if same < n:
                self.ctc_margins += changed_margins(ca[changed], cb[changed])

    def metrics(self) -> dict[str, Any]:
        span = self.ref_max - self.ref_min if self.ref_max > self.ref_min else 0.0
        m: dict[str, Any] = {
            "shape": self.shape,
            "max_abs": self.max_abs,
            "mean_abs": self.sum_abs / self.count if self.count else 0.0,
            "max_rel": self.max_rel,
            "range": span,
            "rel_range": self.max_abs / span if span > 0 else (0.0 if self.max_abs == 0 else math.inf),
            "ref_nonfinite": self.ref_nonfinite,
            "new_nonfinite": self.new_nonfinite,
        }
        cos = np.concatenate(self.cos) if self.cos else np.ones(0)
        rms = np.concatenate(self.rms) if self.rms else np.ones(0)
        if self.value_sums is not None and self.samples:  # one cosine over every sample's one value
            cos = np.array([value_cosine(self.value_sums)])
            rms = np.sqrt(self.value_sums[1:].max(axis=0) / self.samples)  # [1]: the larger of Σa², Σb²
            m["cosine_pooled"] = True
        signal = rms > NOISE_FLOOR * span
        m["cosine_mean"] = float(cos[signal].mean()) if signal.any() else 1.0
        m["cosine_min"] = float(cos[signal].min()) if signal.any() else 1.0
        m["cosine_samples"] = self.samples if m.get("cosine_pooled") and signal.any() else int(signal.sum())
        if self.samples and not signal.any():
            m["cosine_note"] = (f"no sample's signal is above {NOISE_FLOOR:g} of the output range: cosine not "
                                "judged, the error relative to the range is")
        if self.classes:
            agree, margin = np.concatenate(self.top1), np.concatenate(self.margin)
            decided = margin > NOISE_FLOOR * span  # a tie within rounding noise has no top-1 to agree on
            m["top1"] = float(agree[decided].mean()) if decided.any() else 1.0
            m["top1_samples"] = int(decided.sum())
        if self.sequence and self.samples:
            m["ctc"] = 1.0 - self.ctc_edits / self.ctc_chars if self.ctc_chars else float(self.ctc_edits == 0)
            m["ctc_lines"] = self.ctc_same / self.samples
            m["ctc_edits"], m["ctc_chars"] = self.ctc_edits, self.ctc_chars
            m["ctc_samples"] = self.samples
            m["ctc_changed_margins"] = sorted(round(v, 4) for v in self.ctc_margins)
        if self.labelled:
            m["against_labels"] = True
        if self.feature_sums is not None:
            per = column_cosine(self.feature_sums)
            m["feature_cosine"] = [round(float(v), 6) for v in per]
            m["feature_cosine_min"] = float(per.min())
        return m


@dataclass
class OutputResult:
    name: str
    metrics: dict[str, Any]
    thresholds: Thresholds
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "metrics": self.metrics,
                "thresholds": asdict(self.thresholds), "failures": self.failures}


@dataclass
class ValidationReport:
    provider: str
    samples: int
    batches: int
    outputs: list[OutputResult]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def failures(self) -> list[str]:
        return [f"output '{o.name}': {f}" for o in self.outputs for f in o.failures]

    def to_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "samples": self.samples, "batches": self.batches,
                "passed": self.passed, "outputs": [o.to_dict() for o in self.outputs]}


def _range_for_cosine(m: Mapping[str, Any], t: Thresholds) -> bool:
    """Whether ``t``'s cosine check falls back to the error against the output's range:
    no sample has signal to take a cosine of, and ``t`` checks no range itself."""
    return t.cosine is not None and t.rel_range is None and m.get("cosine_samples", 1) == 0


def judged_by(m: Mapping[str, Any], t: Thresholds) -> list[str]:
    """The metrics that decide an output's pass/fail under ``t``, each with why where it is
    not the threshold's own choice."""
    out = []
    if t.rel_range is not None:
        out.append(f"rel_range ≤ {t.rel_range:g}")
    if t.max_abs is not None:
        out.append(f"max_abs ≤ {t.max_abs:g}")
    if t.mean_abs is not None:
        out.append(f"mean_abs ≤ {t.mean_abs:g}")
    if t.cosine is not None and m.get("cosine_pooled") and m.get("cosine_samples", 1) > 0:
        out.append(f"cosine ≥ {t.cosine:g} of all {m.get('cosine_samples')} samples' values as one vector "
                   "(one value per sample: its own cosine would be only its sign)")
    elif t.cosine is not None and m.get("cosine_samples", 1) > 0:
        out.append(f"mean cosine ≥ {t.cosine:g} (over {m.get('cosine_samples')} samples with signal)")
    elif _range_for_cosine(m, t):
        out.append(f"rel_range ≤ {1 - t.cosine:g} (no sample with signal above the noise floor: cosine is noise)")
    if t.feature_cosine is not None and "feature_cosine_min" in m:
        out.append(f"each column's cosine ≥ {t.feature_cosine:g}")
    away = " (changes toward the labels are free)" if m.get("against_labels") else ""
    if t.top1 is not None and "top1" in m:
        out.append(f"top-1 ≥ {t.top1:g}{away}")
    if t.ctc is not None and "ctc" in m:
        out.append(f"greedy CTC decodes agree ≥ {t.ctc:g} (1 − edits / characters){away}")
    if t.ctc_lines is not None and "ctc_lines" in m:
        out.append(f"share of identically decoded samples ≥ {t.ctc_lines:g}{away}")
    return out


def judge(name: str, m: Mapping[str, Any], t: Thresholds) -> list[str]:
    fails = []
    if not t.allow_nonfinite and m["new_nonfinite"] > m["ref_nonfinite"]:
        fails.append(f"{m['new_nonfinite']} NaN/Inf values (original: {m['ref_nonfinite']})")
    if t.rel_range is not None and m["rel_range"] > t.rel_range:
        fails.append(f"max abs error {m['max_abs']:.3g} is {m['rel_range']:.3g} of the output range > {t.rel_range:g}")
    if t.max_abs is not None and m["max_abs"] > t.max_abs:
        fails.append(f"max abs error {m['max_abs']:.3g} > {t.max_abs:g}")
    if t.mean_abs is not None and m["mean_abs"] > t.mean_abs:
        fails.append(f"mean abs error {m['mean_abs']:.3g} > {t.mean_abs:g}")
    if t.cosine is not None and m["cosine_mean"] < t.cosine:
        fails.append(f"mean cosine {m['cosine_mean']:.5f} < {t.cosine:g}")
    if _range_for_cosine(m, t) and m["rel_range"] > 1 - t.cosine:
        fails.append(f"max abs error {m['max_abs']:.3g} is {m['rel_range']:.3g} of the output range > "
                     f"{1 - t.cosine:g} (cosine not judged: no sample has signal above the noise floor)")
    if t.feature_cosine is not None and "feature_cosine_min" in m and m["feature_cosine_min"] < t.feature_cosine:
        j = int(np.argmin(m["feature_cosine"]))
        fails.append(f"cosine of feature {j} (last axis, over all samples) {m['feature_cosine_min']:.5f}"
                     f" < {t.feature_cosine:g}")
    away = " away from the labels" if m.get("against_labels") else ""
    if t.top1 is not None and "top1" in m and m["top1"] < t.top1:
        n = m.get("top1_samples", 0)
        flips = f" ({round((1 - m['top1']) * n)} of {n} flipped{away}{few_samples_note(n, t.top1)})" if n else ""
        fails.append(f"top-1 agreement {m['top1']:.4f} < {t.top1:g}{flips}")
    if t.ctc is not None and "ctc" in m and m["ctc"] < t.ctc:
        fails.append(f"greedy CTC decodes differ by {m['ctc_edits']} edits{away} in {m['ctc_chars']} characters: "
                     f"agreement {m['ctc']:.4f} < {t.ctc:g}")
    if t.ctc_lines is not None and "ctc_lines" in m and m["ctc_lines"] < t.ctc_lines:
        detail = changed_note(m.get("ctc_samples", 0), m.get("ctc_changed_margins", []), t.ctc_lines)
        same = "decode identically or closer to their labels" if away else "decode identically"
        fails.append(f"{m['ctc_lines']:.4f} of the samples {same} < {t.ctc_lines:g}{detail}")
    return fails


def check_labels_used(labels: Labels | None, stats: list[OutputStats]) -> None:
    """An error where ``labels`` fit none of the outputs."""
    if labels is not None and not any(s.labelled for s in stats):
        kind = ("string labels judge a CTC output ([N, T, C] probabilities; a logit head: name it with "
                "--tol OUTPUT:ctc=…)") if labels.strings else \
            "integer labels judge class scores ([N, C])"
        raise OptionError(f"{labels.where}: the labels fit none of the outputs "
                          f"({', '.join(f'{s.name} {s.shape}' for s in stats)}): {kind}")


def judges_decodes(t: Thresholds) -> bool | None:
    """True where ``t`` judges decodes (the output is decoded whatever its values); None:
    decoded where it holds probabilities."""
    return True if t.ctc is not None or t.ctc_lines is not None else None


def compare_models(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    data: DataSource,
    *,
    provider: str = "cpu",
    thresholds: Mapping[str | None, Thresholds] | Thresholds | None = None,
    progress: Progress | None = None,
    threads: int | None = None,
    labels: Labels | None = None,
) -> ValidationReport:
    """Run both models on every batch of ``data`` and compare their outputs (``labels``:
    one per sample of ``data``, see :mod:`onnxcompress.labels`)."""
    progress = progress or NullProgress()
    provider = resolve_provider(provider)
    if thresholds is None:
        thresholds = {None: Thresholds.exact()}
    elif isinstance(thresholds, Thresholds):
        thresholds = {None: thresholds}
    ref_sess = make_session(reference, provider, threads=threads, label="original model")
    new_sess = make_session(candidate, provider, threads=threads, label="optimized model")
    ref_names = [o.name for o in ref_sess.get_outputs()]
    new_names = [o.name for o in new_sess.get_outputs()]
    if ref_names != new_names:
        raise RuntimeModelError(f"the models' outputs differ: {ref_names} vs {new_names}")
    unknown = [k for k in thresholds if k is not None and k not in ref_names]
    if unknown:
        raise OptionError(f"tolerance for unknown output(s) {unknown}; outputs: {', '.join(ref_names)}")
    stats = [OutputStats(n, sequence=judges_decodes(thresholds.get(n, thresholds[None]))) for n in ref_names]
    samples = batches = 0
    with progress.task("validating", data.num_samples) as task:
        for batch in data:
            ref_out = run_session(ref_sess, batch, "original model")
            new_out = run_session(new_sess, batch, "optimized model")
            n = batch_count(batch)
            targets = (labels, labels.take(samples, n)) if labels is not None else None
            for s, a, b in zip(stats, ref_out, new_out):
                s.update(np.asarray(a), np.asarray(b), samples=n, targets=targets)
            samples += n
            batches += 1
            task.advance(n)
    if batches == 0:
        from .errors import DataError

        raise DataError("validation data yielded no samples")
    check_labels_used(labels, stats)
    results = []
    for s in stats:
        t = thresholds.get(s.name, thresholds[None])
        m = s.metrics()
        m["judged_by"] = judged_by(m, t)
        results.append(OutputResult(s.name, m, t, judge(s.name, m, t)))
    return ValidationReport(provider, samples, batches, results)
