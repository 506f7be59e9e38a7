"""Range selection from a calibration histogram (calibration.py).

KL (TensorRT entropy calibration). For each candidate i = q … bins (q = 128 quantized
levels for a symmetric int8 range, 256 for a non-negative tensor on uint8):

* P = the first i bins, with every count above bin i added to bin i−1 (clipping);
* Q = the first i bins merged into q chunks of equal width i/q (bin k falls in chunk
  ⌊k·q/i⌋), each chunk's count spread evenly over its bins where P is non-zero;
* both normalized, Q floored at ε where P > 0; KL(P‖Q) = Σ P log(P/Q).

Before the search the first bin's count is replaced by the second's, as NVIDIA's own
implementation does (pytorch-quantization, ``bins[0] = bins[1]``): the spike of exact
or near zeros (ReLU, SiLU, sparse maps) otherwise dominates P, and the divergence barely
notices clipping of the informative tail — on SiLU networks the unmodified search clips
most activations at a small fraction of their range.

Equal-width chunks are what NVIDIA's pytorch-quantization does. The MXNet/onnxruntime
variant (chunks of ⌊i/q⌋ bins, the last one taking the remainder) has a divergence
curve with saw-teeth at i = 2q−1, 3q−1, …, where all chunks but the last are single
bins and Q copies P almost exactly; its minimum then sits on a tooth and clips hard.

The threshold is (i* + 0.5)·R/bins for the i* of least divergence (ties, equal up to
1e-9 relative, go to the smallest i). All candidates are
evaluated at once with cumulative sums (numpy, in row blocks to bound memory), not in
a Python loop per candidate; per chunk rather than per bin (O(candidates × q)).

Through an activation (:func:`low_through`). A tensor x read only by an elementwise
f (SiLU: x·σ(x)) matters only through f(x̂). Its lower end lo' ∈ [lo, 0) is then the one
of least Σ_slots c·(f(x̂) − f(x))² over the signed histogram's slot centres x (counts c),
with x̂ = (clip(round(x/Δ) + z, 0, 255) − z)·Δ, Δ = (hi − lo')/255, z = round(−lo'/Δ):
exact rounding, not the Δ²/12 noise model, since values a tensor holds often (flat image
regions) make where the grid falls matter. SiLU is flat below about −4, so the negative
half of a symmetric threshold mostly wastes levels.

Other methods: ``minmax``; ``percentile`` (the |x| value below which p% of the mass
lies); ``mse`` (threshold minimizing clipping error Σ_{x>T}(x−T)² plus rounding noise
Δ²/12·N_{x≤T}, Δ = T/levels, over bin centres).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from .calibration import StreamingHistogram

KL_EPS = 1e-10
Method = Literal["kl", "minmax", "percentile", "mse"]


def _table_width(nb: int, q: int) -> int:
    """Columns of the chunk table: widths 0 … ⌈nb/q⌉ (every chunk of every candidate is
    ⌊i/q⌋ or ⌈i/q⌉ ≤ ⌈nb/q⌉ bins wide)."""
    return -(-nb // q) + 1


@functools.lru_cache(maxsize=64)
def _chunk_edges(nb: int, q: int, b0: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates i in [b0, b0 + block), their chunk edges ⌈j·i/q⌉, j = 0 … q, and the flat
    index ``start·(W+1) + width`` of chunks 0 … q−2 into a (bins+1) × (W+1) chunk table,
    W = ⌈bins/q⌉ (cached: the same for every tensor)."""
    cand = np.arange(b0, min(b0 + block, nb + 1), dtype=np.int64)
    j = np.arange(q + 1, dtype=np.int64)
    edges = (j[None, :] * cand[:, None] + q - 1) // q  # chunk j = bins [edges_j, edges_{j+1})
    width = _table_width(nb, q)
    flat = edges[:, :-2] * width + np.diff(edges[:, :-1], axis=1)
    for a in (cand, edges, flat):
        a.setflags(write=False)
    return cand, edges, flat


