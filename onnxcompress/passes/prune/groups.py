"""Channel dependency groups: which tensors must lose the same channels.

Model. Every output channel of a prunable producer (a ``Conv`` with ``group == 1``, a
``ConvTranspose`` with ``group == 1``, or a ``MatMul``/``Gemm`` with a constant 2-D
weight, whose channels are the last axis: a transformer's token features) is an *atom*.
Each tensor whose channel axis carries such channels gets an atom list: position ``p``
of that axis holds atom ``L[p]`` (or ``-1``, a channel no producer of ours owns, e.g.
from a graph input). Walking the graph in topological order:

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
  rows, for any rank where the channels are the last axis) drop the positions whose atom
  is removed, so an MLP's hidden channels (MatMul → activation → MatMul) form a group;
* channels on an axis other than 1 (token features) pass only activations, elementwise
  ops, matrix products, Transpose, Squeeze/Unsqueeze, Slice/Split/Gather on other axes
  and Softmax over another axis; anything else (pooling, norms, Concat, …) blocks them,
  and so does a residual Add with an untracked stream (LayerNorm'd channels);
* a ``Reshape`` of token features to ``[..., h, d]`` is an attention head split: all
  channels of head ``j`` (its ``d`` channels in every leading block, e.g. of Q, K and V
  from one projection) are united, and the head axis carries one atom per head through
  Q·Kᵀ and weights·V (a MatMul of two computed tensors unites their heads), Softmax and
  the merge ``Reshape`` back to ``[..., h·d]``, where each head's atom repeats ``d``
  times for the output projection's rows. Whole heads go;
* anything else reading a tracked tensor (an op we do not understand, a grouped Conv,
  a graph output) *blocks* the producers of its atoms, with the reason recorded.

Each op family has its rule in ``rules.RULES`` (Torch-Pruning's table of per-op handlers):
it maps the atoms the node reads to what it writes, records the uses, or returns a
block verdict with the reason.

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

from ...graph import UNARY_ELEMENTWISE

log = logging.getLogger(__name__)

POOLING = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
#: ops that act on each channel independently; extra inputs must be constants/scalars
CHANNELWISE = POOLING | UNARY_ELEMENTWISE | {"Dropout"}
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"})
NORMS = frozenset({"BatchNormalization", "InstanceNormalization"})
REDUCES = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2"})
#: ops that read a tensor's shape or pass it to no channel-dependent computation
SHAPE_ONLY = frozenset({"Shape", "Size"})


def normalize_axis(value: object, rank: int) -> int:
    """An ONNX axis attribute (negative: from the end) as a non-negative index."""
    v = int(value)  # type: ignore[call-overload]
    return v + rank if v < 0 else v


@dataclass
class Producer:
    """A prunable producer: a Conv/ConvTranspose (channels on axis 1) or a MatMul/Gemm
    with a constant 2-D weight (features on the last axis) whose output channels are atoms."""

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
    kind: str  # consumer-conv, consumer-convT, depthwise, gemm, matmul, norm, const, split, slice, resize, reshape,
    # reshape-dim
    atoms: np.ndarray
    axis: int = 1  # the channel axis of the tensor read (const: of the node's output)


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
    atoms: dict[str, np.ndarray]  # tensor name -> atom list on its channel axis
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

    def per_class(self, g: Group) -> int:
        """Channels of the group's first producer in each class: 1, or a head's channels."""
        return max(1, self.producers[g.producers[0]].channels // max(g.size, 1))

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


def analyze(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> Analysis:
    """Build atoms, uses, union-find classes, blocked producers and groups: each node in
    topological order goes to its op's rule (:data:`~onnxcompress.passes.prune.rules.RULES`);
    an op without a rule, or a rule's block verdict, stops the channels it reads, with the
    reason."""
    from .rules import walk

    w = walk(model, shapes)
    parent = np.array([w.uf.find(i) for i in range(len(w.uf.parent))], dtype=np.int64)
    owner = np.array(w.atom_owner, dtype=np.int64)
    analysis = Analysis(model, shapes, w.producers, w.atoms, w.uses, parent, owner, w.blocked)
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
