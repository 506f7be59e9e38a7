"""Least-squares fitting shared by the passes: input patches of a Conv at sampled output
positions, and the layer-by-layer refit of constant-weight layers (He et al. 2017).

``sequential_refit``: every constant-weight Conv/Gemm/MatMul of a rewritten model is refit
level by level in topological order so that its output, computed from the *rewritten*
network's input, matches the original model's output on calibration data: ridge least
squares on sampled patches (a MatMul's rows), the ridge pulling toward the layer's
current weights rather than toward zero (a layer whose input did not change keeps its
weights; one that changed keeps what the data does not determine), one small problem per channel for depthwise
layers, and the mean of the output error for layers too large for dense normal equations
or with too few samples. Pruning uses it to recover the layers after removed channels,
lowrank to refit the second factor of a split. What it fits to, the original's layer
outputs, is kept compactly (:mod:`onnxcompress.references`); where the calibration batches
are cached too, each level runs from the tensors the last level left
(:mod:`onnxcompress.frontier`), so the refit costs about one pass over the network, not
one per level. Nothing here imports a pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .data import DataSource
from .frontier import Frontier, truncated
from .graph import initializers, producers, remove_dead_code
from .model import node_attr, with_outputs
from .progress import NullProgress, Progress
from .references import Target, cached_targets, make_target, sample_positions
from .validate import make_session, run_named

log = logging.getLogger(__name__)


def conv_geometry(node: onnx.NodeProto, x_shape: tuple[int, ...], w_shape: tuple[int, ...], y_shape: tuple[int, ...]):
    kh, kw = int(w_shape[2]), int(w_shape[3])
    strides = list(node_attr(node, "strides", [1, 1]))  # type: ignore[arg-type]
    dil = list(node_attr(node, "dilations", [1, 1]))  # type: ignore[arg-type]
    auto = node_attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    pads = list(node_attr(node, "pads", [0, 0, 0, 0]))  # type: ignore[arg-type]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for i, (size, k, s, d, out) in enumerate(zip(x_shape[2:], (kh, kw), strides, dil, y_shape[2:])):
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + 2] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0, 0, 0, 0]
    return kh, kw, strides, dil, pads


def sample_patches(node: onnx.NodeProto, x: np.ndarray, out_shape: tuple[int, ...], w_shape: tuple[int, ...], rng,
                   positions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Input patches [S, C, kh, kw] of a Conv at up to ``positions`` random output positions
    per image, and the (image, row, column) indices of those positions."""
    ni, oy, ox = sample_positions(out_shape, rng, positions)
    return patches_at(node, x, out_shape, w_shape, ni, oy, ox), ni, oy, ox


