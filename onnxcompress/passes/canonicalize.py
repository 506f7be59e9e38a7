"""Pass ``canonicalize``: put real exports into the form the other passes expect.

Every step computes exactly the same function as the input graph:

* ``Constant`` nodes of the main graph become initializers of the same name (a weight
  is then found by looking up ``graph.initializer``, whatever the exporter did).
  Constants feeding a graph output directly are kept.
* ``Identity`` nodes are removed: every use of ``y = Identity(x)`` reads ``x`` instead.
  When ``y`` is a graph output, the producer of ``x`` is renamed to write ``y`` (unless
  ``x`` is itself a graph input, initializer or output, where the Identity must stay).
* No-op nodes go the same way (``noops``): ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1`` by a
  constant that broadcasts to x's shape without changing it; ``Squeeze`` of an
  ``Unsqueeze`` over the same axes and the reverse; ``Reshape(x, Shape(z))`` where x has
  z's shape (x is z, or an elementwise op of z and such a constant). Exporters write
  these (paddle2onnx's ``assign`` is Unsqueeze → Add 0 → Squeeze), and onnxruntime
  removes only some: one left between two convolutions takes the tensor out of
  onnxruntime's blocked channel layout and back. ``x + 0`` turns -0.0 into +0.0, which
  onnxruntime's own no-op elimination does too.
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
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import OnnxCompressError
from ..graph import (
    UNARY_ELEMENTWISE,
    defined_in,
    drop_stale_value_info,
    producers,
    remove_dead_code,
    subgraphs,
    used_names,
)
from ..model import tensor_bytes
from ..pipeline import Pass, PassContext, PassResult
from ..shapes import infer_shapes, value_shapes
from ..validate import lost_fusions, runtime_fusions

log = logging.getLogger(__name__)

#: onnxruntime's fusions are compared before and after on models below this size (two more session loads)
FUSION_CHECK_BYTES = 512 * 2**20


@dataclass(frozen=True)
class CanonicalizeOptions:
    constants: bool = field(default=True, metadata={"experimental": True, "help": "turn Constant nodes into initializers"})
    identities: bool = field(default=True, metadata={"experimental": True, "help": "remove Identity nodes"})
    noops: bool = field(default=True, metadata={"experimental": True, "help": "remove no-op nodes (x + 0, x * 1, Unsqueeze → Squeeze, Reshape(x, Shape(x)))"})
    fold: bool = field(default=True, metadata={"help": "evaluate constant subgraphs into initializers"})
    dedupe: bool = field(default=True, metadata={"experimental": True, "help": "merge identical initializers"})
    dead_code: bool = field(default=True, metadata={"experimental": True, "help": "drop dead nodes and unused initializers"})
    weight_inputs: bool = field(default=True, metadata={"experimental": True, "help": "drop graph inputs that only expose initializers (IR >= 4)"})
    infer_shapes: bool = field(default=True, metadata={"help": "infer shapes into value_info"})


def rename_uses(graph: onnx.GraphProto, renames: Mapping[str, str]) -> None:
    """Make every consumer of each old name in ``renames`` (in ``graph`` and captured by
    its subgraphs) read the new one; one pass over the nodes."""
    if not renames:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for sub in subgraphs(node):
            shadowed = defined_in(sub) & renames.keys()  # a subgraph that defines a name shadows it
            inner = {k: v for k, v in renames.items() if k not in shadowed} if shadowed else renames
            rename_uses(sub, inner)
            for o in sub.output:
                if o.name in inner:
                    o.name = inner[o.name]


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


#: x op c == x where the constant c is all this value (the bool: c may stand on either side)
_NEUTRAL = {"Add": (0, True), "Sub": (0, False), "Mul": (1, True), "Div": (1, False)}
#: ops whose output has the shape of their first input, whatever their constant operands
_SHAPE_KEEPING = UNARY_ELEMENTWISE | {"Not", "Softmax", "LogSoftmax"}
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})


def _noops_to_identities(model: onnx.ModelProto) -> int:
    """Turn the main graph's no-op nodes (module docstring) into ``Identity`` nodes of the
    input they pass on; the number turned."""
    g = model.graph
    if not any(n.op_type in ("Squeeze", "Unsqueeze", "Reshape", *_NEUTRAL) for n in g.node):
        return 0
    noops = _NoOps(model)
    turned = 0
    for node in g.node:  # ONNX graphs are topologically sorted
        x = noops.passes_on(node) if node.domain in ("", "ai.onnx") and len(node.output) == 1 else None
        if x is not None:
            log.debug("canonicalize: %s '%s' passes on '%s' unchanged", node.op_type, node.name, x)
            node.op_type, node.domain = "Identity", ""
            del node.input[:]
            node.input.append(x)
            del node.attribute[:]
            noops.alias[node.output[0]] = noops.src(x)
            turned += 1
        for o in node.output:
            noops.producer[o] = node
    return turned


class _NoOps:
    """What the graph read so far says of a node: its producers, the no-ops already turned
    (``alias``: output → the tensor it passes on), constants and inferred shapes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.consts = {t.name: t for t in g.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
        for i in g.input:
            self.consts.pop(i.name, None)  # an initializer the user may override is not a constant
        self.model = model
        self._shapes: dict[str, list[int | str | None]] | None = None
        self.alias: dict[str, str] = {}
        self.producer: dict[str, onnx.NodeProto] = {}

    @property
    def shapes(self) -> dict[str, list[int | str | None]]:
        """Inferred shapes, read once where a rule first needs one (most graphs never do)."""
        if self._shapes is None:
            self._shapes = value_shapes(infer_shapes(self.model)[0])
        return self._shapes

    def src(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def const(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.consts[name]) if name in self.consts else None

    def absorbed(self, name: str, x: str) -> np.ndarray | None:
        """The constant ``name`` where broadcasting it against x leaves x's shape as it is:
        of x's rank or less, each dim 1 or x's (known) dim."""
        c = self.const(name)
        if c is None or c.ndim == 0:
            return c
        dims = self.shapes.get(x)
        if dims is None or c.ndim > len(dims) or any(d != 1 and d != dx for d, dx in zip(c.shape, dims[-c.ndim:])):
            return None
        return c

    def axes(self, node: onnx.NodeProto) -> list[int] | None:
        for a in node.attribute:
            if a.name == "axes":
                return list(a.ints)
        c = self.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        return None if c is None else [int(v) for v in c.ravel()]

    def same_shape(self, x: str, z: str) -> bool:
        """x has z's shape: x is z, or a shape-keeping op of z (and absorbed constants)."""
        if x == z:
            return True
        p = self.producer.get(x)
        if p is None or p.domain not in ("", "ai.onnx") or not p.input:
            return False
        if p.op_type in _SHAPE_KEEPING:
            return self.src(p.input[0]) == z
        if p.op_type in _BROADCASTING and len(p.input) == 2:
            a, b = p.input
            return ((self.src(a) == z and self.absorbed(b, z) is not None)
                    or (self.src(b) == z and self.absorbed(a, z) is not None))
        return False

    def passes_on(self, node: onnx.NodeProto) -> str | None:
        """The input ``node`` passes on unchanged, or None."""
        op, ins = node.op_type, node.input
        if not ins or not ins[0]:
            return None
        if op in _NEUTRAL and len(ins) == 2:
            value, either = _NEUTRAL[op]
            for x, c in ((ins[0], ins[1]), (ins[1], ins[0]))[: 2 if either else 1]:
                arr = self.const(c)
                if arr is not None and arr.dtype != bool and np.all(arr == value) and self.absorbed(c, x) is not None:
                    return x
            return None
        if op in ("Squeeze", "Unsqueeze"):
            return self._undone(node)
        if op == "Reshape" and len(ins) == 2:
            shape = self.producer.get(self.src(ins[1]))
            if shape is None or shape.op_type != "Shape" or any(
                    a.name == "end" or (a.name == "start" and a.i != 0) for a in shape.attribute):
                return None
            return ins[0] if self.same_shape(self.src(ins[0]), self.src(shape.input[0])) else None
        return None

    def _undone(self, node: onnx.NodeProto) -> str | None:
        """Squeeze(Unsqueeze(x, A), A) or Unsqueeze(Squeeze(x, A), A): x."""
        pair = "Unsqueeze" if node.op_type == "Squeeze" else "Squeeze"
        inner = self.producer.get(self.src(node.input[0]))
        if inner is None or inner.op_type != pair or inner.domain not in ("", "ai.onnx"):
            return None
        outer_axes, inner_axes = self.axes(node), self.axes(inner)
        if not outer_axes or not inner_axes:
            return None
        x = inner.input[0]
        if min(outer_axes + inner_axes) < 0:  # both count axes in the rank of the tensor between them
            if x not in self.shapes:
                return None
            mid = len(self.shapes[x]) + (len(inner_axes) if pair == "Unsqueeze" else 0)
            outer_axes, inner_axes = ([a + mid if a < 0 else a for a in v] for v in (outer_axes, inner_axes))
        return x if sorted(outer_axes) == sorted(inner_axes) else None


class Canonicalize(Pass):
    name = "canonicalize"
    summary = "Constant nodes to initializers, drop Identity and no-op nodes, merge duplicate weights, infer shapes"
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
            "noops_removed": 0,
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
        if opts.noops and _noops_to_identities(model):
            stats["noops_removed"] = self._identities(g)
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
        """Remove Identity nodes in one pass (module docstring); the number removed."""
        outputs = {o.name for o in g.output}
        fixed = {i.name for i in g.input} | {t.name for t in g.initializer} | outputs

        def is_identity(n: onnx.NodeProto) -> bool:
            return n.op_type == "Identity" and n.domain in ("", "ai.onnx") and len(n.input) == 1

        alias = {n.output[0]: n.input[0] for n in g.node if is_identity(n) and n.output[0] not in outputs}

        def resolved(name: str) -> str:
            while name in alias:
                name = alias[name]
            return name

        kept = [n for n in g.node if not (is_identity(n) and n.output[0] in alias)]
        made_by = producers(g)  # read only at resolved names, which no removed Identity writes
        to_output: dict[str, str] = {}  # x → graph output y where y = Identity(x) is removed
        final = []
        for node in kept:
            if is_identity(node) and node.output[0] in outputs:
                x, y = resolved(node.input[0]), node.output[0]
                producer = made_by.get(x)
                if x not in fixed and x not in to_output and producer is not None:
                    producer.output[list(producer.output).index(x)] = y
                    to_output[x] = y
                    continue
            final.append(node)
        removed = len(g.node) - len(final)
        if removed:
            renames = {y: to_output.get(resolved(y), resolved(y)) for y in alias} | to_output
            del g.node[:]
            g.node.extend(final)
            rename_uses(g, renames)
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
        rename_uses(g, replace)
        return len(replace)

