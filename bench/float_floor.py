"""Is an exact rewrite's error at the model's float32 floor? Prints, relative to the output
range, how far each rewrite moves each output from the model as given, with onnxruntime's
graph optimizations off and on, next to two floors: onnxruntime's own optimizations on the
unmodified model, and every float weight tensor of rank ≥ 2 (after canonicalize, which makes constants
initializers) moved by one ulp in a seeded random direction.

    python bench/float_floor.py MODEL.onnx CALIB.npz [--passes "fuse;canonicalize"] [--samples 32]

Each spec in ``--passes`` is a pipeline (``build_pipeline``: canonicalize first), run
with no data.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcompress.data import input_specs
from onnxcompress.registry import build_pipeline
from onnxcompress.runtime import make_session, run_session

LEVELS = ("off", "on")  # onnxruntime's graph optimizations


def outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray], level: str) -> list[np.ndarray]:
    s = make_session(model, optimize=level == "on")
    n = next(iter(feeds.values())).shape[0]
    step = 1 if any(i.shape and i.shape[0] == 1 for i in s.get_inputs()) else 8
    runs = [run_session(s, {k: v[i:i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
    return [np.concatenate([r[j] for r in runs]) for j in range(len(runs[0]))]


def one_ulp(model: onnx.ModelProto) -> onnx.ModelProto:
    m = copy.deepcopy(model)
    rng = np.random.default_rng(0)
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.ndim >= 2:  # weights, not scales or shapes
            away = np.where(rng.random(a.shape) < 0.5, np.inf, -np.inf).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(np.nextafter(a, away).astype(np.float32), t.name))
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("--passes", default="fuse")
    ap.add_argument("--samples", type=int, default=32)
    args = ap.parse_args()
    model = onnx.load(args.model)
    specs = input_specs(model)
    with np.load(args.calib) as z:
        keys = [s.name for s in specs] if all(s.name in z for s in specs) else list(z.keys())
        feeds = {s.name: z[k][:args.samples] for s, k in zip(specs, keys)}
    ref = {lvl: outputs(model, feeds, lvl) for lvl in LEVELS}
    spans = [float(r.max() - r.min()) or 1.0 for r in ref["off"]]

    def show(label: str, m: onnx.ModelProto | None) -> None:
        cells = []
        for lvl in LEVELS:
            got = ref["on"] if m is None else outputs(m, feeds, lvl)
            base = ref["off"] if m is None else ref[lvl]
            cells.append(max(float(np.abs(g - b).max()) / s for g, b, s in zip(got, base, spans)))
            if m is None:
                break
        print(f"{label:40s} " + "  ".join(f"{c:.2e}" for c in cells))

    print(f"{'max |Δ| / output range':40s} {'opt off':>8}  {'opt on':>8}")
    show("onnxruntime's optimizations (original)", None)
    show("every weight moved one ulp", one_ulp(build_pipeline("canonicalize").run(copy.deepcopy(model))[0]))
    for spec in args.passes.split(";"):
        show(spec, build_pipeline(spec).run(copy.deepcopy(model))[0])


if __name__ == "__main__":
    main()
