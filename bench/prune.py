"""Pruning figures for issue 3, printed as tables.

    python bench/prune.py [--shared ../shared] [--json out.json] [--skip-structure]

Table 1 (accuracy): for textline_cls and doc_orientation, at the same Conv-MACs budget:
plain L1 pruning without recovery, L1 with recovery, and the default data-driven
pruning (act importance + layer-by-layer least-squares refit). Calibration on
``*_calib.npz`` only; accuracy on ``*_eval.npz`` labels; latency of the pruned model
relative to the original (onnxruntime CPU, batch 8, medians interleaved in one process;
three independent measurements, median ratio and range shown: this machine is noisy).

Table 2 (structure): every model in ../shared/models and the onnx package's light
ResNet-50, DenseNet-121, Inception-v1/v2, ShuffleNet and SqueezeNet (seeded random
weights) pruned at ratio 0.3 without data: onnx.checker, an onnxruntime run, the
channels removed, and the pass's own time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxcompress as oc  # noqa: E402
from _common import check_and_run  # noqa: E402
from onnxcompress.passes.prune import Prune, PruneOptions  # noqa: E402
from onnxcompress.pipeline import PassContext  # noqa: E402
from onnxcompress.registry import build_pipeline  # noqa: E402
from onnxcompress.report import summarize  # noqa: E402
from onnxcompress.validate import measure_latency  # noqa: E402

TARGETS = {  # model: (Conv-MACs budget passed as macs_ratio, goal: max conv MACs ratio, min accuracy)
    "textline_cls": (0.68, 0.70, 0.988),
    "doc_orientation": (0.72, 0.75, 0.98),
}


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    preds = np.concatenate([sess.run(None, {name: x[i : i + 50]})[0].argmax(1) for i in range(0, len(x), 50)])
    return float((preds == y).mean())


def conv_macs(model: onnx.ModelProto, shape: list[int]) -> int:
    s = summarize(model, {model.graph.input[0].name: shape})
    return sum(layer.macs for layer in s.layers if layer.op in ("Conv", "ConvTranspose"))


def accuracy_table(shared: Path, rows: list[dict]) -> Table:
    t = Table(title="prune: accuracy at the same Conv-MACs budget (eval sets)")
    for col in ("model", "method", "Conv MACs", "goal", "accuracy", "goal", "latency b8 (range)", "pass s"):
        t.add_column(col, justify="right")
    for name, (budget, macs_goal, acc_goal) in TARGETS.items():
        ev = np.load(shared / "data" / f"{name}_eval.npz")
        x, y = ev["x"], ev["y"]
        calib = shared / "data" / f"{name}_calib.npz"
        base = oc.load_model(shared / "models" / f"{name}.onnx")
        shape = [1, *x.shape[1:]]
        base_macs = conv_macs(base, shape)
        t.add_row(name, "original (fp32)", f"{base_macs / 1e6:.2f}M", "", f"{accuracy(base, x, y):.4f}", "", "1.000", "")
        methods = [
            ("L1, no recovery", f"prune:macs_ratio={budget}:criterion=l1:recovery=none"),
            ("L1 + lstsq recovery", f"prune:macs_ratio={budget}:criterion=l1:recovery=lstsq"),
            ("act + lstsq (default)", f"prune:macs_ratio={budget}"),
        ]
        for label, spec in methods:
            t0 = time.perf_counter()
            m, rep = oc.optimize(base, spec, calibration=calib, validation=False, latency=False)
            seconds = time.perf_counter() - t0
            macs = conv_macs(m, shape) / base_macs
            acc = accuracy(m, x, y)
            feeds = {base.graph.input[0].name: np.ascontiguousarray(x[:8])}
            ratios = []
            for _ in range(3):  # three independent interleaved measurements; the median ratio is reported
                lat_b, lat_p = measure_latency([base, m], feeds, runs=100, min_seconds=2.0)
                ratios.append(lat_p / lat_b)
            lat_ratio = float(np.median(ratios))
            ok_m, ok_a = macs <= macs_goal, acc >= acc_goal
            t.add_row("", label, f"{macs:.3f}×", f"≤ {macs_goal} {'✓' if ok_m else '✗'}", f"{acc:.4f}",
                      f"≥ {acc_goal} {'✓' if ok_a else '✗'}",
                      f"{lat_ratio:.3f}× ({min(ratios):.2f}–{max(ratios):.2f})", f"{seconds:.1f}")
            rows.append({"table": "accuracy", "model": name, "method": label, "spec": spec, "conv_macs_ratio": macs,
                         "accuracy": acc, "latency_b8_ratio": lat_ratio, "latency_b8_ratios": ratios,
                         "seconds": seconds, "stats": rep.passes[-1].stats})
    return t


def structure_table(shared: Path, rows: list[dict]) -> Table:
    sys.path.insert(0, str(ROOT / "tests"))
    from light import NAMES, realize  # type: ignore[import-not-found]

    t = Table(title="prune ratio=0.3 (no data): every shared model and the onnx light models")
    for col in ("model", "groups (prunable)", "channels removed", "onnx.checker", "onnxruntime", "pass s",
                "blocked by"):
        t.add_column(col)
    models: list[tuple[str, onnx.ModelProto]] = []
    for name in ("textline_cls", "doc_orientation", "text_det", "captcha_det"):
        models.append((name, oc.load_model(shared / "models" / f"{name}.onnx")))
    for name in NAMES:
        models.append((f"light {name}", realize(name, seed=0)))
    for name, m in models:
        canon, _ = build_pipeline("canonicalize").run(m)
        t0 = time.perf_counter()
        res = Prune(PruneOptions(ratio=0.3)).run(copy.deepcopy(canon), PassContext())
        seconds = time.perf_counter() - t0
        checker, runs = check_and_run(res.model)
        st = res.stats
        reasons = ", ".join(f"{k} ×{v}" for k, v in st["blocked_reasons"].items())
        t.add_row(name, f"{st['groups']} ({st['prunable_groups']})", f"{st['channels_removed']}/{st['channels_before']}",
                  checker, runs, f"{seconds:.2f}", reasons[:70])
        rows.append({"table": "structure", "model": name, "checker": checker, "runs": runs, "seconds": seconds,
                     "stats": st})
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("ONNXCOMPRESS_SHARED", ROOT.parent / "shared"))
    ap.add_argument("--shared", type=Path, default=default)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-structure", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    console = Console(width=220)
    rows: list[dict] = []
    if not args.skip_accuracy:
        console.print(accuracy_table(args.shared, rows))
    if not args.skip_structure:
        console.print(structure_table(args.shared, rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
