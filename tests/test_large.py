"""A model over 2 GB (issue 6): external data in, canonicalization and validation, external
data out, and the saved model loads. Two 1.1 GB weights (a protobuf field cannot hold more
than 2 GiB, so large exports split their weights the same way). Marked slow."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from .builders import fvi, make_model

K, N = 16, 17_000_000  # two 16 × 17M float32 weights: 2 × 1.09 GB


def _external(name: str, arr: np.ndarray, f, location: str) -> TensorProto:  # noqa: ANN001
    offset = f.tell()
    arr.tofile(f)
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(arr.shape))
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(arr.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    return t


@pytest.mark.slow
def test_over_2gb_model_round_trips_with_external_data(tmp_path: Path, cli) -> None:  # noqa: ANN001
    src = tmp_path / "big" / "big.onnx"
    src.parent.mkdir()
    with open(src.parent / "big.data", "wb") as f:
        inits = []
        for i, name in enumerate(("w1", "w2")):
            w = np.full((K, N), 0.25 * (i + 1), dtype=np.float32)
            w[:, ::1000] = np.arange(K, dtype=np.float32)[:, None]  # the output depends on the weights
            inits.append(_external(name, w, f, "big.data"))
            del w
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["x", "w2"], ["b"], name="mm2"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    onnx.save(make_model(nodes, [fvi("x", [1, K])], [fvi("y", [1, N])], inits), str(src))
    out = tmp_path / "out" / "big.opt.onnx"
    out.parent.mkdir()
    res = cli("optimize", src, out, "--passes", "canonicalize", "--val-limit", "2", "--no-latency", "-q")
    assert res.code == 0, res.err
    files = sorted(p.name for p in out.parent.iterdir())
    assert len(files) == 2 and "big.opt.onnx" in files, files  # the model and its external data file
    assert out.stat().st_size < 2**20  # the weights are not inside the protobuf
    loaded = onnx.load(str(out))
    w2 = numpy_helper.to_array({t.name: t for t in loaded.graph.initializer}["w2"])
    assert w2.shape == (K, N) and w2[3, 0] == 3.0 and w2[3, 1] == 0.5
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"over-2GB round trip: peak RSS of the test process {peak_gb:.1f} GB")
