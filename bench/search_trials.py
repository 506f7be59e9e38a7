"""How the default pipeline's trials hold on the eval set: one search per model, each
trial model it built scored per sample on its calibration set (fitting and held-out
samples apart, as the search split them) and on ``*_eval.npz``.

    python bench/search_trials.py [--shared ../shared] [--models text_det] [--json out.json]

Per trial: mean per-sample cosine of the first output to the original's on the fitting
samples, the range over the held-out samples, and the eval mean and lowest; and the
ratio of its budget usage (1 − mean cosine over ``max_drop``) on the eval set to that on
calibration (the worse of fitting and held out; none where that is under 1% of the budget,
rounding). Trials the search did not keep (over
budget, not faster) have no model and are listed without scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnxcompress as oc  # noqa: E402
import onnxcompress.search as search_mod  # noqa: E402
from _common import per_sample_cosine, run_batch, run_batched  # noqa: E402


def search_with_models(model: onnx.ModelProto, calib: Path) -> tuple[Any, dict[int, onnx.ModelProto]]:
    """The default pipeline's report on ``model``, and the trial models its search kept."""
    kept: dict[int, onnx.ModelProto] = {}
    run = search_mod.Search.run

    def keeping(self: search_mod.Search, *args: Any) -> Any:
        out = run(self, *args)
        kept.update(self.models)
        return out

    search_mod.Search.run = keeping  # type: ignore[method-assign]
    try:
        _, report = oc.optimize(model, None, calibration=str(calib), validation=False, latency=False)
    finally:
        search_mod.Search.run = run  # type: ignore[method-assign]
    return report, kept


def rows_for(name: str, shared: Path) -> list[dict[str, Any]]:
    model = oc.load_model(shared / "models" / f"{name}.onnx")
    calib_path = shared / "data" / f"{name}_calib.npz"
    with np.load(calib_path) as f:
        cal = f["x"] if "x" in f.files else f[f.files[0]]
    with np.load(shared / "data" / f"{name}_eval.npz") as f:
        ev = f["x"] if "x" in f.files else f[f.files[0]]
    report, kept = search_with_models(model, calib_path)
    s = report.search
    batch = run_batch(model)
    ref_c, ref_e = run_batched(model, cal, batch), run_batched(model, ev, batch)
    max_drop = s.options["max_drop"]
    rows = []
    for t in s.trials:
        row: dict[str, Any] = {"model": name, "trial": t.index, "stage": t.stage, "setting": t.setting,
                               "accepted": t.accepted, "chosen": t.chosen,
                               "latency": round(t.latency_ratio, 3) if t.latency else None}
        if t.index in kept and t.index > 0:
            c = per_sample_cosine(ref_c, run_batched(kept[t.index], cal, batch))
            e = per_sample_cosine(ref_e, run_batched(kept[t.index], ev, batch))
            fit, held = c[: s.fit_samples], c[s.fit_samples:]
            calib_usage = max(1 - fit.mean(), 1 - held.mean() if len(held) else 0.0) / max_drop
            row.update(fit=float(fit.mean()), held=[float(held.min()), float(held.max())] if len(held) else None,
                       eval=float(e.mean()), eval_min=float(e.min()),
                       ratio=float((1 - e.mean()) / max_drop / calib_usage) if calib_usage >= 0.01 else None)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--models", default="text_det")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = [r for name in args.models.split(",") for r in rows_for(name, Path(args.shared))]
    table = Table(title="default-pipeline trials: per-sample cosine to the original")
    for col in ("model", "#", "trial", "accepted", "latency", "fitting", "held-out", "eval mean / lowest",
                "eval ÷ calib usage"):
        table.add_column(col)
    for r in rows:
        scored = "eval" in r
        table.add_row(r["model"], str(r["trial"]), f"{r['stage']} {r['setting']}" + (" (answer)" if r["chosen"] else ""),
                      "✓" if r["accepted"] else "✗", f"{r['latency']}×" if r["latency"] else "—",
                      f"{r['fit']:.4f}" if scored else "—",
                      f"{r['held'][0]:.4f}–{r['held'][1]:.4f}" if scored and r["held"] else "—",
                      f"{r['eval']:.4f} / {r['eval_min']:.4f}" if scored else "—",
                      f"{r['ratio']:.1f}" if scored and r["ratio"] is not None else "—")
    Console(width=200).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
