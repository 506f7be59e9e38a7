"""The graph index the passes share: which node writes and which nodes read a tensor,
initializers by name, names defined in a graph, topological order. It never imports a pass.

A node with subgraphs (If, Loop, Scan) also reads the outer names its bodies use without
defining them (:func:`captured`). Every reader list and order here counts those reads, so
a rewrite that changes or removes such a tensor sees the If as one of its readers."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping

import onnx
from onnx import numpy_helper

from .model import iter_graphs, node_attr


def captured(node: onnx.NodeProto) -> set[str]:
    """The outer names a node's subgraphs read (at any depth) and do not define themselves."""
    names: set[str] = set()
    for sub in subgraphs(node):
        inner: set[str] = set()
        for g in iter_graphs(sub):
            inner |= defined_in(g)
        names |= used_names(sub) - inner
    return names


def reads(node: onnx.NodeProto) -> list[str]:
    """The names a node reads: its inputs, then what its subgraphs capture (sorted)."""
    ins = [i for i in node.input if i]
    return ins + sorted(captured(node) - set(ins)) if node.attribute else ins


def topological_order(graph: onnx.GraphProto) -> list[int]:
    """Node indices in an order where every node comes after the nodes it reads from
    (subgraph captures included)."""
    produced = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    indeg = [0] * len(graph.node)
    users: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(graph.node):
        deps = {produced[x] for x in reads(n) if x in produced}
        indeg[i] = len(deps)
        for d in deps:
            users[d].append(i)
    ready = [i for i, d in enumerate(indeg) if d == 0]
    order = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for u in users[i]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if len(order) != len(graph.node):
        raise ValueError("the graph has a cycle")
    return order


def graph_index(g: onnx.GraphProto) -> tuple[dict[str, onnx.TensorProto], dict[str, list[onnx.NodeProto]], set[str]]:
    """(initializers by name, tensor → the nodes reading it, graph output names). A node
    whose subgraph captures a tensor reads it (:func:`reads`)."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for i in reads(n):
            readers[i].append(n)
    return initializers(g), readers, {o.name for o in g.output}


def defined_in(graph: onnx.GraphProto) -> set[str]:
    """Names defined in ``graph``: its inputs, initializers and node outputs."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for n in graph.node:
        names.update(o for o in n.output if o)
    return names


def drop_stale_value_info(graph: onnx.GraphProto) -> None:
    """Remove ``value_info`` entries of tensors no node or input of ``graph`` defines any more."""
    live = defined_in(graph)
    kept = [vi for vi in graph.value_info if vi.name in live]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held by a node's attributes (If, Loop, Scan bodies)."""
    out: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes of ``graph`` or of its subgraphs (outer captures included)."""
    names: set[str] = set()
    for g in iter_graphs(graph):
        for n in g.node:
            names.update(i for i in n.input if i)
        names.update(o.name for o in g.output)
    return names


def remove_dead_code(g: onnx.GraphProto) -> tuple[int, int]:
    """Remove the nodes no graph output needs and the initializers nothing reads; (nodes, initializers) removed."""
    needed = {o.name for o in g.output}
    producers: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            if o:
                producers[o] = i
    live_nodes: set[int] = set()
    stack = list(needed)
    while stack:
        name = stack.pop()
        idx = producers.get(name)
        if idx is None or idx in live_nodes:
            continue
        live_nodes.add(idx)
        node = g.node[idx]
        reads = [i for i in node.input if i]
        for sub in subgraphs(node):
            reads.extend(used_names(sub))
        stack.extend(reads)
    dead = len(g.node) - len(live_nodes)
    if dead:
        kept_nodes = [n for i, n in enumerate(g.node) if i in live_nodes]
        del g.node[:]
        g.node.extend(kept_nodes)
    used = used_names(g)
    graph_inputs = {i.name for i in g.input}
    kept_inits = [t for t in g.initializer if t.name in used or t.name in graph_inputs]
    unused = len(g.initializer) - len(kept_inits)
    if unused:
        del g.initializer[:]
        g.initializer.extend(kept_inits)
    return dead, unused


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove the initializers no node (or subgraph) reads and no graph output names."""
    g = model.graph
    used = used_names(g)
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def clip_bounds(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> tuple[float, float] | None:
    """(min, max) of a Clip (attributes before opset 11, constant inputs after), else None."""
    lo, hi = node_attr(node, "min", None), node_attr(node, "max", None)
    vals: list[float | None] = [lo, hi]
    for k, idx in ((0, 1), (1, 2)):
        if len(node.input) > idx and node.input[idx]:
            if node.input[idx] not in inits:
                return None
            vals[k] = float(numpy_helper.to_array(inits[node.input[idx]]))
    lo_v = -math.inf if vals[0] is None else float(vals[0])
    hi_v = math.inf if vals[1] is None else float(vals[1])
    return lo_v, hi_v


#: ops applied to each element alone: one tensor in (any further inputs are scalars or
#: attributes), its shape out
UNARY_ELEMENTWISE = frozenset({
    "Abs", "Cast", "Ceil", "Celu", "Clip", "Cos", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish",
    "Identity", "LeakyRelu", "Log", "Mish", "Neg", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin",
    "Softplus", "Softsign", "Sqrt", "Tanh", "ThresholdedRelu",
})


def initializers(g: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The graph's initializers by name."""
    return {t.name: t for t in g.initializer}


def producers(g: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Each tensor's producing node, by tensor name."""
    return {o: n for n in g.node for o in n.output if o}


def fresh_namer(g: onnx.GraphProto) -> Callable[[str], str]:
    """A function returning names not yet used in ``g`` (tensors, inputs, initializers,
    nodes): ``base``, else ``base_1``, ``base_2``, …; each name it returns is taken."""
    taken = used_names(g) | {n.name for sub in iter_graphs(g) for n in sub.node}
    for sub in iter_graphs(g):
        taken |= defined_in(sub)

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    return fresh


def same_computation(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Whether two models run the same nodes (subgraphs included) on the same weights,
    inputs and opsets, in the same order: what inferred shapes (value_info), output shape
    annotations and doc strings leave unchanged."""
    ga, gb = a.graph, b.graph
    if (len(ga.node), len(ga.initializer), len(ga.input)) != (len(gb.node), len(gb.initializer), len(gb.input)):
        return False
    if [(o.name, o.type.tensor_type.elem_type) for o in ga.output] != \
            [(o.name, o.type.tensor_type.elem_type) for o in gb.output]:
        return False
    if {(o.domain, o.version) for o in a.opset_import} != {(o.domain, o.version) for o in b.opset_import}:
        return False
    pairs = [*zip(ga.input, gb.input), *zip(ga.node, gb.node), *zip(ga.initializer, gb.initializer)]
    return all(x.SerializeToString() == y.SerializeToString() for x, y in pairs)
