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
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...graph import topological_order
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


def clip_bounds(node: onnx.NodeProto, inits: Mapping[str, TensorProto]) -> tuple[float, float] | None:
    """(min, max) of a Clip (attributes before opset 11, constant inputs after), else None."""
    lo, hi = node_attr(node, "min", None), node_attr(node, "max", None)
    vals: list[float | None] = [lo, hi]
    for k, idx in ((0, 1), (1, 2)):
        if len(node.input) > idx and node.input[idx]:
            if node.input[idx] not in inits:
                return None
            vals[k] = float(numpy_helper.to_array(inits[node.input[idx]]))
    lo_v = -np.inf if vals[0] is None else float(vals[0])
    hi_v = np.inf if vals[1] is None else float(vals[1])
    return lo_v, hi_v


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
    """tensor → the nodes reading it, in the order given."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in nodes:
        for x in n.input:
            if x:
                readers[x].append(n)
    return readers


def plan(model: onnx.ModelProto, allowed: Iterable[str] | None = None,
         ranges: Mapping[str, tuple[float, float]] | None = None, concat_spread: float = 4.0) -> Plan:
    """The QDQ placement when the nodes named in ``allowed`` (default: all) may be quantized.

    With calibrated ``ranges``, a Concat whose inputs' range widths differ by more than
    ``concat_spread``× (box offsets next to probabilities) *mixes* ranges: one per-tensor
    scale would wipe out the narrow inputs. Such a Concat, anything that only moves its
    output, and every node that would read those tensors through a DequantizeLinear
    stay float."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    types = _float_types(model)
    allowed_set = {n.name for n in g.node} if allowed is None else set(allowed)
    order = [g.node[i] for i in topological_order(g)]
    readers = _readers(order)
    producer = {o: n for n in order for o in n.output if o}
    outputs = {o.name for o in g.output}
    p = Plan()

    def is_float(name: str) -> bool:
        return types.get(name) == TensorProto.FLOAT

    mixed: dict[str, str] = {}
    if ranges is not None:
        for n in order:
            if n.op_type in CONCAT:
                ins = [x for x in n.input if x]
                widths = [ranges[x][1] - ranges[x][0] for x in ins if x in ranges]
                bad = [x for x in ins if x in mixed]
                if bad:
                    mixed[n.output[0]] = mixed[bad[0]]
                elif widths and max(widths) > concat_spread * max(min(widths), 1e-12):
                    mixed[n.output[0]] = (f"it concatenates ranges of width {min(widths):.3g} to {max(widths):.3g} "
                                          f"(spread over {concat_spread:g}x)")
            elif n.op_type in PASSTHROUGH and n.input and n.input[0] in mixed:
                mixed[n.output[0]] = mixed[n.input[0]]

    # 1. compute / binary / unary / concat nodes whose activations are float32
    for n in order:
        op = n.op_type
        if op not in QUANTIZABLE or op in PASSTHROUGH or op in FUSED_ACTIVATIONS:
            continue
        if n.name not in allowed_set:
            p.declined[n.name] = "excluded"
            continue
        acts = data_inputs(n, inits)
        if not acts or not all(is_float(x) for x in acts) or not all(is_float(o) for o in n.output):
            p.declined[n.name] = "not float32 (or type unknown)"
            continue
        bad = [x for x in acts if x in mixed] + [o for o in n.output if o in mixed and op in CONCAT]
        if bad:
            p.declined[n.name] = f"'{bad[0]}' mixes ranges: {mixed[bad[0]]}"
            continue
        if op in COMPUTE:
            why = _compute_ok(n, inits)
            if why:
                p.declined[n.name] = why
                continue
        if op in BINARY and any(x in inits and inits[x].data_type != TensorProto.FLOAT for x in n.input[:2]):
            p.declined[n.name] = "constant operand is not float32"
            continue
        p.nodes.add(n.name)

    # 2. Relu / Clip(min 0) fused into the quantized node whose only reader they are
    for n in order:
        if n.op_type not in FUSED_ACTIVATIONS or n.name not in allowed_set:
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

    def out_tensor(n: onnx.NodeProto) -> list[str]:
        return [o for o in n.output if o and o not in p.inner]

    # 3. tensors of quantized nodes
    quantized: set[str] = set()
    for n in order:
        if n.name in p.nodes and n.name not in p.fused and n.op_type not in PASSTHROUGH:
            quantized.update(data_inputs(n, inits))
        if n.name in p.nodes:
            quantized.update(out_tensor(n))

    # 4. data movement between quantized tensors: forward (input quantized), then keep
    #    only those with a quantized reader (backward, to a fixed point)
    #    (a graph input counts as quantized here: slicing an image in uint8 is cheaper)
    moving: list[onnx.NodeProto] = []
    sources = quantized | ({i.name for i in g.input} - set(inits))
    for n in order:
        if n.op_type in PASSTHROUGH and n.name in allowed_set and n.input and n.input[0] in sources \
                and n.input[0] not in mixed \
                and len(n.output) == 1 and is_float(n.input[0]) and is_float(n.output[0]):
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
        elif n.name in allowed_set:
            p.declined[n.name] = "no quantized neighbour on both sides"

    # 5. shared scales: data movement (output = input) and Concat (inputs = output)
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
    for n in order:
        if n.op_type in QUANTIZABLE and n.name not in p.nodes and n.name not in p.declined and n.name in allowed_set:
            if n.op_type in FUSED_ACTIVATIONS:
                continue  # a standalone Relu/Clip simply runs in float
            p.declined[n.name] = "not quantizable here"
    return p


