"""Comparison metrics of two models' outputs that validation, the search's budget and
int8's accuracy control share: cosines (per sample, per column pooled over samples, over
the values of a one-value output), the output kinds that decide which apply, and where an
output keeps its samples. What each measures and why: :mod:`onnxcompress.validate`."""

from __future__ import annotations

import math

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    """Cosine of ``a`` and ``b`` along ``axis``, in [−1, 1]; 1 where both are zero."""
    na, nb = np.linalg.norm(a, axis=axis), np.linalg.norm(b, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((na == 0) & (nb == 0), 1.0, (a * b).sum(axis=axis) / np.maximum(na * nb, 1e-300))
    return np.clip(cos, -1.0, 1.0)


def column_sums(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[3, F]: Σ a·b, Σ a², Σ b² of each column of two feature tables [N, rows, F], over
    all their rows and samples (the running sums :func:`column_cosine` reads)."""
    a2 = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
    b2 = np.asarray(b, np.float64).reshape(-1, b.shape[-1])
    return np.stack([(a2 * b2).sum(0), (a2 * a2).sum(0), (b2 * b2).sum(0)])


def column_cosine(sums: np.ndarray) -> np.ndarray:
    """Each column's cosine over every row of every sample, from :func:`column_sums`
    (added up over batches); 1 where both columns are zero.

    Pooled over the samples, not a mean of per-sample cosines: a detector's objectness
    column on an image with nothing to detect holds only background values near zero,
    whose cosine measures the pattern of that noise, not the detections. Each image
    weighs by its column's energy, so a lost or invented detection still counts in full
    (docs/decisions/validation.md)."""
    dot, aa, bb = sums
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((aa == 0) & (bb == 0), 1.0, dot / np.maximum(np.sqrt(aa * bb), 1e-300))
    return np.clip(cos, -1.0, 1.0)


def value_cosine(sums: np.ndarray) -> float:
    """The cosine of an output with one value per sample, from :func:`column_sums` over all
    samples' values: their cosine as one vector, and no more than 1/√(1 + r²), where r is
    the norm of the error relative to the reference's. That bound equals the cosine for an
    error orthogonal to the reference and is lower for a common scale, which a cosine does
    not see but a user of a score does (0.9 read as 0.2 where every other value is near 0)."""
    dot, aa, bb = (float(v[0]) for v in sums)
    if aa == 0:
        return 1.0 if bb == 0 else 0.0
    r2 = max(aa + bb - 2 * dot, 0.0) / aa
    return min(float(column_cosine(sums)[0]), 1 / math.sqrt(1 + r2))


#: a sample's cosine counts where its RMS (reference or candidate) exceeds this × the output's range
NOISE_FLOOR = 1e-3


#: largest trailing axis of a "feature table" ([N, rows, F], e.g. detections: box, scores)
FEATURE_TABLE_MAX = 64


#: most classes a class-score output may have
CLASSES_MAX = 100000


def is_class_scores(shape: tuple[int, ...] | list[int]) -> bool:
    """[N, C] with 2 ≤ C ≤ CLASSES_MAX, or [N, C, 1, …, 1] (a classifier ending in a 1×1
    conv and softmax, e.g. SqueezeNet): one score per class, top-1 is meaningful."""
    return len(shape) >= 2 and 2 <= shape[1] <= CLASSES_MAX and all(d == 1 for d in shape[2:])


def is_feature_table(shape: tuple[int, ...] | list[int]) -> bool:
    """[N, rows, F] with 2 ≤ F ≤ FEATURE_TABLE_MAX and more rows than features: each of
    the F columns is its own quantity (box coordinates, objectness, class scores) on its
    own scale, so one cosine over the table is dominated by the largest column."""
    return len(shape) == 3 and 2 <= shape[2] <= FEATURE_TABLE_MAX and shape[1] > shape[2]


def sample_axis(shape: tuple[int, ...] | list[int], samples: int | None) -> int:
    """The axis of an output that holds a batch of ``samples`` samples: 1 where axis 0 is
    not that count and axis 1 is (a time-major [T, N, C] sequence, a [layers, N, H]
    state), else 0. Unknown count: 0."""
    return 1 if samples is not None and len(shape) >= 2 and shape[0] != samples and shape[1] == samples else 0


def sample_major(a: np.ndarray, samples: int | None) -> np.ndarray:
    """``a`` with its sample axis (:func:`sample_axis`) first."""
    return np.moveaxis(a, 1, 0) if sample_axis(a.shape, samples) == 1 else a
