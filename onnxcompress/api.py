"""The Python API: ``optimize``, ``validate_models``, ``inspect_model``.

``optimize`` copies the input model (the original is never modified), runs the pipeline,
validates the result against the original on the chosen execution provider, measures
latency of both in one process, and (when ``output`` is given) writes the result
atomically, only if validation passed or ``keep_failed`` is set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import onnx

from .data import (
    DataSource, ImageOptions, RandomSource, batch_count, batch_of, first_batch, input_specs, model_shapes, open_data,
)
from .data import batch_axes as batch_axes_scope
from .errors import DataError, ModelSaveError, OnnxCompressError, OptionError
from .graph import same_computation
from .labels import Labels, read_labels
from .model import load_model, same_file, save_model
from .pipeline import Pass, PassContext, Pipeline
from .progress import NullProgress, Progress
from .registry import build_pipeline, get_pass_class, parse_spec
from .report import LatencyResult, ModelSummary, OptimizeReport, summarize
from .runtime import DECISION_QUANTILE, run_named
from .search import Search, SearchOptions
from .trials import default_thresholds
from .validate import Thresholds, ValidationReport, compare_models, make_session, measure_latency, resolve_provider

log = logging.getLogger(__name__)

ModelLike = str | os.PathLike[str] | onnx.ModelProto
DataLike = str | os.PathLike[str] | DataSource | Iterable[Mapping[str, Any]] | Callable[[], Iterable[Mapping[str, Any]]]
PassesLike = str | Pipeline | Sequence[Pass | str | tuple[str, Mapping[str, Any]]] | None


def _as_model(model: ModelLike) -> tuple[onnx.ModelProto, str | None]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    return load_model(model), str(model)


def _as_pipeline(passes: PassesLike) -> Pipeline:
    if isinstance(passes, Pipeline):
        return passes
    if passes is None or isinstance(passes, str):
        return build_pipeline(passes)
    objs: list[Pass] = []
    steps: list[tuple[str, Mapping[str, Any]]] = []
    for p in passes:
        if isinstance(p, Pass):
            objs.append(p)
        elif isinstance(p, str):
            steps.extend(parse_spec(p))
        elif isinstance(p, tuple) and len(p) == 2:
            steps.append((str(p[0]), dict(p[1])))
        else:
            raise OptionError(f"cannot use {p!r} as a pass; give a Pass, a name, or (name, options)")
    if objs and steps:
        raise OptionError("give passes either as Pass objects or as names, not both")
    if objs:
        if objs[0].name != "canonicalize":
            from .passes import Canonicalize

            objs.insert(0, Canonicalize())
        return Pipeline(objs)
    return build_pipeline(steps)


#: the final timing keeps a rewrite only when it is at least this much faster than the model as given
KEEP_GAIN = 0.03


def _is_exact(name: str) -> bool:
    try:
        return get_pass_class(name).exact
    except OnnxCompressError:
        return False


def optimize(
    model: ModelLike,
    passes: PassesLike = None,
    *,
    calibration: DataLike | None = None,
    validation: DataLike | Literal[False] | None = None,
    output: str | os.PathLike[str] | None = None,
    provider: str = "cpu",
    thresholds: Mapping[str | None, Thresholds] | Thresholds | None = None,
    batch_size: int = 8,
    calib_limit: int | None = None,
    val_limit: int | None = None,
    image_options: ImageOptions | None = None,
    nonfinite: Literal["error", "skip"] = "error",
    latency: bool = True,
    latency_batch: int = 1,
    latency_runs: int = 20,
    threads: int | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    keep_failed: bool = False,
    external_data: bool | None = None,
    progress: Progress | None = None,
    search: SearchOptions | None = None,
    allow_slower: bool = False,
    batch_axes: Mapping[str, int | None] | None = None,
    labels: str | None = None,
    charset: str | os.PathLike[str] | Sequence[str] | None = None,
) -> tuple[onnx.ModelProto, OptimizeReport]:
    """Optimize ``model`` with ``passes`` and check the result against the original.

    ``passes``: an inline spec (``"prune:ratio=0.3,int8"``), a list of names, ``(name,
    options)`` pairs or :class:`Pass` objects, or a :class:`Pipeline`; ``canonicalize``
    always runs first. ``calibration``: a path or any iterable of ``{input: array}``.
    ``validation``: data to compare on (default: the calibration data, else seeded random
    inputs); ``False`` skips validation. Returns the new model and the report; when
    ``output`` is given the model is written there if validation passed (or
    ``keep_failed``), and ``report.written`` says whether it was.

    Without ``passes`` and with ``calibration``, the default pipeline runs: a search over
    prune, lowrank and int8 for the fastest model within an accuracy budget
    (``search``: :class:`SearchOptions`; ``thresholds`` replace its default budget), see
    :mod:`onnxcompress.search`. Without calibration data only ``canonicalize`` runs.

    The result is timed against the model as given (``latency_batch``); where it is not
    ``KEEP_GAIN`` (3%) faster in two of at most three timings, the model as given is the
    answer and ``report.fallback`` says why, unless ``allow_slower``.

    ``batch_axes``: ``{input: axis or None}`` where the inferred batch axes are wrong (None:
    the input is held constant), see :mod:`onnxcompress.data`.

    ``labels``: the name of the array in the calibration (and validation) ``.npz`` that
    holds each sample's label (class index, or text for a CTC output, read through
    ``charset`` or the model's ``character`` metadata); the budget and validation then
    count only changes away from the labels (:mod:`onnxcompress.labels`).
    """
    with batch_axes_scope(batch_axes):
        return _optimize(model, passes, calibration, validation, output, provider, thresholds, batch_size,
                         calib_limit, val_limit, image_options, nonfinite, latency, latency_batch, latency_runs,
                         threads, input_shapes, seed, keep_failed, external_data, progress, search, allow_slower,
                         (labels, charset))


def _optimize(model: ModelLike, passes: PassesLike, calibration: DataLike | None,
              validation: DataLike | Literal[False] | None, output: str | os.PathLike[str] | None, provider: str,
              thresholds: Mapping[str | None, Thresholds] | Thresholds | None, batch_size: int,
              calib_limit: int | None, val_limit: int | None, image_options: ImageOptions | None,
              nonfinite: Literal["error", "skip"], latency: bool, latency_batch: int, latency_runs: int,
              threads: int | None, input_shapes: Mapping[str, Sequence[int]] | None, seed: int, keep_failed: bool,
              external_data: bool | None, progress: Progress | None, search: SearchOptions | None,
              allow_slower: bool, labelling: tuple[str | None, Any]) -> tuple[onnx.ModelProto, OptimizeReport]:
    progress = progress or NullProgress()
    provider = resolve_provider(provider)
    original, in_path = _as_model(model)
    if output is not None and in_path is not None and same_file(in_path, output):
        raise ModelSaveError(f"{output}: the output is the input file; choose another output path")
    if output is not None and not Path(output).parent.is_dir():
        raise ModelSaveError(f"{output}: output folder {Path(output).parent} does not exist")
    auto = passes is None and calibration is not None
    pipeline = _as_pipeline("canonicalize,fuse" if auto else passes)
    if search is not None and not auto:
        raise OptionError("search options apply to the default pipeline only (no passes, with calibration data)")
    if passes is None and calibration is None:
        log.warning("no calibration data: the default pipeline only canonicalizes; give calibration data to compress")
    # fail early, naming the input, if onnxruntime cannot load the original at all
    make_session(original, provider, optimize=False, label=f"{in_path or 'input model'}")
    calib, val = _sources(original, calibration, validation, calib_limit, val_limit, batch_size, image_options,
                          nonfinite, seed, input_shapes)
    calib_labels, val_labels = _labels(original, labelling, calibration, validation, calib, val, nonfinite)
    sample = first_batch(val) if val is not None else (first_batch(calib) if calib is not None else None)
    shapes = dict(input_shapes or {})
    if sample is not None:
        for k, v in model_shapes(original, sample).items():
            shapes.setdefault(k, v)
    before = summarize(original, shapes)

    work = onnx.ModelProto()
    work.CopyFrom(original)
    ctx = PassContext(calibration=calib, provider=provider, seed=seed, progress=progress)
    result, steps = pipeline.run(work, ctx)
    search_report = None
    if auto:
        searcher = Search(search or SearchOptions(), ctx,
                          thresholds={None: thresholds} if isinstance(thresholds, Thresholds) else thresholds,
                          threads=threads, labels=calib_labels)
        result, search_report = searcher.run(result, original)
        if search_report.chosen.index == 0:  # nothing was faster than the model as given
            steps = []
        steps = steps + searcher.chain(search_report)
        exact_chain = thresholds is None and all(_is_exact(s.name) for s in steps if s.modified)
        thresholds = searcher.thresholds
        if exact_chain:  # exact rewrites are judged as exact
            thresholds = Thresholds.exact(max((get_pass_class(s.name).rel_range for s in steps), default=1e-4))
    fallback = None
    latency_result = None
    if latency and sample is not None:
        latency_result, fallback = _time_against_given(original, result, batch_of(sample, latency_batch, original),
                                                       provider, latency_runs, threads, progress, allow_slower)
        if fallback:
            result, steps, thresholds = original, [], Thresholds.exact()
    after = summarize(result, shapes)

    report = OptimizeReport(passes=steps, before=before, after=after, input_path=in_path,
                            output_path=str(output) if output is not None else None, search=search_report,
                            fallback=fallback)
    if val is not None:
        if thresholds is None:
            thresholds = (Thresholds.exact(pipeline.rel_range) if pipeline.exact
                          else _lossy_thresholds(original, sample, provider))
        report.validation = compare_models(original, result, val, provider=provider, thresholds=thresholds,
                                           progress=progress, threads=threads, labels=val_labels)
    report.latency = latency_result
    if output is not None:
        ok = report.validation is None or report.validation.passed
        if ok or keep_failed:
            save_model(result, output, external_data=external_data)
            report.written = True
        else:
            log.warning("validation failed; %s not written (keep_failed writes it anyway)", output)
    return result, report


def _lossy_thresholds(original: onnx.ModelProto, sample: dict[str, Any] | None,
                      provider: str) -> dict[str | None, Thresholds]:
    """A fixed pipeline's limits for a lossy result: mean cosine and top-1 ≥ 0.99, and for a
    CTC head ([N, T, C] probabilities on ``sample``) its greedy decodes instead of a cosine,
    as in the default pipeline's budget (docs/decisions/ctc.md)."""
    out: dict[str | None, Thresholds] = {None: Thresholds.approximate()}
    if sample is None:
        return out
    names = [o.name for o in original.graph.output]
    values = run_named(make_session(original, provider, label="original model"), names, sample, label="original model")
    budget = default_thresholds(1 - Thresholds.approximate().cosine, dict(zip(names, values)),  # type: ignore[operator]
                                samples=batch_count(sample))
    out.update({n: t for n, t in budget.items() if n is not None and t.ctc is not None})
    return out


