"""Foundation figures on the real models: canonicalize via the CLI path, validated on eval.

    python bench/foundation.py [--shared ../shared] [--json out.json]

For each model in ../shared/models: run ``optimize --passes canonicalize --calib
<model>_calib.npz`` (the library call behind the CLI), then compare original and output
on ``<model>_eval.npz`` and print one table row: MACs, parameters, nodes before/after,
Constant/Identity removed, latency (batch 1, median, interleaved in one process) and the
worst output error relative to the output range on the eval set (goal ≤ 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import onnxcompress as oc

MODELS = ["textline_cls", "doc_orientation", "text_det", "captcha_det"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("ONNXCOMPRESS_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
    ap.add_argument("--shared", type=Path, default=default)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not (args.shared / "models").is_dir():
        print(f"no models in {args.shared}/models", file=sys.stderr)
        return 2
    rows = []
    table = Table(title="canonicalize on ../shared (eval sets)")
    for col in ("model", "MACs/sample", "params", "nodes", "Constant/Identity removed", "latency ms b1 (orig → new)",
                "ratio", "eval samples", "max err / range", "goal ≤ 1e-4", "tool s"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            model = args.shared / "models" / f"{name}.onnx"
            out = Path(tmp) / f"{name}.onnx"
            t0 = time.perf_counter()
            _, rep = oc.optimize(model, "canonicalize", calibration=args.shared / "data" / f"{name}_calib.npz",
                                 output=out, latency_runs=50)
            seconds = time.perf_counter() - t0
            check = oc.validate_models(model, out, args.shared / "data" / f"{name}_eval.npz",
                                       thresholds=oc.Thresholds(rel_range=1e-4))
            worst = max(o.metrics["rel_range"] for o in check.outputs)
            st = rep.passes[0].stats
            lat = rep.latency
            assert lat is not None
            row = {
                "model": name, "macs": rep.before.macs, "macs_after": rep.after.macs, "params": rep.before.params,
                "nodes_before": rep.before.nodes, "nodes_after": rep.after.nodes,
                "constants": st["constants_to_initializers"], "identities": st["identities_removed"],
                "latency_before_ms": lat.before_ms, "latency_after_ms": lat.after_ms, "latency_ratio": lat.ratio,
                "eval_samples": check.samples, "max_rel_range": worst, "passed": check.passed, "seconds": seconds,
            }
            rows.append(row)
            table.add_row(name, f"{rep.before.macs:,}" + ("" if rep.after.macs == rep.before.macs else " (changed!)"),
                          f"{rep.before.params:,}", f"{rep.before.nodes} → {rep.after.nodes}",
                          f"{st['constants_to_initializers']} / {st['identities_removed']}",
                          f"{lat.before_ms:.2f} → {lat.after_ms:.2f}", f"{lat.ratio:.3f}", str(check.samples),
                          f"{worst:.2e}", "pass" if check.passed else "FAIL", f"{seconds:.1f}")
    Console(width=200).print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
