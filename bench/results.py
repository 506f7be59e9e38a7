"""The README's results: every shared model through each pass alone, the default pipeline,
and onnxruntime's quantize_static, side by side.

    python bench/results.py [--shared ../shared] [--models a,b] [--readme README.md] [--out docs/results]

One subprocess per model. Rows: the original; ``fuse``, ``prune``, ``lowrank`` and ``int8``
alone at their defaults; the default pipeline (``optimize`` without ``--passes``: the search within
the default budget); ``quantize_static`` (QDQ, per-channel int8 weights; per tensor where
its per-channel model does not load) with MinMax and Entropy calibration, int8 and uint8
activations. Every tool gets the same calibration samples (``*_calib.npz``); everything
is scored on ``*_eval.npz``, which no tool sees.

Columns: file size, MACs per sample, onnxruntime CPU latency at batch 1 and 8 as a ratio
to the original (each variant timed against the original in one ``measure_latency`` call:
interleaved ABBA rounds, medians), accuracy (classifiers: top-1 against the labels and
agreement with the original; captcha_det: mean cosine, the worst column's cosine over
all eval images (objectness, box coordinates and class scores are separate columns of its
[N, rows, 6] table; pooled over the images, see ``onnxcompress.metrics.column_cosine``),
and recall and precision of the original's detections; text_det: mean cosine and IoU of
the p > 0.3 text masks), whether the default pipeline's default budget holds on the eval
set (judged by the library's ``default_thresholds(0.01)`` and ``judge``, as the search
judges its trials: classifiers top-1 agreement ≥ 0.99 — the search's extra class-score
cosine ≥ 0.999 is a proxy for flips its few held-out samples cannot show, so it is left
out on the eval set; captcha_det mean cosine ≥ 0.99 over the table and for each column;
text_det mean cosine ≥ 0.99), and the tool's own run time.

``--readme`` rewrites the block between ``<!-- results:begin -->`` and
``<!-- results:end -->`` with one row per model (the default pipeline); ``--out``
(docs/results) receives results.json and the default pipeline's trial plots
(<model>_search.png, drawn from results.json), and the page beside it (docs/results.md)
every row. ``--models``
re-runs some models and keeps the others' rows from the existing results.json
(``--models ""`` only redraws the table, plots and README block from it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import onnx

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["textline_cls", "doc_orientation", "captcha_det", "text_det"]
CLASSIFIERS = ("textline_cls", "doc_orientation")
#: the issue's speed goal per model: (batch, largest latency ratio)
SPEED_GOAL = {"textline_cls": (8, 1 / 1.3), "doc_orientation": (8, 1 / 1.3), "captcha_det": (1, 0.5),
              "text_det": (1, 0.5)}
ORT_ROWS = [("quantize_static MinMax, int8 act", "MinMax", "int8"), ("quantize_static MinMax, uint8 act", "MinMax", "uint8"),
            ("quantize_static Entropy, int8 act", "Entropy", "int8"), ("quantize_static Entropy, uint8 act", "Entropy", "uint8")]


def worker(shared: Path, name: str, out_dir: Path) -> dict:
    import numpy as np
    import onnx

    sys.path.insert(0, str(ROOT))
    import onnxcompress as oc
    from _common import quantize_static_variant, run_batch
    from onnxcompress.validate import measure_latency

    path = shared / "models" / f"{name}.onnx"
    calib_path = shared / "data" / f"{name}_calib.npz"
    calib = np.load(calib_path)["x"]
    ev = np.load(shared / "data" / f"{name}_eval.npz")
    x_eval, labels = ev["x"], (ev["y"] if "y" in ev.files else None)
    fp32 = onnx.load(str(path))
    inp = fp32.graph.input[0].name
    bs = run_batch(fp32)
    rows: dict[str, dict] = {}
    models: dict[str, onnx.ModelProto] = {"original": fp32}
    rows["original"] = {"seconds": None, "note": ""}

    for label, passes in (("fuse", "fuse"), ("prune", "prune"), ("lowrank", "lowrank"), ("int8", "int8")):
        t0 = time.perf_counter()
        m, rep = oc.optimize(path, passes, calibration=calib_path, batch_size=bs, validation=False, latency=False)
        step = rep.passes[-1]
        note = step.stats.get("summary") or (f"{step.stats['hardswish_fused']} hard-swish chains fused"
                                             if label == "fuse" else "")
        rows[label] = {"seconds": time.perf_counter() - t0, "note": str(note)}
        models[label] = m

    t0 = time.perf_counter()
    m, rep = oc.optimize(path, calibration=calib_path, batch_size=bs, latency=False)
    s = rep.search
    chosen = s.chosen
    rows["default pipeline"] = {
        "seconds": time.perf_counter() - t0,
        "note": f"{len(s.trials)} trials in {s.seconds:.0f} s, chose #{chosen.index}: "
                + (" → ".join(p.name for p in rep.passes[1:]) if len(rep.passes) > 1 else "the input, unchanged"),
        "search": s.to_dict()}
    models["default pipeline"] = m

    for label, method, act in ORT_ROWS:
        models[label], seconds, note = quantize_static_variant(path, calib, bs, act, method)
        rows[label] = {"seconds": seconds, "note": note}

    _score(name, fp32, models, rows, x_eval, labels, bs)
    heavy = name == "text_det"
    for batch in ([1] if bs == 1 else [1, 8]):
        feeds = {inp: np.ascontiguousarray(x_eval[:batch])}
        for label, m in models.items():
            if label == "original":
                rows[label][f"b{batch}"] = 1.0
                continue
            t_ref, t_new = measure_latency([fp32, m], feeds, threads=2, runs=5 if heavy and batch > 1 else 20,
                                           min_seconds=0.5 if heavy and batch > 1 else 1.5, labels=["original", label])
            rows[label][f"b{batch}"] = t_new / t_ref
            rows["original"][f"b{batch}_ms"] = t_ref
    import platform

    import onnxruntime

    versions = {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
                "python": platform.python_version(), "cpus": os.cpu_count()}
    return {"model": name, "rows": rows, "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M")}


def _score(name: str, fp32: onnx.ModelProto, models: dict[str, onnx.ModelProto], rows: dict[str, dict],
           x_eval: np.ndarray, labels: np.ndarray | None, bs: int) -> None:
    """Each variant's eval accuracy, whether the default budget holds on the eval set, its
    size and MACs, into ``rows``."""
    from _common import eval_metrics, run_batched
    from onnxcompress.model import serialized_size
    from onnxcompress.report import count_macs
    from onnxcompress.search import default_thresholds
    from onnxcompress.validate import OutputStats, judge

    inp = fp32.graph.input[0].name
    ref = run_batched(fp32, x_eval, bs)
    out = fp32.graph.output[0].name
    budget = default_thresholds(0.01, {out: ref[:1]})[out]
    if budget.top1 is not None:  # class scores: the held-out cosine proxy is not the budget
        budget = budget.updated(cosine=None)
    shapes = {inp: [1, *x_eval.shape[1:]]}
    for label, m in models.items():
        y = run_batched(m, x_eval, bs)
        acc = rows[label]["accuracy"] = eval_metrics(name, ref, y, labels)
        stats = OutputStats(out)
        stats.update(ref, y)
        metrics = stats.metrics()
        if "feature_cosine_min" in metrics:
            acc["column_cosine_min"] = metrics["feature_cosine_min"]
        acc["budget_failures"] = judge(out, metrics, budget)
        rows[label]["size"] = serialized_size(m)
        try:
            rows[label]["macs"] = count_macs(m, shapes)[0]
        except Exception:  # a quantized graph whose shapes cannot be inferred: MACs unknown
            rows[label]["macs"] = None


def run_worker(shared: Path, name: str, out_dir: Path) -> dict:
    res = subprocess.run([sys.executable, __file__, "--worker", name, "--shared", str(shared), "--out", str(out_dir)],
                         capture_output=True, text=True, timeout=7200)
    if res.returncode != 0:
        return {"model": name, "error": res.stderr.strip().splitlines()[-3:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _within_budget(name: str, acc: dict) -> bool:
    return not acc["budget_failures"]


def _acc_text(name: str, acc: dict) -> str:
    if name in CLASSIFIERS:
        return f"top-1 {acc['top1']:.3f}, agreement {acc['agreement']:.3f}"
    if name == "captcha_det":
        prec = f", precision {acc['precision']:.3f}" if "precision" in acc else ""
        return (f"cos {acc['cosine']:.4f} (worst column {acc['column_cosine_min']:.4f}), "
                f"recall {acc['recall']:.3f}{prec}")
    return f"cos {acc['cosine']:.4f}, IoU {acc['iou']:.3f}"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        name = r["model"]
        if "error" in r:
            lines += [f"**{name}**: error: {' '.join(r['error'])}", ""]
            continue
        rows = r["rows"]
        orig = rows["original"]
        goal_b, goal = SPEED_GOAL[name]
        ort_best = min(rows[k].get(f"b{goal_b}", rows[k]["b1"]) for k, _, _ in ORT_ROWS)
        ms = ", ".join(f"b{b} {orig[f'b{b}_ms']:.2f} ms" for b in (1, 8) if f"b{b}_ms" in orig)
        v = r.get("versions")
        run = (f"; measured {r.get('date', '?')} with onnxruntime {v['onnxruntime']}, onnx {v['onnx']}, "
               f"numpy {v['numpy']}, {v['cpus']} CPUs") if v else ""
        lines += [f"**{name}** (original: {ms}{run})", "",
                  "| variant | size | MACs | latency b1 | latency b8 | accuracy (eval) | budget | tool time |",
                  "|---|---:|---:|---:|---:|---|:-:|---:|"]
        for label, d in rows.items():
            macs = f"{d['macs'] / orig['macs']:.2f}×" if d.get("macs") and orig.get("macs") else "—"
            b8 = f"{d['b8']:.2f}×" if "b8" in d else "—"
            secs = f"{d['seconds']:.0f} s" if d.get("seconds") is not None else ""
            ok = "✓" if _within_budget(name, d["accuracy"]) else "✗"
            bold = "**" if label == "default pipeline" else ""
            lines.append(f"| {bold}{label}{bold} | {_size(d['size'])} | {macs} | {d['b1']:.2f}× | {b8} | "
                         f"{_acc_text(name, d['accuracy'])} | {ok} | {secs} |")
        dp = rows["default pipeline"]
        got = dp.get(f"b{goal_b}", dp["b1"])
        versus = ("beaten ✓" if got < ort_best * 0.98 else "not beaten ✗" if got > ort_best * 1.02
                  else f"{'ahead' if got < ort_best else 'behind'} by less than 2%, within timing noise")
        lines += ["", f"Default pipeline: {dp['note']}. Speed-up at batch {goal_b}: {1 / got:.3f}× "
                      f"(goal ≥ {1 / goal:.1f}×: {'✓' if got <= goal else '✗'}); quantize_static's best: "
                      f"{1 / ort_best:.3f}× ({versus}); "
                      f"budget on the eval set: {'✓' if _within_budget(name, dp['accuracy']) else '✗'}.",
                  "", f"![{name} search trials](results/{name}_search.png)", ""]
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    """The README's table: the default pipeline's row per model, against the original."""
    lines = ["| model | size | MACs | latency b1 | latency b8 | accuracy (eval) | budget | quantize_static's best |",
             "|---|---:|---:|---:|---:|---|:-:|---:|"]
    dates = sorted({r.get("date", "?")[:10] for r in results if "rows" in r})
    for r in results:
        name = r["model"]
        if "rows" not in r:
            lines.append(f"| {name} | error: {' '.join(r.get('error', []))} | | | | | | |")
            continue
        rows = r["rows"]
        orig, dp = rows["original"], rows["default pipeline"]
        goal_b, _ = SPEED_GOAL[name]
        ort_best = min(rows[k].get(f"b{goal_b}", rows[k]["b1"]) for k, _, _ in ORT_ROWS)
        macs = f"{dp['macs'] / orig['macs']:.2f}×" if dp.get("macs") and orig.get("macs") else "—"
        b8 = f"{dp['b8']:.2f}×" if "b8" in dp else "—"
        ok = "✓" if _within_budget(name, dp["accuracy"]) else "✗"
        lines.append(f"| {name} | {_size(orig['size'])} → {_size(dp['size'])} | {macs} | {dp['b1']:.2f}× | {b8} | "
                     f"{_acc_text(name, dp['accuracy'])} | {ok} | {ort_best:.2f}× (b{goal_b}) |")
    versions = next((r["versions"] for r in results if r.get("versions")), None)
    run = (f" with onnxruntime {versions['onnxruntime']} on {versions['cpus']} CPUs" if versions else "")
    lines += ["", f"Latency and MACs as a ratio to the original (lower is faster); measured {', '.join(dates)}{run}."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("ONNXCOMPRESS_SHARED", ROOT.parent / "shared")))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--readme", type=Path)
    ap.add_argument("--worker")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        print(json.dumps(worker(args.shared, args.worker, args.out), default=str))
        return 0
    results = []
    previous = {}
    if (args.out / "results.json").exists():  # keep the other models' rows when re-running some
        previous = {r["model"]: r for r in json.loads((args.out / "results.json").read_text())}
    for name in [m for m in args.models.split(",") if m]:  # --models "": redraw from results.json only
        print(f"{name} ...", file=sys.stderr, flush=True)
        previous[name] = run_worker(args.shared, name, args.out)
    results = [previous[m] for m in MODELS if m in previous]
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    sys.path.insert(0, str(ROOT))
    from onnxcompress.plot import plot_search

    for r in results:  # the trial plots, drawn from the JSON (so they always match it)
        if "rows" in r:
            plot_search(r["rows"]["default pipeline"]["search"], args.out / f"{r['model']}_search.png",
                        title=f"{r['model']}.onnx")
    md = markdown(results)
    page = args.out.parent / "results.md"
    method = (__doc__ or "").split("\n\n", 2)[2].split("``--readme``")[0].strip().replace("``", "`")
    page.write_text("# Results on the shared models\n\n<!-- generated by bench/results.py; do not edit -->\n\n"
                    "Produced by `python bench/results.py --readme README.md`. " + method + "\n\n" + md + "\n")
    print(md)
    if args.readme:
        text = args.readme.read_text()
        begin, end = "<!-- results:begin -->", "<!-- results:end -->"
        if begin not in text or end not in text:
            print(f"{args.readme}: no {begin} … {end} block", file=sys.stderr)
            return 1
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        stamp = time.strftime("%Y-%m-%d")
        args.readme.write_text(f"{head}{begin}\n<!-- generated by bench/results.py on {stamp}; do not edit -->\n\n"
                               f"{summary(results)}\n{end}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
