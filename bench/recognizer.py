"""The text recognizer (CNN stem + transformer blocks, CTC) through each pass alone and the
default pipeline: MACs, latency at batch 1 and 8, and what a user reads.

    python bench/recognizer.py [--shared ../shared] [--runs "fuse=canonicalize,fuse;default="]
                               [--rounds 9] [--json out.json] [--keep DIR] [--time-budget S]

Each run is ``onnxcompress.optimize`` on ``ppocrv5_rec.onnx`` with ``ppocrv5_rec_calib.npz``
(``allow_slower``, so a run that does not pay still shows by how much). ``prune mlp`` prunes
the transformer MLPs' hidden channels alone: ratio 0 everywhere but the two MLP groups
(first producers ``MatMul.4`` and ``MatMul.10``, as ``onnxcompress inspect --groups``
lists them), which lose half of their channels. ``prune heads`` removes 2 of the 8 attention
heads in each block alone (the head groups' first producers are the fused QKV MatMuls
``MatMul.0`` and ``MatMul.6``). A run whose passes are ``@labels`` is the default pipeline
judged against the calibration set's labels (``labels="y"``). Accuracy is scored
on ``ppocrv5_rec_eval.npz`` only: CER and exact-line rate against the labels (greedy CTC
over ``ppocrv5_rec_dict.txt``: 0 blank, then the dictionary, then a space), and the
agreement of the decodes with the original model's (1 − edits / characters) and the lines
whose decode differs from the original's. Latency:
``measure_latency`` pairs (original, result), interleaved, ``--rounds`` timings per batch;
median ratio and range.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxcompress as oc  # noqa: E402
from onnxcompress.ctc import edit_distance, greedy_decode, sequence_agreement  # noqa: E402
from onnxcompress.report import count_macs  # noqa: E402
from onnxcompress.runtime import make_session, measure_latency  # noqa: E402
from onnxcompress.shapes import all_shapes  # noqa: E402

DEFAULT_RUNS = ("fuse=canonicalize,fuse;prune=canonicalize,fuse,prune:macs_ratio=0.85;"
                "prune 0.7=canonicalize,fuse,prune:macs_ratio=0.7;"
                r"prune mlp=canonicalize,fuse,prune:ratio=0:overrides=^MatMul\.(4|10)$=0.5;"
                r"prune heads=canonicalize,fuse,prune:ratio=0:overrides=^MatMul\.(0|6)$=0.25;"
                "lowrank=canonicalize,fuse,lowrank:macs_ratio=0.85;"
                "lowrank linear=canonicalize,fuse,lowrank:macs_ratio=0.85:layers=linear;"
                "int8=canonicalize,fuse,int8;default=")


def read_charset(shared: Path) -> list[str]:
    """The recognizer's classes: the blank, ``ppocrv5_rec_dict.txt``'s characters, a space."""
    return ["<blank>"] + (shared / "data" / "ppocrv5_rec_dict.txt").read_text(encoding="utf-8").splitlines() + [" "]


def read_lines(model: onnx.ModelProto, x: np.ndarray, chars: list[str], batch: int = 8) -> tuple[list[str], np.ndarray]:
    """(decoded strings, raw outputs) of the model's first output on ``x``."""
    sess = make_session(model, label="recognizer")
    name = sess.get_inputs()[0].name
    out = np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return ["".join(chars[k] for k in seq) for seq in greedy_decode(out)], out


def cer(pred: list[str], truth: list[str]) -> tuple[float, float]:
    """(character error rate, exact-line rate) of ``pred`` against ``truth``."""
    edits = sum(edit_distance(np.array([ord(c) for c in p]), np.array([ord(c) for c in t]))
                for p, t in zip(pred, truth))
    return edits / max(sum(len(t) for t in truth), 1), float(np.mean([p == t for p, t in zip(pred, truth)]))


