"""The search's trials as a picture: the share of the accuracy budget each used against
its latency ratio, one marker per trial and stage, the budget as a line, the chosen
trial ringed.

matplotlib is an optional extra (``onnxcompress[plot]``); it is imported only here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import OptionError
from .trials import SearchReport, describe_budget

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


def plot_search(report: SearchReport | Mapping[str, Any], path: str | os.PathLike[str], title: str = "") -> None:
    """Write the trials of ``report`` (a :class:`SearchReport` or its ``to_dict()``) to
    ``path``: the share of the accuracy budget each trial used (worst output and metric,
    so 100% is the budget's edge) against its latency ratio. Trials never timed (over budget
    before timing) are drawn hollow at the right edge; trials whose pass changed nothing
    (or failed) are listed in a footnote."""
    check_plotting(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = report.to_dict() if isinstance(report, SearchReport) else report
    trials = [t for t in r["trials"] if t.get("usage") is not None and math.isfinite(t["usage"])]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    timed = [t["latency_ratio"] for t in trials if t.get("latency_ratio")]
    untimed_x = max(timed + [1.0]) * 1.08
    for stage, (marker, colour) in _MARKERS.items():
        pts = [t for t in trials if t["stage"] == stage]
        for filled in (True, False):
            sel = [t for t in pts if bool(t.get("latency_ratio")) == filled]
            if not sel:
                continue
            xs = [t["latency_ratio"] if t.get("latency_ratio") else untimed_x for t in sel]
            ys = [100 * t["usage"] for t in sel]
            ax.scatter(xs, ys, marker=marker, s=46, label=stage if filled or not any(t.get("latency_ratio") for t in pts)
                       else None, facecolors=colour if filled else "none", edgecolors=colour)
            for t, x, y in zip(sel, xs, ys):
                ax.annotate(str(t["index"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    chosen = next(t for t in r["trials"] if t["index"] == r["chosen"])
    if chosen.get("latency_ratio"):
        ax.scatter([chosen["latency_ratio"]], [100 * chosen["usage"]], s=260, facecolors="none", edgecolors="red",
                   linewidths=1.8, label=f"chosen (#{chosen['index']})")
    ax.axhline(100, color="red", linestyle="--", linewidth=1, label="budget")
    budget = describe_budget(r["thresholds"])
    ax.set_xlabel(f"latency / input latency (worst of batch {', '.join(map(str, r['batches']))}); hollow: not timed")
    ax.set_ylabel("accuracy budget used, % (worst output)")
    ax.set_title(f"{title}  {len(r['trials'])} trials, {r['seconds']:.0f} s\n{budget}".strip(), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    undrawn = [t for t in r["trials"] if t not in trials]
    if undrawn:  # every trial is on the picture: those without a measurement as a footnote
        note = "; ".join(f"#{t['index']} {t['stage']} {t['setting']}: {t['reason'][:60]}" for t in undrawn)
        fig.text(0.01, 0.01, "not measured: " + note, fontsize=6, wrap=True)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)