@dataclass(frozen=True)
class Derived:
    """How a tensor's range follows from its sources' ranges without a histogram of its
    own: ``scale`` (y = k·x, k > 0: k times x's range), ``shift`` (y = x + b),
    ``clamp`` (Clip, Relu), ``same`` (data movement: every output value is an input value,
    or between two of them), ``hull`` (Concat: the hull of its inputs'). Each maps its
    source's range onto every value the output can take when the source is quantized to
    that range. The source's range is first cut to the values seen there (quantization
    ranges are padded to include 0: x + 3 of an all-negative x would otherwise reach 3).

    ``sigmoid``: σ of the source's seen min and max, not of its quantization range: a
    float Sigmoid (read by a quantized Mul) sees values outside the latter, and σ
    saturates, so the wider range costs little; sigmoids leave calibration, and their own
    KL ranges would clip σ short of 1. Measured no worse than binning them
    (docs/decisions/int8-findings.md).

    ``product``: y = x · g(x), g a chain of the elementwise kinds above starting from x
    (SiLU: x·σ(x); HardSwish after decomposition: x·clip(x/6 + 1/2, 0, 1)). y gets a
    histogram of its own, pushed forward from x's (:func:`calibration.pushforward`), and
    its range from that by the chosen method; :meth:`apply` (f's range over x's) serves
    only where x has no histogram."""

    kind: Literal["scale", "shift", "clamp", "same", "hull", "sigmoid", "product"]
    sources: tuple[str, ...]
    k: float = 1.0  #: scale: the factor; shift: the constant added
    bounds: tuple[float, float] = (-math.inf, math.inf)  #: clamp: Clip's / Relu's bounds
    chain: tuple[Derived, ...] = ()  #: product: the elementwise links g is made of, from x on

    def map(self, v: np.ndarray) -> np.ndarray:
        """The elementwise function itself (scale, shift, clamp, sigmoid, product)."""
        if self.kind == "scale":
            return v * self.k
        if self.kind == "shift":
            return v + self.k
        if self.kind == "clamp":
            return np.clip(v, *self.bounds)
        if self.kind == "sigmoid":
            return 0.5 * (1.0 + np.tanh(0.5 * v))
        if self.kind == "product":
            g = v
            for link in self.chain:
                g = link.map(g)
            return v * g
        raise ValueError(f"{self.kind} is not an elementwise function of one tensor")

    def apply(self, ranges: list[tuple[float, float]]) -> tuple[float, float]:
        lo, hi = ranges[0]
        if self.kind == "product":  # the range of x·g(x) over [lo, hi], on a fine grid
            y = self.map(np.concatenate([np.linspace(lo, hi, 4097), [0.0]]) if lo < 0 < hi else np.linspace(lo, hi, 4097))
            return float(y.min()), float(y.max())
        if self.kind == "sigmoid":
            return _sigmoid(lo), _sigmoid(hi)
        if self.kind in _ELEMENTWISE:  # non-decreasing (scale has k > 0): the ends map to the ends
            a, b = self.map(np.array([lo, hi], dtype=np.float64))
            return float(a), float(b)
        return min(r[0] for r in ranges), max(r[1] for r in ranges)


