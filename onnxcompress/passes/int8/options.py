"""The int8 pass's options and the constants its steps share; every option is checked
in :meth:`Int8Options.check`, before any pass runs."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)


METHODS = ("kl", "minmax", "percentile", "mse")
#: ops that mean a model is quantized already (the pass then leaves it unchanged)
ALREADY_QUANTIZED = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                               "MatMulInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat", "QGemm"})


PREFIX_LEVELS = 16  #: the accuracy control tries floating the first 1/16, 2/16, … of the nodes
UNFLOAT_SLACK = 0.5  #: the float set is thinned only when agreement is within this fraction of max_drop
GUARD_TRIAL_SECONDS = 0.6  #: the latency guard times each variant at least this long per batch size
GUARD_TRIALS = 6  #: most float-region variants the latency guard times
#: float regions are tried only while the best variant is under this × fp32: floating a few
#: small regions wins back a little of int8's overhead, not the ~22% needed from here
GUARD_REGIONS_UNDER = 1.25
FLOAT_STEPS = 12  #: most chunks of Q/DQ pairs the accuracy control tries in float (one evaluation each)


@dataclass(frozen=True)
class Int8Options:
    target: Literal["portable", "host", "vnni", "avx2"] = field(default="portable", metadata={
        "help": "the CPU the model will run on: portable (7-bit weights, exact on every CPU), vnni (8-bit "
                "weights: x86 with VNNI, ARM64, GPUs; saturates on x86 without VNNI), avx2 (7-bit), host (this "
                "machine's)"})
    method: Literal["kl", "minmax", "percentile", "mse"] = field(default="kl", metadata={
        "help": "activation range: kl (TensorRT entropy, 2048 bins), minmax, percentile, mse"})
    percentile: float = field(default=99.99, metadata={"help": "percentile of |x| for method=percentile"})
    kl_guard: float = field(default=1.25, metadata={"experimental": True,
        "help": "kl: use the MSE threshold where KL's expected error exceeds this × the least (0 = pure KL)"})
    activations: Literal["uint8", "int8"] = field(default="uint8", metadata={
        "help": "uint8 asymmetric (onnxruntime CPU fast path) or int8 symmetric (TensorRT)"})
    per_channel: bool = field(default=True, metadata={"help": "per-output-channel weight scales (needs opset 13)"})
    bias: Literal["int32", "float"] = field(default="int32", metadata={
        "help": "int32 bias with scale s_x·s_w (fuses on CPU), or leave it float"})
    exclude: str = field(default="", metadata={
        "help": "comma-separated op types, node names or regexes of nodes kept float"})
    max_drop: float = field(default=0.005, metadata={
        "help": "largest allowed drop of agreement with the float model on calibration samples (0 = off)"})
    max_float: float = field(default=0.5, metadata={
        "help": "accuracy control returns at most this fraction of the quantized nodes to float"})
    unfloat: bool = field(default=True, metadata={"experimental": True,
        "help": "accuracy control: when the float set holds agreement within half of max_drop, return its "
                "graph-order sixteenths to int8 (most MACs first) while agreement holds"})
    min_float_prefix: int = field(default=0, metadata={"experimental": True,
        "help": "accuracy control: float at least this many of its prefix cuts, even where agreement already "
                "holds (the default pipeline raises it when held-out samples reject a result)"})
    check_samples: int = field(default=32, metadata={
        "help": "first calibration samples the accuracy check (and bias correction, guard timing) runs on"})
    samples: int = field(default=0, metadata={"help": "calibration samples used for ranges (0 = all)"})
    head_correction: bool = field(default=True, metadata={"experimental": True,
        "help": "shift the bias of the last quantized Conv/Gemm before each output by its mean total error"})
    bias_correction: bool = field(default=True, metadata={"experimental": True,
        "help": "shift each quantized Conv/Gemm bias by the mean error its own quantization adds (kept only if "
                "agreement does not get worse)"})
    refit: bool = field(default=False, metadata={"experimental": True,
        "help": "last step: refit each int8 Conv, in graph order, to the float model's output from the input the "
                "int8 model gives it (least squares on the check samples; kept only if agreement improves)"})
    guard: bool = field(default=True, metadata={"help": "time fp32 vs int8 and never return a slower model"})
    guard_batches: str = field(default="1,8", metadata={
        "help": "comma-separated batch sizes the guard times; int8 must be faster at every one "
                "(a model with a fixed batch dimension is timed at that size only)"})
    guard_confirm_seconds: float = field(default=2.0, metadata={"experimental": True,
        "help": "the chosen int8 variant is timed once more against fp32 for at least this long per batch size "
                "(each trial before it: 0.6 s), and the worse of its two ratios decides"})
    guard_margin: float = field(default=0.03, metadata={"experimental": True,
        "help": "int8 must be at least this fraction faster than fp32 to be kept (timing noise)"})
    float_tail: bool = field(default=True, metadata={"experimental": True,
        "help": "keep float the nodes after the last Conv/Gemm/MatMul (on the way to the outputs)"})
    gptq: bool = field(default=True, metadata={
        "help": "round each layer's int8 weights by GPTQ on its input statistics (check samples) instead of nearest"})
    through: bool = field(default=True, metadata={"experimental": True,
        "help": "a tensor read only by SiLU/HardSwish gets its low end from the error after the activation"})
    decompose: bool = field(default=True, metadata={"experimental": True,
        "help": "rewrite HardSigmoid/HardSwish as Mul/Add/Clip so int8 regions do not break at them"})
    columns: bool = field(default=True, metadata={"experimental": True,
        "help": "feature-table outputs ([N, rows, F]: boxes, objectness, scores): max_drop also holds each "
                "column's mean cosine"})
    concat_spread: float = field(default=4.0, metadata={"experimental": True,
        "help": "keep a Concat float when its inputs' range widths differ by more than this factor"})
    guard_concat_spread: float = field(default=16.0, metadata={"experimental": True,
        "help": "the latency guard first tries quantizing the Concats (and their readers) whose inputs' range "
                "widths differ by up to this factor; kept if faster by guard_margin and its drop stays within "
                "max(max_drop, the drop before the guard) (0 = off)"})

    def check(self) -> None:
        """Every option's own constraint, before any pass runs (Pass.__init__)."""
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile={self.percentile} must be in (0, 100]")
        if not self.guard_confirm_seconds > 0:
            raise ValueError(f"guard_confirm_seconds={self.guard_confirm_seconds} must be > 0")
        if not 0 <= self.max_float <= 1:
            raise ValueError(f"max_float={self.max_float} must be in [0, 1]")
        if not 0 <= self.min_float_prefix <= PREFIX_LEVELS:
            raise ValueError(f"min_float_prefix={self.min_float_prefix} must be in [0, {PREFIX_LEVELS}]")
        if self.check_samples < 1 or self.samples < 0:
            raise ValueError(f"check_samples must be ≥ 1 and samples ≥ 0, got {self.check_samples}, {self.samples}")
        guard_batch_sizes(self.guard_batches)
        for t in (t.strip() for t in self.exclude.split(",") if t.strip()):
            try:
                re.compile(t)
            except re.error as exc:
                raise ValueError(f"exclude pattern '{t}' is not a valid regex: {exc}") from None


def guard_batch_sizes(spec: str) -> list[int]:
    """``guard_batches`` as sorted batch sizes; ValueError naming the option otherwise."""
    try:
        sizes = sorted({int(b) for b in spec.split(",") if b.strip()})
    except ValueError:
        raise ValueError(f"guard_batches='{spec}' is not a list of integers") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"guard_batches='{spec}' needs sizes ≥ 1")
    return sizes
