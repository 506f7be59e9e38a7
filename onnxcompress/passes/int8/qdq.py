"""Where QuantizeLinear/DequantizeLinear pairs go, and writing them.

Quantization (per tensor for activations, per output channel for weights)::

    q = saturate(round(x / s) + z),   x̂ = (q − z) · s

* activations, ``uint8`` (default; onnxruntime's fast CPU path): range [lo, hi] ∋ 0,
  ``s = (hi − lo)/255``, ``z = round(−lo/s)``; ``int8`` (option): ``s = max(|lo|, |hi|)/127``,
  ``z = 0``;
* weights, int8 symmetric per output channel c: ``s_c = max|W_c| / 127``, ``z = 0``
  (Conv axis 0; Gemm axis 0 with transB=1, else 1; MatMul with a constant B axis 1);
* bias, int32 with ``s_c = s_x · s_w,c``, ``z = 0`` (``s_w,c`` is raised where the bias
  would overflow int32).

Placement follows the node groups onnxruntime fuses into integer kernels: a node is
*quantized* when every float activation it reads comes through a DequantizeLinear and
every output goes through a QuantizeLinear (Conv → QLinearConv, MatMul → QLinearMatMul,
Gemm → QGemm, Add/Mul → QLinearAdd/QLinearMul, Concat → QLinearConcat, Sigmoid /
LeakyRelu / (Global)AveragePool → QLinear*). A Relu, or a Clip with min 0, that is the
only reader of a quantized node's output is *fused*: the pair goes after it, with zero
point at the bottom of the range, which onnxruntime turns into a saturating requantize
(ReluQuantFusion / ClipQuantFusion). Data-movement ops (MaxPool, Resize, Reshape,
Transpose, Flatten, Squeeze, Unsqueeze, Slice, Gather, Expand, Tile) run on the integer
tensor when both their input and an output reader are quantized; their output then
shares the input's scale and zero point (onnxruntime drops such Q/DQ pairs only when
they are equal). A Concat's inputs and output share one scale (the hull of the inputs'
ranges), so QLinearConcat is a plain copy.

Each quantized tensor gets one Q → DQ pair: its producer writes ``t__float``, the
QuantizeLinear reads it, and the DequantizeLinear writes ``t`` again, so every reader and
any graph output keep their names (for a graph input the readers are renamed instead).
onnxruntime's WeightBiasQuantization quantizes the weights of a float Conv/ConvTranspose/
Gemm per tensor when its input comes from a per-tensor DQ, and then fuses it: a Conv the
user excluded between int8 layers ran as a QLinearConv (5 of 5 on a five-Conv chain with
the middle one excluded). Such a node (``keep_float``) reads a DequantizeLinear of its own
with per-channel (axis 1) vectors of the same scale and zero point, which is not matched.
Float nodes the pass chooses itself are left to onnxruntime: its accuracy control and
latency guard time and score the graph onnxruntime runs, and forcing them float costs
latency for the same agreement.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ...graph import clip_bounds, initializers, reads, topological_order
from ...model import node_attr

log = logging.getLogger(__name__)

COMPUTE = frozenset({"Conv", "Gemm", "MatMul"})
BINARY = frozenset({"Add", "Mul"})
UNARY = frozenset({"Sigmoid", "LeakyRelu", "GlobalAveragePool", "AveragePool"})
CONCAT = frozenset({"Concat"})
PASSTHROUGH = frozenset({"MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
                         "Slice", "Gather", "Expand", "Tile"})
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
QUANTIZABLE = COMPUTE | BINARY | UNARY | CONCAT | PASSTHROUGH | FUSED_ACTIVATIONS

ActType = Literal["uint8", "int8"]
FLOAT_SUFFIX = "__float"


@dataclass
class Plan:
    """Which nodes run quantized and which tensors get a Q → DQ pair."""

    nodes: set[str] = field(default_factory=set)          #: quantized nodes (fused activations included)
    fused: dict[str, str] = field(default_factory=dict)   #: fused activation → the node it is fused into
    tensors: set[str] = field(default_factory=set)        #: activation tensors that get a Q → DQ pair
    inner: set[str] = field(default_factory=set)          #: outputs hidden by a fused activation
    share: dict[str, str] = field(default_factory=dict)   #: tensor → representative of its shared-scale group
    sources: set[str] = field(default_factory=set)        #: tensors whose own range counts in their group
    declined: dict[str, str] = field(default_factory=dict)  #: node → why it stays float

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for t in sorted(self.tensors):
            out[self.share.get(t, t)].append(t)
        return dict(out)


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    types: dict[str, int] = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    return types


def data_inputs(node: onnx.NodeProto, inits: Mapping[str, TensorProto]) -> list[str]:
    """The activation inputs a quantized ``node`` reads through DequantizeLinear."""
    op = node.op_type
    if op in ("Conv", "Gemm"):
        return [node.input[0]]
    if op == "MatMul":
        return [x for x in node.input[:2] if x not in inits]
    if op in BINARY:
        return [x for x in node.input[:2] if x not in inits]
    if op in CONCAT:
        return [x for x in node.input if x]
    return [node.input[0]] if node.input else []


def fused_bounds(node: onnx.NodeProto, inits: Mapping[str, TensorProto]) -> tuple[float, float]:
    """The output bounds a fused Relu/Clip imposes on its quantized range."""
    if node.op_type == "Relu":
        return 0.0, np.inf
    b = clip_bounds(node, inits)
    return b if b is not None else (-np.inf, np.inf)


def _compute_ok(node: onnx.NodeProto, inits: Mapping[str, TensorProto]) -> str | None:
    """None if a compute node can be quantized, else why not."""
    op = node.op_type
    if len(node.input) < 2 or node.input[1] not in inits:
        if op == "MatMul" and len(node.input) >= 2:
            return None  # activation × activation: both through DQ
        return "weight is not a constant"
    w = inits[node.input[1]]
    if w.data_type != TensorProto.FLOAT:
        return "weight is not float32"
    if op == "Gemm":
        if int(node_attr(node, "transA", 0)) != 0:
            return "Gemm with transA"
        if len(node.input) > 2 and node.input[2]:
            c = inits.get(node.input[2])
            if c is None or len(c.dims) != 1 or float(node_attr(node, "beta", 1.0)) != 1.0:
                return "Gemm bias is not a 1-D constant with beta 1"
    if op == "MatMul" and len(w.dims) != 2:
        return f"MatMul weight of rank {len(w.dims)}"
    if op == "Conv" and len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
        return "bias is not a constant"
    for x in node.input[1:3]:
        if x in inits and inits[x].data_type == TensorProto.FLOAT and not np.all(np.isfinite(numpy_helper.to_array(inits[x]))):
            return f"'{x}' has NaN or Inf values"
    return None


def _readers(nodes: Iterable[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    """tensor → the nodes reading it (subgraph captures included), in the order given."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in nodes:
        for x in reads(n):
            readers[x].append(n)
    return readers


