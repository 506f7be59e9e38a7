"""Streaming activation histograms and range selection for int8 calibration.

Histogram. Per tensor, a histogram of |x| with ``bins`` (2048) bins over [0, R] is
updated batch by batch. When a batch exceeds R, R grows by the smallest power of two
2^k that covers it and the old histogram is merged exactly (every 2^k old bins into one
new bin), so memory never depends on the number of samples. The signed min and max are
kept too (minmax, and to tell non-negative tensors apart).

KL (TensorRT entropy calibration). For each candidate i = q … bins (q = 128 quantized
levels for a symmetric int8 range, 256 for a non-negative tensor on uint8):

* P = the first i bins, with every count above bin i added to bin i−1 (clipping);
* Q = the first i bins merged into q chunks of ⌊i/q⌋ bins (the last chunk takes the
  remainder), each chunk's count spread evenly over the bins where P is non-zero;
* both normalized, Q floored at ε where P > 0; KL(P‖Q) = Σ P log(P/Q).

The threshold is (i* + 0.5)·R/bins for the i* of least divergence (ties, equal up to
1e-9 relative, go to the smallest i). All candidates are
evaluated at once with cumulative sums (numpy, in row blocks to bound memory), not in
a Python loop per candidate.

Other methods: ``minmax``; ``percentile`` (the |x| value below which p% of the mass
lies); ``mse`` (threshold minimizing clipping error Σ_{x>T}(x−T)² plus rounding noise
Δ²/12·N_{x≤T}, Δ = T/levels, over bin centres).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

KL_EPS = 1e-10


@dataclass
class StreamingHistogram:
    """Histogram of |x| over [0, range] whose range grows by exact power-of-two merges."""

    bins: int = 2048
    hist: np.ndarray | None = None
    range: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    count: int = 0
    merges: int = field(default=0, repr=False)

    def update(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, dtype=np.float32)).ravel()
        a = a[np.isfinite(a)]
        if a.size == 0:
            return
        xs = np.asarray(x, dtype=np.float32)
        finite = xs[np.isfinite(xs)]
        self.min = min(self.min, float(finite.min()))
        self.max = max(self.max, float(finite.max()))
        self.count += a.size
        peak = float(a.max())
        if self.hist is None:
            self.range = peak if peak > 0 else 1e-8
            self.hist = np.zeros(self.bins, dtype=np.int64)
        elif peak > self.range:
            factor = 2 ** math.ceil(math.log2(peak / self.range))
            if factor >= self.bins:
                merged = np.zeros(self.bins, dtype=np.int64)
                merged[0] = self.hist.sum()
            else:
                merged = np.zeros(self.bins, dtype=np.int64)
                merged[: self.bins // factor] = self.hist.reshape(-1, factor).sum(axis=1)
            self.hist = merged
            self.range *= factor
            self.merges += 1
        idx = np.minimum((a * (self.bins / self.range)).astype(np.int64), self.bins - 1)
        self.hist += np.bincount(idx, minlength=self.bins)

    @property
    def bin_width(self) -> float:
        return self.range / self.bins

    @property
    def non_negative(self) -> bool:
        return self.min >= 0.0


def kl_divergences(hist: np.ndarray, num_quantized: int = 128, block: int = 256) -> np.ndarray:
    """KL(P_i ‖ Q_i) for every candidate i = num_quantized … len(hist) (see module doc)."""
    h = np.asarray(hist, dtype=np.float64)
    nb = len(h)
    q = num_quantized
    cs = np.concatenate([[0.0], np.cumsum(h)])
    total = cs[-1]
    out = np.empty(nb - q + 1)
    k = np.arange(nb)
    for b0 in range(q, nb + 1, block):
        cand = np.arange(b0, min(b0 + block, nb + 1))  # [M]
        rows = np.arange(len(cand))
        valid = k[None, :] < cand[:, None]  # [M, nb]
        p = np.where(valid, h[None, :], 0.0)
        p[rows, cand - 1] += total - cs[cand]
        nonzero = p > 0
        merged = cand // q
        chunk = np.minimum(k[None, :] // merged[:, None], q - 1)
        start = chunk * merged[:, None]
        stop = np.where(chunk == q - 1, cand[:, None], start + merged[:, None])
        stop = np.minimum(stop, cand[:, None])
        qsum = cs[stop] - cs[start]  # chunk counts without the clipped outliers
        nz_cs = np.concatenate([np.zeros((len(cand), 1)), np.cumsum(nonzero, axis=1)], axis=1)
        cnt = np.take_along_axis(nz_cs, stop, axis=1) - np.take_along_axis(nz_cs, start, axis=1)
        qd = np.where(nonzero & valid, qsum / np.maximum(cnt, 1), 0.0)
        p_sum = p.sum(axis=1, keepdims=True)
        q_sum = qd.sum(axis=1, keepdims=True)
        pn = p / np.where(p_sum > 0, p_sum, 1.0)
        qn = qd / np.where(q_sum > 0, q_sum, 1.0)
        qn = np.where((pn > 0) & (qn <= 0), KL_EPS, qn)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(pn > 0, pn * np.log(pn / qn), 0.0)
        out[cand - q] = terms.sum(axis=1)
    return out


def kl_threshold(hist: np.ndarray, bin_width: float, num_quantized: int = 128) -> float:
    """TensorRT's entropy threshold from a histogram of |x| (vectorized)."""
    h = np.asarray(hist)
    if h.sum() == 0:
        return 0.0
    last = int(np.flatnonzero(h)[-1]) + 1
    if last <= num_quantized:  # everything fits in the finest candidate: no clipping needed
        return last * bin_width
    d = kl_divergences(h, num_quantized)
    # ties (equal divergence up to float noise) go to the smallest threshold: finer steps
    best = float(d.min())
    i = int(np.flatnonzero(d <= best + 1e-9 * max(best, 1e-12))[0]) + num_quantized
    return (i + 0.5) * bin_width


