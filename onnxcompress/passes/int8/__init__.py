"""Pass ``int8``: QuantizeLinear/DequantizeLinear insertion with streaming calibration,
an accuracy control and a latency guard.

1. **Prepare** (prepare.py, exact float rewrites): opset ≥ 13 for per-channel weights
   (validated upgrade, or per-tensor weights), BatchNormalization and constant
   per-channel Mul/Add folded into the Conv before them, ``x / c`` → ``x · (1/c)``, HardSigmoid and
   HardSwish as Mul/Add/Clip (put back as one node wherever no part ends up quantized).
2. **Place** (qdq.py): which nodes onnxruntime can run as integer kernels, which
   tensors get one Q → DQ pair, which share a scale.
3. **Calibrate** (calibration.py): one onnxruntime session exposing the tensors that may
   need a range, run batch by batch; a 2048-bin histogram per tensor, so memory does
   not depend on the number of samples. Ranges by ``kl`` (TensorRT's entropy method;
   ``kl_guard`` swaps in the MSE threshold where KL's error is far from the best),
   ``minmax``, ``percentile`` or ``mse``. Tensors that no quantized node reads (the
   edge back to float, graph outputs), and graph inputs (raw data: pixels), get their
   min/max: clipping there reaches the output directly. A tensor whose range follows
   from a binned one (scalar Mul/Add, Clip/Relu, Sigmoid, data movement, Concat:
   :func:`qdq.derived_tensors`) is not binned itself.
   A tensor read only by SiLU/HardSwish (``through``) gets its low end from the error
   after the activation (:func:`calibration.low_through`).
   **Weights** are 7-bit (|q| ≤ 63) for ``target=portable`` (the default) and ``avx2``,
   8-bit for ``vnni``: x86 CPUs without VNNI add pairs of uint8·int8 products into
   saturating int16 sums, which 7-bit weights never overflow (:mod:`onnxcompress.isa`);
   the target goes into the model's metadata. They are rounded by GPTQ (``gptq``, :mod:`rounding`): each layer's columns in
   turn, the rounding error moved onto the columns not yet rounded along H⁻¹, H = E[x·xᵀ]
   of its input on the check samples. Nodes after the last compute layer stay float
   (``float_tail``, :func:`qdq.tail_nodes`).
4. **Head correction** (``head_correction``, on): the last quantized Conv/Gemm before
   each output gets its bias shifted by minus its total mean error per channel on the
   check samples (upstream error included — nothing downstream absorbs it): a detector's
   objectness logits otherwise sit systematically low or high. Kept only if agreement does not get worse.
   **Bias correction** (``bias_correction``): each quantized Conv/Gemm's bias is shifted
   by minus the mean error per output channel its own quantized weights and bias add
   (against a float twin reading the same dequantized input, on the check samples;
   the empirical correction of Nagel et al. 2019). Kept only if agreement does not get
   worse: it helps some models and hurts others (a first Conv on an uncentred 0–255
   input turns tiny weight errors into a large mean shift). Correcting each layer's total
   error (upstream included) at once over-corrects.
5. **Accuracy control** (``max_drop``): agreement with the float model on held-out
   calibration samples, ``1 − min over outputs of the mean per-sample cosine`` and
   ``1 −`` top-1 agreement for class scores, and with ``columns`` (on) ``1 −`` the worst
   cosine of a feature table's single column over all samples (see :func:`agreement`: one
   cosine over a detection table hides a lost objectness column). If it exceeds
   ``max_drop`` the other range methods are tried on the same histograms; then the first
   1/16, 2/16, … of the quantized nodes in graph order go float (error made early is
   amplified by every later layer), each cut
   moved by up to half a sixteenth to where the fewest tensors cross (:func:`prefix_cuts`),
   each prefix kept only if agreement improves (at least ``min_float_prefix`` of them
   float regardless); then, from the best prefix, the Q/DQ pairs that bury
   the most signal (mean over channels of min(1, (s²/12)/E[x_c²]), from per-channel mean squares
   kept during calibration) are taken out — their producers and readers go float — a
   chunk (1/32 of them) at a time, greedily: a chunk stays float only if agreement
   improves (moving a float boundary can make it worse), until the drop holds,
   ``FLOAT_STEPS`` (12) chunks were tried, or ``max_float`` of the quantized nodes are float.
   Where the float set holds agreement within half of ``max_drop`` (a prefix that
   overshot), its graph-order sixteenths return to int8 one at a time, the most MACs
   first, each kept while agreement holds (``unfloat``).
6. **Latency guard** (``guard``): fp32 and int8 timed in one process (ABBA blocks,
   medians). The usual culprits are tried in float one group at a time, each kept only
   if it makes int8 at least ``guard_margin`` faster: depthwise convs (onnxruntime's
   uint8 depthwise kernel runs ~5× slower than its fp32 one on an AVX-512 CPU),
   squeeze-excite branches, pooling/resize/data movement (uint8 NCHW MaxPool ~10×
   slower), and quantized regions without a Conv/Gemm/MatMul. If int8 is still not
   faster, regions go back to float one at a time (smallest first) while that helps. The
   chosen variant is then timed once more, over ``guard_confirm_seconds`` (2 s) per batch
   size instead of 0.6 s, and the worse of its two ratios counts (the best of several
   noisy timings is optimistic). If no variant is faster than the input,
   the input is returned unchanged and the report says so. Every timing the decision
   used is in the report. Before the float variants, one that quantizes *more* is
   tried: Concats whose inputs' ranges differ by more than ``concat_spread`` (4) but at
   most ``guard_concat_spread`` (16), with their readers, under one shared scale. Kept
   like the others, only if faster and within the drop limit: a heavy conv after an FPN
   Concat otherwise stays float.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from ... import isa
from ...data import LimitedSource, batch_of, take_samples
from ...errors import OptionError
from ...model import node_attr, with_outputs
from ...pipeline import Pass, PassContext, PassResult
from ...validate import column_cosine, column_sums, cosine, is_class_scores, is_feature_table
from . import prepare, qdq
from .calibration import StreamingHistogram, collect_histograms, low_through, tensor_range
from .rounding import GptqRounder, input_hessians
from .refit import refit_convs

log = logging.getLogger(__name__)

METHODS = ("kl", "minmax", "percentile", "mse")
#: ops that mean a model is quantized already (the pass then leaves it unchanged)
ALREADY_QUANTIZED = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                               "MatMulInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat", "QGemm"})


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


# ----------------------------------------------------------------------------- helpers

PREFIX_LEVELS = 16  #: the accuracy control tries floating the first 1/16, 2/16, … of the nodes
UNFLOAT_SLACK = 0.5  #: the float set is thinned only when agreement is within this fraction of max_drop
GUARD_TRIAL_SECONDS = 0.6  #: the latency guard times each variant at least this long per batch size
GUARD_TRIALS = 6  #: most float-region variants the latency guard times
FLOAT_STEPS = 12  #: most chunks of Q/DQ pairs the accuracy control tries in float (one evaluation each)


def nodes_of_names(names: Iterable[str], p: qdq.Plan) -> set[str]:
    """``names`` with the activations fused into them and the nodes they are fused into,
    restricted to the plan's quantized nodes (a fused pair goes float together)."""
    out = set(names)
    out |= {f for f, src in p.fused.items() if src in out} | {p.fused[f] for f in out if f in p.fused}
    return out & p.nodes


