"""Exact folds of constant per-channel arithmetic into convolutions, shared by ``fuse``
and ``int8`` (both exact up to float rounding):

* **BatchNormalization folding.** ``BN(Conv(x, W) + b)`` with a Conv whose output has
  no other reader becomes ``Conv(x, W')`` + b' with, per output channel c,
  ``k_c = γ_c / √(σ²_c + ε)``, ``W'_c = k_c W_c``, ``b'_c = k_c (b_c − μ_c) + β_c``
  (ConvTranspose: the output channel is axis 1 of W, per group).
* **Affine folding.** ``Conv(x) · a + b`` with constants a, b that are scalars or vary
  only along the output channel (BatchNormalization exported as Mul/Add, learnable
  affine blocks) becomes one Conv with ``W'_c = a_c W_c``, ``b'_c = a_c b_c + b_c``.
* **Forward folding.** ``a·h + b`` read only by unpadded Convs goes into them:
  ``W'[o, c] = a_c·W[o, c]``, ``b'_o = b_o + Σ W[o, c, …]·b_c`` (a padded Conv pads with
  zeros, not with b, so it is left alone).
* **Depthwise form.** Where neither fold applies after a Conv's activation, ``a·h + b``
  becomes a depthwise 1×1 Conv, which onnxruntime runs in its blocked layout.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import drop_unused_initializers, graph_index, initializers, producers, reads
from .model import node_attr

log = logging.getLogger(__name__)


def _absorb(g: onnx.GraphProto, conv: onnx.NodeProto, w: np.ndarray, b: np.ndarray, follower: onnx.NodeProto,
            tag: str) -> None:
    """Give ``conv`` the new weights and bias and ``follower``'s output; the caller drops
    ``follower`` (``_drop_nodes``, with the others it folds)."""
    wname, bname = f"{conv.name}_W_{tag}", f"{conv.name}_B_{tag}"
    g.initializer.extend([numpy_helper.from_array(w, wname), numpy_helper.from_array(b, bname)])
    conv.input[1] = wname
    if len(conv.input) > 2:
        conv.input[2] = bname
    else:
        conv.input.append(bname)
    conv.output[0] = follower.output[0]


def _drop_nodes(g: onnx.GraphProto, nodes: list[onnx.NodeProto], gone: set[int]) -> None:
    """Set the graph's nodes to ``nodes`` less those whose id() is in ``gone``, in one pass
    (``remove`` one by one is quadratic in a large graph). ``nodes`` is the listing the ids
    were taken from; holding it keeps them valid."""
    if gone:
        kept = [n for n in nodes if id(n) not in gone]
        del g.node[:]
        g.node.extend(kept)


def fold_batchnorm(model: onnx.ModelProto, kinds: tuple[str, ...] = ("Conv", "ConvTranspose")) -> int:
    """Fold every BatchNormalization that reads the sole output of a node of ``kinds``
    (Conv, ConvTranspose); the number folded."""
    g = model.graph
    inits = initializers(g)
    readers: dict[str, int] = defaultdict(int)
    for n in g.node:
        for i in reads(n):
            readers[i] += 1
    outputs = {o.name for o in g.output}
    producer = producers(g)
    folded = 0
    nodes = list(g.node)
    gone: set[int] = set()
    for bn in nodes:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or any(x not in inits for x in bn.input[1:5]):
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type not in kinds or len(conv.input) < 2:
            continue
        if readers[bn.input[0]] != 1 or bn.input[0] in outputs or conv.input[1] not in inits:
            continue
        if len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits:
            continue
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[x]).astype(np.float64) for x in bn.input[1:5])
        eps = float(node_attr(bn, "epsilon", 1e-5))
        with np.errstate(invalid="ignore", divide="ignore"):
            k = gamma / np.sqrt(var + eps)
        if not np.all(np.isfinite(k)):
            continue  # a negative variance or zero-width BN: leave it to run as it is
        if conv.op_type == "Conv":
            if w.shape[0] != k.size:
                continue
            w2 = w * k.reshape(-1, *([1] * (w.ndim - 1)))
        else:
            group = int(node_attr(conv, "group", 1))
            per = w.shape[1]
            if per * group != k.size:
                continue
            w2 = w.reshape(group, w.shape[0] // group, per, *w.shape[2:]) * k.reshape(group, 1, per, *([1] * (w.ndim - 2)))
            w2 = w2.reshape(w.shape)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
        b2 = k * (b - mean) + beta
        dtype = numpy_helper.to_array(inits[conv.input[1]]).dtype
        _absorb(g, conv, w2.astype(dtype), b2.astype(dtype), bn, f"bnfold{folded}")
        gone.add(id(bn))
        folded += 1
    _drop_nodes(g, nodes, gone)
    if folded:
        drop_unused_initializers(model)
    return folded


def _channel_vector(c: np.ndarray, out_rank: int, channels: int) -> np.ndarray | None:
    """``c`` as a length-``channels`` vector if it broadcasts only along axis 1 of a rank-``out_rank`` tensor."""
    if c.ndim > out_rank:
        return None
    if c.size == 1:
        return np.full(channels, float(c.reshape(())), dtype=np.float64)
    shape = [1] * (out_rank - c.ndim) + list(c.shape)
    if shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return c.reshape(-1).astype(np.float64)


def _constant_operand(n: onnx.NodeProto | None, inits: dict[str, onnx.TensorProto]) -> tuple[str, np.ndarray] | None:
    """(data input, float32 constant) if ``n`` is a Mul/Add of one tensor and one constant."""
    if n is None or n.op_type not in ("Mul", "Add") or len(n.input) != 2:
        return None
    const = [i for i in n.input if i in inits]
    data = [i for i in n.input if i not in inits]
    if len(const) != 1 or len(data) != 1:
        return None
    arr = numpy_helper.to_array(inits[const[0]])
    return (data[0], arr) if arr.dtype == np.float32 else None


def _compose(chain: list[tuple[onnx.NodeProto, np.ndarray]], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with ``y = a·h + b`` for a chain of Mul/Add given from y back to h, each with
    its per-channel constant."""
    a, b = np.ones(channels), np.zeros(channels)
    for n, vec in reversed(chain):  # from h forward
        if n.op_type == "Mul":
            a, b = a * vec, b * vec
        else:
            b = b + vec
    return a, b


