"""How much a rewrite disturbs a model's outputs, as one number: the sensitivity measure
that lowrank and prune use to share a MACs budget between layers or groups (their
experimental ``sensitivity`` option). Each output feature's error is divided by its
std over the reference outputs, so outputs and features on different scales weigh alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx

from .data import batch_count
from .runtime import make_session, run_session


class OutputDamage:
    """How much a rewrite disturbs a model's outputs: the first whole batches of ``data``
    holding at least ``samples`` samples, the reference model's outputs on them, and per
    output feature (last axis, when ≤ 1024 wide) their std. :meth:`of` is the mean over
    batches and outputs of the MSE of a candidate's outputs, each feature divided by its
    std — the sensitivity measure of lowrank's and prune's budget allocation. The
    reference runs once, on :meth:`reference` or the first :meth:`of`."""

    def __init__(self, model: onnx.ModelProto, data: Iterable[Mapping[str, np.ndarray]], samples: int,
                 provider: str = "cpu", label: str = "sensitivity") -> None:
        self.feeds: list[Mapping[str, np.ndarray]] = []
        n = 0
        for batch in data:
            self.feeds.append(batch)
            n += batch_count(batch)
            if n >= samples:
                break
        self.model, self.provider, self.label = model, provider, label
        self._ref: list[list[np.ndarray]] | None = None
        self._scales: list[np.ndarray] = []

    @staticmethod
    def _scale(o: np.ndarray) -> np.ndarray:
        sd = o.reshape(-1, o.shape[-1]).std(axis=0) if o.ndim >= 2 and o.shape[-1] <= 1024 else np.array(o.std())
        return np.maximum(sd, 1e-6 * max(float(np.abs(o).max()), 1e-12))

    def reference(self) -> list[list[np.ndarray]]:
        """The reference model's outputs per batch (run once)."""
        if self._ref is None:
            sess = make_session(self.model, self.provider, label=f"{self.label} (original)")
            self._ref = [run_session(sess, dict(f), self.label) for f in self.feeds]
            self._scales = [self._scale(np.concatenate([r[k] for r in self._ref])) for k in range(len(self._ref[0]))]
        return self._ref

    def of(self, model: onnx.ModelProto) -> float:
        refs = self.reference()
        sess = make_session(model, self.provider, label=self.label)
        errs = []
        for f, ref in zip(self.feeds, refs):
            new = run_session(sess, dict(f), self.label)
            errs.append(sum(float(np.mean(((b - a) / sc) ** 2)) for a, b, sc in zip(ref, new, self._scales))
                        / max(len(ref), 1))
        return float(np.mean(errs))
