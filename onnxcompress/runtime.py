"""The onnxruntime runtime: execution providers, sessions for in-memory models, runs,
the graph onnxruntime really executes (its own fusions), and interleaved latency timing.
Every other module runs models through here."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .data import Batch, model_feeds
from .errors import OptionError, ProviderError, RuntimeModelError
from .model import PROTOBUF_LIMIT, save_model, tensor_bytes
from .progress import NullProgress, Progress

log = logging.getLogger(__name__)

PROVIDERS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def resolve_provider(name: str) -> str:
    """Map ``cpu|cuda|tensorrt|auto`` to an available provider name, or raise."""
    available = ort.get_available_providers()
    name = name.lower()
    if name == "auto":
        for key in ("tensorrt", "cuda", "cpu"):
            if PROVIDERS[key][0] in available:
                return key
        return "cpu"
    if name not in PROVIDERS:
        raise OptionError(f"unknown provider '{name}'; valid: cpu, cuda, tensorrt, auto")
    if PROVIDERS[name][0] not in available:
        hint = " (install onnxcompress[gpu] for onnxruntime-gpu)" if name != "cpu" else ""
        raise ProviderError(
            f"execution provider '{name}' ({PROVIDERS[name][0]}) is not available in this onnxruntime; "
            f"available: {', '.join(available)}{hint}"
        )
    return name


def ort_message(exc: BaseException) -> str:
    """onnxruntime's error text on one line, without its C++ source location."""
    import re

    msg = " ".join(str(exc).split()) or type(exc).__name__
    return re.sub(r"\S*onnxruntime_src\S*:\d+ .*?\) (?=[A-Z])", "", msg)