def _labels(original: onnx.ModelProto, labelling: tuple[str | None, Any], calibration: DataLike | None,
            validation: DataLike | Literal[False] | None, calib: DataSource | None, val: DataSource | None,
            nonfinite: str) -> tuple[Labels | None, Labels | None]:
    """The labels of the calibration and of the validation samples (see :func:`optimize`)."""
    key, charset = labelling
    if key is None:
        return None, None
    if nonfinite == "skip":
        raise OptionError(f"labels '{key}': skipping non-finite samples would misalign the labels; "
                          "drop those samples from the file instead")
    if calib is None and validation in (None, False):
        raise OptionError(f"labels '{key}': give calibration or validation data that holds them")
    calib_labels = read_labels(calibration, key, original, charset, calib.num_samples) if calib is not None else None
    if val is None:
        return calib_labels, None
    if validation is None:  # validated on the calibration data
        return calib_labels, calib_labels
    return calib_labels, read_labels(validation, key, original, charset, val.num_samples)


def _sources(original: onnx.ModelProto, calibration: DataLike | None, validation: DataLike | Literal[False] | None,
             calib_limit: int | None, val_limit: int | None, batch_size: int, image_options: ImageOptions | None,
             nonfinite: Literal["error", "skip"], seed: int, input_shapes: Mapping[str, Sequence[int]] | None,
             ) -> tuple[DataSource | None, DataSource | None]:
    """The calibration source, and the validation source: the one given, else the
    calibration data, else seeded random inputs (None: validation off)."""
    open_kw: dict[str, Any] = dict(batch_size=batch_size, image_options=image_options, nonfinite=nonfinite)
    calib = open_data(calibration, original, limit=calib_limit, **open_kw) if calibration is not None else None
    if validation is False:
        return calib, None
    if validation is not None:
        return calib, open_data(validation, original, limit=val_limit, **open_kw)
    if calib is not None:
        return calib, calib if val_limit is None else open_data(calibration, original, limit=val_limit, **open_kw)
    return calib, RandomSource(input_specs(original), num_samples=val_limit or 8, batch_size=batch_size, seed=seed,
                               shapes=input_shapes)