def plan(model: onnx.ModelProto, allowed: Iterable[str] | None = None,
         ranges: Mapping[str, tuple[float, float]] | None = None, concat_spread: float = 4.0,
         nonfinite: Iterable[str] = ()) -> Plan:
    """The QDQ placement when the nodes named in ``allowed`` (default: all) may be quantized.

    With calibrated ``ranges``, a Concat whose inputs' range widths differ by more than
    ``concat_spread``× (box offsets next to probabilities) *mixes* ranges: one per-tensor
    scale would wipe out the narrow inputs. Such a Concat, anything that only moves its
    output, and every node that would read those tensors through a DequantizeLinear
    stay float. So does every node that reads or writes a ``nonfinite`` tensor (±inf or
    NaN seen in calibration, as in an attention mask's −inf): a Q/DQ pair would clamp
    them to the range's edge, a finite value that changes what the model computes."""
    g = model.graph
    inits = initializers(g)
    types = _float_types(model)
    allowed_set = {n.name for n in g.node} if allowed is None else set(allowed)
    order = [g.node[i] for i in topological_order(g)]
    readers = _readers(order)
    outputs = {o.name for o in g.output}
    p = Plan()
    mixed = _mixed_concats(order, ranges, concat_spread) if ranges is not None else {}
    unsafe = _moved(order, {t: "holds ±inf or NaN on the calibration data" for t in nonfinite})
    mixed.update(unsafe)
    _place_kernels(p, order, inits, types, allowed_set, mixed, set(unsafe))  # 1. compute/binary/unary/concat
    _fuse_activations(p, order, inits, readers, outputs, allowed_set)  # 2. Relu/Clip(min 0) ride along
    quantized: set[str] = set()  # 3. tensors of quantized nodes
    for n in order:
        if n.name in p.nodes and n.name not in p.fused and n.op_type not in PASSTHROUGH:
            quantized.update(data_inputs(n, inits))
        if n.name in p.nodes:
            quantized.update(o for o in n.output if o and o not in p.inner)
    sources = quantized | ({i.name for i in g.input} - set(inits))  # slicing an image in uint8 is cheaper
    _place_data_movement(p, order, readers, outputs, allowed_set, mixed, types, sources, quantized)  # 4.
    _share_scales(p, order, quantized)  # 5.
    for n in order:
        if n.op_type in QUANTIZABLE and n.name not in p.nodes and n.name not in p.declined and n.name in allowed_set:
            if n.op_type in FUSED_ACTIVATIONS:
                continue  # a standalone Relu/Clip simply runs in float
            p.declined[n.name] = "not quantizable here"
    return p