def prefix_cuts(g: onnx.GraphProto, order: list[str], p: qdq.Plan, levels: int = PREFIX_LEVELS) -> list[int]:
    """Cut positions into ``order`` (the plan's quantized, non-fused nodes in graph order)
    for the float prefixes 0/levels … levels/levels: each sixteenth's cut moves by up to
    half a sixteenth to where the fewest tensors cross from the prefix to quantized nodes
    after it (nearest first), never before the previous cut. A ragged cut costs a
    Q/DQ and a layout change per crossing tensor and leaves residual Adds float beside
    int8 branches, which runs measurably slower than a one-tensor cut a few nodes away."""
    n = len(order)
    pos = {name: i for i, name in enumerate(order)}
    pos.update({f: pos[src] for f, src in p.fused.items() if src in pos})
    last: dict[str, int] = {}  # tensor → position of its last quantized reader
    for r in g.node:
        for t in r.input if r.name in pos else ():
            last[t] = max(last.get(t, -1), pos[r.name])
    cross = np.zeros(n + 2, dtype=np.int64)  # cross[k]: tensors produced in order[:k], read in order[k:]
    for node in g.node:
        a = pos.get(node.name)
        for t in node.output if a is not None else ():
            if last.get(t, -1) > a:
                cross[a + 1] += 1
                cross[last[t] + 1] -= 1
    cross = np.cumsum(cross)
    cuts, half = [0], max(1, n // (2 * levels))
    for j in range(1, levels):
        b = n * j // levels  # the window is never empty: the previous cut is ≤ its own b + half ≤ this b + half
        window = range(max(cuts[-1], b - half), min(n, b + half) + 1)
        cuts.append(min(window, key=lambda k: (int(cross[k]), abs(k - b), k)))
    return [*cuts, n]


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


def _shift_biases(state: "_State", runs: Iterable[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
                  watch: list[tuple[str, str, str]]) -> int:
    """For ``(node, quantized tensor, reference tensor)`` in ``watch``, add minus the mean
    per-channel difference over ``runs`` (pairs of quantized, reference outputs) to the
    node's bias shift; the number of nodes shifted."""
    err: dict[str, np.ndarray] = {}
    count: dict[str, int] = defaultdict(int)
    for got_q, got_f in runs:
        for node, y_q, y_f in watch:
            x, y = got_f[y_f], got_q[y_q]
            if x.ndim < 2 or x.shape != y.shape:
                continue
            with np.errstate(invalid="ignore", over="ignore"):
                d = (y.astype(np.float64) - x).reshape(x.shape[0], x.shape[1], -1)
                err[node] = err.get(node, 0.0) + d.sum(axis=(0, 2))
            count[node] += d.shape[0] * d.shape[2]
    shifted = 0
    for node, e in err.items():
        mean = e / max(count[node], 1)
        if np.all(np.isfinite(mean)):  # NaN/Inf activations: nothing sensible to correct
            state.bias_shift[node] = state.bias_shift.get(node, 0.0) - mean
            shifted += 1
    return shifted


def guard_batch_sizes(spec: str) -> list[int]:
    """``guard_batches`` as sorted batch sizes; ValueError naming the option otherwise."""
    try:
        sizes = sorted({int(b) for b in spec.split(",") if b.strip()})
    except ValueError:
        raise ValueError(f"guard_batches='{spec}' is not a list of integers") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"guard_batches='{spec}' needs sizes ≥ 1")
    return sizes


def _guard_sizes(opts: Int8Options, model: onnx.ModelProto) -> list[int]:
    """The batch sizes the latency guard times (checked before any work is done)."""
    from ...data import input_specs

    sizes = guard_batch_sizes(opts.guard_batches)
    fixed = {sp.static_batch for sp in input_specs(model) if sp.static_batch is not None}
    return sorted(fixed) if fixed else sizes


def agreement(ref: list[list[np.ndarray]], new: list[list[np.ndarray]], columns: bool = False) -> dict[str, float]:
    """Mean per-sample cosine of every output and top-1 agreement of class-score outputs,
    and the worst cosine of a feature table's single column over all samples
    (``column_cosine``; [N, rows, F]: box coordinates, objectness, class scores — one
    cosine over the table hides its small columns; pooled over the samples as
    :func:`~onnxcompress.validate.column_cosine` says why). ``drop`` = 1 − the lowest of
    them (the column cosine only with ``columns``)."""
    cos: dict[int, list[float]] = defaultdict(list)
    cols: dict[int, np.ndarray] = {}
    top1: dict[int, list[float]] = defaultdict(list)
    for a_list, b_list in zip(ref, new):
        for k, (a, b) in enumerate(zip(a_list, b_list)):
            if a.dtype.kind != "f":
                continue
            a2 = a.reshape(a.shape[0], -1).astype(np.float64) if a.ndim else a.reshape(1, -1).astype(np.float64)
            b2 = b.reshape(a2.shape).astype(np.float64)
            cos[k].extend(cosine(a2, b2, axis=1).tolist())
            if is_feature_table(a.shape):  # per column: cosine over the rows of all samples
                sums = column_sums(a, b)
                cols[k] = cols[k] + sums if k in cols else sums
            if is_class_scores(a.shape):
                top1[k].extend((a2.argmax(1) == b2.argmax(1)).astype(float).tolist())
    worst = min((float(np.mean(v)) for v in cos.values()), default=1.0)
    agree = min((float(np.mean(v)) for v in top1.values()), default=1.0)
    out = {"cosine": worst, "top1": agree, "drop": max(1.0 - worst, 1.0 - agree)}
    if cols:
        out["column_cosine"] = min(float(column_cosine(v).min()) for v in cols.values())
        if columns:
            out["drop"] = max(out["drop"], 1.0 - out["column_cosine"])
    return out


# ----------------------------------------------------------------------------- the pass

@dataclass
class _State:
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
    derived: dict[str, qdq.Derived] = field(default_factory=dict)  # ranges that follow from others'
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
            for x in n.input:
                readers[x].append(n)
        self.readers = readers


def _record_target(model: onnx.ModelProto, target: Mapping[str, Any]) -> None:
    """Write the target the weights were quantized for into the model's metadata."""
    keep = [p for p in model.metadata_props if p.key not in (isa.META_TARGET, isa.META_WEIGHT_BITS)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in keep}, isa.META_TARGET: str(target["resolved"]),
                                        isa.META_WEIGHT_BITS: str(target["weight_bits"])})


