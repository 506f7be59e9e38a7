"""The search's trials as a picture: the budget metric (worst output) against the latency
ratio, one marker per trial and stage, the budget as a line, the chosen trial ringed.

matplotlib is an optional extra (``onnxcompress[plot]``); it is imported only here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import OptionError
from .search import SearchReport

_MARKERS = {"input": ("s", "black"), "prune": ("o", "tab:blue"), "lowrank": ("^", "tab:orange"),
            "int8": ("D", "tab:green")}


def check_plotting(path: str | os.PathLike[str]) -> None:
    """Fail before any work if the plot cannot be written."""
    p = Path(path)
    if p.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise OptionError(f"--plot {p}: use a .png, .svg or .pdf file name")
    if not (p.parent if str(p.parent) else Path(".")).is_dir():
        raise OptionError(f"--plot {p}: folder {p.parent} does not exist")
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise OptionError("--plot needs matplotlib: pip install 'onnxcompress[plot]'")


def plot_search(report: SearchReport, path: str | os.PathLike[str], title: str = "") -> None:
    """Write the trials of ``report`` to ``path``. Trials never timed (over budget before
    timing, or failed) are drawn at the right edge, hollow."""
    check_plotting(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    timed = [t.latency_ratio for t in report.trials if t.latency]
    untimed_x = max(timed + [1.0]) * 1.08
    budget = min((v for t in report.thresholds.values() for k, v in t.items() if k in ("cosine", "top1") and v is not None),
                 default=None)
    for stage, (marker, colour) in _MARKERS.items():
        pts = [t for t in report.trials if t.stage == stage and t.metrics]
        for filled in (True, False):
            sel = [t for t in pts if bool(t.latency) == filled]
            if not sel:
                continue
            xs = [t.latency_ratio if t.latency else untimed_x for t in sel]
            ys = [min(t.metrics.values()) for t in sel]
            ax.scatter(xs, ys, marker=marker, s=46, label=stage if filled or not any(t.latency for t in pts) else None,
                       facecolors=colour if filled else "none", edgecolors=colour)
            for t, x, y in zip(sel, xs, ys):
                ax.annotate(str(t.index), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    chosen = report.chosen
    if chosen.metrics:
        ax.scatter([chosen.latency_ratio], [min(chosen.metrics.values())], s=260, facecolors="none",
                   edgecolors="red", linewidths=1.8, label=f"chosen (#{chosen.index})")
    if budget is not None and math.isfinite(budget):
        ax.axhline(budget, color="red", linestyle="--", linewidth=1, label=f"budget {budget:g}")
    ax.set_xlabel(f"latency / input latency (worst of batch {', '.join(map(str, report.batches))}); "
                  "hollow: not timed")
    ax.set_ylabel("agreement with the input (worst output)")
    ax.set_title(f"{title}  {len(report.trials)} trials, {report.seconds:.0f} s".strip())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)
