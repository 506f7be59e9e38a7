"""Activation ranges that follow from other tensors' (so they need no histogram of their
own): scalar scale/shift, Clip/Relu bounds, data movement, Concat hulls, σ of a
source's seen range, and products x·g(x) pushed forward from x's histogram."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ...graph import clip_bounds, initializers, producers, topological_order
from ...model import node_attr
from .qdq import COMPUTE, FUSED_ACTIVATIONS, PASSTHROUGH, _float_types, _readers

log = logging.getLogger(__name__)


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
    inits = initializers(g)
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
    then chosen by the error after f (:func:`thresholds.low_through`)."""
    g = model.graph
    readers = _readers(g.node)
    producer = producers(g)
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