def patches_at(node: onnx.NodeProto, x: np.ndarray, out_shape: tuple[int, ...], w_shape: tuple[int, ...],
               ni: np.ndarray, oy: np.ndarray, ox: np.ndarray) -> np.ndarray:
    """Input patches [S, C, kh, kw] of a Conv at output positions (image ``ni``, row ``oy``,
    column ``ox``)."""
    kh, kw, strides, dil, pads = conv_geometry(node, x.shape, w_shape, out_shape)
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    rows = oy[:, None] * strides[0] + np.arange(kh)[None, :] * dil[0]  # [S, kh]
    cols = ox[:, None] * strides[1] + np.arange(kw)[None, :] * dil[1]  # [S, kw]
    c = x.shape[1]
    return xp[ni[:, None, None, None], np.arange(c)[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]


def weight_2d(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """Consumer weight as [out, in·kh·kw] (Conv), [out, in] (Gemm/MatMul)."""
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    if node.op_type == "Gemm" and int(node_attr(node, "transB", 0)):  # type: ignore[arg-type]
        return w
    return w.T


def _consumer_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {t.name for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits:
            out.append(n)
        elif n.op_type == "Gemm" and n.input[1] in inits and not int(node_attr(n, "transA", 0)):  # type: ignore[arg-type]
            out.append(n)
        elif n.op_type == "MatMul" and n.input[1] in inits:
            out.append(n)
    return out


def _levels(model: onnx.ModelProto, consumers: list[onnx.NodeProto]) -> list[list[onnx.NodeProto]]:
    """Consumers grouped so that none in a level reads another's output, directly or not."""
    producer = producers(model.graph)
    cons_out = {n.output[0] for n in consumers}
    memo: dict[str, int] = {}

    def depth(tensor: str) -> int:
        # number of consumer outputs on the longest path into `tensor`
        stack = [(tensor, False)]
        while stack:
            t, done = stack.pop()
            if t in memo:
                continue
            node = producer.get(t)
            if node is None:
                memo[t] = 0
                continue
            ins = [i for i in node.input if i]
            if not done:
                stack.append((t, True))
                stack.extend((i, False) for i in ins if i not in memo)
                continue
            d = max((memo[i] for i in ins), default=0)
            memo[t] = d + (1 if t in cons_out else 0)
        return memo[tensor]

    levels: dict[int, list[onnx.NodeProto]] = {}
    for n in consumers:
        levels.setdefault(depth(n.input[0]), []).append(n)
    return [levels[k] for k in sorted(levels)]


@dataclass
class _Acc:
    node: onnx.NodeProto
    kind: str  # dense, depthwise, bias
    A: np.ndarray | None = None
    B: np.ndarray | None = None
    diff: np.ndarray | None = None  # bias mode: Σ (y_orig - y_new) per out channel
    count: int = 0
    nonfinite: bool = False  # NaN/Inf seen in its activations: leave the layer as it is


def sequential_refit(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    data: DataSource,
    *,
    provider: str = "cpu",
    seed: int = 0,
    positions: int = 256,
    ridge: float = 1e-2,
    max_dim: int = 2305,
    kept_out: dict[str, np.ndarray] | None = None,
    only: set[str] | None = None,
    progress: Progress | None = None,
) -> dict[str, int]:
    """Refit every constant-weight Conv/Gemm/MatMul of ``pruned`` (in place), level by
    level in topological order, so that on calibration data its output — computed from
    the *pruned* network's input — matches the original model's output (kept channels).

    ``only``: refit just the layers writing these tensors. Dense layers solve ridge least
    squares on sampled patches; depthwise layers solve one
    small problem per channel; layers too large for dense normal equations, or with too
    few samples, get mean-matching bias correction ``b += E[y_orig − y_new]``.
    """
    progress = progress or NullProgress()
    kept_out = kept_out or {}
    rng = np.random.default_rng(seed)
    orig_nodes = {n.output[0]: n for n in original.graph.node if n.output}
    consumers = [n for n in _consumer_nodes(pruned) if n.output[0] in orig_nodes
                 and (only is None or n.output[0] in only)]
    levels = _levels(pruned, consumers)
    counts = {"dense": 0, "depthwise": 0, "bias": 0, "skip": 0, "levels": len(levels)}
    orig_out = sorted({n.output[0] for n in consumers})
    orig_sess = make_session(with_outputs(original, orig_out), provider, label="original model (refit)")
    node_of = {o: orig_nodes[o] for o in orig_out}
    batches, refs = cached_targets(data, orig_sess, node_of, rng, positions)
    # with the batches cached, each level runs from the tensors the last one left (linear in depth)
    frontier = Frontier(batches, provider, label="pruned model (refit)") if batches is not None else None
    with progress.task("refitting (prune)", len(levels)) as task:
        for level in levels:
            inits = initializers(pruned.graph)
            names = list(dict.fromkeys([x for n in level for x in (n.input[0], n.output[0])]))
            level_out = [n.output[0] for n in level]
            if frontier is not None:
                staged = frontier.run(pruned, names, set(level_out))
            else:
                sess = make_session(truncated(pruned, names), provider, label="pruned model (refit)")
            if refs is None:  # streaming: the original network up to this level only
                orig_sess = make_session(truncated(original, level_out), provider, label="original model (refit)")
            accs = {n.output[0]: _Acc(n, _refit_kind(n, numpy_helper.to_array(inits[n.input[1]]), max_dim))
                    for n in level}
            for i, batch in enumerate(batches if batches is not None else data):
                new_vals = dict(zip(names, staged[i] if frontier is not None else run_named(sess, names, batch)))
                targets = refs[i] if refs is not None else {
                    o: make_target(node_of[o], y, rng, positions)
                    for o, y in zip(level_out, run_named(orig_sess, level_out, batch))}
                for out_name, acc in accs.items():
                    n = acc.node
                    x = np.asarray(new_vals[n.input[0]], np.float32)
                    y_new = np.asarray(new_vals[out_name], np.float32)
                    target = targets[out_name].kept(y_new.shape, kept_out.get(out_name))
                    if target is None:
                        acc.kind = "skip"
                        continue
                    _accumulate_refit(acc, x, y_new, target, inits)
            for acc in accs.values():
                if acc.kind != "skip" and acc.count:
                    done = _solve_refit(acc, pruned, inits, ridge)
                    counts[acc.kind] += done
                elif acc.kind == "skip":
                    counts["skip"] += 1
            task.advance()
    remove_dead_code(pruned.graph)  # biases moved to new initializers leave old ones unused
    return counts


def _refit_kind(n: onnx.NodeProto, w: np.ndarray, max_dim: int) -> str:
    """How a layer is refit: ``dense`` least squares where its input dimension fits the
    normal equations, ``depthwise`` per channel, else ``bias`` correction only (also a
    Conv that is not 2-D: the patch sampling is written for two spatial axes)."""
    group = int(node_attr(n, "group", 1))  # type: ignore[arg-type]
    if n.op_type == "Conv" and w.ndim != 4:
        return "bias"
    if n.op_type == "Conv" and group > 1:
        return "depthwise" if group == w.shape[0] and w.shape[1] == 1 else "bias"
    if n.op_type == "Conv":
        d = int(np.prod(w.shape[1:])) + 1
    else:
        d = w.shape[1 if n.op_type == "Gemm" and int(node_attr(n, "transB", 0)) else 0] + 1  # type: ignore[arg-type]
    return "dense" if d <= max_dim else "bias"


def _accumulate_refit(acc: _Acc, x: np.ndarray, y_new: np.ndarray, target: Target, inits) -> None:
    n = acc.node
    if acc.nonfinite or not (target.finite and np.all(np.isfinite(x)) and np.all(np.isfinite(y_new))):
        acc.nonfinite = True
        return
    if acc.kind == "bias":
        axes = tuple(i for i in range(y_new.ndim) if i != target.channel) if y_new.ndim > 1 else (0,)
        d = target.sums - y_new.sum(axis=axes, dtype=np.float64)
        acc.diff = d if acc.diff is None else acc.diff + d
        acc.count += target.count
        return
    if target.rows is None:  # no rows were kept for it (a Conv that is not 2-D): nothing to fit
        acc.kind = "skip"
        return
    if n.op_type == "Conv":
        assert target.where is not None
        w_shape = tuple(inits[n.input[1]].dims)
        kh, kw = int(w_shape[2]), int(w_shape[3])
        cin = x.shape[1]
        ni, oy, ox = target.where
        patches = patches_at(n, x, y_new.shape, w_shape, ni, oy, ox)
        t = target.rows  # [S, C_out]
        if acc.kind == "depthwise":  # per channel: [C, S, kh*kw + 1]
            p = patches.reshape(len(ni), cin, kh * kw).transpose(1, 0, 2).astype(np.float64)
            p = np.concatenate([p, np.ones((cin, len(ni), 1))], axis=2)
            pt = p.transpose(0, 2, 1)  # batched matmul: BLAS, several times faster than einsum here
            a = pt @ p
            bb = (pt @ t.T.astype(np.float64)[:, :, None])[..., 0]
            acc.A = a if acc.A is None else acc.A + a
            acc.B = bb if acc.B is None else acc.B + bb
            acc.count += len(ni)
            return
        p = patches.reshape(len(ni), -1)
    else:  # Gemm/MatMul: every row of every sample ([..., T, K] → [N·T, K]) is one equation
        p = x.reshape(-1, x.shape[-1])
        t = target.rows
    p = np.concatenate([p, np.ones((p.shape[0], 1), np.float32)], axis=1).astype(np.float64)
    acc.A = p.T @ p if acc.A is None else acc.A + p.T @ p
    bt = p.T @ t.astype(np.float64)
    acc.B = bt if acc.B is None else acc.B + bt
    acc.count += p.shape[0]


def _replace_init(model: onnx.ModelProto, inits, name: str, arr: np.ndarray) -> None:
    t = inits[name]
    t.CopyFrom(numpy_helper.from_array(arr.astype(numpy_helper.to_array(t).dtype), name))


def _matmul_bias(model: onnx.ModelProto, inits, node: onnx.NodeProto, b: np.ndarray) -> bool:
    """Set the intercept of a MatMul: the constant of the Add right after it, or a new Add."""
    out = node.output[0]
    users = [n for n in model.graph.node if out in n.input]
    graph_out = any(o.name == out for o in model.graph.output)
    if len(users) == 1 and users[0].op_type == "Add" and not graph_out:
        add = users[0]
        other = add.input[1] if add.input[0] == out else add.input[0]
        if other in inits and numpy_helper.to_array(inits[other]).size == b.size:
            old = numpy_helper.to_array(inits[other])
            name = other + "__refit"
            while name in inits:
                name += "_"
            t = numpy_helper.from_array(b.reshape(old.shape).astype(old.dtype), name)
            model.graph.initializer.append(t)
            inits[name] = t
            add.input[list(add.input).index(other)] = name
            return True
    if graph_out:
        return False
    mid = out + "__nobias"
    name = (node.name or out) + "_bias"
    while name in inits or mid in inits:
        name += "_"
    t = numpy_helper.from_array(b.astype(weight_dtype(node, inits)), name)
    model.graph.initializer.append(t)
    inits[name] = t
    node.output[0] = mid
    idx = list(model.graph.node).index(node)
    model.graph.node.insert(idx + 1, helper.make_node("Add", [mid, name], [out], name=(node.name or out) + "_add_bias"))
    return True


def weight_dtype(node: onnx.NodeProto, inits) -> np.dtype:
    """The element type of the node's weight (a new bias must match it: fp16 models)."""
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    return helper.tensor_dtype_to_np_dtype(w.data_type) if w is not None else np.dtype(np.float32)


def _set_bias(model: onnx.ModelProto, inits, node: onnx.NodeProto, b: np.ndarray) -> bool:
    k = 2
    if node.op_type == "MatMul":
        return _matmul_bias(model, inits, node, b)
    if len(node.input) > k and node.input[k]:
        old = numpy_helper.to_array(inits[node.input[k]])
        if old.size != b.size:
            return False
        shared = sum(1 for n in model.graph.node for i in n.input if i == node.input[k]) > 1
        if shared:
            name = node.input[k] + "__refit"
            i = 0
            while name in inits:
                i += 1
                name = f"{node.input[k]}__refit{i}"
            t = numpy_helper.from_array(b.reshape(old.shape).astype(old.dtype), name)
            model.graph.initializer.append(t)
            inits[name] = t
            node.input[k] = name
        else:
            _replace_init(model, inits, node.input[k], b.reshape(old.shape))
        return True
    name = (node.name or node.output[0]) + "_bias"
    while name in inits:
        name += "_"
    t = numpy_helper.from_array(b.astype(weight_dtype(node, inits)), name)
    model.graph.initializer.append(t)
    inits[name] = t
    while len(node.input) <= k:
        node.input.append("")
    node.input[k] = name
    return True


def _own_weight(model: onnx.ModelProto, inits, node: onnx.NodeProto) -> str:
    """Give ``node`` its own copy of its weight initializer if it is shared; return the name."""
    name = node.input[1]
    if sum(1 for n in model.graph.node for i in n.input if i == name) > 1:
        new = name + "__refit"
        i = 0
        while new in inits:
            i += 1
            new = f"{name}__refit{i}"
        t = numpy_helper.from_array(numpy_helper.to_array(inits[name]), new)
        model.graph.initializer.append(t)
        inits[new] = t
        node.input[1] = new
        return new
    return name


def _current_bias(node: onnx.NodeProto, inits, size: int, model: onnx.ModelProto | None = None) -> np.ndarray:
    if node.op_type == "MatMul" and model is not None:
        users = [n for n in model.graph.node if node.output[0] in n.input]
        if len(users) == 1 and users[0].op_type == "Add":
            other = [i for i in users[0].input if i != node.output[0]]
            if other and other[0] in inits and numpy_helper.to_array(inits[other[0]]).size == size:
                return numpy_helper.to_array(inits[other[0]]).astype(np.float64).reshape(-1)
        return np.zeros(size)
    if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2]:
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64).reshape(-1)
        if b.size == size:
            return b
        return np.broadcast_to(b, (size,)).copy() if b.size == 1 else np.zeros(size)
    return np.zeros(size)


def _solve_refit(acc: _Acc, model: onnx.ModelProto, inits, ridge: float) -> int:
    n = acc.node
    if acc.nonfinite or acc.count == 0:
        return 0
    if acc.kind == "bias":
        delta = acc.diff / max(acc.count, 1)  # type: ignore[operator]
        old = np.zeros_like(delta) if not (len(n.input) > 2 and n.input[2]) else numpy_helper.to_array(inits[n.input[2]]).reshape(-1)
        return int(_set_bias(model, inits, n, (old + delta).astype(weight_dtype(n, inits))))
    A, B = acc.A, acc.B
    assert A is not None and B is not None
    w_name = _own_weight(model, inits, n)
    w = numpy_helper.to_array(inits[w_name])
    if acc.kind == "depthwise":
        c, d, _ = A.shape
        if acc.count < 4 * d:
            return 0
        lam = ridge * np.einsum("cii->c", A[:, :-1, :-1]) / (d - 1)
        reg = lam[:, None, None] * np.eye(d)[None]
        reg[:, -1, -1] = 0.0
        cur = np.concatenate([w.reshape(c, -1).astype(np.float64), np.zeros((c, 1))], axis=1)  # the prior
        sol = np.linalg.solve(A + reg, (B + np.einsum("cij,cj->ci", reg, cur))[..., None])[..., 0]  # [C, kh*kw + 1]
        _replace_init(model, inits, w_name, sol[:, :-1].reshape(w.shape))
        _set_bias(model, inits, n, sol[:, -1].astype(weight_dtype(n, inits)))
        return 1
    d = A.shape[0]
    # the layer's own intercept (a MatMul has none: its bias lives in the Add after it)
    stored_bias = _current_bias(n, inits, B.shape[1], model)
    own = np.zeros(B.shape[1]) if n.op_type == "MatMul" else stored_bias
    if acc.count < 4 * d:  # too few samples for a stable refit: match the output mean instead
        cur = np.concatenate([weight_2d(n, w).T.astype(np.float64), own[None, :]], axis=0)  # [d, out]
        delta = (B[-1] - A[-1] @ cur) / acc.count
        acc.kind = "bias"
        return int(_set_bias(model, inits, n, (stored_bias + delta).astype(weight_dtype(n, inits))))
    lam = ridge * np.trace(A[:-1, :-1]) / max(d - 1, 1)
    reg = np.eye(d) * lam
    reg[-1, -1] = 0.0
    # ridge toward the layer's current weights, not toward zero: a layer whose input did
    # not change keeps its weights exactly, and a changed one is pulled toward its prior
    cur = np.concatenate([weight_2d(n, w).T.astype(np.float64), np.zeros((1, B.shape[1]))], axis=0)
    rhs = B + reg @ cur
    try:
        sol = np.linalg.solve(A + reg, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(A + reg, rhs, rcond=None)[0]
    w2 = sol[:-1].T  # [out, in...]
    if n.op_type == "Conv":
        new_w = w2.reshape(w.shape)
    elif n.op_type == "Gemm" and int(node_attr(n, "transB", 0)):  # type: ignore[arg-type]
        new_w = w2
    else:
        new_w = w2.T
    _replace_init(model, inits, w_name, new_w)
    new_b = sol[-1] + (stored_bias if n.op_type == "MatMul" else 0.0)  # MatMul: intercept joins the Add's bias
    _set_bias(model, inits, n, new_b.astype(weight_dtype(n, inits)))
    return 1