def _mixed_concats(order: list[onnx.NodeProto], ranges: Mapping[str, tuple[float, float]],
                   concat_spread: float) -> dict[str, str]:
    """Tensors written by a Concat whose inputs' range widths differ by more than
    ``concat_spread``×, or moved from one, with the reason."""
    mixed: dict[str, str] = {}
    for n in order:
        if n.op_type in CONCAT:
            ins = [x for x in n.input if x]
            widths = [ranges[x][1] - ranges[x][0] for x in ins if x in ranges]
            bad = [x for x in ins if x in mixed]
            if bad:
                mixed[n.output[0]] = mixed[bad[0]]
            elif widths and max(widths) > concat_spread * max(min(widths), 1e-12):
                mixed[n.output[0]] = (f"mixes ranges: it concatenates ranges of width {min(widths):.3g} to {max(widths):.3g} "
                                      f"(spread over {concat_spread:g}x)")
        elif n.op_type in PASSTHROUGH and n.input and n.input[0] in mixed:
            mixed[n.output[0]] = mixed[n.input[0]]
    return mixed


def _moved(order: list[onnx.NodeProto], marked: dict[str, str]) -> dict[str, str]:
    """``marked`` (tensor → reason) and every tensor that only moves a marked one."""
    out = dict(marked)
    if out:
        for n in order:
            if n.op_type in PASSTHROUGH and n.input and n.input[0] in out:
                out[n.output[0]] = out[n.input[0]]
    return out


def _place_kernels(p: Plan, order: list[onnx.NodeProto], inits: Mapping[str, TensorProto], types: dict[str, int],
                   allowed: set[str], mixed: dict[str, str], unsafe: set[str]) -> None:
    """Compute, binary, unary and Concat nodes whose activations are float32 go int8, or
    are declined with the reason."""
    for n in order:
        op = n.op_type
        if op not in QUANTIZABLE or op in PASSTHROUGH or op in FUSED_ACTIVATIONS:
            continue
        if n.name not in allowed:
            p.declined[n.name] = "excluded"
            continue
        acts = data_inputs(n, inits)
        if not acts or not all(types.get(x) == TensorProto.FLOAT for x in [*acts, *n.output]):
            p.declined[n.name] = "not float32 (or type unknown)"
            continue
        bad = [x for x in acts if x in mixed] + [o for o in n.output if o in mixed and (op in CONCAT or o in unsafe)]
        if bad:
            p.declined[n.name] = f"'{bad[0]}' {mixed[bad[0]]}"
            continue
        why = _compute_ok(n, inits) if op in COMPUTE else None
        if why:
            p.declined[n.name] = why
            continue
        if op in BINARY and any(x in inits and inits[x].data_type != TensorProto.FLOAT for x in n.input[:2]):
            p.declined[n.name] = "constant operand is not float32"
            continue
        p.nodes.add(n.name)


