"""Mutation fuzzer (issue 6): seeded random mutations of the fixture models' protobuf
fields, each run through ``onnxcompress optimize`` with every registered pass.

Each case must end in either exit 0 with an output that loads in onnxruntime, or a clean
refusal — exit 2 (bad input) or 3 (the result failed validation) with a one-line
``error:`` message and no output file. Never an internal error, a traceback, a hang
(30 s per case), a partial output, a leftover temporary file or a modified input.
``ONNXCOMPRESS_FUZZ_CASES`` sets the number of cases (default 300); a failing case is
reported with its seed, and ``ONNXCOMPRESS_FUZZ_SEED=<seed>`` replays just that one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from .conftest import FIXTURES

CASES = int(os.environ.get("ONNXCOMPRESS_FUZZ_CASES", "300"))
REPLAY = os.environ.get("ONNXCOMPRESS_FUZZ_SEED")
MODELS = ["resnet_block", "mobilenet_se", "concat_split"]
PASSES = ("canonicalize,prune:ratio=0.3,lowrank,"
          "int8:guard=false,max_drop=0,experimental.bias_correction=false,experimental.head_correction=false")
TIME_LIMIT = 30
OPS = ["Relu", "Add", "Conv", "Identity", "Mul", "Concat", "MaxPool", "Reshape", "NoSuchOp", "Sigmoid", "Gemm"]


class _Hang(BaseException):
    """Raised by SIGALRM; a BaseException so that the CLI's error handling cannot swallow it."""


def _on_alarm(signum, frame):  # noqa: ANN001, ANN202
    raise _Hang()


