"""Running a model in stages on cached batches, each stage from where the last one stopped.

A layer-by-layer refit needs, at each level, the tensors around that level's layers
computed by the model as refit so far. Running the model from its inputs each time
costs every node once per level below it: quadratic in depth. :class:`Frontier` keeps
the tensors that later nodes still read, so each stage runs only the nodes between
them and what it is asked for. The nodes whose weights the caller is about to change
(the stage's ``changing`` nodes) are not final: their outputs are not kept, and the next
stage that needs them computes them again from their kept inputs, with the new weights.
Values are fed back as computed, in the model's layout.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from .data.specs import model_feeds
from .errors import OnnxCompressError
from .graph import graph_index, remove_dead_code
from .runtime import make_session, ort_message, run_named

log = logging.getLogger(__name__)

#: the kept tensors over all batches; past it the stages run from the model's inputs
FRONTIER_BYTES = 2**30


def truncated(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose only outputs are ``outputs``, without the nodes after them
    (onnxruntime would otherwise run the whole network for every refit level)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _only_outputs(m.graph, outputs)
    return m


def _only_outputs(g: onnx.GraphProto, outputs: list[str]) -> None:
    del g.output[:]
    g.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
    remove_dead_code(g)


def node_key(node: onnx.NodeProto) -> str:
    """How the stages name a node: its first output that is not omitted, else its name."""
    return next((o for o in node.output if o), node.name)


class Frontier:
    """``batches`` (samples on axis 0, as a data source yields them) run through a model
    in stages: :meth:`run` returns the named tensors per batch and keeps what later
    stages read. The model passed to each :meth:`run` may differ from the last only in
    the weights of the ``changing`` nodes of earlier stages."""

    def __init__(self, batches: Sequence[Mapping[str, np.ndarray]], provider: str = "cpu",
                 label: str = "model") -> None:
        self.batches, self.provider, self.label = list(batches), provider, label
        self.feeds: list[Mapping[str, np.ndarray]] | None = None  # the batches in the model's layout
        self.values: dict[str, list[np.ndarray]] = {}
        self.done: set[str] = set()  # nodes (by first output) whose outputs are final
        self.enabled = True

    def _stage(self, model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, set[str]]:
        """The model that computes ``names`` from the kept values and the model's inputs,
        and the nodes it runs (by first output)."""
        m = onnx.ModelProto()
        m.CopyFrom(model)
        g = m.graph
        live = [n for n in g.node if node_key(n) not in self.done]
        del g.node[:]
        g.node.extend(live)
        kept = [vi for vi in g.value_info if vi.name not in self.values]
        del g.value_info[:]
        g.value_info.extend(kept)
        g.input.extend(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v[0].dtype),
                                                     [None] * v[0].ndim) for name, v in self.values.items())
        _only_outputs(g, names)
        return m, {node_key(n) for n in g.node}

    def run(self, model: onnx.ModelProto, names: list[str], changing: set[str]) -> list[list[np.ndarray]]:
        """``names`` of ``model`` on every batch, in order; ``changing``: the nodes (by first
        output) whose weights change after this stage."""
        if not self.enabled:
            return self._from_inputs(model, names)
        _, readers, _ = graph_index(model.graph)
        try:
            stage, ran = self._stage(model, names)
            final = self.done | (ran - changing)

            def wanted(t: str) -> bool:  # read by a node a later stage may run
                return any(node_key(r) not in final for r in readers.get(t, ()))

            new_names = sorted({o for n in stage.graph.node if node_key(n) not in changing for o in n.output
                                if o and wanted(o)})
            extra = [t for t in new_names if t not in names]
            stage.graph.output.extend(onnx.ValueInfoProto(name=t) for t in extra)
            sess = make_session(stage, self.provider, label=self.label)
        except (OnnxCompressError, ValueError, TypeError, AttributeError) as exc:
            # a kept value onnxruntime cannot take as an input (a sequence, a string):
            # staging is only a shortcut, the runs from the inputs give the same
            log.info("%s: staged runs not possible (%s); each stage runs from the inputs", self.label, exc)
            self.enabled, self.values, self.done = False, {}, set()
            return self._from_inputs(model, names)
        if self.feeds is None:  # the first stage reads the model's inputs only
            self.feeds = [dict(model_feeds(sess, b)) for b in self.batches]
        inputs = [i.name for i in sess.get_inputs()]
        fetch = names + extra
        results: list[list[np.ndarray]] = []
        new: dict[str, list[np.ndarray]] = {t: [] for t in new_names}
        for i in range(len(self.feeds)):
            try:
                vals = sess.run(fetch, self._given(inputs, i))
            except Exception as exc:  # onnxruntime's own exception classes; the runs from the inputs decide
                log.info("%s: a staged run failed (%s); each stage runs from the inputs", self.label, ort_message(exc))
                self.enabled, self.values, self.done = False, {}, set()
                return self._from_inputs(model, names)
            results.append(vals[:len(names)])
            got = dict(zip(fetch, vals))
            for t in new_names:
                new[t].append(got[t])
        self.values = {t: v for t, v in self.values.items() if wanted(t)} | new
        self.done = final
        size = sum(v.nbytes for vs in self.values.values() for v in vs)
        if size > FRONTIER_BYTES:
            log.info("%s: %.1f GB of tensors between stages; each stage runs from the inputs", self.label,
                     size / 2**30)
            self.enabled, self.values, self.done = False, {}, set()
        return results

    def _given(self, inputs: list[str], i: int) -> dict[str, np.ndarray]:
        """Batch ``i``'s feeds of a stage whose inputs are ``inputs``: kept values first."""
        assert self.feeds is not None
        feeds = self.feeds[i]
        return {k: self.values[k][i] if k in self.values else feeds[k] for k in inputs
                if k in self.values or k in feeds}

    def rest(self, model: onnx.ModelProto, names: list[str]) -> list[list[np.ndarray]] | None:
        """``names`` of ``model`` on every batch, run from what the stages so far kept: only
        the nodes of ``model`` that are not final run (a node keyed like a final one must be
        unchanged in ``model``). Keeps nothing, so another model can follow. None where it
        cannot run so (no stage yet, a value that was not kept, a failed run): the caller
        runs ``model`` from its inputs."""
        if not self.enabled or self.feeds is None:
            return None
        try:
            stage, _ = self._stage(model, names)
            sess = make_session(stage, self.provider, label=self.label)
        except (OnnxCompressError, ValueError, TypeError, AttributeError) as exc:
            log.debug("%s: not run from the kept values (%s)", self.label, exc)
            return None
        inputs = [i.name for i in sess.get_inputs()]
        out = []
        for i in range(len(self.feeds)):
            try:
                out.append(sess.run(names, self._given(inputs, i)))
            except Exception as exc:  # onnxruntime's own exception classes; the caller runs from the inputs
                log.debug("%s: a run from the kept values failed (%s)", self.label, ort_message(exc))
                return None
        return out

    def _from_inputs(self, model: onnx.ModelProto, names: list[str]) -> list[list[np.ndarray]]:
        sess = make_session(truncated(model, names), self.provider, label=self.label)
        return [run_named(sess, names, b, self.label) for b in self.batches]
