"""Which int8 arithmetic a CPU runs, and the weight range that is exact on it.

onnxruntime's CPU kernels multiply uint8 activations by int8 weights (U8S8). Where the CPU
has a dot-product instruction without saturation (x86 AVX512-VNNI or AVX-VNNI:
``vpdpbusd``; ARM64 ``sdot``/``udot``, or ARM's widening multiplies) the int32 sums are
exact. On x86 without VNNI (AVX2, AVX-512 without VNNI, SSE4.1) the kernels use
``vpmaddubsw``, which adds each *pair* of adjacent u8·s8 products into int16 with
saturation: with full-range weights, 255·127 + 255·127 = 64770 does not fit, and a model
that holds on a VNNI machine silently loses accuracy on the AVX2 machine it is deployed
on. Weights limited to 7 bits (|q| ≤ 63, as onnxruntime's ``reduce_range`` and
OpenVINO's saturation workaround do) keep every pair within 2·255·63 = 32130: exact on
every CPU, at the cost of one bit of weight resolution.

Targets (the int8 pass's ``target`` option):

* ``portable`` — 7-bit weights: exact on every CPU (the default);
* ``vnni`` — 8-bit weights, for x86 CPUs with VNNI, ARM64 and GPUs; saturates on x86 without VNNI;
* ``avx2`` — 7-bit weights (x86 without VNNI);
* ``host`` — whichever of those fits the CPU this runs on (:func:`host_target`).
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Target = Literal["portable", "host", "vnni", "avx2"]
TARGETS: tuple[str, ...] = ("portable", "host", "vnni", "avx2")

#: the largest |q| of int8 weights per resolved target
WEIGHT_MAX = {"portable": 63, "avx2": 63, "vnni": 127}

#: metadata keys the int8 pass writes into the model
META_TARGET = "onnxcompress.int8.target"
META_WEIGHT_BITS = "onnxcompress.int8.weight_bits"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo`` ``flags`` on x86, ``Features`` on ARM);
    empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def describe_host() -> str:
    """A short name of the host's int8 arithmetic: ``x86-vnni``, ``x86-avx2`` (saturating
    pairs), ``arm64-dotprod``, ``arm64`` or ``unknown``."""
    machine = platform.machine().lower()
    flags = cpu_flags()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        if {"avx512_vnni", "avx_vnni"} & flags:
            return "x86-vnni"
        return "x86-avx2" if flags else "unknown"
    if machine in ("aarch64", "arm64"):
        return "arm64-dotprod" if "asimddp" in flags else "arm64"
    return "unknown"


def host_target(provider: str = "cpu") -> str:
    """The target that is exact and fastest here: ``vnni`` on a CPU whose int8 dot product
    does not saturate, or on a GPU provider; ``avx2`` on x86 without VNNI; ``portable``
    where the CPU cannot be identified."""
    if provider in ("cuda", "tensorrt"):
        return "vnni"
    host = describe_host()
    if host == "x86-avx2":
        return "avx2"
    if host in ("x86-vnni", "arm64", "arm64-dotprod"):
        return "vnni"
    return "portable"


def resolve_target(target: str, provider: str = "cpu") -> str:
    """``target`` with ``host`` replaced by :func:`host_target`."""
    return host_target(provider) if target == "host" else target


def weight_max(target: str, provider: str = "cpu") -> int:
    """The largest |q| of int8 weights for ``target``."""
    return WEIGHT_MAX[resolve_target(target, provider)]


def saturates_here() -> bool:
    """Whether onnxruntime's U8S8 kernels on this CPU add weight pairs with int16 saturation."""
    return describe_host() == "x86-avx2"
