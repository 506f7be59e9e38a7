"""Loading and saving: bad files, external data confinement, atomic writes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcompress import model as model_mod
from onnxcompress.errors import ExternalDataError, ModelLoadError, ModelSaveError
from onnxcompress.model import load_model, save_model

from .builders import fvi, make_model, run
from .conftest import FIXTURES


def _small_model(size: int = 4096) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((size,)).astype(np.float32), "w")
    node = onnx.helper.make_node("Add", ["x", "w"], ["y"])
    return make_model([node], [fvi("x", [size])], [fvi("y", [size])], [w])


def _external_model(tmp_path: Path, location: str) -> Path:
    """A model whose weight 'w' claims to live at `location` (crafted by hand)."""
    m = _small_model(16)
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    del t.float_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "64")):
        e = t.external_data.add()
        e.key, e.value = k, v
    path = tmp_path / "model.onnx"
    path.write_bytes(m.SerializeToString())
    return path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.onnx")


def test_folder_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a folder"):
        load_model(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty file"):
        load_model(p)


def test_random_bytes(tmp_path: Path) -> None:
    p = tmp_path / "random.onnx"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="not an ONNX"):
        load_model(p)


def test_truncated_protobuf(tmp_path: Path) -> None:
    data = (FIXTURES / "resnet_block.onnx").read_bytes()
    p = tmp_path / "truncated.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"truncated\.onnx: not an ONNX file or truncated protobuf"):
        load_model(p)


def test_valid_protobuf_that_is_not_a_model(tmp_path: Path) -> None:
    p = tmp_path / "tensor.onnx"
    p.write_bytes(numpy_helper.from_array(np.zeros(3, np.float32), "t").SerializeToString())
    with pytest.raises(ModelLoadError, match="not an ONNX"):
        load_model(p)


@pytest.mark.parametrize("opset", [5, 99])
def test_unsupported_opset(tmp_path: Path, opset: int) -> None:
    m = _small_model(4)
    m.opset_import[0].version = opset
    p = tmp_path / "m.onnx"
    p.write_bytes(m.SerializeToString())
    with pytest.raises(ModelLoadError, match=f"unsupported opset {opset}"):
        load_model(p)


def test_external_data_roundtrip(tmp_path: Path) -> None:
    m = _small_model(4096)
    out = tmp_path / "ext.onnx"
    written = save_model(m, out, external_data=True)
    assert written == [out, tmp_path / "ext.onnx.data"]
    assert out.stat().st_size < 2000  # weights are not inside the .onnx
    assert (tmp_path / "ext.onnx.data").stat().st_size >= 4096 * 4
    # the in-memory model is untouched by saving
    assert m.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT
    loaded = load_model(out)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]),
                                  numpy_helper.to_array(m.graph.initializer[0]))
    # onnxruntime reads our external-data layout from the file as well
    import onnxruntime as ort

    x = np.ones(4096, np.float32)
    ref = run(m, {"x": x})[0]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], ref)


def test_external_data_automatic_above_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_mod, "EXTERNAL_THRESHOLD", 1000)
    save_model(_small_model(4096), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    save_model(_small_model(16), tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()


@pytest.mark.parametrize("location", ["../outside.bin", "sub/../../outside.bin", "/etc/passwd"])
def test_external_data_outside_folder_refused(tmp_path: Path, location: str) -> None:
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64)
    path = _external_model(model_dir, location)
    with pytest.raises(ExternalDataError, match=r"model\.onnx: tensor 'w'.*(outside the model's folder .*|is absolute); refused"):
        load_model(path)


def test_external_data_symlink_leaving_folder_refused(tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\1" * 64)
    (model_dir / "weights.bin").symlink_to(secret)
    path = _external_model(model_dir, "weights.bin")
    with pytest.raises(ExternalDataError, match="outside the model's folder"):
        load_model(path)


def test_external_data_missing_file(tmp_path: Path) -> None:
    path = _external_model(tmp_path, "missing.bin")
    with pytest.raises(ExternalDataError, match="'missing.bin' not found"):
        load_model(path)


def test_external_data_range_past_end(tmp_path: Path) -> None:
    (tmp_path / "short.bin").write_bytes(b"\0" * 10)
    path = _external_model(tmp_path, "short.bin")
    with pytest.raises(ExternalDataError, match="lies outside 'short.bin'"):
        load_model(path)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_failed_save_leaves_no_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous content")
    before = _digest(tmp_path)

    def boom(path: Path, data: bytes) -> None:
        path.write_bytes(data[:10])  # a partial write, then a crash
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_mod, "_write_bytes", boom)
    with pytest.raises(ModelSaveError, match="No space left"):
        save_model(_small_model(), out)
    assert _digest(tmp_path) == before  # old output intact, no temp files


def test_failed_external_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path: Path, data: bytes) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(model_mod, "_write_bytes", boom)
    with pytest.raises(ModelSaveError):
        save_model(_small_model(), tmp_path / "o.onnx", external_data=True)
    assert list(tmp_path.iterdir()) == []


def test_save_into_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelSaveError, match="does not exist"):
        save_model(_small_model(), tmp_path / "no" / "out.onnx")


def test_save_is_atomic_rename(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    save_model(_small_model(), out)
    assert sorted(os.listdir(tmp_path)) == ["o.onnx"]
    assert onnx.load(str(out)).graph.initializer[0].name == "w"
