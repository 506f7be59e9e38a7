"""What the search's structural trials cost, on the shared models: the staged refit
against runs from the model's inputs, lowrank's sensitivity measured from the tensors
before each split against runs from the inputs, and its reuse across budgets.

    python bench/search_costs.py [--shared ../shared] [--models text_det,captcha_det] [--samples 12]

For each model (canonicalize → fuse first): prune at ``--prune`` with the refit staged
(onnxcompress.frontier) and with every level run from the inputs, in one process, their
seconds and the largest output difference (graph optimizations off, the first
calibration batch); lowrank at the first ``--lowrank`` budget with each candidate split
measured from the tensors before it and from the inputs (fresh contexts): seconds, and
whether the ranks chosen and the models are the same; then lowrank at each of ``--lowrank`` budgets with one pass context,
and the last budget again with a fresh context: seconds, layers reused, and whether the
two models are byte-identical.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxcompress.fitting as fitting  # noqa: E402
from onnxcompress.data import LimitedSource, open_data  # noqa: E402
from onnxcompress.pipeline import PassContext  # noqa: E402
from onnxcompress.registry import build_pipeline  # noqa: E402
from onnxcompress.runtime import make_session  # noqa: E402
from onnxcompress.sensitivity import OutputDamage  # noqa: E402


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = make_session(model, optimize=False)  # feeds are in the model's layout already
    return sess.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})


def refit_stages(base: onnx.ModelProto, calib, spec: str, feeds: dict[str, np.ndarray]) -> str:
    staged_cls = fitting.Frontier
    got = {}
    for mode in ("staged", "from inputs"):
        fitting.Frontier = staged_cls if mode == "staged" else (lambda *a, **k: None)  # type: ignore[assignment]
        try:
            t = time.perf_counter()
            got[mode] = (build_pipeline(spec).run(copy.deepcopy(base), PassContext(calibration=calib))[0],
                         time.perf_counter() - t)
        finally:
            fitting.Frontier = staged_cls  # type: ignore[assignment]
    a, b = (_outputs(got[m][0], feeds) for m in ("staged", "from inputs"))
    diff = max(float(np.abs(x - y).max() / max(float(y.max() - y.min()), 1e-12)) for x, y in zip(a, b))
    return f"{spec}: staged {got['staged'][1]:.1f} s, from inputs {got['from inputs'][1]:.1f} s, max |Δ|/range {diff:.1e}"


def sensitivity_staging(base: onnx.ModelProto, calib, ratio: float) -> str:
    staged = OutputDamage._from_first_change
    got = {}
    for mode in ("staged", "from inputs"):
        if mode != "staged":
            OutputDamage._from_first_change = lambda *a, **k: None  # type: ignore[method-assign]
        try:
            t = time.perf_counter()
            model, reps = build_pipeline(f"lowrank:macs_ratio={ratio}").run(copy.deepcopy(base),
                                                                           PassContext(calibration=calib))
            got[mode] = (model, [(la.get("node"), la.get("rank"), la.get("decision")) for la in reps[-1].stats["layers"]],
                         time.perf_counter() - t)
        finally:
            OutputDamage._from_first_change = staged  # type: ignore[method-assign]
    (a, ra, ta), (b, rb, tb) = got["staged"], got["from inputs"]
    return (f"lowrank {ratio} sensitivity: staged {ta:.1f} s, from inputs {tb:.1f} s, same ranks: {ra == rb}, "
            f"byte-identical: {a.SerializeToString() == b.SerializeToString()}")


def sensitivity_reuse(base: onnx.ModelProto, calib, ratios: list[float]) -> list[str]:
    ctx = PassContext(calibration=calib)
    lines, last = [], None
    for r in ratios:
        t = time.perf_counter()
        last, reps = build_pipeline(f"lowrank:macs_ratio={r}").run(copy.deepcopy(base), ctx)
        st = reps[-1].stats
        lines.append(f"lowrank {r}: {time.perf_counter() - t:.1f} s, sensitivity reused for "
                     f"{st.get('sensitivity_reused', 0)} layers, MACs {st['macs_ratio']}")
    t = time.perf_counter()
    fresh, _ = build_pipeline(f"lowrank:macs_ratio={ratios[-1]}").run(copy.deepcopy(base), PassContext(calibration=calib))
    same = last is not None and fresh.SerializeToString() == last.SerializeToString()
    lines.append(f"lowrank {ratios[-1]}, fresh context: {time.perf_counter() - t:.1f} s, byte-identical: {same}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--models", default="text_det,captcha_det,ppocrv5_rec,doc_orientation,wakeword_embed")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--prune", type=float, default=0.85)
    ap.add_argument("--lowrank", default="0.85,0.7,0.65")
    args = ap.parse_args()
    shared = Path(args.shared)
    for name in args.models.split(","):
        base, _ = build_pipeline("canonicalize,fuse").run(onnx.load(shared / "models" / f"{name}.onnx"))
        path = shared / "data" / f"{name}_calib.npz"
        calib = LimitedSource(open_data(path, base), args.samples)
        feeds = PassContext(calibration=calib).calibration_sample() or {}
        print(f"== {name}")
        print("  " + refit_stages(base, calib, f"prune:macs_ratio={args.prune}", feeds), flush=True)
        print("  " + sensitivity_staging(base, calib, float(args.lowrank.split(",")[0])), flush=True)
        for line in sensitivity_reuse(base, calib, [float(r) for r in args.lowrank.split(",")]):
            print("  " + line, flush=True)


if __name__ == "__main__":
    main()