_ELEMENTWISE = ("scale", "shift", "clamp", "sigmoid")  #: kinds that are functions of their one source


def _sigmoid(v: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * v))  # = 1 / (1 + e^−v), without overflow


def derived_tensors(model: onnx.ModelProto) -> dict[str, Derived]:
    """Tensors whose range is derived from other activations' (see :class:`Derived`):
    outputs of a positive scalar Mul (HardSwish's ``· 1/6``), a scalar Add/Sub (its
    ``+ 3``), Clip/Relu (its ``clip(·, 0, 6)``), Sigmoid, of data movement (MaxPool,
    Slice, Reshape, nearest/linear Resize, …) and of Concat, where every source is a
    float activation. A quantized data-movement node or Concat shares its
    input's scale anyway: the derived range is what its output gets when the node is
    float and a quantized node reads it."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    types = _float_types(model)
    out: dict[str, Derived] = {}

    def act(x: str) -> bool:
        return bool(x) and x not in inits and types.get(x) == TensorProto.FLOAT

    for n in (g.node[i] for i in topological_order(g)):
        if len(n.output) != 1 or not act(n.output[0]):
            continue
        d: Derived | None = None
        if n.op_type == "Mul" and len(n.input) == 2 and all(act(x) for x in n.input):
            for x, v in (n.input, n.input[::-1]):
                links: list[Derived] = []
                while v != x and v in out and out[v].kind in _ELEMENTWISE:
                    links.append(out[v])
                    v = out[v].sources[0]
                if v == x and links:
                    d = Derived("product", (x,), chain=tuple(reversed(links)))
                    break
        elif n.op_type in ("Mul", "Add", "Sub") and len(n.input) == 2:
            consts = [x for x in n.input if x in inits]
            if len(consts) == 1 and inits[consts[0]].data_type == TensorProto.FLOAT:
                c = numpy_helper.to_array(inits[consts[0]]).reshape(-1)
                x = n.input[1] if n.input[0] == consts[0] else n.input[0]
                if c.size == 1 and np.isfinite(c[0]) and act(x):
                    k = float(c[0])
                    if n.op_type == "Mul" and k > 0:
                        d = Derived("scale", (x,), k)
                    elif n.op_type == "Add":
                        d = Derived("shift", (x,), k)
                    elif n.op_type == "Sub" and x == n.input[0]:
                        d = Derived("shift", (x,), -k)
        elif n.op_type == "Sigmoid" and n.input and act(n.input[0]):
            d = Derived("sigmoid", (n.input[0],))
        elif n.op_type in FUSED_ACTIVATIONS and n.input and act(n.input[0]):
            b = (0.0, math.inf) if n.op_type == "Relu" else clip_bounds(n, inits)
            if b is not None:
                d = Derived("clamp", (n.input[0],), bounds=b)
        elif n.op_type in PASSTHROUGH and n.input and act(n.input[0]):
            if n.op_type != "Resize" or node_attr(n, "mode", "nearest") != "cubic":
                d = Derived("same", (n.input[0],))
        elif n.op_type == "Concat":
            ins = tuple(x for x in n.input if x)
            if ins and all(act(x) for x in ins):
                d = Derived("hull", ins)
        if d is not None:
            out[n.output[0]] = d
    return out


def tail_nodes(model: onnx.ModelProto) -> set[str]:
    """Nodes after the last compute layer: no Conv/ConvTranspose/Gemm/MatMul reads what they
    write, directly or further down. Quantized, they only add requantization and layout
    work on the way out, and their rounding reaches the outputs unfiltered (a detector's
    Sigmoid → Concat → Reshape → Transpose head)."""
    g = model.graph
    layers = COMPUTE | {"ConvTranspose"}
    readers = _readers(g.node)
    feeds: dict[str, bool] = {}  # node → a compute layer is downstream
    for i in reversed(topological_order(g)):
        n = g.node[i]
        feeds[n.name] = any(r.op_type in layers or feeds.get(r.name, False)
                            for o in n.output for r in readers.get(o, []))
    return {n.name for n in g.node if not feeds[n.name] and n.op_type not in layers}


def through_activations(model: onnx.ModelProto, derived: Mapping[str, Derived]) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """{x: f} for each activation x read only by an elementwise ``product`` f(x) = x·g(x)
    (SiLU, decomposed HardSwish): the Mul itself and the first link of g. x's range is
    then chosen by the error after f (:func:`calibration.low_through`)."""
    g = model.graph
    readers = _readers(g.node)
    producer = {o: n for n in g.node for o in n.output if o}
    outputs = {o.name for o in g.output}
    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    for y, d in derived.items():
        if d.kind != "product" or y not in producer:
            continue
        x = d.sources[0]
        mul = producer[y]
        other = [v for v in mul.input if v != x]
        if len(other) != 1:
            continue
        v = other[0]
        while v in derived and derived[v].sources[0] != x:  # back along g to its first link
            v = derived[v].sources[0]
        if v not in producer or x in outputs:
            continue
        if {r.name for r in readers.get(x, [])} == {mul.name, producer[v].name}:
            out[x] = d.map
    return out


def calibrated_tensors(tensors: Iterable[str], derived: Mapping[str, Derived]) -> list[str]:
    """The tensors calibration must bin so that every one of ``tensors`` has a range.

    A derived tensor is left out where every tensor its range comes from (through other
    derived ones) is binned anyway; otherwise it is binned itself. Deriving must not add
    a tensor to bin, nor change what a range is computed from where that saves nothing: a
    fused ReLU's output keeps its own (one-sided) histogram rather than following the
    Conv output before it."""
    wanted = set(tensors)
    binned = {t for t in wanted if t not in derived}

    def leaves(t: str) -> set[str]:
        out: set[str] = set()
        stack = [t]
        while stack:
            x = stack.pop()
            if x in binned or x not in derived:
                out.add(x)
            else:
                stack.extend(derived[x].sources)
        return out

    for t, d in derived.items():  # topological order
        if d.kind == "product":  # pushed forward from its source's own histogram
            if t in wanted and d.sources[0] not in binned:
                binned.add(t)
        elif t in wanted and not leaves(t) <= binned:
            binned.add(t)
    return sorted(binned)


def pushed_forward(derived: Mapping[str, Derived], binned: Iterable[str],
                   ) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """{y: (x, f)} for every ``product`` tensor that is not binned itself but whose source
    is: calibration pushes x's histogram through f (:func:`calibration.pushforward`)."""
    b = set(binned)
    return {t: (d.sources[0], d.map) for t, d in derived.items()
            if d.kind == "product" and t not in b and d.sources[0] in b}


