"""Pass ``canonicalize``: put real exports into the form the other passes expect.

Every step computes exactly the same function as the input graph:

* ``Constant`` nodes of the main graph become initializers of the same name (a weight
  is then found by looking up ``graph.initializer``, whatever the exporter did).
  Constants feeding a graph output directly are kept.
* ``Identity`` nodes are removed: every use of ``y = Identity(x)`` reads ``x`` instead.
  When ``y`` is a graph output, the producer of ``x`` is renamed to write ``y`` (unless
  ``x`` is itself a graph input, initializer or output, where the Identity must stay).
* Constant subgraphs (nodes whose inputs are all initializers, e.g. paddle2onnx's
  ``Reshape(bias, [1, C, 1, 1])``) are evaluated once and become initializers.
* Initializers with identical dtype, shape and bytes are merged into one.
* Dead nodes (whose outputs reach no graph output) and unused initializers are dropped.
* Graph inputs that merely expose an initializer (old exporters list every weight as an
  input) are removed from the inputs on IR ≥ 4 models, so weights are constants.
* Shapes are inferred (``onnx.shape_inference`` with data propagation) and stored as
  ``value_info``, so later passes can read channel counts without running the model.

Names used inside subgraphs (``If``/``Loop`` bodies capture outer values by name) are
renamed consistently; subgraph contents are otherwise left alone.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import OnnxCompressError
from ..graph import defined_in, drop_stale_value_info, remove_dead_code, subgraphs, used_names
from ..model import tensor_bytes
from ..pipeline import Pass, PassContext, PassResult
from ..shapes import infer_shapes
from ..validate import lost_fusions, runtime_fusions

log = logging.getLogger(__name__)

#: onnxruntime's fusions are compared before and after on models below this size (two more session loads)
FUSION_CHECK_BYTES = 512 * 2**20


@dataclass(frozen=True)
class CanonicalizeOptions:
    constants: bool = field(default=True, metadata={"experimental": True, "help": "turn Constant nodes into initializers"})
    identities: bool = field(default=True, metadata={"experimental": True, "help": "remove Identity nodes"})
    fold: bool = field(default=True, metadata={"help": "evaluate constant subgraphs into initializers"})
    dedupe: bool = field(default=True, metadata={"experimental": True, "help": "merge identical initializers"})
    dead_code: bool = field(default=True, metadata={"experimental": True, "help": "drop dead nodes and unused initializers"})
    weight_inputs: bool = field(default=True, metadata={"experimental": True, "help": "drop graph inputs that only expose initializers (IR >= 4)"})
    infer_shapes: bool = field(default=True, metadata={"help": "infer shapes into value_info"})


def rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every consumer of ``old`` (in ``graph`` and captured by its subgraphs) read ``new``."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for sub in subgraphs(node):
            if old not in defined_in(sub):  # a subgraph that defines `old` shadows it
                rename_uses(sub, old, new)
                for o in sub.output:
                    if o.name == old:
                        o.name = new


def _constant_to_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if len(node.attribute) != 1 or len(node.output) != 1:
        return None
    attr = node.attribute[0]
    name = node.output[0]
    if attr.name == "value":
        t = onnx.TensorProto()
        t.CopyFrom(attr.t)
        t.name = name
        return t
    scalars = {
        "value_float": np.float32,
        "value_floats": np.float32,
        "value_int": np.int64,
        "value_ints": np.int64,
    }
    if attr.name in scalars:
        value = helper.get_attribute_value(attr)
        return numpy_helper.from_array(np.asarray(value, dtype=scalars[attr.name]), name)
    return None  # strings, sparse: left as Constant


class Canonicalize(Pass):
    name = "canonicalize"
    summary = "Constant nodes to initializers, drop Identity, merge duplicate weights, infer shapes"
    Options = CanonicalizeOptions
    exact = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        opts: CanonicalizeOptions = self.options
        before = None  # onnxruntime's own fusions of the input, to report any the rewrite loses
        if tensor_bytes(model) < FUSION_CHECK_BYTES:
            try:
                before = runtime_fusions(model, ctx.provider)
            except OnnxCompressError as exc:
                log.debug("canonicalize: onnxruntime's fusions of the input unknown (%s)", exc)
        g = model.graph
        stats: dict[str, int | bool] = {
            "nodes_before": len(g.node),
            "constants_to_initializers": 0,
            "identities_removed": 0,
            "constants_folded": 0,
            "initializers_merged": 0,
            "dead_nodes_removed": 0,
            "unused_initializers_removed": 0,
            "initializer_inputs_removed": 0,
        }
        if opts.weight_inputs and model.ir_version >= 4:
            inits = {t.name for t in g.initializer}
            real = [i for i in g.input if i.name not in inits]
            stats["initializer_inputs_removed"] = len(g.input) - len(real)
            if len(real) != len(g.input):
                del g.input[:]
                g.input.extend(real)
        if opts.constants:
            stats["constants_to_initializers"] = self._constants(model)
        if opts.identities:
            stats["identities_removed"] = self._identities(g)
        if opts.fold:
            stats["constants_folded"] = self._fold(model)
        if opts.dedupe:
            stats["initializers_merged"] = self._dedupe(g)
        if opts.dead_code:
            stats["dead_nodes_removed"], stats["unused_initializers_removed"] = remove_dead_code(g)
        modified = any(v for k, v in stats.items() if k != "nodes_before")
        if opts.infer_shapes:
            model, inferred = infer_shapes(model)
            stats["shapes_inferred"] = inferred
            modified = modified or inferred
        stats["nodes_after"] = len(model.graph.node)
        if before is not None and modified:
            stats["runtime_fusions_lost"] = lost_fusions(before, model, ctx.provider)
            if stats["runtime_fusions_lost"]:
                log.warning("canonicalize: onnxruntime makes fewer of its fusions of the result: %s",
                            stats["runtime_fusions_lost"])
        return PassResult(model, modified, stats)

    # -- steps ------------------------------------------------------------------------

    @staticmethod
    def _constants(model: onnx.ModelProto) -> int:
        g = model.graph
        outputs = {o.name for o in g.output}
        keep: list[onnx.NodeProto] = []
        new_inits: list[onnx.TensorProto] = []
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
                tensor = _constant_to_tensor(node)
                if tensor is not None:
                    new_inits.append(tensor)
                    continue
            keep.append(node)
        if not new_inits:
            return 0
        del g.node[:]
        g.node.extend(keep)
        g.initializer.extend(new_inits)
        if model.ir_version < 4:  # before IR 4 every initializer must also be a graph input
            for t in new_inits:
                g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        return len(new_inits)

    @staticmethod
    def _identities(g: onnx.GraphProto) -> int:
        removed = 0
        changed = True
        while changed:
            changed = False
            outputs = {o.name for o in g.output}
            fixed = {i.name for i in g.input} | {t.name for t in g.initializer} | outputs
            for idx, node in enumerate(g.node):
                if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.input) != 1:
                    continue
                x, y = node.input[0], node.output[0]
                if y not in outputs:
                    del g.node[idx]
                    rename_uses(g, y, x)
                elif x not in fixed:
                    producer = next((n for n in g.node if x in n.output), None)
                    if producer is None:
                        continue
                    del g.node[idx]
                    producer.output[list(producer.output).index(x)] = y
                    rename_uses(g, x, y)
                else:
                    continue
                removed += 1
                changed = True
                break
        if removed:
            drop_stale_value_info(g)
        return removed

    #: ops never folded: random, or with side effects / huge outputs
    _NO_FOLD = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                          "Bernoulli", "ConstantOfShape", "Expand", "Tile", "Range", "If", "Loop", "Scan",
                          "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
    _FOLD_LIMIT = 16 * 2**20  # bytes: never materialize more than this per folded tensor

    @classmethod
    def _fold(cls, model: onnx.ModelProto) -> int:
        """Evaluate nodes whose inputs are all (non-overridable) initializers."""
        from onnx.reference import ReferenceEvaluator

        g = model.graph
        graph_inputs = {i.name for i in g.input}
        const = {t.name for t in g.initializer} - graph_inputs
        sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in g.initializer}
        outputs = {o.name for o in g.output}
        fold: list[onnx.NodeProto] = []
        for node in g.node:
            ins = [i for i in node.input if i]
            if (
                not ins
                or node.domain not in ("", "ai.onnx")
                or node.op_type in cls._NO_FOLD
                or subgraphs(node)
                or not all(i in const for i in ins)
                or any(o in outputs for o in node.output)
                or sum(sizes.get(i, 0) for i in ins) * 8 > cls._FOLD_LIMIT
            ):
                continue
            fold.append(node)
            const.update(o for o in node.output if o)
        if not fold:
            return 0
        folded_outs = {o for n in fold for o in n.output if o}
        kept_nodes = [n for n in g.node if not any(o in folded_outs for o in n.output)]
        needed = sorted({i for n in kept_nodes for i in n.input if i in folded_outs}
                        | {i for n in kept_nodes for sub in subgraphs(n) for i in used_names(sub) if i in folded_outs})
        if not needed:
            return 0
        inits = [t for t in g.initializer if t.name in {i for n in fold for i in n.input}]
        sub = helper.make_graph(fold, "fold", [], [onnx.ValueInfoProto(name=n) for n in needed], inits)
        sub_model = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
        try:
            values = ReferenceEvaluator(sub_model).run(None, {})
        except Exception as exc:  # an op the reference evaluator lacks: leave the subgraph alone
            log.info("constant folding skipped (%s)", exc)
            return 0
        new_inits = []
        for name, value in zip(needed, values):
            arr = np.asarray(value)
            if arr.dtype == object or arr.nbytes > cls._FOLD_LIMIT:
                log.info("constant folding skipped: '%s' is %s", name, "too large" if arr.dtype != object else "not numeric")
                return 0
            new_inits.append(numpy_helper.from_array(arr, name))
        del g.node[:]
        g.node.extend(kept_nodes)
        g.initializer.extend(new_inits)
        return len(fold)

    @staticmethod
    def _dedupe(g: onnx.GraphProto) -> int:
        protected = {i.name for i in g.input} | {o.name for o in g.output}
        seen: dict[tuple[int, tuple[int, ...], str], str] = {}
        first_bytes: dict[str, bytes] = {}
        replace: dict[str, str] = {}
        for t in g.initializer:
            if t.name in protected or t.data_location == onnx.TensorProto.EXTERNAL:
                continue
            data = numpy_helper.to_array(t).tobytes()
            key = (t.data_type, tuple(t.dims), hashlib.sha256(data).hexdigest())
            if key in seen and first_bytes[seen[key]] == data:
                replace[t.name] = seen[key]
            else:
                seen.setdefault(key, t.name)
                first_bytes.setdefault(t.name, data)
        if not replace:
            return 0
        kept = [t for t in g.initializer if t.name not in replace]
        del g.initializer[:]
        g.initializer.extend(kept)
        for old, new in replace.items():
            rename_uses(g, old, new)
        return len(replace)

