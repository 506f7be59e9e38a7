"""How the passes scale with the node count, on synthetic chains.

    python bench/scale.py [--blocks 1000,4000] [--passes canonicalize,fuse]
    python bench/scale.py --kind convs --blocks 200,400 --passes "prune:macs_ratio=0.85"

Each block is Conv → Mul (a per-channel constant fuse folds) → Relu → Identity → residual
Add, so a model of B blocks has 5·B nodes: B Identity nodes for canonicalize to remove and
B affine folds for fuse. ``--kind convs``: B blocks of 32-channel 3×3 Conv → Relu and no
residual, so prune and lowrank have B layers to cut and refit on 16 seeded calibration
samples (each pass then runs through ``optimize``, without validation or timing). Prints
each pass's seconds per size; a pass whose time grows with the square of the size shows
it here first. Seeded weights; no timing of the model.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import build_pipeline, optimize


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], last: str, channels: int,
           name: str) -> onnx.ModelProto:
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    shape = ["N", channels, 4, 4]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def chain(blocks: int, channels: int = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(blocks):
        w = (rng.standard_normal((channels, channels, 1, 1)) * 0.3).astype(np.float32)
        s = np.full((1, channels, 1, 1), 1.0 + 0.01 * i, np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(s, f"s{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"]),
                  helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"]),
                  helper.make_node("Identity", [f"r{i}"], [f"i{i}"]),
                  helper.make_node("Add", [f"i{i}", prev], [f"a{i}"])]
        prev = f"a{i}"
    return _model(nodes, inits, prev, channels, "chain")


def convs(blocks: int, channels: int = 32) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(blocks):
        w = (rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
        b = (rng.standard_normal(channels) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev = f"r{i}"
    return _model(nodes, inits, prev, channels, "convs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", default="1000,4000")
    ap.add_argument("--passes", default="canonicalize,fuse")
    ap.add_argument("--kind", choices=["chain", "convs"], default="chain")
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((1, 32, 4, 4)).astype(np.float32)} for _ in range(16)]
    print(f"{'blocks':>7} {'nodes':>7}  " + "  ".join(f"{p:>14}" for p in args.passes.split(",")) + "  nodes after")
    for blocks in (int(b) for b in args.blocks.split(",")):
        model = chain(blocks) if args.kind == "chain" else convs(blocks)
        nodes = len(model.graph.node)
        seconds = []
        for spec in args.passes.split(","):
            start = time.perf_counter()
            if args.kind == "chain":
                model, _ = build_pipeline(spec).run(model)
            else:
                model, _ = optimize(model, spec, calibration=calib, validation=False, latency=False)
            seconds.append(time.perf_counter() - start)
        print(f"{blocks:>7} {nodes:>7}  " + "  ".join(f"{s:>13.1f}s" for s in seconds) + f"  {len(model.graph.node)}")


if __name__ == "__main__":
    main()
