"""Where int8 error lives on an input with a constant region (letterbox pad), and how
stable it is: a diagnostic behind issue 5's captcha_det figures.

    python bench/int8_flat.py [--shared ../shared] [--model captcha_det] [--pad 114]
                              [--images 4] [--nudge-conv NAME] [--nudge 1e-3]

captcha_det's inputs are letterboxed top-left into 416×416 with the value 114, so about
60% of every image is one constant colour. In float, each tensor there is one constant
vector per image region; in int8 that vector is rounded the same way at every position,
so its error is coherent (a k×k conv adds its 9·C copies up instead of averaging them
out) and it moves with the exact rounding of a few constants.

The script builds the fully int8 model (``int8:max_drop=0:guard=false`` without the
bias/head corrections, so that nothing compensates) and a twin whose one Conv
(``--nudge-conv``, default the fifth) has its dequantized weights scaled by
``1 + --nudge``, then prints, for tensors spread over the graph, the relative error
against the float model inside the constant region and outside it, on ``--images``
eval images (onnxruntime with graph optimizations off, so the Q/DQ tensors exist), and
each output column's cosine over the eval set (optimizations on).

Measured 2026-11-24 on captcha_det (``--tensors 507,552,606,1000,1093``, Conv_53 nudged
by 1e-3, 4 images): at tensor 606 (stride 16) the int8 model's error was 0.108 in the
pad and 0.061 in the content, the nudged twin's 0.768 and 0.065; the same jump (0.08 →
0.45 over the whole tensor) came with that Conv's exact float weights or 5% of its int8
weights moved by one step, while nearest or GPTQ rounding stayed at 0.08. Output
columns on the eval set: int8 box w/h 0.9996/0.9995, objectness 0.9884; nudged
0.9819/0.9791 and 0.9889. (Float weights in the first 12 Convs, by hand: objectness
0.929 on the eval set, 0.922 on the calibration set.) The pad's state is the same on
every image, so the accuracy control's check samples see it; it is why configurations
a rounding apart can score far apart, and why the cuts and methods of session 20 came
out in a noise-like order.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _session(model: onnx.ModelProto, names: list[str]) -> ort.InferenceSession:
    """Unoptimized (the Q/DQ tensors exist), with ``names`` as extra outputs."""
    from onnxcompress.model import with_outputs
    from onnxcompress.validate import make_session

    return make_session(with_outputs(model, names), optimize=False, label="int8_flat")


def nudged(model: onnx.ModelProto, conv: str, factor: float) -> onnx.ModelProto:
    """``model`` with Conv ``conv``'s dequantized weights times ``factor``, as a float initializer."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    node = next((n for n in m.graph.node if n.name == conv and n.op_type == "Conv"), None)
    if node is None or node.input[1] not in prod or prod[node.input[1]].op_type != "DequantizeLinear":
        raise SystemExit(f"{conv}: not a Conv with a DequantizeLinear weight in the int8 model")
    dq = prod[node.input[1]]
    q, s = init[dq.input[0]].astype(np.float32), init[dq.input[1]]
    w = q * (s.reshape(-1, *[1] * (q.ndim - 1)) if s.ndim else s)
    name = f"{conv}_weight_nudged"
    m.graph.initializer.append(numpy_helper.from_array((w * factor).astype(np.float32), name))
    node.input[1] = name
    return m


