"""Sequence outputs read by greedy CTC decoding: what a recognizer's user sees.

A recognizer's output is a score per time step and class ([N, T, C]); users read the
string that greedy CTC decoding makes of it (argmax per step, repeats collapsed, blanks
dropped). Two models agree as far as their strings agree, so the comparison is the edit
distance between the two decodes, over the reference decode's length (the character
error rate of the candidate *against the reference model*), and the share of samples
whose strings are identical. A cosine over the whole [T, C] map is dominated by the
many steps where both models are sure of the blank, and it moves on changes no decode
shows.

Which outputs: [N, T, C] with T ≥ 2 and C ≥ 3 whose reference values are probabilities
over the last axis (non-negative, summing to 1 within 1e-3: a softmax'd CTC head) or
log-probabilities (log-sum-exp 0 within 1e-3: a log_softmax head, as PyTorch CTC models
export). A time-major head ([T, N, C]) is turned sample-major by validation
(:func:`onnxcompress.metrics.sample_axis`). A logit head cannot be told from a hidden
state by its values; a user names it with the ``ctc`` tolerance. The blank is class 0
(PaddleOCR, torchaudio, most CTC exports); where it is another class the decodes still compare the same argmax paths, with the
blank read as one more symbol.
"""

from __future__ import annotations

import numpy as np

#: blank class index of the greedy decode
BLANK = 0


def is_sequence_probabilities(ref: np.ndarray, tol: float = 1e-3) -> bool:
    """[N, T, C] (T ≥ 2, C ≥ 3) whose values are probabilities or log-probabilities over
    the last axis."""
    if ref.ndim != 3 or ref.shape[1] < 2 or ref.shape[2] < 3 or ref.size == 0:
        return False
    if not np.issubdtype(ref.dtype, np.floating) or not np.all(np.isfinite(ref)):
        return False
    if float(ref.min()) >= -tol:
        return bool(np.all(np.abs(ref.sum(axis=-1, dtype=np.float64) - 1.0) <= tol))
    return _is_log_probabilities(ref, tol)


def _is_log_probabilities(ref: np.ndarray, tol: float = 1e-3) -> bool:
    """Values ≤ ``tol`` whose log-sum-exp over the last axis is 0 within ``tol``."""
    if ref.size == 0 or float(ref.max()) > tol:
        return False
    a = ref.astype(np.float64)
    top = a.max(axis=-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(a - top).sum(axis=-1))
    return bool(np.all(np.abs(lse) <= tol))


def greedy_decode(scores: np.ndarray, blank: int = BLANK) -> list[np.ndarray]:
    """Per sample of [N, T, C] scores: the argmax path with repeats collapsed and blanks
    dropped (class indices)."""
    path = np.argmax(scores, axis=-1)
    out = []
    for p in path:
        keep = np.ones(len(p), dtype=bool)
        keep[1:] = p[1:] != p[:-1]
        q = p[keep]
        out.append(q[q != blank])
    return out


def edit_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Levenshtein distance between two index sequences (one row of the table at a time)."""
    if len(a) < len(b):
        a, b = b, a
    if len(b) == 0:
        return len(a)
    prev = np.arange(len(b) + 1)
    for i, x in enumerate(a, 1):
        cur = np.empty_like(prev)
        cur[0] = i
        sub = prev[:-1] + (b != x)
        for j in range(1, len(b) + 1):  # insertion depends on cur[j - 1]: sequential
            cur[j] = min(sub[j - 1], prev[j] + 1, cur[j - 1] + 1)
        prev = cur
    return int(prev[-1])


def sequence_agreement(ref: np.ndarray, new: np.ndarray, blank: int = BLANK) -> tuple[int, int, int]:
    """(summed edit distance, summed reference length, samples decoded identically) of the
    greedy decodes of two [N, T, C] score arrays."""
    dist = length = same = 0
    for a, b in zip(greedy_decode(ref, blank), greedy_decode(new, blank)):
        d = 0 if len(a) == len(b) and np.array_equal(a, b) else edit_distance(a, b)
        dist += d
        length += len(a)
        same += d == 0
    return dist, length, same


def changed_margins(ref: np.ndarray, new: np.ndarray, blank: int = BLANK) -> list[float]:
    """For each sample of two [N, T, C] score arrays whose greedy decodes differ: the
    reference's smallest top-1 − top-2 score gap over the steps where the two argmaxes
    differ. A small gap is a step where the reference itself nearly decoded otherwise."""
    out = []
    for i, (a, b) in enumerate(zip(greedy_decode(ref, blank), greedy_decode(new, blank))):
        if len(a) == len(b) and np.array_equal(a, b):
            continue
        steps = np.nonzero(np.argmax(ref[i], axis=-1) != np.argmax(new[i], axis=-1))[0]
        # log-probabilities: the gap between probabilities, as for a softmax'd head
        scores = np.exp(ref[i][steps]) if _is_log_probabilities(ref[i]) else ref[i][steps]
        top2 = np.partition(scores, -2, axis=-1)[:, -2:] if ref.shape[-1] >= 2 else np.zeros((0, 2))
        gap = top2[:, 1] - top2[:, 0]
        out.append(float(gap.min()) if gap.size else 0.0)
    return out


def few_samples_note(samples: int, threshold: float) -> str:
    """"; with n samples ≥ t allows none" where a share criterion over ``samples`` samples
    cannot allow a single change (decoded lines here, top-1 flips in validate); else ""."""
    return f"; with {samples} samples ≥ {threshold:g} allows none" if samples and samples * (1 - threshold) < 1 else ""


def changed_note(samples: int, gaps: list[float], threshold: float) -> str:
    """What a refusal on the share of identically decoded samples adds: how many of how
    many changed, the reference's top-2 gaps there, and whether ``samples`` can resolve
    ``threshold`` at all."""
    if not samples or not gaps:
        return ""
    shown = ", ".join(f"{g:.3g}" for g in gaps[:4]) + (", …" if len(gaps) > 4 else "")
    return (f" ({len(gaps)} of {samples} differ; the input model's top-2 gap at their changed steps: {shown}"
            f"{few_samples_note(samples, threshold)})")