def _chunk_table(cs: np.ndarray, cs_nz: np.ndarray, q: int) -> np.ndarray:
    """``F[s, w] = S·log(S/n)`` for the chunk of bins [s, s+w): S its count, n its non-zero
    bins (0 where S = 0). Every chunk of every candidate is one of these (widths are
    ⌊i/q⌋ or ⌈i/q⌉ ≤ ⌈bins/q⌉), so each logarithm is taken once per tensor, not once per
    candidate and chunk."""
    nb = len(cs) - 1
    w = np.arange(_table_width(nb, q))
    s = np.arange(nb + 1)
    end = np.minimum(s[:, None] + w[None, :], nb)
    mass = cs[end] - cs[s][:, None]
    cnt = cs_nz[end] - cs_nz[s][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mass > 0, mass * np.log(mass / np.where(cnt > 0, cnt, 1.0)), 0.0)


def kl_divergences(hist: np.ndarray, num_quantized: int = 128, block: int = 512) -> np.ndarray:
    """KL(P_i ‖ Q_i) for every candidate i = num_quantized … len(hist) (see module doc).

    Computed per chunk, not per bin: P always sums to the total count T (clipped counts
    move into bin i−1), and Q is constant over the non-zero bins of a chunk, so
    ``KL = Σ_k P_k log P_k − Σ_j S_j log Q_j`` with ``S_j`` the P-mass of chunk j — prefix
    sums of h·log h, of h and of the non-zero indicator give every term, and the chunks'
    ``S log(S/n)`` come from a table over (start, width) (:func:`_chunk_table`);
    candidates are processed in blocks of ``block`` rows (arrays of block × q)."""
    h = np.asarray(hist, dtype=np.float64)
    nb = len(h)
    q = num_quantized
    total = float(h.sum())
    cs = np.concatenate([[0.0], np.cumsum(h)])
    hlogh = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
    cs_hlogh = np.concatenate([[0.0], np.cumsum(hlogh)])
    cs_nz = np.concatenate([[0], np.cumsum(h > 0)]).astype(np.float64)
    table = _chunk_table(cs, cs_nz, q).ravel()
    out = np.empty(nb - q + 1)
    for b0 in range(q, nb + 1, block):
        cand, edges, flat = _chunk_edges(nb, q, b0, block)
        outliers = total - cs[cand]  # counts above bin i-1
        last = h[cand - 1] + outliers  # P's last bin
        plogp = (cs_hlogh[cand - 1] + np.where(last > 0, last * np.log(np.where(last > 0, last, 1.0)), 0.0)) / total
        plogp -= np.log(total)
        zq = cs[cand]
        log_zq = np.log(np.where(zq > 0, zq, 1.0))
        # chunks 0 … q−2: P-mass S, Q = S / (n · zq) on its n non-zero bins
        body = table[flat].sum(axis=1)
        body_mass = cs[edges[:, -2]]  # Σ S over chunks 0 … q−2
        # the last chunk also carries the clipped outliers (in its last bin)
        e0, e1 = edges[:, -2], edges[:, -1]
        q_last = cs[e1] - cs[e0]  # its count without the clipped outliers
        n_last = cs_nz[e1] - cs_nz[e0] + ((h[cand - 1] == 0) & (outliers > 0))
        m_last = q_last + outliers
        with np.errstate(divide="ignore", invalid="ignore"):
            lq = np.where((q_last > 0) & (n_last > 0), np.log(q_last / np.where(n_last > 0, n_last, 1.0)) - log_zq,
                          np.log(KL_EPS))
        last_term = np.where(m_last > 0, m_last * lq, 0.0)
        cross = (body - body_mass * log_zq + last_term) / total
        out[b0 - q : b0 - q + len(cand)] = plogp - cross
    return out


def kl_threshold(hist: np.ndarray, bin_width: float, num_quantized: int = 128) -> float:
    """TensorRT's entropy threshold from a histogram of |x| (vectorized)."""
    h = np.array(hist, dtype=np.float64)
    if h.sum() == 0:
        return 0.0
    if len(h) > 1:
        h[0] = h[1]  # suppress the zero spike (see module doc)
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


