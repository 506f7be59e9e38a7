"""Calibration cost for issue 5: onnxcompress KL (streaming) vs onnxruntime's Entropy.

    python bench/int8_calibration.py [--shared ../shared] [--json out.json] [--repeat 3]

Each measurement runs in a fresh subprocess, ``--repeat`` (3) times per side and model,
and reports the medians of the wall time of the calibration step and of the process's peak RSS (ru_maxrss, imports and model included; the RSS right
before calibration is shown too). Both sides see the same samples (``*_calib.npz``), fed the same batches (8 samples; 1 for captcha_det, whose batch
dimension is fixed at 1), read from the npz before the clock starts on either side:

* onnxcompress: what the int8 pass does — canonicalize and prepare (BN/affine folding),
  then one session exposing every tensor its widest QDQ placement could quantize, 2048-bin
  streaming histograms of every value (exact min/max; binned by a worker thread beside
  the session where a sub-batch's activations fit in 256 MB) and per-channel mean
  squares, KL thresholds;
* onnxruntime: ``create_calibrator(..., CalibrationMethod.Entropy)`` at its defaults
  (what quantize_static runs: every tensor of the op types it quantizes),
  ``collect_data`` + ``compute_data``.

A second table checks that our peak RSS does not grow with the number of samples:
captcha_det with 32 and 256 samples (the 32 calibration images cycled).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["textline_cls", "doc_orientation", "text_det", "captcha_det"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


BATCH = 8


def _calibration_set(shared: Path, name: str, graph_input) -> tuple:
    """The calibration images and the batch size (BATCH; 1 for a model whose input
    ``graph_input`` has a fixed batch dimension of 1). Read before either side's clock
    starts: reading the npz (0.04–0.24 s) is not calibration, and it would weigh on the
    faster side's ratio."""
    import numpy as np

    x = np.load(shared / "data" / f"{name}_calib.npz")["x"]
    fixed = graph_input.type.tensor_type.shape.dim[0].dim_value
    return x, (1 if fixed == 1 else BATCH)


def _batches(x, b: int, samples: int):
    """``samples`` images of ``x`` (cycled if needed; 0 = all) in batches of ``b``."""
    import numpy as np

    samples = samples or len(x)
    idx = np.arange(samples) % len(x)
    for i in range(0, samples, b):
        yield x[idx[i : i + b]]


def worker(side: str, shared: Path, name: str, samples: int) -> dict:
    import onnx

    sys.path.insert(0, str(ROOT))
    model_path = shared / "models" / f"{name}.onnx"
    graph_input = onnx.load(str(model_path), load_external_data=False).graph.input[0]
    input_name = graph_input.name
    if side == "ours":
        import onnxcompress as oc
        from onnxcompress.data import open_data
        from onnxcompress.passes.int8 import Int8, Int8Options, qdq
        from onnxcompress.passes.int8 import ranges as derived
        from onnxcompress.passes.int8.calibration import collect_histograms
        from onnxcompress.passes.int8.thresholds import tensor_range
        from onnxcompress.pipeline import PassContext
        from onnxcompress.registry import build_pipeline

        model, _ = build_pipeline("canonicalize").run(oc.load_model(model_path))
        # what the int8 pass calibrates: every tensor its widest placement could quantize,
        # with per-channel mean squares for the accuracy control
        p = Int8(Int8Options())
        ctx = PassContext(calibration=open_data(shared / "data" / f"{name}_calib.npz", model, limit=1))
        state = p._prepare(model, ctx, p.options, {})
        widest = qdq.plan(state.model, state.allowed)
        names = derived.calibrated_tensors(widest.tensors, state.derived)
        x, b = _calibration_set(shared, name, graph_input)
        base = _rss_mb()
        t0 = time.perf_counter()
        hists = collect_histograms(state.model, names, ({input_name: v} for v in _batches(x, b, samples)),
                                   channels=True, functions=derived.pushed_forward(state.derived, names))
        ranges = {n: tensor_range(h, "kl", kl_guard=p.options.kl_guard) for n, h in hists.items()}
        seconds = time.perf_counter() - t0
        return {"side": side, "model": name, "samples": samples, "tensors": len(ranges), "seconds": seconds,
                "rss_before_mb": base, "peak_rss_mb": _rss_mb()}
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    x, b = _calibration_set(shared, name, graph_input)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = ({input_name: v} for v in _batches(x, b, samples))

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        base = _rss_mb()
        t0 = time.perf_counter()
        cal = create_calibrator(str(model_path), None, augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                calibrate_method=CalibrationMethod.Entropy)
        cal.collect_data(Reader())
        ranges = cal.compute_data()
        seconds = time.perf_counter() - t0
    count = len(ranges.data) if hasattr(ranges, "data") else len(list(ranges.keys()))
    return {"side": side, "model": name, "samples": samples, "tensors": count, "seconds": seconds,
            "rss_before_mb": base, "peak_rss_mb": _rss_mb()}


