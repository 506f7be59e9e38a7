"""The ``onnxcompress`` command: parsing and printing only; the work is in the library.

Exit codes: 0 success, 2 user error (one line, no traceback unless ``--debug``),
3 validation failed, 1 internal error, 130 SIGINT, 143 SIGTERM.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from . import api
from .data import ImageOptions
from .errors import Interrupted, OnnxCompressError, OptionError, ValidationFailed
from .pipeline import describe_options
from .registry import REGISTRY, build_pipeline, load_config
from .report import ModelSummary
from .search import SearchOptions
from .validate import Thresholds, parse_tolerances

app = typer.Typer(
    name="onnxcompress",
    help="Compress trained ONNX models (prune, lowrank, int8) and prove the result against the original in onnxruntime.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

from .console import RichProgress, _fmt_bytes, _print_report, _print_validation, _write_json, err, out

_state: dict[str, Any] = {"debug": False, "interrupted": None}


# ----------------------------------------------------------------------------- helpers


def _setup(debug: bool, quiet: bool, verbose: bool = False) -> RichProgress:
    _state["debug"] = debug
    level = logging.DEBUG if debug else (logging.INFO if verbose else (logging.ERROR if quiet else logging.WARNING))
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True)
    return RichProgress(enabled=not quiet and err.is_terminal)


def _parse_batch_axes(values: list[str] | None) -> dict[str, int | None] | None:
    if not values:
        return None
    axes: dict[str, int | None] = {}
    for v in values:
        name, eq, axis = v.rpartition("=")
        if not eq or not name:
            raise OptionError(f"--batch-axis '{v}': expected NAME=K (K an axis, or none to hold the input constant)")
        if axis.strip().lower() == "none":
            axes[name] = None
            continue
        try:
            axes[name] = int(axis)
        except ValueError:
            raise OptionError(f"--batch-axis '{v}': K must be an integer axis or none") from None
    return axes


def _parse_shapes(values: list[str] | None) -> dict[str, list[int]] | None:
    if not values:
        return None
    shapes: dict[str, list[int]] = {}
    for v in values:
        name, eq, dims = v.rpartition("=")
        if not eq or not name:
            raise OptionError(f"--shape '{v}': expected NAME=D0xD1x... (e.g. x=1x3x224x224)")
        try:
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise OptionError(f"--shape '{v}': dimensions must be integers separated by 'x'") from None
    return shapes


def _floats3(text: str | None, option: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if text is None:
        return default
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise OptionError(f"{option} '{text}': expected numbers separated by commas") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise OptionError(f"{option} '{text}': expected 1 or 3 values")
    return (vals[0], vals[1], vals[2])


def _image_options(size: str | None, resize: str, mean: str | None, std: str | None, scale: float,
                   channel_order: str, layout: str) -> ImageOptions:
    hw = None
    if size:
        try:
            h, w = (int(v) for v in size.lower().split("x"))
            hw = (h, w)
        except ValueError:
            raise OptionError(f"--image-size '{size}': expected HxW, e.g. 224x224") from None
    choices = {"resize": (resize, ("stretch", "letterbox", "crop")), "channel-order": (channel_order, ("rgb", "bgr")),
               "layout": (layout, ("nchw", "nhwc"))}
    for opt, (val, allowed) in choices.items():
        if val not in allowed:
            raise OptionError(f"--{opt} '{val}': expected one of {', '.join(allowed)}")
    return ImageOptions(size=hw, resize=resize, mean=_floats3(mean, "--mean", (0.0, 0.0, 0.0)),  # type: ignore[arg-type]
                        std=_floats3(std, "--std", (1.0, 1.0, 1.0)), scale=scale, channel_order=channel_order,  # type: ignore[arg-type]
                        layout=layout)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- commands

Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, errors only.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Info logs.")]
Provider = Annotated[str, typer.Option(help="Execution provider: cpu, cuda, tensorrt or auto.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Samples per batch.")]
Shapes = Annotated[Optional[list[str]], typer.Option("--shape", help="Concrete input shape NAME=1x3xHxW (MACs, random data); repeatable.")]
BatchAxes = Annotated[Optional[list[str]], typer.Option(
    "--batch-axis", help="NAME=K: input NAME's samples lie along axis K (none: held constant, fed as given); "
                         "repeatable. Default: inferred from the model's symbolic dimensions.")]
ImageSize = Annotated[Optional[str], typer.Option("--image-size", help="Images: HxW (default: the model's static size).", rich_help_panel="Image data")]
Resize = Annotated[str, typer.Option(help="Images: stretch, letterbox (top-left, pad 114) or crop (short side, centre).", rich_help_panel="Image data")]
Mean = Annotated[Optional[str], typer.Option(help="Images: per-channel mean after scaling, e.g. 0.485,0.456,0.406.", rich_help_panel="Image data")]
Std = Annotated[Optional[str], typer.Option(help="Images: per-channel std, e.g. 0.229,0.224,0.225.", rich_help_panel="Image data")]
Scale = Annotated[float, typer.Option(help="Images: pixel multiplier before mean/std.", rich_help_panel="Image data")]
ChannelOrder = Annotated[str, typer.Option("--channel-order", help="Images: rgb or bgr.", rich_help_panel="Image data")]
Layout = Annotated[str, typer.Option(help="Images: nchw or nhwc.", rich_help_panel="Image data")]
SkipNonfinite = Annotated[bool, typer.Option("--skip-nonfinite", help="Skip samples with NaN/Inf instead of refusing them.")]
Tol = Annotated[Optional[str], typer.Option("--tol", help="Thresholds: '[OUTPUT:]key=value,...;...' with keys rel_range, max_abs, mean_abs, cosine, top1, feature_cosine (each column of an [N, rows, F] table), ctc, ctc_lines (greedy CTC decodes of an [N, T, C] output), allow_nonfinite.")]
Threads = Annotated[Optional[int], typer.Option(help="onnxruntime intra-op threads (default: onnxruntime's choice).")]
LabelsOpt = Annotated[Optional[str], typer.Option("--labels", help="Name of the array in the data's .npz that holds each sample's label (class index, or text for a CTC output): the budget and validation then count only changes away from the labels.")]
CharsetOpt = Annotated[Optional[Path], typer.Option("--charset", help="Text labels: the CTC output's characters, one per line (class 0 is the blank). Default: the model's 'character' metadata.")]
ReportPath = Annotated[Optional[Path], typer.Option("--report", help="Write the report as JSON here.")]


@app.command()
def optimize(
    input: Annotated[Path, typer.Argument(help="The ONNX model to optimize (never modified).")],
    output: Annotated[Path, typer.Argument(help="Where to write the optimized model.")],
    passes: Annotated[Optional[str], typer.Option("--passes", "-p", help="Pipeline, e.g. 'prune:ratio=0.3,int8:method=kl'. See `onnxcompress passes`. Default with --calib: search prune, lowrank and int8 within --max-drop.")] = None,
    max_drop: Annotated[float, typer.Option("--max-drop", help="Default pipeline: accuracy budget on held-out calibration samples: class outputs top-1 agreement ≥ 1 − this (and mean cosine ≥ 1 − this/10), [N, T, C] CTC probabilities greedy decodes agree ≥ 1 − this/2 of the characters and ≥ 1 − this of the samples, other outputs mean cosine ≥ 1 − this (for [N, rows, F≤64] tables such as detections, of each column too). --tol replaces it per output.", rich_help_panel="Default pipeline")] = 0.01,
    time_budget: Annotated[float, typer.Option("--time-budget", help="Default pipeline: seconds the search may take.", rich_help_panel="Default pipeline")] = 300.0,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Default pipeline: plot every trial (agreement against latency) to this .png/.svg/.pdf (needs matplotlib: the 'plot' extra).", rich_help_panel="Default pipeline")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Pipeline TOML file with \\[\\[passes]] tables.")] = None,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration data: .npy, .npz, or a folder of arrays or images.")] = None,
    val: Annotated[Optional[Path], typer.Option("--val", help="Validation data (default: the calibration data, else seeded random inputs).")] = None,
    calib_limit: Annotated[Optional[int], typer.Option("--calib-limit", help="Use at most N calibration samples.")] = None,
    val_limit: Annotated[Optional[int], typer.Option("--val-limit", help="Validate on at most N samples.")] = None,
    labels: LabelsOpt = None,
    charset: CharsetOpt = None,
    batch_size: BatchSize = 8,
    provider: Provider = "cpu",
    tol: Tol = None,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip validation (not recommended).")] = False,
    keep_failed: Annotated[bool, typer.Option("--keep-failed", help="Write the output even when validation fails.")] = False,
    allow_slower: Annotated[bool, typer.Option(
        "--allow-slower", help="Keep the rewritten model even where it runs slower than the model as given.")] = False,
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Measure latency of both models.")] = True,
    latency_batch: Annotated[int, typer.Option("--latency-batch", help="Batch size for the latency measurement.")] = 1,
    latency_runs: Annotated[int, typer.Option("--latency-runs", help="Timed runs per model, at least (lower quartile reported).")] = 20,
    threads: Threads = None,
    external_data: Annotated[Optional[bool], typer.Option("--external-data/--no-external-data", help="Force tensor data into OUTPUT.data (default: only above 2 GB).")] = None,
    report: ReportPath = None,
    shape: Shapes = None,
    batch_axis: BatchAxes = None,
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    image_size: ImageSize = None, resize: Resize = "stretch", mean: Mean = None, std: Std = None, scale: Scale = 1 / 255,
    channel_order: ChannelOrder = "rgb", layout: Layout = "nchw",
    skip_nonfinite: SkipNonfinite = False,
    quiet: Quiet = False, verbose: Verbose = False, debug: Debug = False,
) -> None:
    """Optimize a model, validate it against the original, and write it."""
    progress = _setup(debug, quiet, verbose)
    if passes and config:
        raise OptionError("give the pipeline with --passes or --config, not both")
    auto = not passes and not config and calib is not None
    if not auto and plot is not None:
        raise OptionError("--plot shows the default pipeline's search: drop --passes/--config, give --calib")
    if plot is not None:
        from .plot import check_plotting

        check_plotting(plot)
    if auto:
        search = SearchOptions(max_drop=max_drop, time_budget=time_budget)  # checks its values
        pipeline = None
        thresholds = parse_tolerances(tol, Thresholds(cosine=1 - max_drop, top1=1 - max_drop)) if tol else None
    else:
        search = None
        pipeline = build_pipeline(load_config(config) if config else passes)
        base = Thresholds.exact(pipeline.rel_range) if pipeline.exact else Thresholds.approximate()
        thresholds = parse_tolerances(tol, base) if tol else None  # None: the API's defaults per output
    result, rep = api.optimize(
        input, pipeline, calibration=calib, search=search, validation=False if no_validate else val, output=output, provider=provider,
        thresholds=thresholds, batch_size=batch_size, calib_limit=calib_limit, val_limit=val_limit,
        image_options=_image_options(image_size, resize, mean, std, scale, channel_order, layout),
        nonfinite="skip" if skip_nonfinite else "error", latency=latency, latency_batch=latency_batch,
        latency_runs=latency_runs, threads=threads, input_shapes=_parse_shapes(shape), seed=seed,
        keep_failed=keep_failed, allow_slower=allow_slower, external_data=external_data, progress=progress,
        batch_axes=_parse_batch_axes(batch_axis), labels=labels, charset=charset,
    )
    _print_report(rep)
    _write_json(report, rep.to_dict())
    if plot is not None and rep.search is not None:
        from .plot import plot_search

        plot_search(rep.search, plot, title=input.name)
        out.print(f"wrote {plot}")
    if rep.validation is not None and not rep.validation.passed:
        raise ValidationFailed("validation failed: " + "; ".join(rep.validation.failures()))


@app.command()
def validate(
    reference: Annotated[Path, typer.Argument(help="The original model.")],
    candidate: Annotated[Path, typer.Argument(help="The model to check against it.")],
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Data to compare on (same as --val).")] = None,
    val: Annotated[Optional[Path], typer.Option("--val", help="Data to compare on (default: seeded random inputs).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use at most N samples.")] = None,
    batch_size: BatchSize = 8,
    provider: Provider = "cpu",
    tol: Tol = None,
    labels: LabelsOpt = None,
    charset: CharsetOpt = None,
    approximate: Annotated[bool, typer.Option("--approximate", help="Default thresholds of approximate rewrites (cosine ≥ 0.99, top-1 ≥ 0.99) instead of exact ones (error ≤ 1e-4 of the output range).")] = False,
    threads: Threads = None,
    report: ReportPath = None,
    shape: Shapes = None,
    batch_axis: BatchAxes = None,
    seed: Annotated[int, typer.Option(help="Seed of the random inputs.")] = 0,
    image_size: ImageSize = None, resize: Resize = "stretch", mean: Mean = None, std: Std = None, scale: Scale = 1 / 255,
    channel_order: ChannelOrder = "rgb", layout: Layout = "nchw",
    skip_nonfinite: SkipNonfinite = False,
    quiet: Quiet = False, verbose: Verbose = False, debug: Debug = False,
) -> None:
    """Compare two existing models' outputs on the same inputs."""
    progress = _setup(debug, quiet, verbose)
    if calib and val:
        raise OptionError("give the comparison data with --val or --calib, not both")
    base = Thresholds.approximate() if approximate else Thresholds.exact()
    rep = api.validate_models(
        reference, candidate, val or calib, provider=provider, thresholds=parse_tolerances(tol, base),
        batch_size=batch_size, limit=limit, image_options=_image_options(image_size, resize, mean, std, scale, channel_order, layout),
        nonfinite="skip" if skip_nonfinite else "error", seed=seed, threads=threads, input_shapes=_parse_shapes(shape),
        progress=progress, batch_axes=_parse_batch_axes(batch_axis), labels=labels, charset=charset,
    )
    _print_validation(rep)
    _write_json(report, rep.to_dict())
    if not rep.passed:
        raise ValidationFailed("validation failed: " + "; ".join(rep.failures()))


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="The ONNX model.")],
    shape: Shapes = None,
    top: Annotated[int, typer.Option(help="How many of the heaviest layers to list.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    groups: Annotated[bool, typer.Option("--groups", help="Also list the channel dependency groups (prune).")] = False,
    quiet: Quiet = False, verbose: Verbose = False, debug: Debug = False,
) -> None:
    """Inputs, outputs, opset, ops, parameters, MACs, the heaviest layers, prunable groups."""
    _setup(debug, quiet, verbose)
    s: ModelSummary = api.inspect_model(model, _parse_shapes(shape))
    group_rows = api.prune_groups(model, _parse_shapes(shape)) if groups else None
    if as_json:
        payload = s.to_dict(top=top)
        if group_rows is not None:
            payload["prune_groups"] = group_rows
        out.print_json(json.dumps(payload, default=str))
        return
    out.print(f"[bold]{model}[/]  opset {s.opset}")
    io = Table(title="inputs and outputs", title_justify="left")
    for col in ("", "name", "dtype", "shape"):
        io.add_column(col)
    for i in s.inputs:
        io.add_row("input", i["name"], i["dtype"], str(i["shape"]))
    for o in s.outputs:
        io.add_row("output", o["name"], "", str(o["shape"]))
    out.print(io)
    shape_note = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in s.macs_input_shapes.items())
    out.print(f"parameters {s.params:,}   MACs {s.macs:,} per sample at {shape_note}   size {_fmt_bytes(s.file_size)}   "
              f"nodes {s.nodes}   BatchNormalization {s.batchnorm}" if s.macs is not None else
              f"parameters {s.params:,}   MACs unknown   nodes {s.nodes}   BatchNormalization {s.batchnorm}")
    out.print("ops: " + ", ".join(f"{k} {v}" for k, v in s.op_counts.items()))
    layers = sorted(s.layers, key=lambda x: -x.macs)[:top]
    if layers:
        lt = Table(title=f"top {len(layers)} layers by MACs", title_justify="left")
        for col in ("node", "op", "MACs", "share", "output shape"):
            lt.add_column(col, justify="right" if col in ("MACs", "share") else "left")
        for layer in layers:
            lt.add_row(layer.node, layer.op, f"{layer.macs:,}", f"{100 * layer.macs / max(s.macs or 1, 1):.1f}%", str(layer.output_shape))
        out.print(lt)
    if group_rows is not None:
        n_ok = sum(1 for g in group_rows if g["prunable"])
        gt = Table(title=f"channel dependency groups: {n_ok} prunable of {len(group_rows)}", title_justify="left")
        for col in ("group", "channels", "producers", "prunable"):
            gt.add_column(col, justify="right" if col in ("group", "channels") else "left")
        for g in group_rows:
            names = ", ".join(g["producers"][:4]) + (f" (+{len(g['producers']) - 4})" if len(g["producers"]) > 4 else "")
            size = str(g["channels"]) if g["per_class"] == 1 else f"{g['channels']} × {g['per_class']}"
            gt.add_row(str(g["id"]), size, names, "yes" if g["prunable"] else f"no: {g['blocked'] or 'one channel'}")
        if any(g["per_class"] > 1 for g in group_rows):
            gt.caption = "h × c: h classes of c channels that go together (attention heads)"
        out.print(gt)


