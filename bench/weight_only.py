"""Weight-only int8 linear layers on the text recognizer: onnxruntime's ``MatMulNBits``
(com.microsoft; 8-bit codes in blocks along K with one scale per block, symmetric, the
bias added inside) in place of fuse's Gemm, for the classifier head alone and for every
linear layer. Not a pass: a measurement of whether it would pay (docs/decisions/hybrids.md).

    python bench/weight_only.py [--shared ../shared] [--rounds 9] [--block 32]

The start is the default pipeline's exact answer (``canonicalize,fuse``). ``accuracy
level`` 0 dequantizes the weights and multiplies in float; 4 also quantizes the input
rows to int8 per block and multiplies in int8. Latency: ``measure_latency`` of the
original and every variant interleaved in one call per round at batch 1 and 8, the
median ratio to the original and the range. Accuracy on ``ppocrv5_rec_eval.npz``: the
eval lines whose greedy decode differs from the original's, CER and exact lines against
the labels.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from recognizer import cer, read_charset, read_lines  # noqa: E402

from onnxcompress.graph import graph_index  # noqa: E402
from onnxcompress.registry import build_pipeline  # noqa: E402
from onnxcompress.runtime import measure_latency  # noqa: E402


def weight_only(model: onnx.ModelProto, names: set[str], block: int, accuracy_level: int) -> onnx.ModelProto:
    """``model`` with each Gemm named in ``names`` (no transposes, a constant [K, N]
    weight and [N] bias, between fuse's Reshapes) as one MatMulNBits on the sequence."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits, readers, _ = graph_index(g)
    made_by = {o: n for n in g.node for o in n.output}
    replace: dict[int, onnx.NodeProto] = {}
    drop: set[int] = set()
    for n in g.node:
        if n.op_type != "Gemm" or n.name not in names:
            continue
        rows, after = made_by[n.input[0]], readers[n.output[0]][0]  # Reshape to rows, Reshape back
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        k, m = w.shape
        blocks = -(-k // block)
        wt = np.pad(w.T, ((0, 0), (0, blocks * block - k))).reshape(m, blocks, block)
        scale = np.abs(wt).max(axis=2) / 127
        scale[scale == 0] = 1.0
        codes = (np.clip(np.round(wt / scale[..., None]), -127, 127) + 128).astype(np.uint8)
        g.initializer.extend([numpy_helper.from_array(codes, f"{n.name}_codes"),
                              numpy_helper.from_array(scale.astype(np.float32).reshape(-1), f"{n.name}_scales")])
        replace[id(after)] = helper.make_node(
            "MatMulNBits", [rows.input[0], f"{n.name}_codes", f"{n.name}_scales", "", "", n.input[2]],
            list(after.output), name=n.name, domain="com.microsoft", K=k, N=m, bits=8, block_size=block,
            accuracy_level=accuracy_level)
        drop |= {id(n), id(rows)}
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=os.environ.get("ONNXCOMPRESS_SHARED", str(ROOT.parent / "shared")))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--block", type=int, default=32)
    args = ap.parse_args()
    shared = Path(args.shared)
    original = onnx.load(shared / "models" / "ppocrv5_rec.onnx")
    fused, _ = build_pipeline("canonicalize,fuse").run(original)
    linear = {n.name for n in fused.graph.node if n.op_type == "Gemm"}
    head = max(linear, key=lambda name: next(int(np.prod(t.dims)) for n in fused.graph.node if n.name == name
                                             for t in fused.graph.initializer if t.name == n.input[1]))
    variants = {"fuse (the default's answer)": fused}
    for level in (0, 4):
        variants[f"head, accuracy level {level}"] = weight_only(fused, {head}, args.block, level)
    variants["every linear layer, accuracy level 4"] = weight_only(fused, linear, args.block, 4)
    chars = read_charset(shared)
    ev = np.load(shared / "data" / "ppocrv5_rec_eval.npz")
    labels = [str(s) for s in ev["y"]]
    ref, _ = read_lines(original, ev["x"], chars)
    x = np.load(shared / "data" / "ppocrv5_rec_calib.npz")["x"]
    models = list(variants.values())
    ratios: dict[int, np.ndarray] = {}
    for b in (1, 8):
        feeds = {original.graph.input[0].name: x[:b]}
        rounds = []
        for _ in range(args.rounds):
            t = measure_latency([original, *models], feeds, runs=10, min_seconds=0.3)
            rounds.append([v / t[0] for v in t[1:]])
        ratios[b] = np.array(rounds)
    print(f"ppocrv5_rec, weight-only int8 (block {args.block}); latency ratio to the original, "
          f"median of {args.rounds} interleaved rounds (range)")
    print("| variant | b1 | b8 | eval lines changed | CER | exact lines |")
    print("|---|---|---|---|---|---|")
    for i, (name, model) in enumerate(variants.items()):
        lines, _ = read_lines(model, ev["x"], chars)
        changed = sum(a != b for a, b in zip(ref, lines))
        acc = cer(lines, labels)
        cells = [f"{np.median(ratios[b][:, i]):.3f}× ({ratios[b][:, i].min():.2f}–{ratios[b][:, i].max():.2f})"
                 for b in (1, 8)]
        print(f"| {name} | {cells[0]} | {cells[1]} | {changed}/{len(ref)} | {acc[0]:.4f} | {acc[1]:.3f} |")


if __name__ == "__main__":
    main()
