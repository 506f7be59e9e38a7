"""int8 across CPU kinds: accuracy of int8 models built for each target, run as this CPU
runs them and as x86 without VNNI runs them (emulated saturating u8·s8 pairs).

    python bench/int8_isa.py [--shared ../shared] [--models captcha_det,text_det] [--targets portable,vnni]

For each model and target: ``canonicalize,int8:target=T`` at the pass's defaults,
calibrated on ``*_calib.npz``; scored on ``*_eval.npz`` against the fp32 model
(bench/_common.eval_metrics: captcha_det recall/precision of the fp32 detections and
cosine, text_det mask IoU and cosine), once in onnxruntime on this CPU and once through
:func:`onnxcompress.emulate.run_saturating`. One subprocess per (model, target).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"captcha_det": "recall ≥ 0.95, cosine ≥ 0.995", "text_det": "mask IoU ≥ 0.95"}


def worker(shared: Path, name: str, target: str) -> dict:
    import numpy as np
    import onnx

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from _common import eval_metrics, run_batch, run_batched

    from onnxcompress import isa
    from onnxcompress.data import open_data
    from onnxcompress.emulate import run_saturating
    from onnxcompress.pipeline import PassContext
    from onnxcompress.registry import build_pipeline

    path = shared / "models" / f"{name}.onnx"
    model = onnx.load(str(path))
    batch = run_batch(model)
    ctx = PassContext(calibration=open_data(shared / "data" / f"{name}_calib.npz", model, batch_size=batch))
    t0 = time.perf_counter()
    q, reports = build_pipeline(f"canonicalize,int8:target={target}").run(model, ctx)
    seconds = time.perf_counter() - t0
    stats = reports[-1].stats
    x = np.load(shared / "data" / f"{name}_eval.npz")["x"]
    ref = run_batched(model, x, batch)
    here = eval_metrics(name, ref, run_batched(q, x, batch), None)
    inp = q.graph.input[0].name
    emu_out, runs, saturated = [], 0, 0
    t1 = time.perf_counter()
    for i in range(0, len(x), batch):
        out, info = run_saturating(q, {inp: x[i:i + batch]})
        emu_out.append(out[0])
        runs, saturated = max(runs, info["runs"]), max(saturated, info["saturated_layers"])
    emulated = eval_metrics(name, ref, np.concatenate(emu_out), None)
    return {"model": name, "target": target, "host": isa.describe_host(), "decision": stats.get("decision"),
            "weight_bits": stats.get("target", {}).get("weight_bits"), "summary": stats.get("summary"),
            "build_seconds": round(seconds, 1), "emulation_seconds": round(time.perf_counter() - t1, 1),
            "risky_pairs": info["risky_pairs"], "saturated_layers": saturated, "emulation_runs": runs,
            "here": here, "emulated": emulated}


def _fmt(acc: dict) -> str:
    keys = [k for k in ("recall", "precision", "iou", "cosine") if k in acc]
    return ", ".join(f"{k} {acc[k]:.4f}" for k in keys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("ONNXCOMPRESS_SHARED", ROOT.parent / "shared")))
    ap.add_argument("--models", default="captcha_det,text_det")
    ap.add_argument("--targets", default="portable,vnni")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.shared, *args.worker)))
        return
    rows = []
    for name in args.models.split(","):
        for target in args.targets.split(","):
            proc = subprocess.run([sys.executable, __file__, "--shared", str(args.shared), "--worker", name, target],
                                  capture_output=True, text=True)
            if proc.returncode:
                print(f"{name} {target}: worker failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{name} {target}: done ({row['build_seconds']} s build, {row['emulation_seconds']} s emulation)",
                  file=sys.stderr)
    print(f"host: {rows[0]['host'] if rows else '?'}")
    print("| model | target | weight bits | int8? | this CPU | emulated x86 without VNNI | saturating layers | goal |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['target']} | {r['weight_bits']} | {r['decision']} | {_fmt(r['here'])} | "
              f"{_fmt(r['emulated'])} | {r['saturated_layers']} ({r['risky_pairs']} risky pairs) | "
              f"{GOALS.get(r['model'], '')} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
