"""The lowrank pass's options, and the split of one K×K weight into a Kh×1 and a 1×Kw
factor by SVD, or of one linear layer's weight into two thinner ones (see the package
docstring for the derivation)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...graph import fresh_namer
from ...model import node_attr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LowRankOptions:
    rank: int = field(default=0, metadata={"help": "fixed rank for every layer (0 = use energy or macs_ratio)"})
    energy: float = field(default=0.0, metadata={"help": "keep this fraction of the weights' Σσ² per layer (0 = off)"})
    macs_ratio: float = field(default=0.0, metadata={"help": "whole-model MACs budget, e.g. 0.7 (0 = off)"})
    round_to: int = field(default=8, metadata={"help": "ranks rounded up to a multiple of this"})
    min_saving: float = field(default=0.15, metadata={"help": "split only if the chain needs this fraction fewer MACs"})
    layers: Literal["all", "spatial", "linear"] = field(default="all", metadata={
        "help": "which layers may be split: all, spatial (K×K convs only) or linear (MatMul, Gemm, 1×1 Conv only)"})
    measure: Literal["auto", "true", "false"] = field(default="auto", metadata={
        "help": "time each layer and its split at the model's shapes in onnxruntime; keep the split only if "
                "faster (auto = linear layers: MatMul, Gemm, 1×1 Conv)"})
    refit: Literal["auto", "none", "lstsq"] = field(default="auto", metadata={
        "help": "auto = least-squares refit of the second factor when calibration data is given"})
    ridge: float = field(default=1e-4, metadata={"experimental": True, "help": "refit ridge, relative to the mean diagonal"})
    positions: int = field(default=256, metadata={"experimental": True, "help": "sampled output positions per image for the refit"})
    sensitivity: bool = field(default=True, metadata={"experimental": True,
        "help": "with macs_ratio and calibration data: allocate ranks, and which layers to split at all, by the "
                "measured output error of splitting each layer alone (a few ranks per layer) instead of by "
                "weight energy"})
    sensitivity_samples: int = field(default=8, metadata={"experimental": True, "help": "calibration samples used to measure sensitivity"})
    data_energy: bool = field(default=False, metadata={"experimental": True,
        "help": "with calibration data, weigh each plain-SVD component by the input energy it sees (instead of "
                "whiten)"})
    whiten: Literal["auto", "true", "false"] = field(default="auto", metadata={"experimental": True,
        "help": "with calibration data, choose each layer's subspace by the SVD of Lᵀ·M (Σ = L·Lᵀ the second "
                "moment of the layer's input patches) instead of M: the rank-r optimum of the output error; "
                "auto = with macs_ratio (data_energy=true turns it off)"})

    def check(self) -> None:
        if self.rank < 0 or self.round_to < 1:
            raise ValueError("rank must be ≥ 0 and round_to ≥ 1")
        if not 0 <= self.energy <= 1:
            raise ValueError(f"energy must be in [0, 1], got {self.energy}")
        if not 0 <= self.macs_ratio < 1:
            raise ValueError(f"macs_ratio must be in [0, 1) (0 = off), got {self.macs_ratio}")
        if not 0 <= self.min_saving < 1:
            raise ValueError(f"min_saving must be in [0, 1), got {self.min_saving}")


def svd_factors(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, σ, Vᵀ) of the (C·Kh) × (N·Kw) matrix of ``w`` (N×C×Kh×Kw)."""
    n, c, kh, kw = w.shape
    m = w.transpose(1, 2, 0, 3).reshape(c * kh, n * kw).astype(np.float64)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return u, s, vt


def split_weights(w: np.ndarray, r: int, u=None, s=None, vt=None) -> tuple[np.ndarray, np.ndarray]:
    """Vertical (r×C×Kh×1) and horizontal (N×r×1×Kw) factors of rank ``r``."""
    n, c, kh, kw = w.shape
    if u is None:
        u, s, vt = svd_factors(w)
    root = np.sqrt(s[:r])
    vert = (u[:, :r] * root).T.reshape(r, c, kh, 1)
    horiz = (root[:, None] * vt[:r]).reshape(r, n, kw).transpose(1, 0, 2).reshape(n, r, 1, kw)
    return vert.astype(w.dtype), horiz.astype(w.dtype)


@dataclass
class Candidate:
    index: int
    node: onnx.NodeProto
    w: np.ndarray
    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    out_hw: tuple[int, int]
    in_w: int
    original_macs: int
    rank: int = 0
    op: str = "Conv"  # Conv, MatMul or Gemm (w is then the [N, K, 1, 1] view of the [K, N] weight)
    label: str = ""  # the layer's name before the split
    decision: str = ""
    reason: str = ""
    weights: np.ndarray | None = None  # per-component energy: σ_k² (weights) or σ_k²·E[(u_kᵀx)²]
    plain_s: np.ndarray | None = None  # the weights' own singular values, where whitening replaced s

    @property
    def full_rank(self) -> int:
        return len(self.s)

    @property
    def linear(self) -> bool:
        return is_linear(self.op, self.w)

    def chain_macs(self, r: int) -> int:
        n, c, kh, kw = self.w.shape
        ho, wo = self.out_hw
        return int(r * c * kh * ho * self.in_w + n * r * kw * ho * wo)

    def energy(self, r: int) -> float:
        e = self.s**2 if self.weights is None else self.weights
        total = float(e.sum())
        return float(e[:r].sum()) / total if total > 0 else 1.0