def region_errors(ref: list[list[np.ndarray]], model: onnx.ModelProto, names: list[str], x: np.ndarray,
                  masks: list[np.ndarray]) -> list[tuple[float, float]]:
    """Per tensor, (relative error inside the constant region, outside it) over the images."""
    sess = _session(model, names)
    acc = np.zeros((len(names), 4))
    for i in range(len(x)):
        outs = sess.run(names, {sess.get_inputs()[0].name: x[i : i + 1]})
        for j, (r, q) in enumerate(zip(ref[i], outs)):
            if r.ndim != 4:
                continue
            h, w = r.shape[2:]
            fh, fw = masks[i].shape[0] // h, masks[i].shape[1] // w
            flat = masks[i][: h * fh, : w * fw].reshape(h, fh, w, fw).all((1, 3))
            d, e = ((q - r) ** 2).sum(1)[0], (r**2).sum(1)[0]
            acc[j] += [d[flat].sum(), e[flat].sum(), d[~flat].sum(), e[~flat].sum()]
    return [(float(np.sqrt(a / max(b, 1e-30))), float(np.sqrt(c / max(d, 1e-30)))) for a, b, c, d in acc]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("ONNXCOMPRESS_SHARED", ROOT.parent / "shared")))
    ap.add_argument("--model", default="captcha_det")
    ap.add_argument("--pad", type=float, default=114.0, help="value of the constant region in the input")
    ap.add_argument("--images", type=int, default=4, help="eval images for the per-region errors")
    ap.add_argument("--nudge-conv", default="", help="Conv whose weights are nudged (default: the fifth)")
    ap.add_argument("--nudge", type=float, default=1e-3)
    ap.add_argument("--tensors", default="", help="tensors to report, comma-separated (default: 8 spread out)")
    args = ap.parse_args()

    from _common import run_batch, run_batched
    from rich.console import Console
    from rich.table import Table

    import onnxcompress as oc
    from onnxcompress.data import open_data
    from onnxcompress.pipeline import PassContext
    from onnxcompress.registry import build_pipeline
    from onnxcompress.metrics import column_cosine, column_sums

    path = args.shared / "models" / f"{args.model}.onnx"
    model = oc.load_model(path)
    bs = run_batch(model)
    ctx = PassContext(calibration=open_data(args.shared / "data" / f"{args.model}_calib.npz", model, batch_size=bs))
    float_model, _ = build_pipeline("canonicalize").run(model, PassContext())
    spec = "canonicalize,int8:max_drop=0:guard=false:experimental.head_correction=false:experimental.bias_correction=false"
    q, _ = build_pipeline(spec).run(model, ctx)
    convs = [n.name for n in q.graph.node if n.op_type == "Conv"]
    twin = nudged(q, args.nudge_conv or convs[4], 1.0 + args.nudge)

    known = {o for n in float_model.graph.node for o in n.output}
    quantized = [n.input[0].removesuffix("__float") for n in q.graph.node if n.op_type == "QuantizeLinear"]
    quantized = [t for t in dict.fromkeys(quantized) if t in known]
    names = [quantized[int(k)] for k in np.linspace(0, len(quantized) - 1, 8)]
    if args.tensors:
        names = args.tensors.split(",")
        if missing := [t for t in names if t not in quantized]:
            raise SystemExit(f"not quantized tensors of {args.model}: {', '.join(missing)}")

    x_eval = np.load(args.shared / "data" / f"{args.model}_eval.npz")["x"]
    x = x_eval[: args.images]
    masks = [(img == args.pad).all(0) for img in x]
    fs = _session(float_model, names)
    ref = [fs.run(names, {fs.get_inputs()[0].name: x[i : i + 1]}) for i in range(len(x))]
    errs = {label: region_errors(ref, m, names, x, masks) for label, m in (("int8", q), ("nudged", twin))}

    t = Table(title=f"{args.model}: int8 error vs float, constant region (input = {args.pad:g}, "
                    f"{np.mean([m.mean() for m in masks]):.0%} of the pixels) and the rest; "
                    f"twin: {args.nudge_conv or convs[4]} weights × (1 + {args.nudge:g})")
    for col in ("tensor", "int8: constant", "int8: rest", "nudged: constant", "nudged: rest"):
        t.add_column(col, justify="right")
    for j, name in enumerate(names):
        t.add_row(name, *(f"{errs[k][j][i]:.3f}" for k in ("int8", "nudged") for i in (0, 1)))
    Console(width=160).print(t)

    y_ref = run_batched(onnx.load(str(path)), x_eval, bs)
    for label, m in (("int8", q), ("nudged", twin)):
        y = run_batched(m, x_eval, bs)
        if y_ref.ndim == 3:
            cc = column_cosine(column_sums(y_ref.reshape(-1, y_ref.shape[-1]), y.reshape(-1, y.shape[-1])))
            print(f"{label}: each output column's cosine on the eval set {np.round(cc, 4).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