def latency(original: onnx.ModelProto, model: onnx.ModelProto, x: np.ndarray, batch: int,
            rounds: int) -> tuple[float, float, float]:
    """(median, min, max) of ``rounds`` interleaved timing ratios at ``batch``."""
    feeds = {original.graph.input[0].name: x[:batch]}
    r = []
    for _ in range(rounds):
        before, after = measure_latency([original, model], feeds, runs=20, min_seconds=0.5)
        r.append(after / before)
    return float(np.median(r)), float(min(r)), float(max(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=os.environ.get("ONNXCOMPRESS_SHARED", str(ROOT.parent / "shared")))
    ap.add_argument("--runs", default=DEFAULT_RUNS,
                    help="'label=passes;…' (empty passes: the default pipeline; '@labels': it, with --labels y)")
    ap.add_argument("--time-budget", type=float, default=300.0, help="the default pipeline's search seconds")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json")
    ap.add_argument("--keep", help="write each run's model into this folder")
    args = ap.parse_args()
    shared = Path(args.shared)
    model_path = shared / "models" / "ppocrv5_rec.onnx"
    calib = shared / "data" / "ppocrv5_rec_calib.npz"
    ev = np.load(shared / "data" / "ppocrv5_rec_eval.npz")
    x, truth = ev["x"], [str(t) for t in ev["y"]]
    chars = read_charset(shared)
    original = onnx.load(str(model_path))
    shapes, _ = all_shapes(original, {original.graph.input[0].name: [1, *x.shape[1:]]})
    base_macs = count_macs(original, shapes)[0]
    ref_lines, ref_out = read_lines(original, x, chars)
    ref_cer, ref_exact = cer(ref_lines, truth)
    rows = [{"run": "original", "macs": 1.0, "cer": ref_cer, "exact": ref_exact, "agree": 1.0, "changed": 0}]
    for item in (r for r in args.runs.split(";") if r.strip()):
        label, _, spec = item.partition("=")
        labels = None
        if spec.strip() == "@labels":  # the default pipeline judged against the calibration labels
            spec, labels = "", "y"
        result, report = oc.optimize(original, passes=spec or None, calibration=str(calib), allow_slower=True,
                                     latency=False, labels=labels,
                                     search=None if spec else oc.SearchOptions(time_budget=args.time_budget))
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            oc.save_model(result, Path(args.keep) / f"{label}.onnx")
        lines, out = read_lines(result, x, chars)
        c, e = cer(lines, truth)
        edits, n, _ = sequence_agreement(ref_out, out)
        r_shapes, _ = all_shapes(result, {result.graph.input[0].name: [1, *x.shape[1:]]})
        row = {"run": label, "passes": spec or "default", "chain": [p.name for p in report.passes if p.modified],
               "macs": count_macs(result, r_shapes)[0] / base_macs, "cer": c, "exact": e, "agree": 1 - edits / n,
               "changed": sum(a != b for a, b in zip(lines, ref_lines))}
        for b in (1, 8):
            row[f"b{b}"] = latency(original, result, x, b, args.rounds)
        rows.append(row)
        Console(stderr=True).print(f"{label}: {row}")
    table = Table(title=f"ppocrv5_rec (eval: {len(x)} lines; latency ratio to the original, median of "
                        f"{args.rounds} interleaved timings, range)")
    for col in ("run", "chain", "MACs", "b1", "b8", "CER", "exact lines", "decodes agree", "lines changed"):
        table.add_column(col)
    for r in rows:
        lat = [f"{r[k][0]:.2f}× ({r[k][1]:.2f}–{r[k][2]:.2f})" if k in r else "1" for k in ("b1", "b8")]
        table.add_row(r["run"], " → ".join(r.get("chain", [])), f"{r['macs']:.3f}", *lat, f"{r['cer']:.4f}",
                      f"{r['exact']:.3f}", f"{r['agree']:.4f}", f"{r['changed']}/{len(x)}")
    Console(width=200).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