def resolve_ranges(ranges: dict[str, tuple[float, float]], derived: Mapping[str, Derived],
                   seen: Mapping[str, tuple[float, float]]) -> None:
    """Add to ``ranges``, in place, the range of every derived tensor whose sources have
    one (``derived`` in topological order, as :func:`derived_tensors` returns it); a
    tensor that has a range already keeps it. ``seen``: the (min, max) observed of the
    binned tensors; a source's range is cut to it before it is mapped."""
    seen = dict(seen)
    for t, d in derived.items():
        if all(x in seen for x in d.sources) and t not in seen:
            seen[t] = d.apply([seen[x] for x in d.sources])
        if t in ranges or not all(x in ranges for x in d.sources):
            continue
        cut = []
        for x in d.sources:
            lo, hi = ranges[x]
            if x in seen and d.kind == "sigmoid":  # σ saturates: all seen values cost little
                lo, hi = seen[x]
            elif x in seen:
                lo, hi = max(lo, seen[x][0]), min(hi, seen[x][1])
                if lo > hi:  # a range that misses every seen value: keep it as it is
                    lo, hi = ranges[x]
            cut.append((lo, hi))
        ranges[t] = d.apply(cut)


# ----------------------------------------------------------------------------- parameters

def act_params(lo: float, hi: float, act_type: ActType) -> tuple[float, int]:
    """(scale, zero point) of an activation range."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if act_type == "int8":
        m = max(-lo, hi)
        return (m / 127.0 if m > 0 else 1.0), 0
    if hi - lo <= 0:
        return 1.0, 0
    s = (hi - lo) / 255.0
    z = int(np.clip(round(-lo / s), 0, 255))
    return s, z


def tensor_params(plan_: Plan, ranges: Mapping[str, tuple[float, float]], act_type: ActType,
                  bounds: Mapping[str, tuple[float, float]] | None = None) -> dict[str, tuple[float, int]]:
    """Scale and zero point of every planned tensor (shared groups: hull of their sources)."""
    bounds = bounds or {}
    hull: dict[str, list[float]] = {}
    for t in plan_.tensors:
        if t not in plan_.sources:
            continue
        lo, hi = ranges.get(t, (0.0, 0.0))
        if t in bounds:
            lo, hi = max(lo, bounds[t][0]), min(hi, bounds[t][1])
        r = plan_.share.get(t, t)
        h = hull.setdefault(r, [0.0, 0.0])
        h[0], h[1] = min(h[0], lo), max(h[1], hi)
    out = {}
    for t in plan_.tensors:
        r = plan_.share.get(t, t)
        lo, hi = hull.get(r, ranges.get(t, (0.0, 0.0)))
        out[t] = act_params(lo, hi, act_type)
    return out


def quantize_weight(w: np.ndarray, axis: int | None, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights in [−qmax, qmax], float32 scales) — symmetric, per channel along
    ``axis`` (None: per tensor); ``qmax`` 63 for 7-bit weights (see :mod:`onnxcompress.isa`)."""
    w = w.astype(np.float32)
    if axis is None:
        m = np.array(np.max(np.abs(w)) if w.size else 0.0, dtype=np.float64)
        s = np.where(m > 0, m / qmax, 1.0)
        q = np.clip(np.round(w / s), -qmax, qmax).astype(np.int8)
        return q, np.asarray(s, dtype=np.float32)
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    m = np.max(np.abs(moved), axis=1) if moved.shape[1] else np.zeros(w.shape[axis])
    s = np.where(m > 0, m / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / s.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, s


def weight_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if int(node_attr(node, "transB", 0)) else 1
    return 1  # MatMul: B is K × N


# ----------------------------------------------------------------------------- writing

def _float_reader_channels(n: onnx.NodeProto, x: str, plan_: Plan, inits: Mapping[str, TensorProto]) -> int | None:
    """Channels (axis 1) of ``x`` when ``n`` is a float Conv/ConvTranspose/Gemm reading it as
    its data input with a constant weight (what onnxruntime would quantize by itself), else
    None. A single channel is left alone: its scale vector would count as per tensor."""
    if n.name in plan_.nodes or n.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(n.input) < 2:
        return None
    if n.input[0] != x or n.input[1] not in inits:
        return None
    shape = list(inits[n.input[1]].dims)
    if n.op_type == "Conv":
        c = shape[1] * int(node_attr(n, "group", 1))
    elif n.op_type == "ConvTranspose":
        c = shape[0]
    elif int(node_attr(n, "transA", 0)):
        return None  # axis 1 of Aᵀ is the batch
    else:
        c = shape[1] if int(node_attr(n, "transB", 0)) else shape[0]
    return c if c > 1 else None


def insert_qdq(model: onnx.ModelProto, plan_: Plan, params: Mapping[str, tuple[float, int]], *,
               act_type: ActType = "uint8", per_channel: bool = True, bias: Literal["int32", "float"] = "int32",
               bias_shift: Mapping[str, np.ndarray] | None = None,
               rounding: Callable[[onnx.NodeProto, np.ndarray, np.ndarray, int | None], np.ndarray | None] | None = None,
               keep_float: Iterable[str] = (), weight_max: int = 127,
               ) -> onnx.ModelProto:
    """A copy of ``model`` with the Q/DQ pairs, quantized weights and biases of ``plan_``
    (``bias_shift``: node → per-channel amount added to its bias before quantization;
    ``rounding``: (node, W, final scales, axis) → int8 weights, or None for nearest
    rounding — :class:`rounding.GptqRounder`; ``keep_float``: float nodes that must stay
    float in onnxruntime, see the module docstring)."""
    bias_shift = bias_shift or {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    npq = np.uint8 if act_type == "uint8" else np.int8
    new_inits: list[TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    producer = {o: n for n in g.node for o in n.output if o}
    float_names = set(keep_float)
    must_float = [n for n in g.node if n.name in float_names]  # looked at for every quantized tensor

    def add_init(arr: np.ndarray, name: str) -> str:
        new_inits.append(numpy_helper.from_array(arr, name))
        return name

    # weights, biases and constant operands of quantized nodes
    def x_name(n: onnx.NodeProto) -> str:
        return n.input[0]

    for n in list(g.node):
        if n.name not in plan_.nodes:
            continue
        if n.op_type in COMPUTE and len(n.input) > 1 and n.input[1] in inits:
            w = numpy_helper.to_array(inits[n.input[1]])
            axis = weight_axis(n) if per_channel else None
            q, ws = quantize_weight(w, axis, weight_max)
            b_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
            if b_name is None and n.name in bias_shift and bias == "int32" and n.op_type == "Conv":
                b_name = f"{n.name}_bias_zero"  # a bias to carry the correction
                inits[b_name] = numpy_helper.from_array(np.zeros(w.shape[0], np.float32), b_name)
                n.input.append(b_name)
            if b_name is not None and bias == "int32" and b_name in inits:
                b = numpy_helper.to_array(inits[b_name]).astype(np.float64)
                if n.name in bias_shift:
                    b = b + bias_shift[n.name]
                sx = params[x_name(n)][0]
                # raise a weight scale where the bias would not fit int32
                need = np.abs(b) / (sx * (2**31 - 1))
                if axis is None:
                    need_s = float(np.max(need)) if need.size else 0.0
                    if need_s > float(ws):
                        ws = np.asarray(need_s, dtype=np.float32)
                        q = np.clip(np.round(w / ws), -weight_max, weight_max).astype(np.int8)
                else:
                    grow = need > ws
                    if np.any(grow):
                        ws = np.where(grow, need, ws).astype(np.float32)
                        shape = [1] * w.ndim
                        shape[axis] = -1
                        q = np.clip(np.round(w / ws.reshape(shape)), -weight_max, weight_max).astype(np.int8)
                bs = (sx * ws.astype(np.float64)).astype(np.float32)
                qb = np.clip(np.round(b / bs), -(2**31 - 1), 2**31 - 1).astype(np.int32)
                base = f"{n.name}_bias"
                bsn = add_init(bs.reshape(-1) if axis is not None else bs.reshape(()), f"{base}_scale")
                bzn = add_init(np.zeros(bs.shape, dtype=np.int32).reshape(-1) if axis is not None
                               else np.array(0, dtype=np.int32), f"{base}_zero_point")
                bq = add_init(qb, f"{base}_quantized")
                attrs = {"axis": 0} if axis is not None else {}
                new_nodes.append(helper.make_node("DequantizeLinear", [bq, bsn, bzn], [f"{base}_dequantized"],
                                                  name=f"{base}_DequantizeLinear", **attrs))
                n.input[2] = f"{base}_dequantized"
            if rounding is not None:
                rq = rounding(n, w, ws, axis)
                q = rq if rq is not None else q
            base = f"{n.name}_weight"
            wq = add_init(q, f"{base}_quantized")
            wsn = add_init(ws.reshape(-1) if axis is not None else np.asarray(ws, np.float32).reshape(()), f"{base}_scale")
            wzn = add_init(np.zeros(ws.size, dtype=np.int8) if axis is not None else np.array(0, dtype=np.int8),
                           f"{base}_zero_point")
            attrs = {"axis": axis} if axis is not None else {}
            new_nodes.append(helper.make_node("DequantizeLinear", [wq, wsn, wzn], [f"{base}_dequantized"],
                                              name=f"{base}_DequantizeLinear", **attrs))
            n.input[1] = f"{base}_dequantized"
        elif n.op_type in BINARY:
            for i, x in enumerate(n.input[:2]):
                if x not in inits:
                    continue
                c = numpy_helper.to_array(inits[x]).astype(np.float32)
                s, z = act_params(float(c.min(initial=0.0)), float(c.max(initial=0.0)), act_type)
                lo, hi = (0, 255) if act_type == "uint8" else (-128, 127)
                qc = np.clip(np.round(c / s) + z, lo, hi).astype(npq)
                base = f"{n.name}_const{i}"
                names = [add_init(qc, f"{base}_quantized"), add_init(np.array(s, np.float32), f"{base}_scale"),
                         add_init(np.array(z, npq), f"{base}_zero_point")]
                new_nodes.append(helper.make_node("DequantizeLinear", names, [f"{base}_dequantized"],
                                                  name=f"{base}_DequantizeLinear"))
                n.input[i] = f"{base}_dequantized"
    # activations (after the weights: a graph input's readers are renamed here)
    for t in sorted(plan_.tensors):
        s, z = params[t]
        sn = add_init(np.array(s, dtype=np.float32), f"{t}_scale")
        zn = add_init(np.array(z, dtype=npq), f"{t}_zero_point")
        if t in producer:
            src = t + FLOAT_SUFFIX
            node = producer[t]
            for i, o in enumerate(node.output):
                if o == t:
                    node.output[i] = src
            dq_out = t
        else:  # graph input
            src = t
            dq_out = t + "__dq"
            for n in g.node:
                for i, x in enumerate(n.input):
                    if x == t:
                        n.input[i] = dq_out
        new_nodes.append(helper.make_node("QuantizeLinear", [src, sn, zn], [t + "__q"], name=f"{t}_QuantizeLinear"))
        new_nodes.append(helper.make_node("DequantizeLinear", [t + "__q", sn, zn], [dq_out], name=f"{t}_DequantizeLinear"))
        for n in must_float:
            c = _float_reader_channels(n, dq_out, plan_, inits)
            if c is None:
                continue
            # onnxruntime's WeightBiasQuantization turns a float Conv/ConvTranspose/Gemm whose
            # input comes from a per-tensor DequantizeLinear into an int8 one (its own
            # per-tensor weights): the node would not run float. A per-channel DQ of
            # equal scales gives the same values and is not matched.
            name = f"{t}__float_reader_{n.name}"
            sv = add_init(np.full(c, s, dtype=np.float32), f"{name}_scale")
            zv = add_init(np.full(c, z, dtype=npq), f"{name}_zero_point")
            new_nodes.append(helper.make_node("DequantizeLinear", [t + "__q", sv, zv], [name],
                                              name=f"{name}_DequantizeLinear", axis=1))
            n.input[0] = name

    g.initializer.extend(new_inits)
    g.node.extend(new_nodes)
    order = topological_order(g)
    nodes = [g.node[i] for i in order]
    del g.node[:]
    g.node.extend(nodes)
    used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    # value_info of renamed producer outputs is stale; let shape inference redo it
    del g.value_info[:]
    return m


def fused_ops(model: onnx.ModelProto, provider: str = "cpu") -> dict[str, int]:
    """Op histogram of the graph onnxruntime actually runs (after its QDQ fusions)."""
    from ...validate import runtime_ops

    return runtime_ops(model, provider)