@app.command(name="passes")
def list_passes(
    all_: Annotated[bool, typer.Option("--all", help="Also list the experimental options (experimental.NAME=VALUE).")] = False,
) -> None:
    """List the registered passes and their options."""
    hidden = 0
    for name, cls in REGISTRY.items():
        out.print(f"[bold]{name}[/] — {cls.summary}" + ("" if cls.exact else "  (approximate)"), highlight=False)
        for o in describe_options(cls.Options):
            if o.experimental and not all_:
                hidden += 1
                continue
            out.print(f"    {o.name}: {o.type_name} = {o.default!r}  {o.help}", markup=False, highlight=False)
    if hidden:
        out.print(f"({hidden} experimental options not shown: onnxcompress passes --all)", highlight=False)


# ----------------------------------------------------------------------------- entry point


def _on_signal(signum: int, frame: FrameType | None) -> None:
    name, code = ("SIGTERM", 143) if signum == signal.SIGTERM else ("SIGINT", 130)
    _state["interrupted"] = Interrupted(name, code)  # typer swallows the exception; keep it here
    raise _state["interrupted"]


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(UsageError, ClickException, Exit, Abort) classes of click and of typer, whose
    newer releases vendor their own click copy with their own exception classes."""
    import importlib

    mods: list[Any] = [typer]
    for name in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass

    def collect(attr: str) -> tuple[type, ...]:
        return tuple({getattr(m, attr) for m in mods if isinstance(getattr(m, attr, None), type)})

    return collect("UsageError"), collect("ClickException"), collect("Exit"), collect("Abort")


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns (and exits with) the exit code."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    _state["interrupted"] = None
    usage_errors, click_errors, exits, aborts = _click_exceptions()
    command = typer.main.get_command(app)
    code = 0
    try:
        rv = command.main(args=argv, prog_name="onnxcompress", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
        if _state["interrupted"] is not None:
            raise _state["interrupted"]
    except usage_errors as exc:
        exc.show(file=sys.stderr)  # type: ignore[attr-defined]
        code = 2
    except click_errors as exc:
        exc.show(file=sys.stderr)  # type: ignore[attr-defined]
        code = getattr(exc, "exit_code", 2)
    except exits as exc:
        code = int(getattr(exc, "exit_code", 0) or 0)
        if _state["interrupted"] is not None:
            err.print(f"error: {_state['interrupted']}", markup=False)
            code = _state["interrupted"].exit_code
    except Interrupted as exc:
        err.print(f"error: {exc}", markup=False)
        code = exc.exit_code
    except aborts + (KeyboardInterrupt,):
        err.print("error: interrupted by SIGINT; no output was written", markup=False)
        code = 130
    except OnnxCompressError as exc:
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        err.print("error: " + " ".join(str(exc).split()), markup=False)
        code = exc.exit_code
    except Exception as exc:  # a bug: one line unless --debug
        if _state["debug"]:
            raise
        err.print(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", markup=False)
        code = 1
    return code


def run() -> None:  # pragma: no cover - the console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