@dataclass(frozen=True)
class AccuracyControl:
    """What the accuracy control reached, for the search to act on: whether it held
    ``max_drop`` on its check samples, its drop there, and how many of its prefix cuts
    it floated."""

    met: bool
    drop: float
    float_prefix: int


class Int8(Pass):
    name = "int8"
    summary = "QDQ int8 quantization: streaming KL calibration, accuracy control, never slower than its input"
    Options = Int8Options
    exact = False

    def check_context(self, ctx: PassContext) -> None:
        if ctx.calibration is None:
            raise OptionError("pass 'int8' needs calibration data (--calib)")

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        opts: Int8Options = self.options
        self.check_context(ctx)
        guard_sizes = _guard_sizes(opts, model) if opts.guard else []
        stats: dict[str, Any] = {}
        done = sorted({n.op_type for n in model.graph.node if n.op_type in ALREADY_QUANTIZED})
        if done:
            return PassResult(model, False, {"decision": "kept", "summary": f"already quantized ({', '.join(done)})"})
        t_start = time.perf_counter()
        state = self._prepare(model, ctx, opts, stats)

        # calibrate every tensor the widest placement could quantize, through the sources of
        # those whose range is derived (an output hidden by a fused Relu/Clip never needs a
        # range: fused pairs go float together, see _build)
        widest = state.widest = qdq.plan(state.model, state.allowed)
        names = qdq.calibrated_tensors(widest.tensors, state.derived)
        if not widest.nodes:
            stats.update(decision="kept float", reason="no quantizable node")
            return PassResult(model, False, stats)
        t0 = time.perf_counter()
        pushed = qdq.pushed_forward(state.derived, names)
        state.hists = collect_histograms(state.model, names, LimitedSource(ctx.calibration, opts.samples),
                                         provider=ctx.provider, seed=ctx.seed, progress=ctx.progress,
                                         channels=opts.max_drop > 0, functions=pushed)
        stats["calibration"] = {"tensors": len(names), "pushed_forward": len(pushed),
                                "seconds": round(time.perf_counter() - t0, 3)}

        check = take_samples(ctx.calibration, max(opts.check_samples, 1))
        from ...validate import make_session, run_session

        ref_sess = make_session(model, ctx.provider, label="int8: float model")
        state.ref = [run_session(ref_sess, b, "int8: float model") for b in check]
        del ref_sess
        if opts.gptq:
            t0 = time.perf_counter()
            compute = [n for n in state.model.graph.node if n.name in widest.nodes and n.op_type in qdq.COMPUTE]
            digest = hashlib.sha1(state.model.SerializeToString())
            for b in check:
                for k in sorted(b):
                    digest.update(k.encode())
                    digest.update(np.ascontiguousarray(b[k]).tobytes())
            key = f"{digest.hexdigest()}:{ctx.seed}:{state.weight_max}:{sorted(n.name for n in compute)}"
            cached = ctx.cache.get("int8.gptq")
            reused = cached is not None and cached[0] == key
            state.rounder = cached[1] if reused else GptqRounder(
                input_hessians(state.model, compute, check, provider=ctx.provider, seed=ctx.seed), state.weight_max)
            ctx.cache["int8.gptq"] = (key, state.rounder)  # only the latest: its statistics can be large
            stats["gptq"] = {"layers": len(state.rounder.hessians), "reused": reused,
                             "seconds": round(time.perf_counter() - t0, 3)}

        if opts.max_drop > 0 and opts.unfloat:
            state.macs = _layer_macs(state.model, check[0])

        def evaluate(q: onnx.ModelProto) -> dict[str, float]:
            sess = make_session(q, ctx.provider, label="int8 model")
            return agreement(state.ref, [run_session(sess, b, "int8 model") for b in check], opts.columns)

        # accuracy control
        method = opts.method
        floated: set[str] = set()
        q, p = self._build(state, opts, method, floated)
        acc = evaluate(q)
        steps = [{"method": method, "float_nodes": 0, **_round(acc)}]
        if opts.max_drop > 0 and acc["drop"] > opts.max_drop:
            for other in [m for m in ("mse", "percentile", "kl", "minmax") if m != method]:
                q2, p2 = self._build(state, opts, other, floated)
                acc2 = evaluate(q2)
                steps.append({"method": other, "float_nodes": 0, **_round(acc2)})
                if acc2["drop"] < acc["drop"]:
                    q, p, acc, method = q2, p2, acc2, other
                if acc["drop"] <= opts.max_drop:
                    break
        for enabled, label, correct in ((opts.head_correction, "heads_corrected", self._correct_heads),
                                        (opts.bias_correction, "bias_corrected", self._correct_bias)):
            if not enabled or opts.bias != "int32":
                continue
            saved = dict(state.bias_shift)
            shifted = correct(state, p, q, check, ctx)
            if not shifted:
                continue
            q2, p2 = self._build(state, opts, method, floated)
            acc2 = evaluate(q2)
            steps.append({"method": method, label: shifted, **_round(acc2)})
            if acc2["drop"] <= acc["drop"]:
                q, p, acc = q2, p2, acc2
            else:  # it made things worse: forget this correction, keep the earlier ones
                state.bias_shift = saved
        prefix = 0
        if opts.max_drop > 0 and (acc["drop"] > opts.max_drop or opts.min_float_prefix > 0):
            q, p, acc, prefix = self._return_to_float(state, opts, method, q, p, acc, floated, steps, evaluate)
        control = AccuracyControl(met=acc["drop"] <= opts.max_drop or opts.max_drop == 0,
                                  drop=round(float(acc["drop"]), 6), float_prefix=prefix)
        stats["accuracy"] = {"method": method, "max_drop": opts.max_drop, "drop": control.drop, "met": control.met,
                             "float_prefix": prefix, "steps": steps}
        if opts.max_drop > 0 and acc["drop"] > opts.max_drop:
            log.warning("int8: agreement drop %.4f on calibration samples exceeds max_drop %.4f even with %d "
                        "nodes in float", acc["drop"], opts.max_drop, len(floated))

        # latency guard
        if opts.guard:
            best = self._guard(state, opts, method, floated, model, q, p, check, ctx, stats, evaluate, acc["drop"],
                               guard_sizes)
            if best is None:
                stats.update(decision="kept float", seconds=round(time.perf_counter() - t_start, 3),
                             summary=f"kept float: {stats.get('reason', '')}")
                return PassResult(model, False, stats, control)
            q, p = best
        if opts.refit:
            q, acc = self._refit(state, q, check, ctx, acc, evaluate, stats)
        stats.update(self._describe(state, p))
        stats["decision"] = "quantized"
        _record_target(q, stats["target"])
        lat = stats.get("latency", {}).get("ratio")
        stats["summary"] = (f"{len(p.nodes)} nodes int8 ({method} ranges), agreement drop {acc['drop']:.4f}"
                            + (f" (worst table column cosine {acc['column_cosine']:.4f})" if "column_cosine" in acc
                               else "")
                            + (f", {lat:.3f}× fp32 latency" if lat is not None else ""))
        stats["seconds"] = round(time.perf_counter() - t_start, 3)
        return PassResult(q, True, stats, control)

    # -- steps

    def _prepare(self, model: onnx.ModelProto, ctx: PassContext, opts: Int8Options,
                 stats: dict[str, Any]) -> _State:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        per_channel = opts.per_channel
        opset = prepare.opset_of(m)
        if opset < prepare.PER_CHANNEL_OPSET and (per_channel or opset < 10):
            why = None
            try:
                up = prepare.upgrade_opset(m)
                from ...validate import make_session, run_session

                batch = take_samples(ctx.calibration, 1)[0]
                a = run_session(make_session(m, ctx.provider), batch)
                b = run_session(make_session(up, ctx.provider), batch)
                for x, y in zip(a, b):
                    span = float(np.max(np.abs(x))) if x.size else 0.0
                    if x.shape != y.shape or (x.size and float(np.max(np.abs(x - y))) > 1e-4 * max(span, 1e-12)):
                        why = "the upgraded model's outputs differ"
                        break
            except Exception as exc:  # the converter raises many kinds of errors
                why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            if why is None:
                m = up
                stats["opset"] = f"upgraded {opset} → {prepare.PER_CHANNEL_OPSET} (validated)"
            elif opset < 10:
                raise OptionError(f"pass 'int8': opset {opset} has no QuantizeLinear (needs ≥ 10) and the "
                                  f"upgrade to {prepare.PER_CHANNEL_OPSET} failed: {why}")
            else:
                per_channel = False
                stats["opset"] = f"kept {opset}: upgrade failed ({why}); weights per tensor"
                log.warning("int8: opset %d could not be upgraded to 13 (%s); weights are quantized per tensor",
                            opset, why)
        stats["batchnorm_folded"] = prepare.fold_batchnorm(m)
        stats["affine_folded"] = prepare.fold_affine(m)
        stats["div_to_mul"] = prepare.div_to_mul(m)
        hard: list[prepare.HardActivation] = []
        if opts.decompose:
            stats["hard_activations_decomposed"] = prepare.decompose_hard_activations(m, hard)
        prepare.name_nodes(m)
        m = onnx.shape_inference.infer_shapes(m)
        inits = {t.name: t for t in m.graph.initializer}
        excluded = _excluded(m, opts.exclude)
        allowed = {n.name for n in m.graph.node} - excluded
        if opts.float_tail:
            tail = qdq.tail_nodes(m) & allowed
            allowed -= tail
            stats["tail_float"] = len(tail)
        bounds = {}
        for n in m.graph.node:
            if n.op_type in qdq.FUSED_ACTIVATIONS and n.output:
                bounds[n.output[0]] = qdq.fused_bounds(n, inits)
        derived = qdq.derived_tensors(m)
        target = isa.resolve_target(opts.target, ctx.provider)
        bits = 7 if isa.WEIGHT_MAX[target] < 127 else 8
        stats["target"] = {"option": opts.target, "resolved": target, "host": isa.describe_host(), "weight_bits": bits}
        stats["weights"] = f"{bits}-bit for {target}"  # the report's one-line form
        return _State(m, inits, allowed, {}, bounds, per_channel, hard=hard, derived=derived,
                      through=qdq.through_activations(m, derived) if opts.through else {}, excluded=excluded,
                      weight_max=isa.WEIGHT_MAX[target])

    def _ranges(self, state: _State, opts: Int8Options, method: str, p: qdq.Plan | None = None,
                ) -> dict[str, tuple[float, float]]:
        sym = opts.activations == "int8"
        if method not in state.base_ranges:  # thresholds depend only on the histograms: once per method
            state.base_ranges[method] = {
                t: tensor_range(h, method, symmetric=sym, percentile=opts.percentile,  # type: ignore[arg-type]
                                kl_guard=opts.kl_guard)
                for t, h in state.hists.items()}
            if not sym:  # a tensor read only by SiLU/HardSwish: its low end by the error after it
                base = state.base_ranges[method]
                for t, f in state.through.items():
                    if t in base and t in state.hists:
                        lo, hi = base[t]
                        base[t] = (low_through(state.hists[t], f, lo, hi), hi)
        out = dict(state.base_ranges[method])
        seen = {t: (h.min, h.max) for t, h in state.hists.items() if h.signed is not None}
        qdq.resolve_ranges(out, state.derived, seen)
        if p is not None:
            read = set()
            for n in state.model.graph.node:
                if n.name in p.nodes and n.name not in p.fused:
                    read.update(qdq.data_inputs(n, state.inits) if n.op_type not in qdq.PASSTHROUGH else n.input[:1])
            edge = (p.tensors - read) | {i.name for i in state.model.graph.input}
            if edge & p.tensors:
                mm = {t: tensor_range(h, "minmax", symmetric=sym) for t, h in state.hists.items()}
                qdq.resolve_ranges(mm, state.derived, seen)
                out.update({t: mm[t] for t in edge & p.tensors if t in mm})
        return out

    def _build(self, state: _State, opts: Int8Options, method: str, floated: set[str],
               drop: set[str] | None = None, spread: float | None = None) -> tuple[onnx.ModelProto, qdq.Plan]:
        out = floated | (drop or set())
        if state.widest is not None:  # a fused activation and its producer go float together
            out = out | nodes_of_names(out, state.widest)
        allowed = state.allowed - out
        ranges = self._ranges(state, opts, method)
        p = qdq.plan(state.model, allowed, ranges, spread or opts.concat_spread)
        if state.hists:  # calibration covers the widest placement's tensors
            missing = sorted(t for t in p.tensors if t not in ranges)
            if missing:
                raise RuntimeError(f"int8: no calibrated range for {missing[:3]} (internal error)")
        ranges = self._ranges(state, opts, method, p)
        params = qdq.tensor_params(p, ranges, opts.activations, state.bounds)
        q = qdq.insert_qdq(state.model, p, params, act_type=opts.activations, per_channel=state.per_channel,
                           bias=opts.bias, bias_shift=state.bias_shift, rounding=state.rounder,
                           keep_float=state.excluded, weight_max=state.weight_max)
        prepare.recompose_hard_activations(q, state.hard, p.nodes)
        return q, p

    def _correct_bias(self, state: _State, p: qdq.Plan, q: onnx.ModelProto, check: list[dict[str, np.ndarray]],
                      ctx: PassContext) -> int:
        """Empirical bias correction of each quantized Conv/Gemm's own error: a float twin
        of the layer reads the same dequantized input, and the mean difference per output
        channel, ``E[Conv(x̂, Ŵ) + b̂ − (Conv(x̂, W) + b)]`` over the check samples, is
        subtracted from the bias. Each layer corrects only what its own weights and bias
        add, so corrections do not compound. Returns the number of layers shifted."""
        from onnx import helper

        from ...validate import make_session, run_session

        convs = [n for n in q.graph.node if n.name in p.nodes and n.op_type in ("Conv", "Gemm")]
        orig = {n.name: n for n in state.model.graph.node}
        if not convs:
            return 0
        m = onnx.ModelProto()
        m.CopyFrom(q)
        have = {t.name for t in m.graph.initializer}
        watch: list[tuple[str, str, str]] = []
        for n in convs:
            o = orig[n.name]
            for x in o.input[1:]:
                if x and x not in have and x in state.inits:
                    m.graph.initializer.append(state.inits[x])
                    have.add(x)
            twin = helper.make_node(n.op_type, [n.input[0], *o.input[1:]], [f"{n.name}__twin"], name=f"{n.name}__twin")
            twin.attribute.extend(n.attribute)
            m.graph.node.append(twin)
            watch.append((n.name, n.output[0], twin.output[0]))
        outs = {o.name for o in m.graph.output}
        m.graph.output.extend(onnx.ValueInfoProto(name=t) for _, a, b in watch for t in (a, b) if t not in outs)
        sess = make_session(m, ctx.provider, optimize=False, label="int8 bias correction model")
        names = [o.name for o in m.graph.output]
        runs = ((got, got) for got in (dict(zip(names, run_session(sess, b, "int8 bias correction model")))
                                       for b in check))
        return _shift_biases(state, runs, watch)

    def _correct_heads(self, state: _State, p: qdq.Plan, q: onnx.ModelProto, check: list[dict[str, np.ndarray]],
                       ctx: PassContext) -> int:
        """Head correction: the last quantized Conv/Gemm before each graph output gets its
        bias shifted by minus its *total* mean error per channel (int8 model vs float model,
        upstream errors included). Only the heads: nothing downstream absorbs the shift,
        so corrections cannot compound. Returns the number of heads corrected."""
        from ...validate import make_session, run_session

        heads: dict[str, onnx.NodeProto] = {}
        stack, seen = [o.name for o in state.model.graph.output], set()
        while stack:
            n = state.producer.get(stack.pop())
            if n is None or n.name in seen:
                continue
            seen.add(n.name)
            if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
                if n.name in p.nodes and n.op_type in ("Conv", "Gemm"):
                    heads[n.name] = n
                continue
            stack.extend(x for x in n.input if x)
        if not heads:
            return 0
        names_f = [n.output[0] for n in heads.values()]
        names_q = [t + qdq.FLOAT_SUFFIX if t in p.tensors else t for t in names_f]
        f, qq = with_outputs(state.model, names_f), with_outputs(q, names_q)
        sf = make_session(f, ctx.provider, label="int8 head correction (float)")
        sq = make_session(qq, ctx.provider, label="int8 head correction (int8)")
        of, oq = [o.name for o in f.graph.output], [o.name for o in qq.graph.output]
        runs = ((dict(zip(oq, run_session(sq, b))), dict(zip(of, run_session(sf, b)))) for b in check)
        return _shift_biases(state, runs, list(zip(heads, names_q, names_f)))

    def _return_to_float(self, state: _State, opts: Int8Options, method: str, q: onnx.ModelProto, p: qdq.Plan,
                         acc: dict[str, float], floated: set[str], steps: list[dict[str, Any]],
                         evaluate):  # type: ignore[no-untyped-def]
        """Return quantized nodes to float until agreement holds (``floated`` is updated);
        the model, its plan, its agreement and how many prefix cuts it floated.

        1. Prefixes: the first 1/16, 2/16, … of the quantized nodes in graph order, each cut
           moved to where few tensors cross (:func:`prefix_cuts`), within ``max_float``,
           until one holds ``max_drop``; at least ``min_float_prefix`` of them (kept even if
           agreement is no better: held-out samples rejected fewer). Rounding error made early is
           amplified by every layer after it, and no choice of single tensors comes as
           close as a float prefix.
        2. Then, from the best prefix, the Q/DQ pairs that bury the most signal, a chunk at
           a time. A tensor's damage is the mean over its channels of
           min(1, (s²/12) / E[x_c²]): per-tensor scales wipe out the small channels of a
           tensor whose channels differ widely (they reach depthwise convs intact). Taking
           a pair out means its producer and every reader go float.
        3. With ``unfloat`` (and no ``min_float_prefix``), when the float set holds
           agreement within ``UNFLOAT_SLACK`` of ``max_drop``: its graph-order
           sixteenths (with MACs in them) return to int8,
           most MACs first, each kept while agreement holds ``max_drop``.
        A step of 1-2 is kept only if agreement improves (moving float boundaries can also
        make it worse)."""
        ranges = self._ranges(state, opts, method, p)
        params = qdq.tensor_params(p, ranges, opts.activations, state.bounds)
        scores = {}
        for t in p.tensors:
            d = state.derived.get(t)
            src, k = (d.sources[0], d.k) if t not in state.hists and d is not None and d.kind == "scale" else (t, 1.0)
            h = state.hists.get(src)  # y = k·x: y's step s buries x's signal as x's step s/k would
            v = h.noise_to_signal(params[t][0] / k) if h is not None else None
            if v is not None:
                scores[t] = v
        ranked = sorted(scores, key=lambda t: -scores[t])

        def nodes_of(tensors: list[str]) -> set[str]:
            out: set[str] = set()
            for t in tensors:
                if t in state.producer:
                    out.add(state.producer[t].name)
                out.update(r.name for r in state.readers.get(t, []))
            return nodes_of_names(out, p)

        def cost(nodes: set[str]) -> int:  # fused activations ride along: not counted
            return sum(1 for n in nodes if n not in p.fused)

        budget = int(opts.max_float * max(cost(p.nodes), 1))
        best: tuple[onnx.ModelProto, qdq.Plan, dict[str, float], set[str]] = (q, p, acc, set())
        # 1. prefixes in graph order
        order = [n.name for n in state.model.graph.node if n.name in p.nodes and n.name not in p.fused]

        cuts = prefix_cuts(state.model.graph, order, p)

        def sixteenths(lo: int, hi: int) -> set[str]:
            """The quantized nodes of graph-order sixteenths lo … hi − 1 (fused ones with them)."""
            return nodes_of_names(order[cuts[lo]:cuts[hi]], p)

        rung = best_rung = 0  # prefixes tried so far (distinct cuts), the one kept
        floor = opts.min_float_prefix
        for j in range(1, PREFIX_LEVELS + 1):
            if cuts[j] == cuts[j - 1]:
                continue
            rung += 1
            trial = sixteenths(0, j)
            if cost(trial) > budget or (rung > floor and best[2]["drop"] <= opts.max_drop):
                break
            if rung < floor:
                continue
            q2, p2 = self._build(state, opts, method, floated | trial)
            acc2 = evaluate(q2)
            kept = rung == floor or acc2["drop"] < best[2]["drop"] - 1e-5
            steps.append({"method": method, "float_prefix": f"{j}/{PREFIX_LEVELS}", "rung": rung,
                          "float_nodes": len(trial), **_round(acc2), "kept": kept})
            if kept:
                best, best_rung = (q2, p2, acc2, trial), rung
        # 2. greedy, a chunk of tensors at a time in ranked order
        chunk = max(1, len(ranked) // 32)
        for i in range(0, min(len(ranked), chunk * FLOAT_STEPS), chunk):
            if best[2]["drop"] <= opts.max_drop:
                break
            trial = best[3] | nodes_of(ranked[i : i + chunk])
            if cost(trial) > budget:
                break
            q2, p2 = self._build(state, opts, method, floated | trial)
            acc2 = evaluate(q2)
            steps.append({"method": method, "float_tensors": i + chunk, "float_nodes": len(trial), **_round(acc2),
                          "kept": acc2["drop"] < best[2]["drop"] - 1e-5})
            if acc2["drop"] < best[2]["drop"] - 1e-5:
                best = (q2, p2, acc2, trial)
        # 3. spend the slack (a prefix that overshot: agreement within half the limit): graph-order
        #    segments of the float set back to int8, most MACs first, while agreement holds
        if opts.unfloat and not floor and best[3] and best[2]["drop"] <= UNFLOAT_SLACK * opts.max_drop:
            segments = []
            for j in range(PREFIX_LEVELS):
                seg = sixteenths(j, j + 1) & best[3]
                work = sum(state.macs.get(n, 0) for n in seg)
                if work > 0:
                    segments.append((work, j, seg))
            for work, j, seg in sorted(segments, key=lambda s: (-s[0], s[1])):
                trial = best[3] - seg
                q2, p2 = self._build(state, opts, method, floated | trial)
                acc2 = evaluate(q2)
                kept = acc2["drop"] <= opts.max_drop
                steps.append({"method": method, "unfloat_segment": f"{j + 1}/{PREFIX_LEVELS}", "macs": work,
                              "float_nodes": len(trial), **_round(acc2), "kept": kept})
                if kept:
                    best = (q2, p2, acc2, trial)
        floated |= best[3]
        return best[0], best[1], best[2], best_rung

    def _refit(self, state: _State, q: onnx.ModelProto, check: list[dict[str, np.ndarray]], ctx: PassContext,
               acc: dict[str, float], evaluate, stats: dict[str, Any],  # type: ignore[no-untyped-def]
               ) -> tuple[onnx.ModelProto, dict[str, float]]:
        """:func:`refit.refit_convs` on a copy of the final model, kept only if agreement on
        the check samples improves. Returns the model kept and its agreement."""
        t0 = time.perf_counter()
        q2 = onnx.ModelProto()
        q2.CopyFrom(q)
        layers = refit_convs(state.model, q2, check, provider=ctx.provider, seed=ctx.seed, qmax=state.weight_max)
        acc2 = evaluate(q2) if layers else acc
        kept = layers > 0 and acc2["drop"] < acc["drop"]
        stats["refit"] = {"layers": layers, "kept": kept, "drop_before": round(acc["drop"], 6),
                          "drop_after": round(acc2["drop"], 6), "seconds": round(time.perf_counter() - t0, 3)}
        return (q2, acc2) if kept else (q, acc)

    def _regions(self, state: _State, p: qdq.Plan) -> list[set[str]]:
        """Connected quantized nodes (through quantized tensors)."""
        uf = qdq.UnionFind()
        for n in state.model.graph.node:
            if n.name not in p.nodes:
                continue
            uf.find(n.name)
            if n.name in p.fused:
                uf.union(n.name, p.fused[n.name])
            for x in n.input:
                src = state.producer.get(x)
                if src is not None and src.name in p.nodes and (x in p.tensors or x in p.inner):
                    uf.union(n.name, src.name)
        groups: dict[str, set[str]] = defaultdict(set)
        for n in p.nodes:
            groups[uf.find(n)].add(n)
        return list(groups.values())

    def _guard(self, state: _State, opts: Int8Options, method: str, floated: set[str], original: onnx.ModelProto,
               q: onnx.ModelProto, p: qdq.Plan, check: list[dict[str, np.ndarray]], ctx: PassContext,
               stats: dict[str, Any], evaluate, drop_now: float, sizes: list[int]):  # type: ignore[no-untyped-def]
        """Time int8 against fp32; try the usual culprits in float; keep a variant only if it
        is faster by ``guard_margin`` and its agreement drop stays within
        max(``max_drop``, the drop before the guard) — moving a float boundary can cost
        accuracy."""
        from ...validate import measure_latency

        drop_limit = max(opts.max_drop, drop_now) + 1e-4 if opts.max_drop > 0 else None
        rejected: list[str] = []

        accepted_acc: list[dict[str, float]] = []  # agreement of the variant last accepted

        def accurate(cand: onnx.ModelProto, label: str) -> bool:
            if drop_limit is None:
                return True
            a = evaluate(cand)
            if a["drop"] > drop_limit:
                rejected.append(f"{label}: drop {a['drop']:.4f} > {drop_limit:.4f}")
                return False
            accepted_acc[:] = [a]
            return True

        pool = {k: np.concatenate([b[k] for b in check]) for k in check[0]}
        feeds_by_batch = {bsz: batch_of(pool, bsz) for bsz in sizes}
        trials: list[dict[str, Any]] = []

        def timed(cand: onnx.ModelProto, label: str, seconds: float = GUARD_TRIAL_SECONDS) -> float:
            worst = 0.0
            row: dict[str, Any] = {"variant": label}
            for bsz, feeds in feeds_by_batch.items():
                t_f, t_q = measure_latency([original, cand], feeds, provider=ctx.provider, runs=20,
                                           min_seconds=seconds, labels=["fp32 model", f"int8 model ({label})"])
                row[f"b{bsz}"] = {"fp32_ms": round(t_f, 3), "int8_ms": round(t_q, 3), "ratio": round(t_q / t_f, 3)}
                worst = max(worst, t_q / t_f)
            row["ratio"] = round(worst, 3)
            trials.append(row)
            return worst

        best_ratio = timed(q, "all quantized")
        best = (q, p)
        spread = opts.concat_spread
        if opts.guard_concat_spread > spread and any("mixes ranges" in r for r in p.declined.values()):
            q2, p2 = self._build(state, opts, method, floated, spread=opts.guard_concat_spread)
            label = f"Concats spread up to {opts.guard_concat_spread:g}x quantized"
            if len(p2.nodes) > len(p.nodes):
                r = timed(q2, label)
                if r < best_ratio * (1.0 - opts.guard_margin) and accurate(q2, label):
                    best_ratio, best, spread = r, (q2, p2), opts.guard_concat_spread
                    p = p2
        regions = self._regions(state, p)
        nodes = {n.name: n for n in state.model.graph.node}

        def depthwise(n: onnx.NodeProto) -> bool:
            if n.op_type != "Conv":
                return False
            w = state.inits.get(n.input[1])
            return w is not None and int(node_attr(n, "group", 1)) > 1 and w.dims[1] == 1

        no_compute = set().union(*[r for r in regions if not any(nodes[x].op_type in qdq.COMPUTE for x in r)] or [set()])
        dw = {x for x in p.nodes if depthwise(nodes[x])}
        dw |= {f for f, src in p.fused.items() if src in dw}
        moving = {x for x in p.nodes if nodes[x].op_type in qdq.PASSTHROUGH and nodes[x].op_type != "Reshape"}
        se = self._squeeze_excite(state, p)
        drop: set[str] = set()
        for label, cand_set in (("depthwise convs float", dw), ("squeeze-excite float", se),
                                ("pooling/resize/data movement float", moving),
                                ("elementwise-only regions float", no_compute)):
            cand_set = cand_set - drop
            if not cand_set:
                continue
            q2, p2 = self._build(state, opts, method, floated, drop | cand_set, spread)
            if not any(nodes[x].op_type in qdq.COMPUTE for x in p2.nodes):
                continue
            r = timed(q2, label)
            if r < best_ratio * (1.0 - opts.guard_margin) and accurate(q2, label):
                best_ratio, best, drop = r, (q2, p2), drop | cand_set
        if best_ratio >= 1.0 - opts.guard_margin:
            _, p_now = best
            regs = sorted(self._regions(state, p_now), key=len)
            for reg in regs[:GUARD_TRIALS]:
                q2, p2 = self._build(state, opts, method, floated, drop | reg, spread)
                if not any(nodes[x].op_type in qdq.COMPUTE for x in p2.nodes):
                    continue  # nothing heavy left in int8: that is the float model
                r = timed(q2, f"region of {len(reg)} nodes float")
                if r < best_ratio * (1.0 - opts.guard_margin) and accurate(q2, f"region of {len(reg)} nodes float"):
                    best_ratio, best, drop = r, (q2, p2), drop | reg
        if best_ratio < 1.0 - opts.guard_margin:
            # the best of several noisy timings is optimistic: time the choice again, over
            # a longer window, and keep the worse
            best_ratio = max(best_ratio, timed(best[0], "the chosen variant, timed again", opts.guard_confirm_seconds))
        stats["latency"] = {"batches": sizes, "provider": ctx.provider, "trials": trials,
                            "ratio": round(best_ratio, 3), "rejected_for_accuracy": rejected}
        if best_ratio >= 1.0 - opts.guard_margin:
            log.warning("int8: no quantized variant is faster than the float model (best %.3f×); keeping float",
                        best_ratio)
            stats["reason"] = (f"int8 not faster (best {best_ratio:.3f}× of fp32; needs < {1 - opts.guard_margin:.2f}×)")
            return None
        if drop or spread != opts.concat_spread:
            stats["accuracy"]["after_guard"] = _round(accepted_acc[0] if accepted_acc else evaluate(best[0]))
        return best

    def _squeeze_excite(self, state: _State, p: qdq.Plan) -> set[str]:
        """Quantized nodes of squeeze-excite branches: from a GlobalAveragePool through the
        ops on its 1×1 output to the Mul that rescales the feature map."""
        out: set[str] = set()
        for n in state.model.graph.node:
            if n.op_type != "GlobalAveragePool":
                continue
            stack, seen = [n], set()
            while stack:
                cur = stack.pop()
                if cur.name in seen or len(seen) > 16:
                    continue
                seen.add(cur.name)
                if cur.op_type == "Mul" and cur is not n and len(seen) > 1:
                    continue  # the rescale: stop here (kept in the set)
                for o in cur.output:
                    stack.extend(state.readers.get(o, []))
            out |= seen
        return out & p.nodes

    def _describe(self, state: _State, p: qdq.Plan) -> dict[str, Any]:
        ops = Counter(n.op_type for n in state.model.graph.node if n.name in p.nodes)
        reasons = Counter(v for v in p.declined.values())
        return {
            "quantized_nodes": len(p.nodes),
            "quantized_ops": dict(sorted(ops.items())),
            "qdq_pairs": len(p.tensors),
            "per_channel": state.per_channel,
            "float_reasons": dict(reasons.most_common()),
        }


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


__all__ = ["Int8", "Int8Options"]
