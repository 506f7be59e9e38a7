"""Channel dependency groups: which tensors must lose the same channels.

Model. Every output channel of a prunable producer (a ``Conv`` with ``group == 1`` or a
``ConvTranspose`` with ``group == 1``) is an *atom*. Each tensor whose axis 1 carries
such channels gets an atom list: position ``p`` of the tensor holds atom ``L[p]`` (or
``-1``, a channel no producer of ours owns, e.g. from a graph input). Walking the graph
in topological order:

* channel-wise ops (activations, BatchNormalization, pooling, Pad, Resize, per-channel or
  scalar constants, depthwise Conv) pass the list through;
* elementwise ops on two tracked tensors (residual ``Add``, squeeze-excite ``Mul``)
  *unite* the atoms position by position (union-find): united atoms must be removed
  together;
* ``Concat`` on axis 1 concatenates the lists; ``Split``/``Slice`` on axis 1 take
  sub-lists (channels map by offset);
* ``Flatten``/flatten-like ``Reshape`` repeat each atom H·W times, so a following
  ``Gemm``/``MatMul`` loses a block of H·W rows per channel;
* contracting consumers (``Conv``/``ConvTranspose`` input channels, ``Gemm``/``MatMul``
  rows) drop the positions whose atom is removed;
* anything else reading a tracked tensor (an op we do not understand, a grouped Conv,
  a graph output) *blocks* the producers of its atoms, with the reason recorded.

A *group* is a connected set of producers whose atoms are united; a *channel class* is
one union-find class of atoms. Pruning removes whole classes from unblocked groups, so
every coupled tensor loses exactly the same channels.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...graph import topological_order

log = logging.getLogger(__name__)

#: ops that act on each channel independently; extra inputs must be constants/scalars
CHANNELWISE = frozenset({
    "Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "LeakyRelu", "Tanh", "Elu", "Selu", "Softplus",
    "Softsign", "Gelu", "Erf", "Exp", "Neg", "Abs", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
    "Identity", "Dropout", "Cast", "Mish", "ThresholdedRelu", "Celu", "Log", "Sin", "Cos",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
})
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"})
NORMS = frozenset({"BatchNormalization", "InstanceNormalization"})
REDUCES = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2"})
#: ops that read a tensor's shape or pass it to no channel-dependent computation
SHAPE_ONLY = frozenset({"Shape", "Size"})


@dataclass
class Producer:
    """A prunable producer: a Conv/ConvTranspose whose output channels are atoms."""

    index: int  # node index in the graph
    name: str
    op: str
    channels: int
    first_atom: int
    output: str

    @property
    def atoms(self) -> np.ndarray:
        return np.arange(self.first_atom, self.first_atom + self.channels)


@dataclass
class Use:
    """A node input that reads a tracked tensor, and what pruning must do there."""

    node: int
    input: int  # input position
    kind: str  # consumer-conv, consumer-convT, depthwise, gemm, matmul, norm, const, split, slice, resize, reshape
    atoms: np.ndarray


@dataclass
class Group:
    id: int
    producers: list[int]  # indices into Analysis.producers
    classes: np.ndarray  # representative atom id of each channel class, in order of the first producer
    blocked: str | None = None

    @property
    def size(self) -> int:
        return len(self.classes)


@dataclass
class Analysis:
    model: onnx.ModelProto
    shapes: dict[str, list[int]]
    producers: list[Producer]
    atoms: dict[str, np.ndarray]  # tensor name -> atom list on axis 1
    uses: list[Use]
    parent: np.ndarray  # union-find over atoms
    atom_producer: np.ndarray  # atom -> producer index
    blocked: dict[int, str]  # producer index -> reason
    groups: list[Group] = field(default_factory=list)

    def find(self, a: np.ndarray | int) -> np.ndarray:
        """Class representative of each atom (vectorized; -1 stays -1)."""
        arr = np.atleast_1d(np.asarray(a, dtype=np.int64))
        out = arr.copy()
        valid = out >= 0
        while True:
            nxt = out.copy()
            nxt[valid] = self.parent[out[valid]]
            if np.array_equal(nxt, out):
                return out
            out = nxt

    def group_of_producer(self) -> dict[int, Group]:
        return {p: g for g in self.groups for p in g.producers}

    def describe(self, g: Group) -> str:
        names = [self.producers[p].name for p in g.producers]
        return ", ".join(names[:4]) + (f" (+{len(names) - 4})" if len(names) > 4 else "")


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def analyze(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> Analysis:
    """Build atoms, uses, union-find classes, blocked producers and groups."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {i.name for i in g.input}
    uf = _UnionFind()
    producers: list[Producer] = []
    atom_owner: list[int] = []
    atoms: dict[str, np.ndarray] = {}
    uses: list[Use] = []
    blocked: dict[int, str] = {}

    def const(name: str) -> np.ndarray | None:
        if name in inits and name not in graph_inputs:
            return numpy_helper.to_array(inits[name])
        return None

    def block(lst: np.ndarray | None, reason: str) -> None:
        if lst is None:
            return
        for a in np.unique(lst[lst >= 0]):
            blocked.setdefault(atom_owner[int(a)], reason)

    def new_producer(idx: int, node: onnx.NodeProto, channels: int) -> np.ndarray:
        first = uf.add(channels)
        atom_owner.extend([len(producers)] * channels)
        producers.append(Producer(idx, node.name or node.output[0], node.op_type, channels, first, node.output[0]))
        return np.arange(first, first + channels)

    def channels_of(name: str) -> int | None:
        s = shapes.get(name)
        return s[1] if s is not None and len(s) >= 2 else None

    for idx in topological_order(g):
        node = g.node[idx]
        op = node.op_type
        label = f"{op} '{node.name or node.output[0]}'"
        ins = [atoms.get(i) if i else None for i in node.input]
        tracked = [k for k, a in enumerate(ins) if a is not None]
        out0 = node.output[0] if node.output else ""
        a = _attrs(node)
        if node.domain not in ("", "ai.onnx"):
            for k in tracked:
                block(ins[k], f"{label} (domain {node.domain})")
            continue

        if op in ("Conv", "ConvTranspose"):
            w = const(node.input[1]) if len(node.input) > 1 else None
            group = int(a.get("group", 1))  # type: ignore[arg-type]
            x = ins[0]
            for k in tracked[1:]:
                block(ins[k], f"{label} reads it as a weight or bias")
            if w is None:
                block(x, f"{label} has non-constant weights")
                continue
            if w.ndim < 3:
                block(x, f"{label} has a weight of rank {w.ndim}")
                continue
            if w.dtype.kind == "f" and not np.all(np.isfinite(w)):
                block(x, f"{label} has NaN or Inf weights")
                continue
            if op == "Conv":
                cout, cin = w.shape[0], w.shape[1] * group
            else:
                cout, cin = w.shape[1] * group, w.shape[0]
            if x is not None and len(x) != cin:
                block(x, f"{label}: channel count mismatch")
                continue
            if group == 1:
                if x is not None:
                    uses.append(Use(idx, 0, "consumer-conv" if op == "Conv" else "consumer-convT", x))
                atoms[out0] = new_producer(idx, node, cout)
            elif op == "Conv" and group == cin == cout and x is not None:
                uses.append(Use(idx, 0, "depthwise", x))
                atoms[out0] = x
            else:
                block(x, f"{label} is a grouped convolution (group={group})")
            continue

        if not tracked:
            continue  # nothing of ours flows through this node

        if op in CHANNELWISE:
            if op in ("MaxPool",) and len(node.output) > 1 and node.output[1]:
                block(ins[0], f"{label} returns indices")
                continue
            if any(k != 0 for k in tracked):
                block(np.concatenate([ins[k] for k in tracked]), f"{label} reads a tracked tensor as a parameter")
                continue
            ok = all(const(i) is not None and const(i).size == 1 for i in node.input[1:] if i)  # type: ignore[union-attr]
            if not ok:
                block(ins[0], f"{label} has non-scalar parameters")
                continue
            atoms[out0] = ins[0]
            continue

        if op in NORMS:
            if tracked != [0] or any(const(i) is None for i in node.input[1:]):
                block(ins[0], f"{label} has non-constant parameters")
                continue
            uses.append(Use(idx, 0, "norm", ins[0]))
            atoms[out0] = ins[0]
            continue

        if op in ELEMENTWISE:
            c_out = channels_of(out0)
            out_rank = len(shapes.get(out0, []))
            if c_out is None:
                block(np.concatenate([ins[k] for k in tracked]), f"{label}: output shape unknown")
                continue
            full = [k for k in tracked if len(ins[k]) == c_out]  # type: ignore[arg-type]
            if len(full) != len(tracked):
                block(np.concatenate([ins[k] for k in tracked]), f"{label} broadcasts a tracked tensor over channels")
                continue
            problem = None
            for k, name in enumerate(node.input):
                if not name or k in tracked:
                    continue
                c = const(name)
                if c is not None:
                    ax = 1 - (out_rank - c.ndim)
                    if c.size == 1 or ax < 0 or c.shape[ax] == 1:
                        continue
                    if c.shape[ax] == c_out:
                        uses.append(Use(idx, k, "const", ins[full[0]]))  # type: ignore[arg-type]
                        continue
                    problem = f"{label} has a constant of shape {list(c.shape)}"
                else:  # a computed tensor we do not track: fine only if it broadcasts over channels
                    shp = shapes.get(name)
                    ax = None if shp is None else 1 - (out_rank - len(shp))
                    if shp is not None and (ax < 0 or shp[ax] == 1):  # type: ignore[operator,index]
                        continue
                    problem = f"{label} mixes in untracked tensor '{name}'"
            if problem:
                block(np.concatenate([ins[k] for k in tracked]), problem)
                continue
            first = ins[full[0]]
            for k in full[1:]:
                for x, y in zip(first, ins[k]):  # type: ignore[arg-type]
                    if x >= 0 and y >= 0:
                        uf.union(int(x), int(y))
                    elif x != y:
                        block(np.array([x, y]), f"{label} adds a channel that cannot be pruned")
            atoms[out0] = first  # type: ignore[assignment]
            continue

        rank = len(shapes.get(node.input[tracked[0]], []))

        if op == "Concat":
            axis = int(a.get("axis", 0))  # type: ignore[arg-type]
            axis = axis + rank if axis < 0 else axis
            if axis != 1:
                block(np.concatenate([ins[k] for k in tracked]), f"{label} concatenates on axis {axis}")
                continue
            parts = []
            for k, name in enumerate(node.input):
                if ins[k] is not None:
                    parts.append(ins[k])
                else:
                    c = channels_of(name)
                    if c is None:
                        parts = []
                        break
                    parts.append(np.full(c, -1, dtype=np.int64))
            if not parts:
                block(np.concatenate([ins[k] for k in tracked]), f"{label}: input shape unknown")
                continue
            atoms[out0] = np.concatenate(parts)
            continue

        if op == "Split":
            axis = int(a.get("axis", 0))  # type: ignore[arg-type]
            axis = axis + rank if axis < 0 else axis
            x = ins[0]
            if tracked != [0]:
                block(np.concatenate([ins[k] for k in tracked]), f"{label} reads a tracked split size")
                continue
            if axis != 1:
                for o in node.output:
                    atoms[o] = x  # type: ignore[assignment]
                continue
            sizes = [channels_of(o) for o in node.output]
            if any(s is None for s in sizes) or sum(sizes) != len(x):  # type: ignore[arg-type]
                block(x, f"{label}: output shapes unknown")
                continue
            uses.append(Use(idx, 0, "split", x))  # type: ignore[arg-type]
            start = 0
            for o, s in zip(node.output, sizes):
                atoms[o] = x[start : start + s]  # type: ignore[index,operator]
                start += s  # type: ignore[operator]
            continue

        if op == "Slice":
            x = ins[0]
            if tracked != [0]:
                block(np.concatenate([ins[k] for k in tracked]), f"{label} reads a tracked slice bound")
                continue
            vals = [const(i) if i else None for i in node.input[1:5]]
            if len(node.input) < 3 or any(v is None for v in vals[:2]) or any(
                    node.input[k] and vals[k - 1] is None for k in range(3, len(node.input))):
                block(x, f"{label} has non-constant bounds")
                continue
            starts, ends = vals[0], vals[1]
            axes = vals[2] if len(vals) > 2 and vals[2] is not None else np.arange(len(starts))  # type: ignore[arg-type]
            steps = vals[3] if len(vals) > 3 and vals[3] is not None else np.ones(len(starts), np.int64)  # type: ignore[arg-type]
            axes = [int(ax) + rank if int(ax) < 0 else int(ax) for ax in axes]
            if 1 not in axes:
                atoms[out0] = x  # type: ignore[assignment]
                continue
            k = axes.index(1)
            if int(steps[k]) != 1:  # type: ignore[index]
                block(x, f"{label} slices channels with a step")
                continue
            s, e, _ = slice(int(starts[k]), int(ends[k])).indices(len(x))  # type: ignore[index,arg-type]
            uses.append(Use(idx, 0, "slice", x))  # type: ignore[arg-type]
            atoms[out0] = x[s:e]  # type: ignore[index]
            continue

        if op in ("Resize", "Upsample"):
            if tracked != [0]:
                block(np.concatenate([ins[k] for k in tracked]), f"{label} reads a tracked parameter")
                continue
            scales_name = node.input[2] if op == "Resize" and len(node.input) > 2 else (node.input[1] if op == "Upsample" else "")
            sc = const(scales_name) if scales_name else None
            if scales_name and sc is not None and sc.size >= 2 and float(sc[1]) != 1.0:
                block(ins[0], f"{label} scales the channel axis")
                continue
            if scales_name and sc is None:
                block(ins[0], f"{label} has non-constant scales")
                continue
            sizes_name = node.input[3] if op == "Resize" and len(node.input) > 3 else ""
            if sizes_name:
                if const(sizes_name) is None:
                    block(ins[0], f"{label} has non-constant sizes")
                    continue
                uses.append(Use(idx, 3, "resize", ins[0]))  # type: ignore[arg-type]
            atoms[out0] = ins[0]  # type: ignore[assignment]
            continue

        if op == "Pad":
            x = ins[0]
            pads = const(node.input[1]) if len(node.input) > 1 and node.input[1] else np.asarray(a.get("pads", []))
            axes_in = const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if tracked != [0] or pads is None:
                block(x, f"{label} has non-constant pads")
                continue
            n_ax = rank if axes_in is None else len(axes_in)
            axes = list(range(rank)) if axes_in is None else [int(v) + rank if v < 0 else int(v) for v in axes_in]
            if 1 in axes:
                k = axes.index(1)
                if int(pads[k]) != 0 or int(pads[k + n_ax]) != 0:
                    block(x, f"{label} pads the channel axis")
                    continue
            atoms[out0] = x  # type: ignore[assignment]
            continue

        if op in REDUCES:
            x = ins[0]
            axes_val = a.get("axes")
            if axes_val is None and len(node.input) > 1 and node.input[1]:
                c = const(node.input[1])
                axes_val = None if c is None else [int(v) for v in c]
            keep = int(a.get("keepdims", 1))  # type: ignore[arg-type]
            if axes_val is None:
                block(x, f"{label} reduces over all axes")
                continue
            axes = [int(v) + rank if int(v) < 0 else int(v) for v in axes_val]  # type: ignore[union-attr]
            if 1 in axes or 0 in axes or (not keep and min(axes) < 1):
                block(x, f"{label} reduces the channel axis")
                continue
            atoms[out0] = x  # type: ignore[assignment]
            continue

        if op in ("Flatten", "Reshape"):
            x = ins[0]
            if tracked != [0]:
                block(np.concatenate([ins[k] for k in tracked]), f"{label} reads a tracked shape")
                continue
            in_shape, out_shape = shapes.get(node.input[0]), shapes.get(out0)
            if op == "Flatten" and int(a.get("axis", 1)) != 1:  # type: ignore[arg-type]
                block(x, f"{label} flattens from axis {a.get('axis')}")
                continue
            if in_shape is None or out_shape is None or len(out_shape) != 2 or len(in_shape) < 2:
                block(x, f"{label} reshapes channels")
                continue
            hw = int(np.prod(in_shape[2:], dtype=np.int64))
            if out_shape[1] != len(x) * hw or out_shape[0] != in_shape[0]:  # type: ignore[arg-type]
                block(x, f"{label} reshapes channels")
                continue
            if op == "Reshape":
                uses.append(Use(idx, 1, "reshape", x))  # type: ignore[arg-type]
            atoms[out0] = np.repeat(x, hw)  # type: ignore[arg-type]
            continue

        if op in ("Gemm", "MatMul"):
            x = ins[0]
            w = const(node.input[1]) if len(node.input) > 1 else None
            if tracked != [0] or w is None or w.ndim != 2 or len(shapes.get(node.input[0], [])) != 2:
                block(np.concatenate([ins[k] for k in tracked]), f"{label} is not a constant-weight matrix product")
                continue
            if op == "Gemm" and int(a.get("transA", 0)):  # type: ignore[arg-type]
                block(x, f"{label} transposes its input")
                continue
            uses.append(Use(idx, 0, "gemm" if op == "Gemm" else "matmul", x))  # type: ignore[arg-type]
            continue

        if op in SHAPE_ONLY:
            continue

        block(np.concatenate([ins[k] for k in tracked]), f"{label} is not supported on a channel path")

    for o in g.output:
        if o.name in atoms:
            block(atoms[o.name], f"reaches graph output '{o.name}'")

    parent = np.array([uf.find(i) for i in range(len(uf.parent))], dtype=np.int64)
    owner = np.array(atom_owner, dtype=np.int64)
    analysis = Analysis(model, shapes, producers, atoms, uses, parent, owner, blocked)
    analysis.groups = _groups(analysis)
    return analysis


def _groups(an: Analysis) -> list[Group]:
    """Connected producers (sharing any atom class) form a group."""
    n = len(an.producers)
    link = _UnionFind()
    link.add(n)
    reps = an.parent
    first_owner: dict[int, int] = {}
    for atom, rep in enumerate(reps):
        p = int(an.atom_producer[atom])
        q = first_owner.setdefault(int(rep), p)
        if q != p:
            link.union(p, q)
    members: dict[int, list[int]] = defaultdict(list)
    for p in range(n):
        members[link.find(p)].append(p)
    groups = []
    for gid, (_, prods) in enumerate(sorted(members.items())):
        first = an.producers[prods[0]]
        classes = list(dict.fromkeys(int(r) for r in reps[first.first_atom : first.first_atom + first.channels]))
        seen = set(classes)
        for p in prods[1:]:
            pr = an.producers[p]
            for r in reps[pr.first_atom : pr.first_atom + pr.channels]:
                if int(r) not in seen:
                    seen.add(int(r))
                    classes.append(int(r))
        reason = next((an.blocked[p] for p in prods if p in an.blocked), None)
        groups.append(Group(gid, prods, np.array(classes, dtype=np.int64), reason))
    return groups
