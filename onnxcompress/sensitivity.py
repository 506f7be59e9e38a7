"""How much a rewrite disturbs a model's outputs, as one number: the sensitivity measure
that lowrank and prune use to share a MACs budget between layers or groups (their
experimental ``sensitivity`` option). Each output feature's error is divided by its
std over the reference outputs, so outputs and features on different scales weigh alike.

A budget allocation measures one candidate per layer or group, each the reference with a
few nodes changed. The nodes before the first change compute what the reference computed,
so a candidate runs from the reference's tensors at that point (:class:`~.frontier.Frontier`,
advanced along the reference as the candidates' first changes move down the graph): the
measurements cost the part of the model each change reaches, not the whole model each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx

from .data import batch_count
from .frontier import Frontier, node_key
from .graph import initializers, reads
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
        # the reference's nodes by the key the Frontier's stages use, in order; their
        # positions; tensor → the key of the node that computes it; its constants
        self._order = {node_key(n): n for n in model.graph.node}
        self._pos = {k: i for i, k in enumerate(self._order)}
        self._produced = {o: k for k, n in self._order.items() for o in n.output if o}
        self._inits = initializers(model.graph)
        self._frontier: Frontier | None = None

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
        news = self._from_first_change(model, refs)
        if news is None:
            sess = make_session(model, self.provider, label=self.label)
            news = [run_session(sess, dict(f), self.label) for f in self.feeds]
        errs = [sum(float(np.mean(((b - a) / sc) ** 2)) for a, b, sc in zip(ref, new, self._scales)) / max(len(ref), 1)
                for ref, new in zip(refs, news)]
        return float(np.mean(errs))

    def _first_change(self, model: onnx.ModelProto) -> onnx.NodeProto | None:
        """The reference's first node that ``model`` lacks or changed (the node, or a
        constant it reads); None where there is none."""
        theirs = {node_key(n): n for n in model.graph.node}
        their_inits = initializers(model.graph)
        for key, node in self._order.items():
            other = theirs.get(key)
            if other is None or other != node or any(
                    their_inits.get(t) != self._inits[t] for t in reads(node) if t in self._inits):
                return node
        return None

    def _from_first_change(self, model: onnx.ModelProto, refs: list[list[np.ndarray]]) -> list[list[np.ndarray]] | None:
        """``model``'s outputs per batch, run from the reference's tensors before its first
        change; None where they must come from a run from the inputs (nothing upstream to
        skip, or a change upstream of where the reference has been run to)."""
        node = self._first_change(model)
        if node is None or len(model.graph.output) != len(self.model.graph.output):
            return None
        pos = self._pos[node_key(node)]
        if self._frontier is None:
            self._frontier = Frontier(self.feeds, self.provider, label=f"{self.label} (staged)")
        f = self._frontier
        if not f.enabled or any(self._pos[k] >= pos for k in f.done):
            return None
        needs = [t for t in reads(node) if t in self._produced]
        if not needs:  # the change reads the model's inputs: nothing to skip
            return None
        if any(t not in f.values for t in needs):  # run the reference down to the change
            f.run(self.model, needs, set())
        outs = [o.name for o in self.model.graph.output]
        own = [o for o in outs if self._produced.get(o) not in f.done]
        vals = f.rest(model, own) if own else [[] for _ in self.feeds]
        if vals is None:
            return None
        return [[v[own.index(o)] if o in own else ref[k] for k, o in enumerate(outs)] for v, ref in zip(vals, refs)]
