"""lowrank's whitening shrinkage, measured: each shared model through ``lowrank`` alone at
several values of ``onnxcompress.passes.lowrank.ranks.WHITEN_SHRINK``.

    python bench/lowrank_shrink.py [--shared ../shared] [--eps 1e-3,1e-2,3e-2]
                                   [--models text_det,captcha_det,...] [--json out.json]

Per model: ``lowrank:macs_ratio=R:measure=false`` (measure off, so the timings of tiny
layers do not change which layers split between runs; R = 0.85 for ppocrv5_rec, else
0.65), fitted on the first 3/4 of ``*_calib.npz``. Scored on the last 1/4 (held out, what
the search would judge on) and on ``*_eval.npz``: mean and lowest per-sample cosine to the
original's output; text_det: IoU of the ``p > 0.3`` masks; captcha_det: objectness recall
(original > 0.3 kept > 0.3); classifiers: top-1 against the labels; ppocrv5_rec: CER and
exact-line rate against the labels. One JSON line per run, then a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import onnxcompress as oc  # noqa: E402
import onnxcompress.passes.lowrank.ranks as ranks  # noqa: E402
from _common import eval_metrics, per_sample_cosine, run_batch, run_batched  # noqa: E402
from recognizer import cer, read_charset, read_lines  # noqa: E402

MODELS = "text_det,captcha_det,doc_orientation,textline_cls,wakeword_embed,ppocrv5_rec"


def one(shared: Path, name: str, eps_values: list[float], tmp: Path) -> list[dict]:
    base = oc.load_model(shared / "models" / f"{name}.onnx")
    calib, ev = np.load(shared / "data" / f"{name}_calib.npz"), np.load(shared / "data" / f"{name}_eval.npz")
    xc = calib["x"]
    n_fit = len(xc) - len(xc) // 4
    fit = tmp / f"{name}_fit.npz"
    np.savez(fit, x=xc[:n_fit])
    b = run_batch(base)
    held_ref, eval_ref = run_batched(base, xc[n_fit:], b), run_batched(base, ev["x"], b)
    recognizer = name == "ppocrv5_rec"
    ratio = 0.85 if recognizer else 0.65
    labels = ev["y"] if "y" in ev.files and not recognizer else None
    rows = []
    for eps in eps_values:
        ranks.WHITEN_SHRINK = eps
        t0 = time.perf_counter()
        m, rep = oc.optimize(base, f"lowrank:macs_ratio={ratio}:measure=false", calibration=fit,
                             validation=False, latency=False)
        st = rep.passes[-1].stats
        held, out = run_batched(m, xc[n_fit:], b), run_batched(m, ev["x"], b)
        ch, ce = per_sample_cosine(held_ref, held), per_sample_cosine(eval_ref, out)
        r: dict = {"model": name, "eps": eps, "macs": st["macs_ratio"], "split": st["split"],
                   "held_cos": float(ch.mean()), "held_min": float(ch.min()),
                   "eval_cos": float(ce.mean()), "eval_min": float(ce.min()), "seconds": time.perf_counter() - t0}
        if recognizer:
            lines, _ = read_lines(m, ev["x"], read_charset(shared))
            c, exact = cer(lines, [str(s) for s in ev["y"]])
            r["task"] = ("CER / exact", f"{c:.4f} / {exact:.3f}")
        else:
            acc = eval_metrics(name, eval_ref, out, labels)
            key = next((k for k in ("iou", "recall", "top1") if k in acc), None)
            if key is not None:
                r["task"] = (key, acc[key])
        print(json.dumps(r), flush=True)
        rows.append(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--eps", default="1e-3,1e-2,3e-2")
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    eps = [float(e) for e in args.eps.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for name in args.models.split(",") for r in one(args.shared, name, eps, Path(tmp))]
    t = Table(title="lowrank alone, by whitening shrinkage (fit on 3/4 of calib; held out = the last 1/4)")
    for col in ("model", "ε", "MACs", "split", "held-out cos mean / min", "eval cos mean / min", "eval task"):
        t.add_column(col, justify="right")
    for r in rows:
        task = r.get("task")
        t.add_row(r["model"], f"{r['eps']:g}", f"{r['macs']:.3f}", str(r["split"]), f"{r['held_cos']:.4f} / {r['held_min']:.4f}",
                  f"{r['eval_cos']:.4f} / {r['eval_min']:.4f}",
                  "" if task is None else f"{task[0]} {task[1] if isinstance(task[1], str) else f'{task[1]:.4f}'}")
    Console().print(t)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