def _round_up(r: int, step: int, cap: int) -> int:
    return min(cap, int(math.ceil(r / step) * step)) if r > 0 else 0


def is_linear(op: str, w: np.ndarray) -> bool:
    """A per-position linear map: MatMul, Gemm or 1×1 Conv (``w``: the conv weight, or
    the [N, K, 1, 1] view of a linear one)."""
    return op != "Conv" or w.shape[2:] == (1, 1)


def linear_view(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """A MatMul's [K, N] weight (a Gemm's B, transposed where ``transB``) as the [N, K, 1, 1]
    weight of the 1×1 convolution computing the same map, so one SVD serves both."""
    if node.op_type == "Gemm" and int(node_attr(node, "transB", 0)):
        w = w.T
    return np.ascontiguousarray(w.T)[:, :, None, None]


def _split_node(model: onnx.ModelProto, cand: Candidate, r: int) -> str:
    """Replace the layer by the chain in ``model``; return the first factor's output name."""
    if cand.op != "Conv":
        return _split_linear(model, cand, r)
    g = model.graph
    node = cand.node
    vert, horiz = split_weights(cand.w, r, cand.u, cand.s, cand.vt)
    base = node.name or node.output[0]
    fresh = fresh_namer(g)
    v_name, h_name, mid = fresh(f"{base}_lr_v"), fresh(f"{base}_lr_h"), fresh(f"{base}_lr_mid")
    g.initializer.extend([numpy_helper.from_array(vert, v_name), numpy_helper.from_array(horiz, h_name)])
    strides = list(node_attr(node, "strides", [1, 1]))
    dil = list(node_attr(node, "dilations", [1, 1]))
    pads = list(node_attr(node, "pads", [0, 0, 0, 0]))
    auto = node_attr(node, "auto_pad", "NOTSET")
    v_attrs: dict[str, Any] = {"kernel_shape": [cand.w.shape[2], 1], "strides": [strides[0], 1], "dilations": [dil[0], 1]}
    h_attrs: dict[str, Any] = {"kernel_shape": [1, cand.w.shape[3]], "strides": [1, strides[1]], "dilations": [1, dil[1]]}
    if auto in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        v_attrs["auto_pad"] = h_attrs["auto_pad"] = auto
    else:
        v_attrs["pads"] = [pads[0], 0, pads[2], 0]
        h_attrs["pads"] = [0, pads[1], 0, pads[3]]
    v_node = helper.make_node("Conv", [node.input[0], v_name], [mid], name=f"{base}_lr_v", **v_attrs)
    h_inputs = [mid, h_name] + ([node.input[2]] if len(node.input) > 2 and node.input[2] else [])
    h_node = helper.make_node("Conv", h_inputs, [node.output[0]], name=f"{base}_lr_h", **h_attrs)
    _replace(g, cand, v_node, h_node)
    return mid


def _replace(g: onnx.GraphProto, cand: Candidate, first: onnx.NodeProto, second: onnx.NodeProto) -> None:
    """Put the chain where the candidate's node was; the candidate now names its second node."""
    idx = list(g.node).index(cand.node)
    g.node.remove(cand.node)
    g.node.insert(idx, second)
    g.node.insert(idx, first)
    cand.node = second


def _split_linear(model: onnx.ModelProto, cand: Candidate, r: int) -> str:
    """MatMul(x, W) → MatMul(MatMul(x, A), B) with W ≈ A·B ([K, r], [r, N]); a Gemm keeps
    its C, alpha and beta on the second factor. The output name stays, so a following Add
    (bias) and onnxruntime's MatMul + Add fusion stay as they were."""
    g = model.graph
    node = cand.node
    vert, horiz = split_weights(cand.w, r, cand.u, cand.s, cand.vt)
    a, b = np.ascontiguousarray(vert[:, :, 0, 0].T), np.ascontiguousarray(horiz[:, :, 0, 0].T)
    base = node.name or node.output[0]
    fresh = fresh_namer(g)
    a_name, b_name, mid = fresh(f"{base}_lr_a"), fresh(f"{base}_lr_b"), fresh(f"{base}_lr_mid")
    g.initializer.extend([numpy_helper.from_array(a, a_name), numpy_helper.from_array(b, b_name)])
    first = helper.make_node("MatMul", [node.input[0], a_name], [mid], name=f"{base}_lr_a")
    if node.op_type == "Gemm":
        attrs = {k: node_attr(node, k, 1.0) for k in ("alpha", "beta")}
        second = helper.make_node("Gemm", [mid, b_name, *node.input[2:]], [node.output[0]], name=f"{base}_lr_b",
                                  **attrs)
    else:
        second = helper.make_node("MatMul", [mid, b_name], [node.output[0]], name=f"{base}_lr_b")
    _replace(g, cand, first, second)
    return mid
