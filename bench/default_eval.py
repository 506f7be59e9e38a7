"""The default pipeline on a shared model, judged on its eval set and timed against the
model as given.

    python bench/default_eval.py [--shared ../shared] [--models ppocrv5_rec,wakeword_embed] [--json out.json]

For each model: ``onnxcompress.optimize(model, calibration=*_calib.npz)`` (the search at
its defaults); then on ``*_eval.npz``, which the search never sees: the default budget
(``search.default_thresholds(0.01)`` judged as the search judges a trial), mean cosine,
and for ppocrv5_rec the CTC greedy decode against the labels (character error rate,
exact lines) for both models; latency at batch 1 and 8 against the model as given,
interleaved in one process (``measure_latency``, ≥ 9 rounds), 3 measurements: the
median ratio and the range. One subprocess per model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ctc_decode(scores, charset: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    """Greedy CTC: argmax per step, repeats merged, blanks (index 0) dropped."""
    out = []
    for row in scores.argmax(-1):
        chars, prev = [], 0
        for k in row:
            if k != prev and k != 0:
                chars.append(charset[k - 1] if k - 1 < len(charset) else "")
            prev = k
        out.append("".join(chars))
    return out


def _edits(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_scores(texts: list[str], labels) -> dict:  # type: ignore[no-untyped-def]
    labels = [str(t) for t in labels]
    errors = sum(_edits(t, y) for t, y in zip(texts, labels))
    return {"cer": errors / max(sum(len(y) for y in labels), 1),
            "exact": sum(t == y for t, y in zip(texts, labels)) / len(labels)}


def worker(shared: Path, name: str) -> dict:
    import numpy as np
    import onnx

    sys.path.insert(0, str(ROOT))
    import onnxcompress as oc
    from onnxcompress.data import batch_of
    from onnxcompress.search import default_thresholds
    from onnxcompress.validate import OutputStats, judge, make_session, measure_latency, run_session

    path = shared / "models" / f"{name}.onnx"
    model = onnx.load(str(path))
    result, rep = oc.optimize(model, calibration=shared / "data" / f"{name}_calib.npz", latency=False)
    chosen = rep.search.chosen
    ev = np.load(shared / "data" / f"{name}_eval.npz")
    x = ev["x"]
    sa, sb = make_session(model), make_session(result)
    inp = sa.get_inputs()[0].name
    ref = np.concatenate([run_session(sa, {inp: x[i:i + 8]})[0] for i in range(0, len(x), 8)])
    new = np.concatenate([run_session(sb, {inp: x[i:i + 8]})[0] for i in range(0, len(x), 8)])
    stats = OutputStats(sa.get_outputs()[0].name)
    for i in range(0, len(x), 8):
        stats.update(ref[i:i + 8], new[i:i + 8])
    m = stats.metrics()
    t = default_thresholds(0.01, {stats.name: ref[:1]})[stats.name]
    row: dict = {"model": name, "passes": [p.name for p in rep.passes if p.modified],
                 "chosen": f"#{chosen.index} {chosen.stage} {chosen.setting}", "fallback": rep.fallback,
                 "cosine": m["cosine_mean"], "budget_failures": judge(stats.name, m, t),
                 "search_seconds": round(rep.search.seconds, 1)}
    if "y" in ev.files and name == "ppocrv5_rec":
        charset = (shared / "data" / "ppocrv5_rec_dict.txt").read_text(encoding="utf-8").splitlines() + [" "]
        row["fp32"] = text_scores(ctc_decode(ref, charset), ev["y"])
        row["optimized"] = text_scores(ctc_decode(new, charset), ev["y"])
    pool = {inp: x[:8]}
    for b in (1, 8):
        feeds = batch_of(pool, b, model)
        ratios = []
        for _ in range(3):
            t_a, t_b = measure_latency([model, result], feeds, runs=45, min_seconds=1.0)
            ratios.append(t_b / t_a)
        row[f"latency_b{b}"] = [float(np.median(ratios)), min(ratios), max(ratios)]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("ONNXCOMPRESS_SHARED", ROOT.parent / "shared")))
    ap.add_argument("--models", default="ppocrv5_rec,wakeword_embed")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.shared, args.worker)))
        return
    rows = []
    for name in args.models.split(","):
        proc = subprocess.run([sys.executable, __file__, "--shared", str(args.shared), "--worker", name],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"{name}: worker failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print("| model | answer | eval: default budget | eval cosine | text (fp32 → optimized) | latency b1 | latency b8 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        text = (f"CER {r['fp32']['cer']:.4f} → {r['optimized']['cer']:.4f}, exact {r['fp32']['exact']:.3f} → "
                f"{r['optimized']['exact']:.3f}" if "fp32" in r else "")
        lat = {b: f"{r[f'latency_b{b}'][0]:.3f}× ({r[f'latency_b{b}'][1]:.3f}–{r[f'latency_b{b}'][2]:.3f})"
               for b in (1, 8)}
        budget = "holds" if not r["budget_failures"] else "; ".join(r["budget_failures"])
        print(f"| {r['model']} | {', '.join(r['passes']) or 'the model as given'} ({r['chosen']}) | {budget} | "
              f"{r['cosine']:.5f} | {text} | {lat[1]} | {lat[8]} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
