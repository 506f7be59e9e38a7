"""The command line: outputs, reports, and every user mistake as one line with exit code 2."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from .conftest import FIXTURES, ROOT, run_cli_subprocess, shared_path

MODEL = FIXTURES / "resnet_block.onnx"
CALIB = FIXTURES / "resnet_block_calib.npz"


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def assert_user_error(res, *fragments: str) -> None:
    assert res.code == 2, (res.code, res.out, res.err)
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.err
    assert "Traceback" not in res.err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_optimize_writes_model_and_report(cli, tmp_path: Path) -> None:
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    before = sha(MODEL)
    res = cli("optimize", MODEL, out, "--calib", CALIB, "--passes", "canonicalize", "--report", rep, "--latency-runs", 5,
              "--allow-slower")  # canonicalize's speed is the original's: timing noise decides otherwise
    assert res.code == 0, res.err
    assert sha(MODEL) == before and out.exists()
    assert "MACs" in res.out and "latency ms" in res.out and f"wrote {out}" in res.out
    r = json.loads(rep.read_text())
    assert r["written"] and r["validation"]["passed"] and r["validation"]["samples"] == 64
    assert r["before"]["macs"] == r["after"]["macs"] > 0
    assert r["latency"]["before_ms"] > 0 and r["latency"]["after_ms"] > 0
    assert [p["name"] for p in r["passes"]] == ["canonicalize"]
    onnx.checker.check_model(onnx.load(str(out)))


def test_optimize_without_data_uses_random_inputs(cli, tmp_path: Path) -> None:
    res = cli("optimize", FIXTURES / "mobilenet_se.onnx", tmp_path / "o.onnx", "--no-latency", "--quiet")
    assert res.code == 0, res.err
    assert "validation on 8 samples" in res.out


def test_config_file(cli, tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text('[[passes]]\nname = "canonicalize"\ninfer_shapes = false\n')
    rep = tmp_path / "r.json"
    res = cli("optimize", MODEL, tmp_path / "o.onnx", "--config", cfg, "--no-latency", "--report", rep)
    assert res.code == 0, res.err
    assert json.loads(rep.read_text())["passes"][0]["options"]["infer_shapes"] is False


def test_validation_failure_exits_3_and_writes_nothing(cli, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    res = cli("optimize", MODEL, out, "--calib", CALIB, "-p", "canonicalize", "--tol", "rel_range=-1", "--no-latency")
    assert res.code == 3 and not out.exists()
    assert "validation failed: output 'logits'" in res.err and "Traceback" not in res.err
    kept = cli("optimize", MODEL, out, "--calib", CALIB, "-p", "canonicalize", "--tol", "rel_range=-1", "--no-latency",
               "--keep-failed")
    assert kept.code == 3 and out.exists()


def test_validate_command(cli, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    assert cli("optimize", MODEL, out, "--no-latency", "-q").code == 0
    res = cli("validate", MODEL, out, "--val", FIXTURES / "resnet_block_val.npz", "--report", tmp_path / "v.json")
    assert res.code == 0 and "validation on 32 samples" in res.out
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is True
    # a different model fails against it
    bad = onnx.load(str(out))
    w = bad.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.1, w.name))
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    res = cli("validate", MODEL, tmp_path / "bad.onnx", "--val", FIXTURES / "resnet_block_val.npz")
    assert res.code == 3 and "validation failed" in res.err


def test_inspect_prints_macs(cli) -> None:
    res = cli("inspect", MODEL, "--top", 3)
    assert res.code == 0
    assert "MACs 8,831,296 per sample at input=1x3x32x32" in res.out and "BatchNormalization 6" in res.out
    js = cli("inspect", MODEL, "--json")
    assert json.loads(js.out)["macs"] == 8_831_296


def test_inspect_shape_option(cli) -> None:
    res = cli("inspect", FIXTURES / "concat_split.onnx", "--shape", "input=1x3x64x64", "--json")
    assert json.loads(res.out)["macs_input_shapes"] == {"input": [1, 3, 64, 64]}
    assert_user_error(cli("inspect", MODEL, "--shape", "input=1x3xbig"), "--shape", "integers")


def test_passes_command(cli) -> None:
    res = cli("passes")
    assert res.code == 0 and "canonicalize" in res.out and "infer_shapes: bool = True" in res.out
    assert "experimental." not in res.out and "head_correction" not in res.out
    assert "experimental options not shown: onnxcompress passes --all" in res.out
    everything = cli("passes", "--all")
    assert everything.code == 0 and "experimental.head_correction: bool = True" in everything.out
    assert "[N, rows, F]" in everything.out  # help texts print as written (no markup eaten)


# ----------------------------------------------------------------------------- user errors


def test_missing_file(cli, tmp_path: Path) -> None:
    assert_user_error(cli("optimize", tmp_path / "nope.onnx", tmp_path / "o.onnx"), "nope.onnx: no such file")


def test_not_an_onnx_file(cli, tmp_path: Path) -> None:
    p = tmp_path / "junk.onnx"
    p.write_bytes(os.urandom(3000))
    assert_user_error(cli("optimize", p, tmp_path / "o.onnx"), "junk.onnx: not an ONNX")
    assert not (tmp_path / "o.onnx").exists()


def test_truncated_protobuf(cli, tmp_path: Path) -> None:
    p = tmp_path / "cut.onnx"
    p.write_bytes(MODEL.read_bytes()[:40000])
    assert_user_error(cli("inspect", p), "cut.onnx: not an ONNX file or truncated protobuf")


def test_protobuf_that_is_not_a_model(cli, tmp_path: Path) -> None:
    p = tmp_path / "graph.onnx"
    p.write_bytes(onnx.load(str(MODEL)).graph.SerializeToString())
    assert_user_error(cli("optimize", p, tmp_path / "o.onnx"), "graph.onnx", "not an ONNX")


def test_unsupported_opset(cli, tmp_path: Path) -> None:
    m = onnx.load(str(MODEL))
    m.opset_import[0].version = 4
    p = tmp_path / "old.onnx"
    p.write_bytes(m.SerializeToString())
    assert_user_error(cli("optimize", p, tmp_path / "o.onnx"), "old.onnx: unsupported opset 4")


def test_external_data_outside_folder(cli, tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    folder = tmp_path / "m"
    folder.mkdir()
    m = onnx.load(str(MODEL))
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "1728")):
        e = t.external_data.add()
        e.key, e.value = k, v
    p = folder / "crafted.onnx"
    p.write_bytes(m.SerializeToString())
    assert_user_error(cli("optimize", p, folder / "o.onnx"), "crafted.onnx", f"tensor '{t.name}'",
                      "resolves outside the model's folder", "refused")


def test_input_equals_output(cli, tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    p.write_bytes(MODEL.read_bytes())
    before = sha(p)
    assert_user_error(cli("optimize", p, p), "the output is the input file")
    assert_user_error(cli("optimize", p, tmp_path / "." / "m.onnx"), "the output is the input file")
    assert sha(p) == before


def test_output_folder_missing(cli, tmp_path: Path) -> None:
    assert_user_error(cli("optimize", MODEL, tmp_path / "no" / "o.onnx"), "output folder", "does not exist")


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (lambda d: np.savez(d / "c.npz", wrong=np.zeros((2, 3, 32, 32), np.float32), other=np.zeros(2)),
         ["c.npz: no array for input(s) 'input'", "'wrong', 'other'"]),
        (lambda d: np.save(d / "c.npy", np.zeros((2, 3, 16, 16), np.float32)),
         ["input 'input': expected shape [N,3,32,32], found [2,3,16,16]", "c.npy"]),
        (lambda d: np.save(d / "c.npy", np.zeros((2, 32, 32), np.float32)),
         ["input 'input': expected shape [N,3,32,32], found [1,2,32,32]", "read as one sample without a batch axis"]),
        (lambda d: np.save(d / "c.npy", np.zeros((2, 3, 32, 32), np.int64)),
         ["input 'input': expected dtype float32, found int64"]),
        (lambda d: np.save(d / "c.npy", np.array([None, 1], dtype=object), allow_pickle=True),
         ["c.npy: holds Python objects"]),
        (lambda d: (d / "c.npy").write_bytes(b"nope"), ["c.npy: not a valid .npy array"]),
    ],
)
def test_bad_calibration_data(cli, tmp_path: Path, make, fragments) -> None:
    make(tmp_path)
    data = next(p for p in tmp_path.iterdir() if p.name.startswith("c."))
    out = tmp_path / "o.onnx"
    assert_user_error(cli("optimize", MODEL, out, "--calib", data), *fragments)
    assert not out.exists()


def test_calibration_with_nan(cli, tmp_path: Path) -> None:
    x = np.load(CALIB)["input"][:5].copy()
    x[3, 0, 0, 0] = np.inf
    np.save(tmp_path / "nan.npy", x)
    assert_user_error(cli("optimize", MODEL, tmp_path / "o.onnx", "--calib", tmp_path / "nan.npy"),
                      "NaN or Inf in sample 3", "nan.npy")
    ok = cli("optimize", MODEL, tmp_path / "o.onnx", "--calib", tmp_path / "nan.npy", "--skip-nonfinite", "--no-latency",
             "-p", "canonicalize")
    assert ok.code == 0 and "validation on 4 samples" in ok.out


def test_empty_calibration_folder(cli, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_user_error(cli("optimize", MODEL, tmp_path / "o.onnx", "--calib", tmp_path / "empty"), "holds no .npy")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--passes", "quantize:bits=4"], ["unknown pass 'quantize'; valid passes: canonicalize, fuse, int8, lowrank, prune"]),
        (["--passes", "canonicalize:foo=1"], ["unknown option 'foo'; valid options: fold, infer_shapes (and 6 experimental ones"]),
        (["--passes", "canonicalize:experimental.dedupe=perhaps"], ["option 'experimental.dedupe': 'perhaps' is not a boolean"]),
        (["--provider", "cuda"], ["execution provider 'cuda'"]),
        (["--provider", "tpu"], ["unknown provider 'tpu'"]),
        (["--tol", "cosine=high"], ["'high' is not a number"]),
        (["--tol", "nonsense:top1=0.5"], ["unknown output(s) ['nonsense']"]),
        (["--batch-size", "0"], ["batch size must be at least 1"]),
        (["--resize", "squash"], ["--resize 'squash'"]),
        (["--passes", "canonicalize", "--config", "x.toml"], ["not both"]),
    ],
)
def test_bad_options(cli, tmp_path: Path, args, fragments) -> None:
    import onnxruntime as ort

    if "cuda" in args and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA available")
    assert_user_error(cli("optimize", MODEL, tmp_path / "o.onnx", "--calib", CALIB, *args), *fragments)


def test_usage_error_exit_code(cli, tmp_path: Path) -> None:
    res = cli("optimize", MODEL, tmp_path / "o.onnx", "--no-such-flag")
    assert res.code == 2 and "No such option" in res.err and "Traceback" not in res.err


def test_subprocess_one_line_no_traceback_and_debug(tmp_path: Path) -> None:
    p = tmp_path / "junk.onnx"
    p.write_bytes(b"\x08\x07garbage" * 10)
    res = run_cli_subprocess("optimize", p, tmp_path / "o.onnx")
    assert res.code == 2 and res.err.count("\n") == 1 and "Traceback" not in res.err
    dbg = run_cli_subprocess("optimize", p, tmp_path / "o.onnx", "--debug")
    assert dbg.code == 2 and "Traceback" in dbg.err


def _shared_or_skip() -> tuple[Path, Path]:
    return shared_path("models", "text_det.onnx"), shared_path("data", "text_det_eval.npz")


@pytest.mark.shared
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupt_leaves_no_output(tmp_path: Path, sig: int, code: int) -> None:
    model, data = _shared_or_skip()
    out = tmp_path / "o.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "onnxcompress.cli", "optimize", model, out, "--calib", data,
                             "--latency-runs", "200"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)  # well inside validation / latency of 32 pages
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def _mutate(kind: str) -> onnx.ModelProto:
    m = onnx.load(str(MODEL))
    g = m.graph
    if kind == "dangling_input":
        g.node[3].input[0] = "nonexistent"
    elif kind == "short_initializer":
        g.initializer[0].raw_data = g.initializer[0].raw_data[:-4]
    elif kind == "unknown_domain":
        g.node[0].domain = "com.unknown"
    elif kind == "cycle":
        g.node[1].input[0] = g.node[5].output[0]
    elif kind == "wrong_input_type":
        g.input[0].type.tensor_type.elem_type = onnx.TensorProto.STRING
    elif kind == "bad_attribute":
        g.node[0].attribute[0].ints[:] = [3, 3, 3]
    return m


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("dangling_input", "Node input 'nonexistent' is not a graph input"),
        ("short_initializer", "holds 1724 bytes of data, but its shape [16, 3, 3, 3] of FLOAT needs 1728"),
        ("unknown_domain", "com.unknown"),
        ("cycle", "not acyclic"),
        ("wrong_input_type", "tensor(string)"),
        ("bad_attribute", "conv_2"),
    ],
)
def test_malformed_models_are_refused(cli, tmp_path: Path, kind: str, fragment: str) -> None:
    p = tmp_path / f"{kind}.onnx"
    p.write_bytes(_mutate(kind).SerializeToString())
    before = sha(p)
    assert_user_error(cli("optimize", p, tmp_path / "o.onnx", "--no-latency"), f"{kind}.onnx", fragment)
    assert sha(p) == before and sorted(x.name for x in tmp_path.iterdir()) == [p.name]


def test_model_without_inputs(cli, tmp_path: Path) -> None:
    from onnx import helper

    const = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "c")
    g = helper.make_graph([helper.make_node("Constant", [], ["k"], value=const), helper.make_node("Relu", ["k"], ["y"])],
                          "noinput", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    p = tmp_path / "noinput.onnx"
    p.write_bytes(m.SerializeToString())
    res = cli("optimize", p, tmp_path / "o.onnx", "--no-latency")
    assert res.code == 0, res.err
    assert "validation on 1 samples" in res.out


def test_inspect_groups(cli) -> None:
    res = cli("inspect", FIXTURES / "concat_split.onnx", "--groups")
    assert res.code == 0 and "channel dependency groups: 5 prunable of 6" in res.out
    assert "no: reaches graph output 'heatmap'" in res.out
    js = json.loads(cli("inspect", FIXTURES / "resnet_block.onnx", "--groups", "--json").out)
    assert sorted(g["channels"] for g in js["prune_groups"]) == [10, 16, 16, 32, 32]  # 10: the classifier Gemm
    assert [g["blocked"] for g in js["prune_groups"] if g["channels"] == 10] == ["reaches graph output 'logits'"]
    assert {g["per_class"] for g in js["prune_groups"]} == {1}


def test_inspect_groups_shows_attention_heads(cli, tmp_path: Path) -> None:
    from .builders import hybrid_recognizer

    p = tmp_path / "hybrid.onnx"
    onnx.save(hybrid_recognizer(heads=4, ctc=False), p)
    res = cli("inspect", p, "--groups")
    assert res.code == 0 and "4 × 8" in res.out and "attention heads" in res.out
    js = json.loads(cli("inspect", p, "--groups", "--json").out)
    (heads,) = [g for g in js["prune_groups"] if g["per_class"] > 1]
    assert heads["producers"] == ["q", "k", "v"] and heads["channels"] == 4 and heads["prunable"]


@pytest.mark.shared
def test_interrupt_during_int8_calibration(tmp_path: Path) -> None:
    model, _ = _shared_or_skip()
    calib = shared_path("data", "text_det_calib.npz")
    out = tmp_path / "o.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "onnxcompress.cli", "optimize", model, out, "--calib", calib,
                             "--passes", "int8"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(7)  # inside the int8 pass (calibration takes ~10 s on 2 cores)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_concurrent_runs_into_one_folder(tmp_path: Path) -> None:
    """Two runs writing different outputs into the same folder at once do not interfere."""
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    procs = [subprocess.Popen([sys.executable, "-m", "onnxcompress.cli", "optimize", MODEL, o, "--calib",
                               FIXTURES / "resnet_block_calib.npz", "--passes", passes, "-q", "--keep-failed", "--allow-slower"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for o, passes in zip(outs, ["canonicalize", "prune:ratio=0.25"])]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode in (0, 3), err  # 3: pruned random weights may miss top-1; --keep-failed writes it
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]  # no temporary files left
    a, b = (onnx.load(str(o)) for o in outs)
    assert len(a.graph.initializer) and len(b.graph.initializer)
    wa = {t.name: tuple(t.dims) for t in a.graph.initializer}
    wb = {t.name: tuple(t.dims) for t in b.graph.initializer}
    assert wa != wb  # each file holds its own run's model