def make_session(
    model: onnx.ModelProto,
    provider: str = "cpu",
    *,
    optimize: bool = True,
    threads: int | None = None,
    label: str = "model",
    spin: bool = True,
) -> ort.InferenceSession:
    """An onnxruntime session for an in-memory model (spilled to a temp file if > 2 GB).
    ``spin=False``: idle intra-op threads sleep instead of spinning (for a session that
    shares the cores with other work)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = PROVIDERS[resolve_provider(provider)]
    try:
        if tensor_bytes(model) > PROTOBUF_LIMIT // 2:
            with tempfile.TemporaryDirectory(prefix="onnxcompress-") as tmp:
                path = Path(tmp) / "model.onnx"
                save_model(model, path, external_data=True)
                return ort.InferenceSession(str(path), opts, providers=providers)
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    except Exception as exc:  # onnxruntime raises Fail, InvalidGraph, InvalidArgument, NotImplemented, ...
        raise RuntimeModelError(f"{label}: onnxruntime cannot load it: {ort_message(exc)}") from None


def runtime_ops(model: onnx.ModelProto, provider: str = "cpu", extended_only: bool = False,
                domains: bool = False) -> dict[str, int]:
    """Op histogram of the graph onnxruntime actually runs: the model after its graph
    optimizations (all of them, or up to the extended level: its fusions without the
    blocked-layout rewrite), keyed by op type (``domain:op`` outside the standard domain
    with ``domains``)."""
    with tempfile.TemporaryDirectory(prefix="onnxcompress-") as tmp:
        path = Path(tmp) / "opt.onnx"
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = str(path)
        if extended_only:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        try:
            ort.InferenceSession(model.SerializeToString(), so, providers=PROVIDERS[resolve_provider(provider)])
        except Exception as exc:  # onnxruntime's own exception classes
            raise RuntimeModelError(f"onnxruntime cannot load the model: {ort_message(exc)}") from None
        opt = onnx.load(str(path), load_external_data=False)
    hist: dict[str, int] = {}
    for n in opt.graph.node:
        key = n.op_type if not domains or n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
        hist[key] = hist.get(key, 0) + 1
    return hist


#: ops of onnxruntime's own fusions (in its optimized graph), that a rewrite must not lose
RUNTIME_FUSIONS = ("LayerNormalization", "SimplifiedLayerNormalization", "Gelu")
FUSED_MATMUL = "com.microsoft:FusedMatMul"
FUSED_PRODUCTS = "FusedMatMul or Gemm"  #: their count, as runtime_fusions reports it
#: fusions that take another one in whole, with the Add before it (a residual Add and a
#: LayerNorm make a SkipLayerNormalization; a bias Add and a Gelu a BiasGelu): where a rewrite
#: lets onnxruntime make the larger one, the smaller one's count drops and nothing is lost
ABSORBED_BY = {
    "LayerNormalization": ("com.microsoft:SkipLayerNormalization",),
    "SimplifiedLayerNormalization": ("com.microsoft:SkipSimplifiedLayerNormalization",),
    "Gelu": ("com.microsoft:BiasGelu",),
    "com.microsoft:Gelu": ("com.microsoft:BiasGelu",),
}


def runtime_fusions(model: onnx.ModelProto, provider: str = "cpu") -> dict[str, int]:
    """How many of each fused op onnxruntime makes of ``model`` (extended level):
    contrib ops (FusedConv, Attention, SkipLayerNormalization, BiasGelu, …),
    LayerNormalization/Gelu, and FusedMatMul and Gemm counted together
    (``FUSED_PRODUCTS``)."""
    ops = runtime_ops(model, provider, extended_only=True, domains=True)
    out = {k: v for k, v in ops.items() if k.startswith("com.microsoft:") or k in RUNTIME_FUSIONS}
    # a matrix product fused with a transpose (FusedMatMul) or with its bias (Gemm) is one
    # fused product: a rewrite may trade one for the other (fuse's linear_bias)
    products = out.pop(FUSED_MATMUL, 0) + ops.get("Gemm", 0)
    if products:
        out[FUSED_PRODUCTS] = products
    return out


def lost_fusions(before: Mapping[str, int] | None, model: onnx.ModelProto, provider: str = "cpu") -> str:
    """'LayerNormalization 3 → 1, …' for the onnxruntime fusions (:func:`runtime_fusions`)
    ``model`` has fewer of than ``before``, less those that became a fusion absorbing them
    (:data:`ABSORBED_BY`, as many as it gained); empty where none is lost or ``before`` is unknown."""
    if not before:
        return ""
    try:
        after = runtime_fusions(model, provider)
    except RuntimeModelError:
        return "onnxruntime cannot load the rewritten model"
    gained = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    lost = []
    for k, v in sorted(before.items()):
        short = v - after.get(k, 0)
        for bigger in ABSORBED_BY.get(k, ()):
            took = min(short, max(gained.get(bigger, 0), 0))
            short -= took
            gained[bigger] = gained.get(bigger, 0) - took  # each gain covers one loss only
        if short > 0:
            lost.append(f"{k} {v} → {after.get(k, 0)}")
    return ", ".join(lost)


def run_named(sess: ort.InferenceSession, names: list[str], feeds: Batch, label: str = "calibration model",
              ) -> list[np.ndarray]:
    """The named tensors of one run (``feeds`` with the samples on axis 0)."""
    try:
        return sess.run(names, model_feeds(sess, feeds))
    except Exception as exc:  # onnxruntime's own exception classes
        raise RuntimeModelError(f"{label}: onnxruntime failed to run it: {ort_message(exc)}") from None


def run_session(sess: ort.InferenceSession, feeds: Batch, label: str = "model") -> list[np.ndarray]:
    try:
        return sess.run(None, model_feeds(sess, feeds))
    except Exception as exc:  # onnxruntime raises its own exception classes
        raise RuntimeModelError(f"{label}: onnxruntime failed to run it: {ort_message(exc)}") from None


DECISION_QUANTILE = 0.25
"""The latency statistic of the timings that decide whether a rewrite is kept (the
keep-check, lowrank's per-layer timing, int8's guard; the search ranks its trials by the
median, see docs/decisions/never-slower.md). Noise on a shared machine only adds
time, and comes in stretches of one to a few seconds that slow one of two interleaved
sessions more than the other (docs/decisions/never-slower.md): the lower quartile of each
model's runs measures both away from such a stretch as long as it covers less than three
quarters of the timing, where the median needs it under half."""


def measure_latency(
    models: Sequence[onnx.ModelProto],
    feeds: Batch,
    *,
    provider: str = "cpu",
    warmup: int = 5,
    warmup_seconds: float = 0.2,
    runs: int = 20,
    min_seconds: float = 1.0,
    max_runs: int = 2000,
    threads: int | None = None,
    progress: Progress | None = None,
    labels: Sequence[str] | None = None,
    quantile: float = 0.5,
) -> list[float]:
    """Latency (ms) of each model on ``feeds``: the ``quantile`` of its timed runs (0.5,
    the median, by default; decisions pass ``DECISION_QUANTILE``).

    All models run in one process, interleaved in rounds (ABBA order): in each round a
    model gets untimed runs for at least 20 ms (at least one), which absorb the switch from
    the other session (whose onnxruntime threads may still be spinning), then 5 timed
    runs. Machine noise thus hits every model alike. Warm-up lasts at least ``warmup``
    rounds and ``warmup_seconds``; timing lasts at least ``runs`` timed runs per model and
    ``min_seconds``, and at most ``max_runs`` runs per model.

    Compare two models per call: every ratio the passes, the search and the benchmarks
    quote comes from a pair. With more models in one call the ratios are not reliable
    (docs/decisions/validation.md).
    """
    import time

    progress = progress or NullProgress()
    labels = labels or [f"model {i}" for i in range(len(models))]
    sessions = [make_session(m, provider, threads=threads, label=lbl) for m, lbl in zip(models, labels)]
    order = list(range(len(sessions)))
    start = time.perf_counter()
    i = 0
    while i < warmup or time.perf_counter() - start < warmup_seconds:
        for k in order:
            run_session(sessions[k], feeds, labels[k])
        i += 1
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    block = 5  # timed runs per model per round, after untimed runs that absorb the switch
    settle = 0.02  # seconds of untimed runs after each switch (at least one run)
    with progress.task("latency", runs) as task:
        i = 0
        while i * block < max_runs and (i * block < runs or time.perf_counter() - start < min_seconds):
            for k in (order if i % 2 == 0 else order[::-1]):
                t_switch = time.perf_counter()
                run_session(sessions[k], feeds, labels[k])
                while time.perf_counter() - t_switch < settle:  # the previous session's threads may still spin
                    run_session(sessions[k], feeds, labels[k])
                for _ in range(block):
                    t0 = time.perf_counter()
                    run_session(sessions[k], feeds, labels[k])
                    times[k].append((time.perf_counter() - t0) * 1000.0)
            i += 1
            task.advance(block)
    return [float(np.quantile(t, quantile)) for t in times]