def _time_against_given(original: onnx.ModelProto, result: onnx.ModelProto, feeds: dict[str, Any], provider: str,
                        latency_runs: int, threads: int | None, progress: Progress, allow_slower: bool,
                        ) -> tuple[LatencyResult | None, str | None]:
    """Time the result against the model as given; where it is not ``KEEP_GAIN`` faster in
    two of at most three timings (each of at least 9 interleaved rounds and 2 s, the lower
    quartile of each model's runs), the reason the model as given is the answer (None: the
    result stands). On a shared machine one session of the two now and then runs at up to
    twice its time for a few seconds: the quartile sees past a stretch shorter than three
    quarters of a timing, and one odd timing decides nothing. The latency reported is of
    the answer, from the timing with the median ratio. A result that changed no node or
    weight (inferred shapes only) is not timed: the two would differ by noise alone."""
    if result is not original and not allow_slower and same_computation(original, result):
        fallback = "no pass changed a node or a weight (shape annotations only): the model as given is the answer"
        log.warning("%s", fallback)
        return None, fallback
    n = batch_count(feeds)
    timings: list[tuple[float, float]] = []
    votes = {True: 0, False: 0}
    for _ in range(1 if allow_slower or result is original else 3):
        b, a = measure_latency([original, result], feeds, provider=provider, runs=max(latency_runs, 45),
                               min_seconds=2.0, threads=threads, progress=progress, quantile=DECISION_QUANTILE,
                               labels=["original model", "optimized model"])
        timings.append((b, a))
        votes[a / b <= 1 - KEEP_GAIN] += 1
        if max(votes.values()) >= 2:
            break
    timings_by_ratio = sorted(timings, key=lambda t: t[1] / t[0])
    b, a = timings_by_ratio[(len(timings) - 1) // 2]
    if votes[True] < 2 and result is not original and not allow_slower:
        fallback = (f"the rewritten model ran {' and '.join(f'{a / b:.3f}×' for b, a in timings)} the time of the "
                    f"model as given (batch {n}), not {KEEP_GAIN:.0%} faster in two timings: the model as given "
                    "is the answer")
        log.warning("%s", fallback)
        return LatencyResult(provider, n, b, b), fallback
    return LatencyResult(provider, n, b, a), None


def validate_models(
    reference: ModelLike,
    candidate: ModelLike,
    data: DataLike | None = None,
    *,
    provider: str = "cpu",
    thresholds: Mapping[str | None, Thresholds] | Thresholds | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    image_options: ImageOptions | None = None,
    nonfinite: Literal["error", "skip"] = "error",
    seed: int = 0,
    threads: int | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    progress: Progress | None = None,
    batch_axes: Mapping[str, int | None] | None = None,
    labels: str | None = None,
    charset: str | os.PathLike[str] | Sequence[str] | None = None,
) -> ValidationReport:
    """Compare two models' outputs on ``data`` (or seeded random inputs); ``batch_axes``,
    ``labels`` and ``charset`` as in :func:`optimize`."""
    with batch_axes_scope(batch_axes):
        return _validate_models(reference, candidate, data, provider, thresholds, batch_size, limit, image_options,
                                nonfinite, seed, threads, input_shapes, progress, (labels, charset))


def _validate_models(reference: ModelLike, candidate: ModelLike, data: DataLike | None, provider: str,
                     thresholds: Mapping[str | None, Thresholds] | Thresholds | None, batch_size: int,
                     limit: int | None, image_options: ImageOptions | None, nonfinite: Literal["error", "skip"],
                     seed: int, threads: int | None, input_shapes: Mapping[str, Sequence[int]] | None,
                     progress: Progress | None, labelling: tuple[str | None, Any]) -> ValidationReport:
    ref, _ = _as_model(reference)
    new, _ = _as_model(candidate)
    ref_in = [(s.name, s.dtype) for s in input_specs(ref)]
    new_in = [(s.name, s.dtype) for s in input_specs(new)]
    if ref_in != new_in:
        raise DataError(f"the models take different inputs: {ref_in} vs {new_in}")
    if data is None:
        source: DataSource = RandomSource(input_specs(ref), num_samples=limit or 8, batch_size=batch_size, seed=seed,
                                          shapes=input_shapes)
    else:
        source = open_data(data, ref, batch_size=batch_size, limit=limit, image_options=image_options, nonfinite=nonfinite)
    _, labels = _labels(ref, labelling, None, data, None, source, nonfinite)
    return compare_models(ref, new, source, provider=provider, thresholds=thresholds, progress=progress, threads=threads,
                          labels=labels)


def inspect_model(model: ModelLike, input_shapes: Mapping[str, Sequence[int]] | None = None) -> ModelSummary:
    """Inputs, outputs, opset, op histogram, parameters and MACs of a model."""
    m, _ = _as_model(model)
    return summarize(m, input_shapes)


def prune_groups(model: ModelLike, input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[dict[str, Any]]:
    """The channel dependency groups of a model: producers, channel count (classes that go
    together: channels, or attention heads of ``per_class`` channels each), blocked reason."""
    from .passes.prune.groups import analyze
    from .shapes import all_shapes

    m, _ = _as_model(model)
    canon, _ = build_pipeline("canonicalize").run(m)
    shapes, _ = all_shapes(canon, input_shapes)
    an = analyze(canon, shapes)
    return [
        {"id": g.id, "producers": [an.producers[p].name for p in g.producers], "channels": g.size,
         "per_class": an.per_class(g),
         "prunable": g.blocked is None and g.size > 1, "blocked": g.blocked}
        for g in an.groups
    ]


def measure(
    models: Sequence[ModelLike], data: DataLike, *, provider: str = "cpu", batch: int = 1, runs: int = 20,
    threads: int | None = None,
) -> list[float]:
    """Median latencies (ms) of several models on the first batch of ``data``."""
    loaded = [_as_model(m)[0] for m in models]
    source = open_data(data, loaded[0], batch_size=max(batch, 1))
    feeds = batch_of(first_batch(source), batch, loaded[0])
    return measure_latency(loaded, feeds, provider=provider, runs=runs, threads=threads)


def save(model: onnx.ModelProto, path: str | os.PathLike[str], external_data: bool | None = None) -> list[Path]:
    return save_model(model, path, external_data=external_data)
