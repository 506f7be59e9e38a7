"""Float rewrites that make a model quantizable, each exact up to float rounding.

* **Opset upgrade.** Per-channel ``DequantizeLinear`` (the ``axis`` attribute) needs
  opset 13. A model below it is converted with ``onnx.version_converter`` and the
  result is checked: onnx.checker, then onnxruntime on one calibration batch, outputs
  within 1e-4 of their range of the original's. If either fails the caller falls back
  to per-tensor weights at the original opset (≥ 10).
* **BatchNormalization folding.** ``BN(Conv(x, W) + b)`` with a Conv whose output has
  no other reader becomes ``Conv(x, W')`` + b' with, per output channel c,
  ``k_c = γ_c / √(σ²_c + ε)``, ``W'_c = k_c W_c``, ``b'_c = k_c (b_c − μ_c) + β_c``
  (ConvTranspose: the output channel is axis 1 of W, per group). The quantized Conv
  then carries the BN in its weights, as onnxruntime does for float.
* **Affine folding.** ``Conv(x) · a + b`` with constants a, b that are scalars or vary
  only along the output channel (BatchNormalization exported as Mul/Add, PP-LCNetV3's
  learnable affine blocks) becomes one Conv with ``W'_c = a_c W_c``, ``b'_c = a_c b_c + b_c``
  — fewer quantization points, and per-channel weight scales absorb a_c.
* **Division by a constant** ``x / c`` becomes ``x · (1/c)``: ``Mul`` has a quantized
  kernel, ``Div`` does not (the HardSwish spelled ``x·clip(x+3, 0, 6)/6``).
* **HardSigmoid / HardSwish decomposition** (opset ≥ 11): ``hardsigmoid(x) =
  clip(α·x + β, 0, 1)`` as Mul → Add → Clip, and ``hardswish(x) = x · hardsigmoid(x)``
  with α = 1/6, β = 1/2: onnxruntime has no integer kernel for either op, but it has
  them for Mul and Add, and a Clip(0, ·) folds into the requantization — the int8 region
  then does not break at every activation.
* Every node gets a unique name (the per-node decisions and reports refer to it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...graph import drop_unused_initializers, initializers, reads
from ...model import default_opset, node_attr

log = logging.getLogger(__name__)

PER_CHANNEL_OPSET = 13


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node of the main graph a unique, non-empty name."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        name = n.name or f"{n.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        n.name = name
        seen.add(name)


def upgrade_opset(model: onnx.ModelProto, target: int = PER_CHANNEL_OPSET) -> onnx.ModelProto:
    """``model`` converted to ``target`` (raises on any converter or checker failure)."""
    from onnx import version_converter

    new = version_converter.convert_version(model, target)
    onnx.checker.check_model(new)
    return new


def div_to_mul(model: onnx.ModelProto) -> int:
    """Rewrite ``Div(x, c)`` with a constant float ``c`` (no zeros) as ``Mul(x, 1/c)``."""
    g = model.graph
    inits = initializers(g)
    done = 0
    for n in g.node:
        if n.op_type != "Div" or len(n.input) != 2 or n.input[1] not in inits:
            continue
        c = numpy_helper.to_array(inits[n.input[1]])
        if c.dtype.kind != "f" or np.any(c == 0):
            continue
        name = f"{n.name}_reciprocal"
        g.initializer.append(numpy_helper.from_array((1.0 / c.astype(np.float64)).astype(c.dtype), name))
        n.op_type = "Mul"
        n.input[1] = name
        done += 1
    if done:
        drop_unused_initializers(model)
    return done


@dataclass(frozen=True)
class HardActivation:
    """A HardSigmoid/HardSwish that :func:`decompose_hard_activations` split: the original
    node and the names of the nodes that replaced it, in order."""

    node: onnx.NodeProto
    parts: tuple[str, ...]


def decompose_hard_activations(model: onnx.ModelProto, record: list[HardActivation] | None = None) -> int:
    """Rewrite HardSigmoid and HardSwish as Mul/Add/Clip(/Mul); the number rewritten (each
    appended to ``record``, for :func:`recompose_hard_activations`)."""
    if opset_of(model) < 11:
        return 0
    g = model.graph
    done = 0
    new_nodes: list[onnx.NodeProto] = []
    consts: dict[float, str] = {}

    def const(v: float) -> str:
        if v not in consts:
            name = f"hard_act_const_{len(consts)}"
            g.initializer.append(numpy_helper.from_array(np.array(v, dtype=np.float32), name))
            consts[v] = name
        return consts[v]

    for n in g.node:
        if n.op_type not in ("HardSigmoid", "HardSwish") or n.domain not in ("", "ai.onnx"):
            new_nodes.append(n)
            continue
        x, y = n.input[0], n.output[0]
        if n.op_type == "HardSigmoid":
            alpha, beta = float(node_attr(n, "alpha", 0.2)), float(node_attr(n, "beta", 0.5))
        else:
            alpha, beta = 1.0 / 6.0, 0.5
        base = n.name or f"{n.op_type}_{done}"
        hs = y if n.op_type == "HardSigmoid" else f"{base}_hardsigmoid"
        new_nodes += [
            helper.make_node("Mul", [x, const(alpha)], [f"{base}_scaled"], name=f"{base}_mul_alpha"),
            helper.make_node("Add", [f"{base}_scaled", const(beta)], [f"{base}_shifted"], name=f"{base}_add_beta"),
            helper.make_node("Clip", [f"{base}_shifted", const(0.0), const(1.0)], [hs], name=f"{base}_clip"),
        ]
        if n.op_type == "HardSwish":
            new_nodes.append(helper.make_node("Mul", [x, hs], [y], name=f"{base}_mul_x"))
        if record is not None:
            parts = ("mul_alpha", "add_beta", "clip") + (("mul_x",) if n.op_type == "HardSwish" else ())
            record.append(HardActivation(n, tuple(f"{base}_{p}" for p in parts)))
        done += 1
    if done:
        del g.node[:]
        g.node.extend(new_nodes)
    return done


def recompose_hard_activations(model: onnx.ModelProto, acts: list[HardActivation], quantized: set[str]) -> int:
    """Put back as one node each decomposed activation none of whose parts is in
    ``quantized``; the number put back. Decomposed, a float HardSwish is four kernels and
    three intermediate tensors where onnxruntime has one kernel: a model with many float
    decomposed activations runs slower than the float model it came from.
    Reads the first part's input, whatever Q/DQ insertion renamed it to."""
    g = model.graph
    index = {n.name: i for i, n in enumerate(g.node)}
    replace: dict[int, onnx.NodeProto | None] = {}
    for act in acts:
        if any(p in quantized or p not in index for p in act.parts):
            continue
        first, last = g.node[index[act.parts[0]]], g.node[index[act.parts[-1]]]
        node = onnx.NodeProto()
        node.CopyFrom(act.node)
        node.input[0] = first.input[0]
        node.output[0] = last.output[0]
        replace[index[act.parts[0]]] = node
        replace.update({index[p]: None for p in act.parts[1:]})
    if not replace:
        return 0
    kept = [replace.get(i, n) for i, n in enumerate(g.node)]
    read = {x for n in kept if n is not None for x in reads(n)} | {o.name for o in g.output}
    # a DequantizeLinear that only a removed part read
    kept = [n for n in kept if n is not None and not (n.op_type == "DequantizeLinear" and n.output[0] not in read)]
    del g.node[:]
    g.node.extend(kept)
    drop_unused_initializers(model)
    return sum(1 for v in replace.values() if v is not None)


def opset_of(model: onnx.ModelProto) -> int:
    return default_opset(model) or 0


def set_default_opset(model: onnx.ModelProto, version: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = version
            return
    model.opset_import.append(helper.make_opsetid("", version))
