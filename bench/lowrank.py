"""Low-rank figures for issue 4, printed as tables.

    python bench/lowrank.py [--shared ../shared] [--budget 0.75] [--json out.json]

1. Exactness: each conv geometry split at full rank vs the original conv
   (max abs error / output range; goal ≤ 1e-4).
2. captcha_det.onnx at a whole-model MACs budget: pure SVD split, with the
   least-squares refit, and the default (whitened SVD + refit) (calibration on
   captcha_det_calib.npz; scored on captcha_det_eval.npz): total MACs, mean cosine to
   the original output, objectness recall (original score > 0.3 kept > 0.3),
   onnxruntime CPU latency at batch 1 (median ratio of three interleaved measurements).
3. Every shared model and the light ResNet-50 / Inception-v1/v2: through the pass
   (energy 0.9), onnx.checker and an onnxruntime run.
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
sys.path.insert(0, str(ROOT / "tests"))

import onnxcompress as oc  # noqa: E402
from _common import check_and_run  # noqa: E402
from onnxcompress.passes.lowrank import LowRank, LowRankOptions, split_layer  # noqa: E402
from onnxcompress.pipeline import PassContext  # noqa: E402
from onnxcompress.registry import build_pipeline  # noqa: E402
from onnxcompress.validate import measure_latency  # noqa: E402


def _run(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def exactness(rows: list[dict]) -> Table:
    from tests.test_lowrank import CASES, conv_model

    t = Table(title="lowrank: full-rank chain vs original conv")
    for col in ("case", "max |err| / range", "goal ≤ 1e-4"):
        t.add_column(col)
    for name, kw in CASES.items():
        m = conv_model(**kw)
        split = split_layer(copy.deepcopy(m), "conv")
        errs = []
        for seed in range(3):
            x = np.random.default_rng(seed).standard_normal((1, 6, 13, 17)).astype(np.float32)
            ref, out = _run(m, {"x": x}), _run(split, {"x": x})
            errs.append(float(np.abs(out - ref).max() / (ref.max() - ref.min())))
        e = max(errs)
        t.add_row(name, f"{e:.2e}", "✓" if e <= 1e-4 else "✗")
        rows.append({"table": "exactness", "case": name, "rel_err": e})
    return t


def captcha(shared: Path, budget: float, rows: list[dict]) -> Table:
    x = np.load(shared / "data" / "captcha_det_eval.npz")["x"]
    calib = shared / "data" / "captcha_det_calib.npz"
    base = oc.load_model(shared / "models" / "captcha_det.onnx")

    def outputs(m: onnx.ModelProto) -> np.ndarray:
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {"images": x[i : i + 1]})[0] for i in range(len(x))])

    ref = outputs(base)
    t = Table(title=f"lowrank on captcha_det (macs_ratio={budget}; eval set)")
    for col in ("method", "MACs", "goal ≤ 0.75", "mean cosine", "goal ≥ 0.99", "objectness recall", "goal ≥ 0.95",
                "latency b1 (range)", "goal ≤ 0.85", "pass s"):
        t.add_column(col, justify="right")
    for label, spec in (("pure SVD split", f"lowrank:macs_ratio={budget}:refit=none:experimental.whiten=false"),
                        ("SVD + least-squares refit", f"lowrank:macs_ratio={budget}:experimental.whiten=false"),
                        ("whitened SVD + refit (default)", f"lowrank:macs_ratio={budget}")):
        t0 = time.perf_counter()
        m, rep = oc.optimize(base, spec, calibration=calib, validation=False, latency=False)
        seconds = time.perf_counter() - t0
        out = outputs(m)
        a, b = ref.reshape(len(x), -1), out.reshape(len(x), -1)
        cos = float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))
        pos = ref[..., 4] > 0.3
        recall = float((out[..., 4][pos] > 0.3).mean())
        ratios = []
        for _ in range(3):
            lb, lp = measure_latency([base, m], {"images": x[:1]}, runs=30, min_seconds=2.0)
            ratios.append(lp / lb)
        lat = float(np.median(ratios))
        st = rep.passes[-1].stats
        t.add_row(label, f"{st['macs_ratio']:.3f}×", "✓" if st["macs_ratio"] <= 0.75 else "✗", f"{cos:.4f}",
                  "✓" if cos >= 0.99 else "✗", f"{recall:.3f}", "✓" if recall >= 0.95 else "✗",
                  f"{lat:.3f}× ({min(ratios):.2f}–{max(ratios):.2f})", "✓" if lat <= 0.85 else "✗", f"{seconds:.0f}")
        rows.append({"table": "captcha_det", "method": label, "spec": spec, "macs_ratio": st["macs_ratio"],
                     "cosine": cos, "recall": recall, "latency_b1_ratio": lat, "latency_ratios": ratios,
                     "seconds": seconds, "split": st["split"], "layers": st["layers"]})
    return t


def structure(shared: Path, rows: list[dict]) -> Table:
    from light import realize  # type: ignore[import-not-found]

    t = Table(title="lowrank: every shared model (energy=0.9) and light ResNet-50 / Inception (rank=16; random "
                    "weights have flat spectra, so an energy target keeps them whole)")
    for col in ("model", "split / candidates", "MACs", "onnx.checker", "onnxruntime"):
        t.add_column(col)
    models = [(n, oc.load_model(shared / "models" / f"{n}.onnx"))
              for n in ("textline_cls", "doc_orientation", "text_det", "captcha_det")]
    models += [(f"light {n}", realize(n)) for n in ("resnet50", "inception_v1", "inception_v2")]
    for name, m in models:
        canon, _ = build_pipeline("canonicalize").run(m)
        opts = LowRankOptions(rank=16) if name.startswith("light") else LowRankOptions(energy=0.9)
        res = LowRank(opts).run(canon, PassContext())
        checker, runs = check_and_run(res.model)
        st = res.stats
        t.add_row(name, f"{st['split']}/{st['candidates']}", f"{st['macs_ratio']:.3f}×", checker, runs)
        rows.append({"table": "structure", "model": name, "split": st["split"], "candidates": st["candidates"],
                     "macs_ratio": st["macs_ratio"], "checker": checker, "runs": runs})
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("ONNXCOMPRESS_SHARED", ROOT.parent / "shared")))
    ap.add_argument("--budget", type=float, default=0.75)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-captcha", action="store_true")
    args = ap.parse_args()
    console = Console(width=220)
    rows: list[dict] = []
    console.print(exactness(rows))
    if not args.skip_captcha:
        console.print(captcha(args.shared, args.budget, rows))
    console.print(structure(args.shared, rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