def fold_affine(model: onnx.ModelProto, declines: Counter[str] | None = None) -> int:
    """Fold constant per-channel Mul/Add that follow a Conv or ConvTranspose into it; the
    number folded. (ConvTranspose's weights are [C_in, C_out/group, …]: output channel
    g·C_out/group + j is column j of group g's rows.) A Conv → constant Mul/Add left
    alone is counted in ``declines`` by reason."""
    g = model.graph
    folded = 0
    changed = True
    while changed:  # a sweep folds one Mul/Add into each conv it can; a chain of them takes a sweep each
        changed = False
        why: Counter[str] = Counter()  # the last sweep's (it finds every candidate left)
        inits, readers, outputs = graph_index(g)
        gone: set[int] = set()
        nodes = list(g.node)
        for conv in nodes:
            # a conv folded this sweep has weights the index does not know: the next sweep sees it
            if conv.op_type not in ("Conv", "ConvTranspose") or len(conv.input) < 2 or conv.input[1] not in inits:
                continue
            y = conv.output[0]
            nxt = readers.get(y, [])
            if len(nxt) != 1 or y in outputs:
                continue
            op = nxt[0]
            if op.op_type not in ("Mul", "Add") or len(op.input) != 2:
                continue
            other = op.input[1] if op.input[0] == y else op.input[0]
            if other not in inits or other == y:
                continue
            if len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits:
                why["the conv's bias is not a constant"] += 1
                continue
            w = numpy_helper.to_array(inits[conv.input[1]])
            if w.dtype != np.float32:
                why["the conv's weights are not float32"] += 1
                continue
            group = int(node_attr(conv, "group", 1))
            cout = w.shape[0] if conv.op_type == "Conv" else w.shape[1] * group
            c = _channel_vector(numpy_helper.to_array(inits[other]), w.ndim, cout)
            if c is None:
                why["the constant varies along an axis other than the channels"] += 1
                continue
            b = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
                 if len(conv.input) > 2 and conv.input[2] else np.zeros(cout))
            if op.op_type == "Mul":
                if conv.op_type == "Conv":
                    w2 = (w.astype(np.float64) * c.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
                else:
                    gw = w.astype(np.float64).reshape(group, w.shape[0] // group, *w.shape[1:])
                    w2 = (gw * c.reshape(group, 1, -1, *([1] * (w.ndim - 2)))).reshape(w.shape).astype(np.float32)
                b2 = b * c
            else:
                w2 = w
                b2 = b + c
            _absorb(g, conv, w2, b2.astype(np.float32), op, f"affine{folded}")
            gone.add(id(op))
            folded += 1
            changed = True
        _drop_nodes(g, nodes, gone)
    if declines is not None:
        declines.update(why)
    if folded:
        drop_unused_initializers(model)
    return folded


def _unpadded(conv: onnx.NodeProto) -> bool:
    """True when ``conv`` pads nothing (explicit zero pads, VALID, or no padding attribute)."""
    auto = node_attr(conv, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto not in ("NOTSET", "VALID"):
        return False
    return all(int(p) == 0 for p in node_attr(conv, "pads", []) or [])


def fold_affine_forward(model: onnx.ModelProto) -> int:
    """Fold ``y = a·h + b`` (a chain of constant Mul/Add, each constant a scalar or varying
    only along axis 1) into the Convs that read ``y``, when every reader of ``y`` is an
    unpadded Conv with constant weights reading it as its input:
    ``W'[o, c, …] = W[o, c, …]·a[c]``, ``bias'[o] = bias[o] + Σ_{c,…} W[o, c, …]·b[c]``
    (c the input channel of o's group). Exact only without padding: a padded Conv pads y
    with zeros, which are not a·0 + b. Returns the number of Mul/Add removed."""
    g = model.graph
    removed = 0
    changed = True
    while changed:  # one sweep folds every chain whose nodes and convs no fold of the sweep touched
        changed = False
        inits, readers, outputs = graph_index(g)
        producer = producers(g)
        touched: set[int] = set()  # id() of nodes a fold of this sweep removed or rewrote: the index is stale there
        gone: set[int] = set()
        nodes = list(g.node)
        for last in nodes:
            if last.op_type not in ("Mul", "Add") or len(last.input) != 2 or id(last) in touched:
                continue
            y = last.output[0]
            convs = readers.get(y, [])
            if not convs or y in outputs or any(
                    c.op_type != "Conv" or list(c.input).count(y) != 1 or c.input[0] != y or len(c.input) < 2
                    or c.input[1] not in inits or (len(c.input) > 2 and c.input[2] and c.input[2] not in inits)
                    or not _unpadded(c) for c in convs):
                continue
            ws = [numpy_helper.to_array(inits[c.input[1]]) for c in convs]
            if any(w.dtype != np.float32 or w.ndim < 3 for w in ws):
                continue
            channels = {w.shape[1] * int(node_attr(c, "group", 1)) for w, c in zip(ws, convs)}
            if len(channels) != 1:
                continue
            cin, rank = channels.pop(), ws[0].ndim
            # walk back through the chain: steps from h to y, each reading only its predecessor
            chain: list[tuple[onnx.NodeProto, np.ndarray]] = []
            node = last
            while (op := _constant_operand(node, inits)) is not None:
                vec = _channel_vector(op[1], rank, cin)
                if vec is None:
                    break
                chain.append((node, vec))
                prev = producer.get(op[0])
                if (prev is None or len(readers.get(op[0], [])) != 1 or op[0] in outputs):
                    break
                node = prev
            if not chain or any(id(n) in touched for n, _ in chain) or any(id(c) in touched for c in convs):
                continue
            h = next(i for i in chain[-1][0].input if i not in inits)
            a, b = _compose(chain, cin)
            for k, (conv, w) in enumerate(zip(convs, ws)):
                group = int(node_attr(conv, "group", 1))
                per_o = np.repeat(np.arange(group), w.shape[0] // group)  # group of each output channel
                a_o = a.reshape(group, -1)[per_o]  # [O, C/G]
                b_o = b.reshape(group, -1)[per_o]
                wd = w.astype(np.float64)
                w2 = wd * a_o.reshape(*a_o.shape, *([1] * (rank - 2)))
                bias = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
                        if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0]))
                bias2 = bias + (wd.sum(axis=tuple(range(2, rank))) * b_o).sum(axis=1)
                tag = f"affine_in{removed}_{k}"  # unique even for unnamed Convs
                wname, bname = f"{conv.name}_W_{tag}", f"{conv.name}_B_{tag}"
                g.initializer.extend([numpy_helper.from_array(w2.astype(np.float32), wname),
                                      numpy_helper.from_array(bias2.astype(np.float32), bname)])
                conv.input[0], conv.input[1] = h, wname
                if len(conv.input) > 2:
                    conv.input[2] = bname
                else:
                    conv.input.append(bname)
            touched.update(id(n) for n in (*(n for n, _ in chain), *convs))
            gone.update(id(n) for n, _ in chain)
            removed += len(chain)
            changed = True
        _drop_nodes(g, nodes, gone)
    if removed:
        drop_unused_initializers(model)
    return removed


ACTIVATIONS_AFTER_CONV = frozenset({"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh"})


def _after_conv(name: str, producer: dict[str, onnx.NodeProto]) -> bool:
    """``name`` is a Conv's output or an activation of one (hard-swish as x·HardSigmoid(x)
    included): onnxruntime keeps such a tensor in its blocked layout."""
    n = producer.get(name)
    if n is None:
        return False
    if n.op_type == "Conv":
        return True
    if n.op_type in ACTIVATIONS_AFTER_CONV:
        src = producer.get(n.input[0])
        return src is not None and src.op_type == "Conv"
    if n.op_type == "Mul" and len(n.input) == 2:  # x·HardSigmoid(x)
        for a, b in ((0, 1), (1, 0)):
            hs = producer.get(n.input[b])
            if hs is not None and hs.op_type == "HardSigmoid" and hs.input[0] == n.input[a]:
                src = producer.get(n.input[a])
                return src is not None and src.op_type == "Conv"
    return False


def affine_to_depthwise(model: onnx.ModelProto) -> int:
    """Rewrite ``y = a·h + b`` (a chain of constant Mul/Add, each constant a scalar or
    varying only along axis 1) after a Conv's activation as one depthwise 1×1 Conv:
    ``W[c, 0, 0, 0] = a[c]``, ``bias[c] = b[c]``, ``group = C`` — the same products and
    sums, for any reader (padded ones included, which :func:`fold_affine_forward` must
    leave alone). h must be 4-D with a known channel count. Returns the number of
    Mul/Add replaced."""
    g = model.graph
    inits, readers, outputs = graph_index(g)
    producer = producers(g)
    shapes = {v.name: v.type.tensor_type.shape for v in [*g.value_info, *g.input]
              if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}

    replaced = 0
    replace: dict[int, onnx.NodeProto] = {}
    drop: set[int] = set()
    for last in g.node:
        if _constant_operand(last, inits) is None:
            continue
        y = last.output[0]
        nxt = readers.get(y, [])
        if len(nxt) == 1 and y not in outputs and _constant_operand(nxt[0], inits) is not None:
            continue  # not the end of its chain
        chain: list[tuple[onnx.NodeProto, np.ndarray]] = []  # from y back to h
        node: onnx.NodeProto | None = last
        while (op := _constant_operand(node, inits)) is not None:
            chain.append((node, op[1]))
            h = op[0]
            prev = producer.get(h)
            if _constant_operand(prev, inits) is None or len(readers.get(h, [])) != 1 or h in outputs:
                break
            node = prev
        sh = shapes.get(h)
        if (sh is None or len(sh.dim) != 4 or not sh.dim[1].HasField("dim_value") or sh.dim[1].dim_value < 1
                or all(d.HasField("dim_value") and d.dim_value == 1 for d in sh.dim[2:])  # [N, C, 1, 1]: no gain
                or not _after_conv(h, producer)):
            continue
        cin = sh.dim[1].dim_value
        per_channel = [(n, v) for n, arr in chain if (v := _channel_vector(arr, 4, cin)) is not None]
        if len(per_channel) != len(chain):
            continue
        a, b = _compose(per_channel, cin)
        tag = f"{last.name or y}_depthwise"
        wname, bname = f"{tag}_W", f"{tag}_B"
        g.initializer.extend([numpy_helper.from_array(a.reshape(cin, 1, 1, 1).astype(np.float32), wname),
                              numpy_helper.from_array(b.astype(np.float32), bname)])
        replace[id(last)] = helper.make_node("Conv", [h, wname, bname], [y], name=tag, group=cin,
                                             kernel_shape=[1, 1])
        drop.update(id(n) for n, _ in chain[1:])
        replaced += len(chain)
    if not replace:
        return 0
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    drop_unused_initializers(model)
    return replaced