def percentile_threshold(hist: np.ndarray, bin_width: float, percentile: float = 99.99) -> float:
    c = np.cumsum(np.asarray(hist, dtype=np.float64))
    if c[-1] == 0:
        return 0.0
    i = int(np.searchsorted(c, c[-1] * percentile / 100.0))
    return (i + 1) * bin_width


def mse_threshold(hist: np.ndarray, bin_width: float, levels: int = 128) -> float:
    h = np.asarray(hist, dtype=np.float64)
    nb = len(h)
    centers = (np.arange(nb) + 0.5) * bin_width
    t = (np.arange(1, nb + 1)) * bin_width  # candidate thresholds at bin edges
    cs = np.cumsum(h)
    # clipping error Σ_{x>T} (x−T)² = Σ h x² − 2T Σ h x + T² Σ h over bins above T
    hx = np.cumsum((h * centers)[::-1])[::-1]
    hx2 = np.cumsum((h * centers**2)[::-1])[::-1]
    hn = np.cumsum(h[::-1])[::-1]
    above = np.concatenate([hx2[1:], [0.0]]) - 2 * t * np.concatenate([hx[1:], [0.0]]) + t**2 * np.concatenate([hn[1:], [0.0]])
    noise = (t / levels) ** 2 / 12.0 * cs
    return float(t[int(np.argmin(above + noise))])


Method = Literal["kl", "minmax", "percentile", "mse"]


def tensor_range(h: StreamingHistogram, method: Method = "kl", *, symmetric: bool = False,
                 percentile: float = 99.99) -> tuple[float, float]:
    """(low, high) quantization range of a tensor from its statistics.

    Non-negative tensors get a one-sided range [0, T] (uint8's 256 levels for KL);
    others a symmetric [−T, T] (128 levels per side), or [min, max] for asymmetric
    minmax."""
    if h.hist is None:
        return 0.0, 0.0
    nonneg = h.non_negative and not symmetric
    if method == "minmax":
        if symmetric:
            m = max(abs(h.min), abs(h.max))
            return -m, m
        return min(h.min, 0.0), max(h.max, 0.0)
    if method == "kl":
        t = kl_threshold(h.hist, h.bin_width, 256 if nonneg else 128)
    elif method == "percentile":
        t = percentile_threshold(h.hist, h.bin_width, percentile)
    elif method == "mse":
        t = mse_threshold(h.hist, h.bin_width, 256 if nonneg else 128)
    else:
        raise ValueError(method)
    t = min(t, max(abs(h.min), abs(h.max)))
    return (0.0, t) if nonneg else (-t, t)