def run_worker(side: str, shared: Path, name: str, samples: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", side, "--model", name, "--samples", str(samples),
                          "--shared", str(shared)], capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        return {"side": side, "model": name, "samples": samples, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _secs(r: dict) -> str:
    runs = r.get("runs", [])
    return f"{r['seconds']:.1f}" + (f" [{', '.join(f'{v:.1f}' for v in runs)}]" if len(runs) > 1 else "")


def run_repeated(side: str, shared: Path, name: str, samples: int, repeat: int) -> dict:
    """:func:`run_worker` ``repeat`` times (fresh processes); the median seconds and peak
    RSS, with every run's seconds under ``runs`` (onnxruntime's Entropy time on captcha_det
    varied 12–19 s from run to run on this machine)."""
    import statistics

    runs = [run_worker(side, shared, name, samples) for _ in range(max(1, repeat))]
    bad = [r for r in runs if "error" in r]
    if bad:
        return bad[0]
    out = dict(runs[0])
    out["seconds"] = statistics.median(r["seconds"] for r in runs)
    out["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in runs)
    out["runs"] = [round(r["seconds"], 2) for r in runs]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("ONNXCOMPRESS_SHARED", ROOT.parent / "shared")))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", choices=["ours", "ort"])
    ap.add_argument("--model")
    ap.add_argument("--samples", type=int, default=0)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeat", type=int, default=3, help="runs per side and model; medians are reported")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.shared, args.model, args.samples)))
        return 0
    from rich.console import Console
    from rich.table import Table

    import numpy as np

    rows = []
    t = Table(title="calibration of all float activations: onnxcompress KL vs onnxruntime Entropy (same samples; "
                    f"medians of {args.repeat} runs each, seconds of every run in brackets)")
    for col in ("model", "samples", "tensors (ours/ort)", "ours s", "ort s", "time ratio", "goal ≤ 0.2",
                "ours peak RSS MB", "ort peak RSS MB", "RSS ratio", "goal ≤ 0.2"):
        t.add_column(col, justify="right")
    for name in args.models.split(","):
        n = len(np.load(args.shared / "data" / f"{name}_calib.npz")["x"])
        ours = run_repeated("ours", args.shared, name, n, args.repeat)
        ort_ = run_repeated("ort", args.shared, name, n, args.repeat)
        rows += [ours, ort_]
        if "error" in ours or "error" in ort_:
            t.add_row(name, str(n), "error", str(ours.get("error", "")), str(ort_.get("error", "")), "", "", "", "", "", "")
            continue
        tr = ours["seconds"] / ort_["seconds"]
        rr = ours["peak_rss_mb"] / ort_["peak_rss_mb"]
        t.add_row(name, str(n), f"{ours['tensors']}/{ort_['tensors']}", _secs(ours), _secs(ort_),
                  f"{tr:.3f}", "✓" if tr <= 0.2 else "✗", f"{ours['peak_rss_mb']:.0f} ({ours['rss_before_mb']:.0f} before)",
                  f"{ort_['peak_rss_mb']:.0f} ({ort_['rss_before_mb']:.0f} before)", f"{rr:.2f}", "✓" if rr <= 0.2 else "✗")
    console = Console(width=220)
    console.print(t)
    g = Table(title="onnxcompress KL calibration memory vs number of samples (captcha_det)")
    for col in ("samples", "seconds", "peak RSS MB", "growth vs 32", "goal < 10%"):
        g.add_column(col, justify="right")
    base = None
    for n in (32, 256):
        r = run_worker("ours", args.shared, "captcha_det", n)
        rows.append(r)
        if "error" in r:
            g.add_row(str(n), "error", str(r["error"]), "", "")
            continue
        base = base or r["peak_rss_mb"]
        growth = r["peak_rss_mb"] / base - 1
        g.add_row(str(n), f"{r['seconds']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{growth:+.1%}", "✓" if growth < 0.1 else "✗")
    console.print(g)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