def mse_curve(hist: np.ndarray, bin_width: float, levels: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(candidate thresholds at bin edges, expected squared error of each) from a histogram of |x|:
    clipping error Σ_{x>T}(x−T)² plus rounding noise Δ²/12 per value below T, Δ = T/levels."""
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
    return t, above + noise


def mse_threshold(hist: np.ndarray, bin_width: float, levels: int = 128) -> float:
    t, err = mse_curve(hist, bin_width, levels)
    return float(t[int(np.argmin(err))])


def tensor_range(h: StreamingHistogram, method: Method = "kl", *, symmetric: bool = False,
                 percentile: float = 99.99, kl_guard: float = 0.0) -> tuple[float, float]:
    """(low, high) quantization range of a tensor from its statistics.

    Non-negative tensors get a one-sided range [0, T] (uint8's 256 levels for KL);
    others [max(min, −T), min(max, T)] (asymmetric, for uint8), or [−T, T] with
    ``symmetric`` (int8), or [min, max] for asymmetric minmax.

    ``kl_guard`` > 0: where the KL threshold's expected squared error (:func:`mse_curve`)
    exceeds ``kl_guard`` times the least achievable, the MSE-optimal threshold is used
    instead (long-tailed activations such as SiLU's, on which KL clips most of the range)."""
    if h.signed is None:
        return 0.0, 0.0
    nonneg = h.non_negative and not symmetric
    if method == "minmax":
        if symmetric:
            m = max(abs(h.min), abs(h.max))
            return -m, m
        return min(h.min, 0.0), max(h.max, 0.0)
    if method == "kl":
        levels = 256 if nonneg else 128
        t = kl_threshold(h.hist, h.bin_width, levels)
        if kl_guard > 0:
            ts, err = mse_curve(h.hist, h.bin_width, levels)
            k = int(np.clip(round(t / h.bin_width) - 1, 0, len(ts) - 1))
            best = int(np.argmin(err))
            if err[k] > kl_guard * max(float(err[best]), 1e-30):
                t = float(ts[best])
    elif method == "percentile":
        t = percentile_threshold(h.hist, h.bin_width, percentile)
    elif method == "mse":
        t = mse_threshold(h.hist, h.bin_width, 256 if nonneg else 128)
    else:
        raise ValueError(method)
    t = min(t, max(abs(h.min), abs(h.max)))
    if nonneg:
        return 0.0, t
    if symmetric:
        return -t, t
    # asymmetric (uint8): the threshold clips each side, but never beyond what was seen
    return max(min(h.min, 0.0), -t), min(max(h.max, 0.0), t)


def low_through(h: StreamingHistogram, f: Callable[[np.ndarray], np.ndarray], lo: float, hi: float,
                candidates: int = 256) -> float:
    """The lower end in [lo, 0) of a uint8 range [·, hi] for x that minimizes the squared
    error of f(x̂) over the histogram (module docstring), among ``candidates`` evenly spaced values;
    ``lo`` itself where nothing beats it (and for a range that does not straddle 0)."""
    if h.signed is None or not lo < 0.0 < hi:
        return lo
    nz = np.flatnonzero(h.signed)
    t = (nz - (h.bins - 1)).astype(np.float64)
    w = h.bin_width
    v = np.clip(np.where(t == 0, 0.0, np.sign(t) * (np.abs(t) + 0.5) * w), h.min, h.max)  # slot centres
    c = h.signed[nz].astype(np.float64)
    fv = np.asarray(f(v), np.float64)
    lows = np.linspace(lo, 0.0, candidates, endpoint=False)
    err = np.empty(candidates)
    for i, a in enumerate(lows):  # exact rounding of every slot: values a tensor holds often
        s = (hi - a) / 255.0      # (flat image regions) are where the grid falls matters
        z = np.round(-a / s)
        vq = (np.clip(np.round(v / s) + z, 0, 255) - z) * s
        err[i] = ((np.asarray(f(vq), np.float64) - fv) ** 2) @ c
    return float(lows[int(np.argmin(err))])
