"""Every pass alone, and the default pipeline, on every model we can find: no internal
error, exact passes exact, nothing written slower than the model as given.

    python bench/zoo.py [--shared ../shared] [--groups shared,light,edge,wheels] [--models a,b] [--runs fuse,default]
                        [--time-budget 300] [--json out.json]

Models: the seven in ``../shared/models`` (calibrated on ``*_calib.npz``); the onnx
package's light architectures with seeded weights (``tests/light.py``) and seeded random
inputs; generated edge cases (fp16 weights, an already-quantized model, If/Loop
subgraphs, an NHWC TensorFlow-style export, opsets 7 and 21, a model over 2 GB in
external data, a multi-input model with scalar and state inputs); with ``--groups wheels``,
the trained models public pip wheels bundle (``bench/wheels.py``; fetched once, needs a
registry).

Runs per model: ``--passes canonicalize``, ``fuse``, ``prune``, ``lowrank``, ``int8``
(each after canonicalize, at its defaults) and the default pipeline (``--calib`` only),
each as its own ``onnxcompress optimize`` process with a JSON report. The table shows
the exit code (1 = internal error: the one outcome that must never happen), for exact
passes the largest error relative to an output's range, the worst mean cosine of an
output, and for written outputs the latency ratio against the model as given: timed here
in one process, interleaved, at batch 1 (the model's batch where it is fixed), 3
measurements of at least 9 rounds each; the median and the range. Refusals show their
one line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUNS = {
    "canonicalize": "canonicalize",
    "fuse": "canonicalize,fuse",
    "prune": "canonicalize,prune",
    "lowrank": "canonicalize,lowrank",
    "int8": "canonicalize,int8",
    "default": None,
}
EXACT_RUNS = {"canonicalize", "fuse"}
SHARED = ["textline_cls", "doc_orientation", "text_det", "captcha_det", "ppocrv5_rec", "wakeword_embed",
          "melspectrogram"]


# ----------------------------------------------------------------------------- edge cases


def nhwc_tf() -> onnx.ModelProto:
    """A TensorFlow-style export: NHWC input, Transpose to NCHW around each Conv, LeakyRelu, MatMul head."""
    from onnx import helper, numpy_helper

    from tests.builders import fvi, make_model

    rng = np.random.default_rng(11)

    def t(name: str, shape: tuple[int, ...], s: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)

    nodes = [helper.make_node("Transpose", ["x"], ["xc"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["xc", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("LeakyRelu", ["c1"], ["r1"], alpha=0.2),
             helper.make_node("Transpose", ["r1"], ["r1h"], perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["r1h"], ["r1c"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["r1c", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("LeakyRelu", ["c2"], ["r2"], alpha=0.2),
             helper.make_node("MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Transpose", ["p"], ["ph"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["ph", "flat"], ["f"]),
             helper.make_node("MatMul", ["f", "wf"], ["y"])]
    inits = [t("w1", (16, 1, 3, 3)), t("b1", (16,), 0.1), t("w2", (32, 16, 3, 3), 0.1), t("b2", (32,), 0.1),
             numpy_helper.from_array(np.array([-1, 16 * 8 * 32], np.int64), "flat"), t("wf", (16 * 8 * 32, 24), 0.02)]
    return make_model(nodes, [fvi("x", ["N", 32, 16, 1])], [fvi("y", ["N", 24])], inits)


def over_2gb(folder: Path) -> Path:
    """Two 1.1 GB MatMul weights in external data (tests/test_large.py's model)."""
    from onnx import helper

    from tests.builders import fvi, make_model
    from tests.test_large import K, N, _external

    path = folder / "big.onnx"
    with open(folder / "big.data", "wb") as f:
        inits = []
        for i, name in enumerate(("w1", "w2")):
            w = np.full((K, N), 0.25 * (i + 1), dtype=np.float32)
            w[:, ::1000] = np.arange(K, dtype=np.float32)[:, None]
            inits.append(_external(name, w, f, "big.data"))
            del w
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    onnx.save(make_model(nodes, [fvi("x", [1, K])], [fvi("y", [1, N])], inits), str(path))
    return path


def edge_cases() -> dict[str, Callable[[], onnx.ModelProto]]:
    from tests import test_corpus as corpus
    from tests.test_data import _vad_model

    return {"fp16_weights": lambda: corpus.conv_net(13, onnx.TensorProto.FLOAT16),
            "already_quantized": corpus.already_qdq, "if_subgraph": corpus.with_if, "loop_subgraph": corpus.with_loop,
            "nhwc_tf": nhwc_tf, "opset7": lambda: corpus.conv_net(7), "opset21": lambda: corpus.conv_net(21),
            "scalar_and_state_inputs": _vad_model}


def random_calib(model: onnx.ModelProto, path: Path, samples: int = 16) -> None:
    """Seeded random samples in the model's layout (dynamic dims: 1 on the batch axis, else 32)."""
    from onnxcompress.data import input_specs

    rng = np.random.default_rng(0)
    arrays = {}
    for sp in input_specs(model):
        sample = [d if isinstance(d, int) else 32 for d in sp.sample_shape]
        if sp.batch_axis is None:
            arrays[sp.name] = (np.array(16000, sp.dtype) if not sample else np.zeros(sample, sp.dtype))
            continue
        n = sp.static_batch or samples
        shape = sample[:sp.batch_axis] + [n] + sample[sp.batch_axis:]
        arr = rng.standard_normal(shape)
        arrays[sp.name] = arr.astype(sp.dtype) if np.issubdtype(sp.dtype, np.floating) else arr.astype(np.int64)
    np.savez(path, **arrays)


# ----------------------------------------------------------------------------- running


def prepare(group: str, name: str, shared: Path, work: Path) -> tuple[Path, Path]:
    """(model path, calibration path) of one zoo model."""
    if group == "shared":
        return shared / "models" / f"{name}.onnx", shared / "data" / f"{name}_calib.npz"
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    if name == "over_2gb":
        path = over_2gb(d)
        model = onnx.load(str(path), load_external_data=False)
    else:
        if group == "light":
            from tests.light import realize

            model = realize(name)
        else:
            model = edge_cases()[name]()
        path = d / "in.onnx"
        onnx.save(model, str(path))
    calib = d / "calib.npz"
    random_calib(model, calib, samples=2 if name == "over_2gb" else 16)
    return path, calib


def time_pair(src: Path, out: Path, calib: Path, rounds: int = 9, repeats: int = 3,
              axes: dict[str, int | None] | None = None) -> tuple[float, float, float]:
    """Latency of ``out`` over ``src`` (median, low, high over ``repeats`` interleaved
    measurements); ``axes``: batch axes as ``--batch-axis`` gives them."""
    from onnxcompress.data import batch_axes, batch_of, first_batch, open_data
    from onnxcompress.model import load_model
    from onnxcompress.validate import measure_latency

    a, b = load_model(src), load_model(out)
    ratios = []
    with batch_axes(axes):  # the feeds are laid out for the model while the axes hold
        feeds = batch_of(first_batch(open_data(calib, a, batch_size=1)), 1, a)
        for _ in range(repeats):
            t_a, t_b = measure_latency([a, b], feeds, runs=rounds * 5, min_seconds=0.5)
            ratios.append(t_b / t_a)
    return float(np.median(ratios)), min(ratios), max(ratios)


def run_one(src: Path, calib: Path, run: str, work: Path, time_budget: float, timeout: float = 1500,
            timed: bool = True, axes: dict[str, int] | None = None) -> dict:
    out, rep = work / f"{run}.onnx", work / f"{run}.json"
    for p in (out, rep):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "onnxcompress.cli", "optimize", str(src), str(out), "--calib", str(calib),
           "--report", str(rep), "-q", *(a for k, v in (axes or {}).items() for a in ("--batch-axis", f"{k}={v}"))]
    if RUNS[run] is not None:
        cmd += ["--passes", RUNS[run]]
    else:
        cmd += ["--time-budget", str(time_budget)]
    if "over_2gb" in str(src):
        cmd += ["--val-limit", "2", "--no-latency"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        code, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        code, err = -1, f"timed out after {timeout:.0f} s"
    row: dict = {"run": run, "exit": code, "seconds": round(time.perf_counter() - t0, 1)}
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code != 0:
        row["message"] = lines[-1][:240] if lines else ""
        row["one_line"] = len([ln for ln in lines if ln.startswith("error:")]) == 1
    if rep.exists():
        r = json.loads(rep.read_text())
        outs = (r.get("validation") or {}).get("outputs") or []
        if outs:
            row["rel_range"] = max(o["metrics"]["rel_range"] for o in outs)
            row["cosine"] = min(o["metrics"]["cosine_mean"] for o in outs)
        row["fallback"] = r.get("fallback")
        row["passes"] = [p["name"] for p in r.get("passes", []) if p.get("modified")]
    if timed and code == 0 and out.exists() and "over_2gb" not in str(src):
        same = onnx.load(str(out)).SerializeToString() == onnx.load(str(src)).SerializeToString()
        row["identical"] = same  # the model as given, written back: its latency is the original's
        row["latency"] = (1.0, 1.0, 1.0) if same else time_pair(src, out, calib, axes=dict(axes or {}))
    for p in work.glob(f"{run}.onnx*"):
        p.unlink()
    return row


def _cell(row: dict) -> str:
    if row["exit"] == 1:
        return f"**1 internal**: {row.get('message', '')[:80]}"
    if row["exit"] not in (0,):
        return f"{row['exit']}: {row.get('message', '')[:70]}"
    parts = []
    if row["run"] in EXACT_RUNS and "rel_range" in row:
        parts.append(f"err {row['rel_range']:.1e}")
    elif "cosine" in row:
        parts.append(f"cos {row['cosine']:.4f}")
    if "latency" in row:
        med, lo, hi = row["latency"]
        if not row.get("identical"):
            parts.append(f"{med:.2f}× ({lo:.2f}–{hi:.2f})")
    if row.get("identical"):
        parts.append("the model as given")
    return "0 " + ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("ONNXCOMPRESS_SHARED", ROOT.parent / "shared")))
    ap.add_argument("--groups", default="shared,light,edge")
    ap.add_argument("--models", default="", help="only these models (comma-separated)")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--time-budget", type=float, default=300.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from tests.light import NAMES as LIGHT

    import wheels

    models = {"shared": SHARED, "light": LIGHT, "edge": [*edge_cases(), "over_2gb"], "wheels": list(wheels.MODELS)}
    wanted = set(filter(None, args.models.split(",")))
    runs = args.runs.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        for group in args.groups.split(","):
            for name in models[group]:
                if wanted and name not in wanted:
                    continue
                work = Path(tmp) / name
                work.mkdir(parents=True, exist_ok=True)
                axes: dict[str, int] = {}
                if group == "wheels":
                    src, calib, axes = wheels.prepare(name, args.shared, Path(tmp) / "models" / name)
                else:
                    src, calib = prepare(group, name, args.shared, Path(tmp) / "models")
                for run in runs:
                    if name == "over_2gb" and run != "canonicalize":
                        continue  # 2.2 GB of weights: loading, canonicalizing and writing are what it checks
                    row = {"group": group, "model": name,
                           **run_one(src, calib, run, work, args.time_budget, axes=axes)}
                    rows.append(row)
                    print(f"{name} {run}: exit {row['exit']} ({row['seconds']} s) {_cell(row)}", file=sys.stderr,
                          flush=True)
                    if args.json:
                        args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows, runs)


def print_table(rows: list[dict], runs: list[str]) -> None:
    print("| model | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for name in dict.fromkeys(r["model"] for r in rows):
        cells = {r["run"]: _cell(r) for r in rows if r["model"] == name}
        print(f"| {name} | " + " | ".join(cells.get(run, "") for run in runs) + " |")
    internal = [r for r in rows if r["exit"] == 1]
    inexact = [r for r in rows if r["run"] in EXACT_RUNS and r["exit"] == 0 and r.get("rel_range", 0) > 1e-4]
    slower = [r for r in rows if "latency" in r and r["latency"][0] > 1.0]
    multi = [r for r in rows if r["exit"] in (2, 3) and not r.get("one_line")]
    print(f"\n{len(rows)} runs: {len(internal)} internal errors, {len(inexact)} exact runs over 1e-4, "
          f"{len(slower)} written outputs with median latency > 1.00×, {len(multi)} refusals not on one line")


if __name__ == "__main__":
    main()