def _fuse_activations(p: Plan, order: list[onnx.NodeProto], inits: Mapping[str, TensorProto],
                      readers: dict[str, list[onnx.NodeProto]], outputs: set[str], allowed: set[str]) -> None:
    """A Relu, or a Clip with min 0, that is the only reader of a quantized node's output
    is fused into it (onnxruntime's saturating requantize)."""
    producer = {o: n for n in order for o in n.output if o}
    for n in order:
        if n.op_type not in FUSED_ACTIVATIONS or n.name not in allowed:
            continue
        src = producer.get(n.input[0])
        if src is None or src.name not in p.nodes or src.name in p.fused:
            continue
        if len(readers[n.input[0]]) != 1 or n.input[0] in outputs or len(src.output) != 1:
            continue
        if n.op_type == "Clip":
            b = clip_bounds(n, inits)
            if b is None or b[0] != 0.0:
                continue
        p.nodes.add(n.name)
        p.fused[n.name] = src.name
        p.inner.add(n.input[0])


def _place_data_movement(p: Plan, order: list[onnx.NodeProto], readers: dict[str, list[onnx.NodeProto]],
                         outputs: set[str], allowed: set[str], mixed: dict[str, str], types: dict[str, int],
                         sources: set[str], quantized: set[str]) -> None:
    """Data movement between quantized tensors: forward (its input quantized), then only
    those with a quantized reader are kept (backward, to a fixed point)."""
    moving: list[onnx.NodeProto] = []
    for n in order:
        if n.op_type in PASSTHROUGH and n.name in allowed and n.input and n.input[0] in sources \
                and n.input[0] not in mixed and len(n.output) == 1 \
                and types.get(n.input[0]) == TensorProto.FLOAT and types.get(n.output[0]) == TensorProto.FLOAT:
            moving.append(n)
            sources.add(n.output[0])
    active = {n.name for n in moving}
    changed = True
    while changed:
        changed = False
        for n in reversed(moving):
            if n.name not in active:
                continue
            out = n.output[0]
            if out in outputs or any(r.name in active or (r.name in p.nodes and r.op_type not in PASSTHROUGH)
                                     for r in readers[out]):
                if out in outputs and not any(r.name in p.nodes or r.name in active for r in readers[out]):
                    active.discard(n.name)
                    changed = True
                continue
            active.discard(n.name)
            changed = True
    for n in moving:
        if n.name in active:
            p.nodes.add(n.name)
            quantized.update((n.input[0], n.output[0]))
        elif n.name in allowed:
            p.declined[n.name] = "no quantized neighbour on both sides"


def _share_scales(p: Plan, order: list[onnx.NodeProto], quantized: set[str]) -> None:
    """Shared scales: data movement (output = input) and Concat (inputs = output)."""
    uf = UnionFind()
    produced_by_sharing: set[str] = set()
    for n in order:
        if n.name not in p.nodes:
            continue
        if n.op_type in PASSTHROUGH:
            uf.union(n.input[0], n.output[0])
            produced_by_sharing.add(n.output[0])
        elif n.op_type in CONCAT:
            for x in n.input:
                if x:
                    uf.union(x, n.output[0])
            produced_by_sharing.add(n.output[0])
    p.tensors = quantized
    p.share = {t: uf.find(t) for t in quantized}
    p.sources = {t for t in quantized if t not in produced_by_sharing}
