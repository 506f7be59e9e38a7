"""What a layer-by-layer refit fits to: the original model's layer outputs on the
calibration data, kept compactly.

A refit reads a Conv's reference output only at sampled output positions, plus its
per-channel sums for the mean-matching correction; a Gemm's or MatMul's at every row. So
each reference is kept as just those rows and sums (:class:`Target`), drawn once per layer
and batch from the refit's seeded generator. Where the targets of every layer fit in
memory (where the full outputs often would not: 1.8 GB for 48 text lines through a
recognizer's 63 layers, 669 MB kept this way), the original model runs once over the
data instead of once per refit level, each time through a prefix of the network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from .data import Batch
from .runtime import run_named

CACHE_INPUT_BYTES = 256 * 2**20  #: the calibration batches kept for the refit
CACHE_TARGET_BYTES = 2**30  #: the targets kept for the refit


def sample_positions(out_shape: tuple[int, ...], rng: np.random.Generator,
                     positions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, row, column) of up to ``positions`` distinct random output positions per
    image of an [N, C, H, W] output."""
    n, _, ho, wo = out_shape
    per = min(positions, ho * wo)
    ni = np.repeat(np.arange(n), per)
    flat = np.concatenate([rng.choice(ho * wo, per, replace=False) for _ in range(n)]) if n else np.zeros(0, int)
    return ni, flat // wo, flat % wo


@dataclass(frozen=True)
class Target:
    """One layer's reference output on one batch, as far as a refit reads it."""

    shape: tuple[int, ...]  # the full output's shape
    channel: int  # its channel axis: 1 for a Conv, the last for a Gemm/MatMul
    sums: np.ndarray  # Σ over every axis but the channel (float64)
    count: int  # values summed per channel
    rows: np.ndarray | None  # [S, C]: a 2-D Conv's outputs at ``where``, a Gemm's/MatMul's every row
    where: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # a 2-D Conv's sampled (image, row, column)
    finite: bool  # no NaN/Inf in the full output

    @property
    def nbytes(self) -> int:
        return self.sums.nbytes + (self.rows.nbytes if self.rows is not None else 0) + \
            (sum(a.nbytes for a in self.where) if self.where is not None else 0)

    def kept(self, new_shape: tuple[int, ...], channels: np.ndarray | None) -> Target | None:
        """This target for a layer that now writes ``new_shape``: the kept ``channels``
        where the channel axis shrank; None where the shapes differ otherwise."""
        if tuple(new_shape) == self.shape:
            return self
        if channels is None or len(new_shape) != len(self.shape):
            return None
        differ = [a for a in range(len(self.shape)) if self.shape[a] != new_shape[a]]
        if differ != [self.channel] or len(channels) != new_shape[self.channel]:
            return None
        if not self.finite:  # nothing kept to select from
            return dataclasses.replace(self, shape=tuple(new_shape))
        return dataclasses.replace(self, shape=tuple(new_shape), sums=self.sums[..., channels],
                                   rows=None if self.rows is None else self.rows[:, channels])


def make_target(node: onnx.NodeProto, y: np.ndarray, rng: np.random.Generator, positions: int) -> Target:
    """The :class:`Target` of ``node``'s reference output ``y`` (positions drawn from ``rng``)."""
    y = np.asarray(y, np.float32)
    conv = node.op_type == "Conv"
    channel = 1 if conv else max(y.ndim - 1, 0)
    axes = tuple(i for i in range(y.ndim) if i != channel) if y.ndim > 1 else (0,)
    count = int(np.prod([y.shape[i] for i in axes])) if y.ndim else 1
    if not np.all(np.isfinite(y)):  # the refit leaves such a layer as it is: keep nothing
        return Target(tuple(y.shape), channel, np.zeros(0), count, None, None, False)
    sums = y.sum(axis=axes, dtype=np.float64)
    rows = where = None
    if conv and y.ndim == 4:
        where = sample_positions(y.shape, rng, positions)
        rows = y[where[0], :, where[1], where[2]]
    elif not conv and y.ndim >= 1:
        rows = y.reshape(-1, y.shape[-1])
    return Target(tuple(y.shape), channel, sums, count, rows, where, True)


def cached_targets(data: Iterable[Batch], orig_sess: Any, nodes: Mapping[str, onnx.NodeProto],
                   rng: np.random.Generator, positions: int,
                   ) -> tuple[list[Batch] | None, list[dict[str, Target]] | None]:
    """The calibration batches and every layer's :class:`Target` on them, where both fit
    the caches; (None, None) otherwise: the refit then runs the original model level by
    level."""
    batches: list[Batch] = []
    targets: list[dict[str, Target]] = []
    in_bytes = out_bytes = 0
    names = list(nodes)
    for batch in data:
        in_bytes += sum(v.nbytes for v in batch.values())
        ref = {o: make_target(nodes[o], y, rng, positions) for o, y in zip(names, run_named(orig_sess, names, batch))}
        out_bytes += sum(t.nbytes for t in ref.values())
        if in_bytes > CACHE_INPUT_BYTES or out_bytes > CACHE_TARGET_BYTES:
            return None, None
        batches.append(batch)
        targets.append(ref)
    return batches, targets
