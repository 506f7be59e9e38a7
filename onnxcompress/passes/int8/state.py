"""What the int8 pass's steps share: the prepared model, its placement and ranges
(:class:`State`), and small helpers."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ... import isa
from ...errors import OptionError
from ...graph import reads
from . import prepare, qdq, ranges
from .calibration import StreamingHistogram
from .rounding import GptqRounder

log = logging.getLogger(__name__)


@dataclass
class State:
    model: onnx.ModelProto              # prepared float model
    inits: dict[str, onnx.TensorProto]
    allowed: set[str]
    hists: dict[str, StreamingHistogram]
    bounds: dict[str, tuple[float, float]]
    per_channel: bool
    ref: list[list[np.ndarray]] = field(default_factory=list)  # float outputs on the check samples
    bias_shift: dict[str, np.ndarray] = field(default_factory=dict)  # bias correction per node
    base_ranges: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)  # per method
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)  # tensor → the node writing it
    readers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)  # tensor → nodes reading it
    hard: list[prepare.HardActivation] = field(default_factory=list)  # decomposed, put back where float
    widest: qdq.Plan | None = None  # the placement with every allowed node quantized
    derived: dict[str, ranges.Derived] = field(default_factory=dict)  # ranges that follow from others'
    through: dict[str, Callable[[np.ndarray], np.ndarray]] = field(default_factory=dict)  # x read only by f(x)
    rounder: GptqRounder | None = None  # GPTQ weight rounding (None: nearest)
    macs: dict[str, int] = field(default_factory=dict)  # Conv/Gemm/MatMul → MACs per check sample
    excluded: set[str] = field(default_factory=set)  # the user's exclude=: must run float in onnxruntime
    weight_max: int = 127  # the largest |q| of the weights (63: 7-bit, see onnxcompress.isa)

    def __post_init__(self) -> None:
        readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.model.graph.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for x in reads(n):
                readers[x].append(n)
        self.readers = readers


def _excluded(model: onnx.ModelProto, spec: str) -> set[str]:
    names: set[str] = set()
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    if not tokens:
        return names
    pats = []
    for t in tokens:
        try:
            pats.append(re.compile(t))
        except re.error as exc:
            raise OptionError(f"pass 'int8': exclude pattern '{t}' is not a valid regex: {exc}") from None
    matched = set()
    for n in model.graph.node:
        for t, pat in zip(tokens, pats):
            if n.op_type == t or n.name == t or pat.fullmatch(n.name):
                names.add(n.name)
                matched.add(t)
    for t in tokens:
        if t not in matched:
            log.warning("int8: exclude '%s' matches no node or op type", t)
    return names


def _record_target(model: onnx.ModelProto, target: Mapping[str, Any]) -> None:
    """Write the target the weights were quantized for into the model's metadata."""
    keep = [p for p in model.metadata_props if p.key not in (isa.META_TARGET, isa.META_WEIGHT_BITS)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in keep}, isa.META_TARGET: str(target["resolved"]),
                                        isa.META_WEIGHT_BITS: str(target["weight_bits"])})


def _layer_macs(model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> dict[str, int]:
    """MACs of each Conv/Gemm/MatMul at the check sample's shapes ({} if they cannot be
    resolved: no float segment then has work to return to int8, and the slack is not spent)."""
    from ...report import count_macs

    try:
        _, layers, _ = count_macs(model, {k: list(v.shape) for k, v in sample.items()})
    except Exception as exc:  # shape inference on an odd export: unfloat does nothing
        log.info("int8: no per-layer MACs (%s)", exc)
        return {}
    return {layer.node: layer.macs for layer in layers}


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 5) for k, v in d.items()}
