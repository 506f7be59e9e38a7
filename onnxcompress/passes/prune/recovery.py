"""Statistics from calibration data, and training-free accuracy recovery.

``collect``: one streaming pass over the calibration data (one onnxruntime session of the
*original* model exposing each consumer's input) accumulates per input channel the mean
``E[x_c]`` and mean magnitude ``E|x_c|`` (for the ``act`` importance and for bias
compensation).

Recovery once channels are chosen, without training:

* **bias** (``bias_compensation``): the removed channels' average contribution is folded
  into the consumers' biases: ``b += Σ_{c removed} E[x_c] · Σ_{kh,kw} W[:, c]`` (exact for
  constant channels, ignoring zero padding at borders). Without calibration data,
  ``E[x_c]`` is estimated from the BatchNormalization statistics when the input is
  ``BN(·)`` (``E = β``) or ``Relu(BN(·))`` (``E = β·Φ(β/γ) + γ·φ(β/γ)``).
* **lstsq** (:func:`onnxcompress.fitting.sequential_refit`, He et al. 2017): every
  constant-weight layer is refit level by level so that its output, computed from the
  *pruned* network's input, matches the original output on calibration data (ridge least
  squares on sampled patches).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from onnx import numpy_helper

from ...data import DataSource, batch_count
from ...fitting import weight_2d, weight_dtype
from ...graph import initializers, producers
from ...model import node_attr, with_outputs
from ...progress import NullProgress, Progress
from ...validate import make_session, run_named
from .groups import Analysis, Use

log = logging.getLogger(__name__)

CONSUMER_KINDS = ("consumer-conv", "gemm", "matmul")
#: the layer-by-layer refit keeps calibration inputs / original outputs in memory up to these sizes


@dataclass
class ConsumerStats:
    use: Use
    sum_x: np.ndarray | None = None  # per input position
    sum_abs: np.ndarray | None = None
    elems: int = 0

    def mean(self) -> np.ndarray:
        assert self.sum_x is not None
        return self.sum_x / max(self.elems, 1)

    def mean_abs(self) -> np.ndarray:
        assert self.sum_abs is not None
        return self.sum_abs / max(self.elems, 1)


@dataclass
class CalibrationStats:
    consumers: dict[int, ConsumerStats] = field(default_factory=dict)  # node index -> stats
    samples: int = 0
    batches: int = 0



def collect(
    an: Analysis,
    data: DataSource,
    *,
    uses: list[Use],
    provider: str = "cpu",
    progress: Progress | None = None,
) -> CalibrationStats:
    """Stream ``data`` through the original model; per-channel input statistics for ``uses``."""
    progress = progress or NullProgress()
    g = an.model.graph
    inits = initializers(g)
    stats = CalibrationStats()
    names: list[str] = []
    for use in uses:
        node = g.node[use.node]
        if node.op_type == "Conv":
            w = inits.get(node.input[1])
            if int(node_attr(node, "group", 1)) != 1 or w is None or len(w.dims) != 4:  # type: ignore[arg-type]
                continue
        stats.consumers[use.node] = ConsumerStats(use)
        names.append(node.input[0])
    names = list(dict.fromkeys(names))
    if not names:
        return stats
    sess = make_session(with_outputs(an.model, names), provider, label="calibration model")
    with progress.task("calibrating (prune)", data.num_samples) as task:
        for batch in data:
            vals = dict(zip(names, run_named(sess, names, batch)))
            n = batch_count(batch)
            for idx, cs in stats.consumers.items():
                _accumulate(cs, np.asarray(vals[g.node[idx].input[0]], dtype=np.float32))
            stats.samples += n
            stats.batches += 1
            task.advance(n)
    return stats


def _accumulate(cs: ConsumerStats, x: np.ndarray) -> None:
    channel = cs.use.axis  # 1, or the last axis of a MatMul's token features
    if cs.sum_x is None:
        cs.sum_x = np.zeros(x.shape[channel])
        cs.sum_abs = np.zeros(x.shape[channel])
    axes = tuple(i for i in range(x.ndim) if i != channel)
    cs.sum_x += x.sum(axis=axes, dtype=np.float64)
    cs.sum_abs += np.abs(x).sum(axis=axes, dtype=np.float64)
    cs.elems += int(np.prod([x.shape[i] for i in axes]))


@dataclass
class RecoveryResult:
    arrays: dict[tuple[int, int], np.ndarray]  # (node index, input) -> new full-size array
    bias: int = 0
    skipped: int = 0


def bias_compensation(an: Analysis, gone: np.ndarray, stats: CalibrationStats | None) -> RecoveryResult:
    """New biases of the consumers that lose channels: the removed channels' mean
    contribution (measured in ``stats``, else from BatchNormalization statistics)."""
    g = an.model.graph
    inits = initializers(g)
    res = RecoveryResult({})
    for use in an.uses:
        if use.kind not in CONSUMER_KINDS:
            continue
        safe = np.where(use.atoms >= 0, use.atoms, 0)
        removed = (use.atoms >= 0) & gone[safe]
        if not removed.any():
            continue
        node = g.node[use.node]
        if node.op_type == "Conv" and int(node_attr(node, "group", 1)) != 1:  # type: ignore[arg-type]
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        w2 = weight_2d(node, w)
        bias_k = 2
        has_bias = len(node.input) > bias_k and bool(node.input[bias_k]) and node.op_type != "MatMul"
        b = numpy_helper.to_array(inits[node.input[bias_k]]).astype(np.float32).reshape(-1) if has_bias else np.zeros(w2.shape[0], np.float32)
        if node.op_type == "Gemm" and has_bias and b.size != w2.shape[0]:
            res.skipped += 1  # broadcast bias shapes: leave alone
            continue
        khw = w2.shape[1] // len(use.atoms)
        cs = stats.consumers.get(use.node) if stats else None
        mean = cs.mean() if cs is not None and cs.sum_x is not None else bn_mean_estimate(an, use)
        if mean is None or node.op_type == "MatMul":
            res.skipped += 1
            continue
        if not np.all(np.isfinite(mean[removed])):
            res.skipped += 1  # overflowing or NaN activations: no meaningful compensation
            continue
        contrib = w2.reshape(w2.shape[0], len(use.atoms), khw).sum(axis=2)  # [out, in]
        with np.errstate(all="ignore"):
            delta = contrib[:, removed] @ mean[removed]
        if not np.all(np.isfinite(delta)):
            res.skipped += 1
            continue
        res.arrays[(use.node, bias_k)] = (b + delta).astype(weight_dtype(node, inits))
        res.bias += 1
    return res


def bn_mean_estimate(an: Analysis, use: Use) -> np.ndarray | None:
    """E[x] per input channel of a consumer from BN statistics (BN or Relu(BN))."""
    g = an.model.graph
    producer = producers(g)
    inits = initializers(g)
    name = g.node[use.node].input[0]
    node = producer.get(name)
    relu = False
    if node is not None and node.op_type == "Relu":
        relu = True
        node = producer.get(node.input[0])
    if node is None or node.op_type != "BatchNormalization" or any(i not in inits for i in node.input[1:3]):
        return None
    gamma = np.abs(numpy_helper.to_array(inits[node.input[1]]).astype(np.float64))
    beta = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
    if len(beta) != len(use.atoms):
        return None
    if not relu:
        return beta
    z = beta / np.maximum(gamma, 1e-12)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return beta * cdf + gamma * pdf


# ----------------------------------------------------------------------------- sequential refit