def mutate(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    """Apply one random mutation in place; a description of it."""
    g = model.graph
    kinds = ["dims", "input_dims", "dtype", "attr", "input", "opset", "op_type", "drop_node", "output", "raw_bytes"]
    kind = str(rng.choice(kinds))
    if kind == "dims" and g.initializer:
        t = g.initializer[int(rng.integers(len(g.initializer)))]
        if len(t.dims):
            j = int(rng.integers(len(t.dims)))
            t.dims[j] = int(rng.integers(0, 9))
            return f"initializer {t.name} dim {j} -> {t.dims[j]}"
        t.dims.append(int(rng.integers(0, 4)))
        return f"initializer {t.name} gains a dim"
    if kind == "input_dims" and g.input:
        vi = g.input[int(rng.integers(len(g.input)))]
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            d = dims[int(rng.integers(len(dims)))]
            if rng.random() < 0.5:
                d.dim_value = int(rng.integers(0, 65))
            else:
                d.dim_param = "fuzz"
            return f"input {vi.name} dim changed"
        vi.type.tensor_type.elem_type = int(rng.integers(0, 17))
        return f"input {vi.name} elem_type changed"
    if kind == "dtype" and g.initializer:
        t = g.initializer[int(rng.integers(len(g.initializer)))]
        t.data_type = int(rng.integers(1, 17))
        return f"initializer {t.name} dtype -> {t.data_type}"
    nodes = list(g.node)
    if kind == "attr":
        with_attrs = [n for n in nodes if n.attribute]
        if with_attrs:
            n = with_attrs[int(rng.integers(len(with_attrs)))]
            a = n.attribute[int(rng.integers(len(n.attribute)))]
            if a.type == onnx.AttributeProto.INT:
                a.i = int(rng.integers(-3, 10))
            elif a.type == onnx.AttributeProto.INTS and len(a.ints):
                a.ints[int(rng.integers(len(a.ints)))] = int(rng.integers(-3, 10))
            elif a.type == onnx.AttributeProto.FLOAT:
                a.f = float(rng.normal() * 10)
            elif a.type == onnx.AttributeProto.STRING:
                a.s = [b"SAME_UPPER", b"VALID", b"bogus", b""][int(rng.integers(4))]
            else:
                n.attribute.remove(a)
            return f"node {n.name or n.op_type} attribute {a.name} changed"
    if kind == "input" and nodes:
        n = nodes[int(rng.integers(len(nodes)))]
        if n.input:
            names = [t.name for t in g.initializer] + [i.name for i in g.input] + [o for m in nodes for o in m.output]
            j = int(rng.integers(len(n.input)))
            n.input[j] = str(rng.choice(names + ["nothing_produces_this"]))
            return f"node {n.name or n.op_type} input {j} -> {n.input[j]}"
    if kind == "opset":
        model.opset_import[0].version = int(rng.integers(1, 26))
        return f"opset -> {model.opset_import[0].version}"
    if kind == "op_type" and nodes:
        n = nodes[int(rng.integers(len(nodes)))]
        n.op_type = str(rng.choice(OPS))
        return f"node {n.name} op_type -> {n.op_type}"
    if kind == "drop_node" and nodes:
        n = nodes[int(rng.integers(len(nodes)))]
        g.node.remove(n)
        return f"node {n.name or n.op_type} removed"
    if kind == "output" and g.output:
        o = g.output[int(rng.integers(len(g.output)))]
        o.name = str(rng.choice([o.name + "_x", g.node[0].output[0] if g.node else "x"]))
        return f"graph output renamed {o.name}"
    # raw bytes: flip a few bytes of one initializer's payload
    with_raw = [t for t in g.initializer if t.raw_data]
    if with_raw:
        t = with_raw[int(rng.integers(len(with_raw)))]
        raw = bytearray(t.raw_data)
        for _ in range(int(rng.integers(1, 4))):
            raw[int(rng.integers(len(raw)))] = int(rng.integers(256))
        t.raw_data = bytes(raw)
        return f"initializer {t.name} bytes flipped"
    return "unchanged"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _seeds() -> list[int]:
    if REPLAY is not None:
        return [int(REPLAY)]
    return [int(s) for s in np.random.default_rng(20261122).integers(0, 2**31, CASES)]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # NaN arithmetic inside a pass counts as a failure
def test_mutation_fuzzer(tmp_path: Path, cli) -> None:  # noqa: ANN001
    counts: Counter[str] = Counter()
    failures: list[str] = []
    old = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for seed in _seeds():
            rng = np.random.default_rng(seed)
            name = MODELS[seed % len(MODELS)]
            m = onnx.load(str(FIXTURES / f"{name}.onnx"))
            what = mutate(m, rng)
            case = tmp_path / f"case_{seed}"
            case.mkdir()
            src = case / "in.onnx"
            src.write_bytes(m.SerializeToString())
            before = _sha(src)
            out = case / "out.onnx"
            signal.alarm(TIME_LIMIT)
            try:
                res = cli("optimize", src, out, "--calib", FIXTURES / f"{name}_calib.npz", "--passes", PASSES,
                          "--calib-limit", 8, "--val-limit", 4, "--no-latency", "-q")
            except _Hang:
                failures.append(f"seed {seed} ({name}: {what}): hang over {TIME_LIMIT} s")
                counts["hangs"] += 1
                continue
            finally:
                signal.alarm(0)
            counts["models tried"] += 1
            problem = None
            if "internal error" in res.err or "Traceback" in res.err:
                problem = "internal error / traceback: " + res.err.strip().splitlines()[-1][:300]
                counts["tracebacks"] += 1
            elif res.code == 0:
                if not out.exists():
                    problem = "exit 0 without output"
                else:
                    try:
                        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
                        counts["correct outputs"] += 1
                    except Exception as exc:  # an output onnxruntime cannot load counts as broken
                        problem = f"output does not load: {exc}"[:300]
            elif res.code in (2, 3):
                lines = [ln for ln in res.err.splitlines() if ln.strip()]
                if out.exists():
                    problem = f"exit {res.code} but an output was written"
                    counts["partial outputs"] += 1
                elif len(lines) != 1 or not lines[0].startswith("error: "):
                    problem = f"refusal is not one 'error:' line: {res.err[:300]!r}"
                else:
                    counts["clean refusals" if res.code == 2 else "validation refusals"] += 1
            else:
                problem = f"exit {res.code}: {res.err.strip()[:300]}"
            if _sha(src) != before:
                problem = (problem or "") + " input modified"
                counts["inputs modified"] += 1
            leftovers = sorted(p.name for p in case.iterdir() if p.name not in ("in.onnx", "out.onnx"))
            if leftovers:
                problem = (problem or "") + f" leftover files {leftovers}"
            if problem:
                failures.append(f"seed {seed} ({name}: {what}): {problem}")
    finally:
        signal.signal(signal.SIGALRM, old)
    report = {k: counts.get(k, 0) for k in ("models tried", "correct outputs", "clean refusals", "validation refusals",
                                            "tracebacks", "partial outputs", "inputs modified", "hangs")}
    (Path(os.environ.get("ONNXCOMPRESS_FUZZ_REPORT", tmp_path / "fuzz.json"))).write_text(json.dumps(report))
    print("fuzz:", json.dumps(report))
    assert not failures, f"{len(failures)} failing cases (replay with ONNXCOMPRESS_FUZZ_SEED=<seed>):\n" + "\n".join(
        failures[:20])
    if REPLAY is None:
        assert report["models tried"] == CASES
