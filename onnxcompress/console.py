"""What the ``onnxcompress`` command prints: the consoles, progress bars and the report's
tables (the CLI layer; the library only logs)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import OptionError
from .report import OptimizeReport
from .trials import SearchReport, describe_budget
from .validate import ValidationReport

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)


err = Console(stderr=True, highlight=False, soft_wrap=True)


class RichProgress:
    """The library's Progress protocol on rich progress bars (stderr). Tasks opened while
    another is running (a pass inside the search) share its live display as extra rows."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Progress | None = None
        self._depth = 0

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        if not self.enabled:
            from .progress import _NullTask

            yield _NullTask()
            return
        if self._bar is None:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err, transient=True)
            self._bar.start()
        bar = self._bar
        tid = bar.add_task(description, total=total)
        self._depth += 1

        class _Task:
            def advance(self, n: int = 1) -> None:
                bar.advance(tid, n)

            def describe(self, text: str) -> None:
                bar.update(tid, description=text)

        try:
            yield _Task()
        finally:
            bar.remove_task(tid)
            self._depth -= 1
            if self._depth == 0:
                bar.stop()
                self._bar = None


def _fmt_int(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return str(n)


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _ratio(a: float | int | None, b: float | int | None) -> str:
    if a is None or b is None or a == 0:
        return "-"
    return f"{b / a:.3f}×"


def _print_validation(v: ValidationReport) -> None:
    t = Table(title=f"validation on {v.samples} samples ({v.provider})", title_justify="left")
    for col in ("output", "max abs", "rel. to range", "mean abs", "max rel", "cosine mean/min", "top-1", "NaN/Inf", "result"):
        t.add_column(col, justify="right" if col not in ("output", "result") else "left")
    for o in v.outputs:
        m = o.metrics
        t.add_row(o.name, f"{m['max_abs']:.3g}", f"{m['rel_range']:.3g}", f"{m['mean_abs']:.3g}", f"{m['max_rel']:.3g}",
                  f"{m['cosine_mean']:.6f}/{m['cosine_min']:.6f}", f"{m['top1']:.4f}" if "top1" in m else "-",
                  f"{m['new_nonfinite']}", "[green]pass[/]" if o.passed else "[red]FAIL[/]: " + "; ".join(o.failures))
    out.print(t)


def _print_search(s: SearchReport) -> None:
    budget = describe_budget(s.thresholds)
    t = Table(title=f"search: {len(s.trials)} trials in {s.seconds:.0f} s; fitted on {s.fit_samples} calibration samples "
                    f"(prune/lowrank refit on {s.refit_samples}), judged on {s.samples} held out and on all {s.checked_samples}; "
                    f"budget {budget}; latency ratio = worst of batch {', '.join(map(str, s.batches))}",
              title_justify="left")
    for col in ("#", "stage", "setting", "MACs", "latency", "agreement", "budget used", "result", "seconds"):
        t.add_column(col, justify="left" if col in ("stage", "setting", "result") else "right")
    for tr in s.trials:
        result = ("[bold green]chosen[/]" if tr.chosen else "accepted" if tr.accepted else tr.reason)
        t.add_row(str(tr.index), tr.stage, tr.setting,
                  f"{tr.macs_ratio:.3f}×" if tr.macs_ratio is not None else "—",
                  f"{tr.latency_ratio:.3f}×" if tr.latency else "—",
                  f"{1 - tr.drop:.4f}" if math.isfinite(tr.drop) else "—",
                  f"{tr.usage:.0%}" if math.isfinite(tr.usage) else "—", result, f"{tr.seconds:.1f}")
    out.print(t)
    if s.stopped:
        out.print(f"time budget reached before: {', '.join(s.stopped)}")


def _print_report(r: OptimizeReport) -> None:
    if r.search is not None:
        _print_search(r.search)
    steps = Table(title="passes", title_justify="left")
    for col in ("pass", "changed", "seconds", "statistics"):
        steps.add_column(col)
    for p in r.passes:
        stats = ", ".join(f"{k}={v}" for k, v in p.stats.items() if not isinstance(v, (list, tuple, dict)))
        steps.add_row(p.name, "yes" if p.modified else "no", f"{p.seconds:.2f}", stats)
    out.print(steps)
    b, a = r.before, r.after
    shape_note = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in b.macs_input_shapes.items())
    t = Table(title=f"model (MACs per sample at {shape_note})", title_justify="left")
    for col in ("", "original", "optimized", "ratio"):
        t.add_column(col, justify="right")
    t.add_row("parameters", _fmt_int(b.params), _fmt_int(a.params), _ratio(b.params, a.params))
    t.add_row("MACs", _fmt_int(b.macs), _fmt_int(a.macs), _ratio(b.macs, a.macs))
    t.add_row("size", _fmt_bytes(b.file_size), _fmt_bytes(a.file_size), _ratio(b.file_size, a.file_size))
    t.add_row("nodes", str(b.nodes), str(a.nodes), _ratio(b.nodes, a.nodes))
    if r.latency:
        lat = r.latency
        t.add_row(f"latency ms ({lat.provider}, batch {lat.batch}, lower quartile)", f"{lat.before_ms:.3f}", f"{lat.after_ms:.3f}",
                  f"{lat.ratio:.3f}×")
    out.print(t)
    changed = sorted(set(b.op_counts) | set(a.op_counts))
    diffs = [(op, b.op_counts.get(op, 0), a.op_counts.get(op, 0)) for op in changed if b.op_counts.get(op, 0) != a.op_counts.get(op, 0)]
    if diffs:
        out.print("ops changed: " + ", ".join(f"{op} {x}→{y}" for op, x, y in diffs))
    if r.validation:
        _print_validation(r.validation)
    if r.fallback:
        out.print(f"[yellow]kept the model as given[/]: {r.fallback} (--allow-slower keeps the rewrite)")
    if r.output_path:
        out.print(f"wrote {r.output_path}" if r.written else f"[red]not written[/]: {r.output_path} (validation failed; --keep-failed writes it anyway)")


def _write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    import os
    import tempfile

    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OptionError(f"--report {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(clean(payload), fh, indent=2, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
