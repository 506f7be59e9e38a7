"""Calibration data: formats, checks with precise messages, streaming, images."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxcompress.data import ImageOptions, RandomSource, input_specs, open_data
from onnxcompress.errors import DataError

from .builders import fvi, make_model


def conv_model(shape=("N", 3, 8, 8)) -> onnx.ModelProto:
    return make_model([helper.make_node("Relu", ["x"], ["y"])], [fvi("x", list(shape))], [fvi("y", list(shape))])


def two_input_model() -> onnx.ModelProto:
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])
    return make_model([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Identity", ["ids"], ["z"])],
                      [fvi("x", ["N", 3]), ids], [fvi("y", ["N", 3]), helper.make_tensor_value_info("z", TensorProto.INT64, ["N", 4])])


def arr(n: int, shape=(3, 8, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def collect(src) -> list[dict[str, np.ndarray]]:
    return list(src)


def test_npy_batches_and_limit(tmp_path: Path) -> None:
    data = arr(10)
    np.save(tmp_path / "d.npy", data)
    src = open_data(tmp_path / "d.npy", conv_model(), batch_size=4)
    batches = collect(src)
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2] and src.num_samples == 10
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), data)
    limited = collect(open_data(tmp_path / "d.npy", conv_model(), batch_size=4, limit=5))
    assert [b["x"].shape[0] for b in limited] == [4, 1]
    assert collect(src)[0]["x"].shape == (4, 3, 8, 8)  # re-iterable


def test_npz_key_resolution(tmp_path: Path) -> None:
    m = conv_model()
    np.savez(tmp_path / "named.npz", x=arr(3), y=np.arange(3))  # by input name; labels ignored
    np.savez(tmp_path / "single.npz", images=arr(2))  # the only array
    np.savez_compressed(tmp_path / "xkey.npz", x=arr(2), labels=np.arange(2))
    for name, n in (("named", 3), ("single", 2), ("xkey", 2)):
        assert sum(b["x"].shape[0] for b in open_data(tmp_path / f"{name}.npz", m)) == n


def test_npz_wrong_keys_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", a=arr(2), b=arr(2))
    with pytest.raises(DataError, match=r"bad\.npz: no array for input\(s\) 'x'; the file holds 'a', 'b'"):
        open_data(tmp_path / "bad.npz", conv_model())


def test_multi_input_npz(tmp_path: Path) -> None:
    m = two_input_model()
    np.savez(tmp_path / "ok.npz", x=arr(5, (3,)), ids=np.zeros((5, 4), np.int64))
    batches = collect(open_data(tmp_path / "ok.npz", m, batch_size=2))
    assert [sorted(b) for b in batches] == [["ids", "x"]] * 3
    np.savez(tmp_path / "missing.npz", x=arr(5, (3,)))
    with pytest.raises(DataError, match=r"no array for input\(s\) 'ids'"):
        open_data(tmp_path / "missing.npz", m)
    np.save(tmp_path / "one.npy", arr(5, (3,)))
    with pytest.raises(DataError, match="a .npy file can only feed a single-input model; this model has inputs x, ids"):
        open_data(tmp_path / "one.npy", m)
    np.savez(tmp_path / "counts.npz", x=arr(5, (3,)), ids=np.zeros((4, 4), np.int64))
    with pytest.raises(DataError, match="different sample counts"):
        open_data(tmp_path / "counts.npz", m)


def test_rank_shape_dtype_errors_name_the_input(tmp_path: Path) -> None:
    m = conv_model()
    np.save(tmp_path / "rank.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(DataError, match=r"input 'x': expected rank 4 \[N,3,8,8\].*found rank 2 \[2, 3\] in .*rank\.npy"):
        open_data(tmp_path / "rank.npy", m)
    np.save(tmp_path / "shape.npy", np.zeros((2, 3, 8, 9), np.float32))
    with pytest.raises(DataError, match=r"input 'x': expected shape \[N,3,8,8\], found \[2,3,8,9\] in .*shape\.npy \(axis 3\)"):
        collect(open_data(tmp_path / "shape.npy", m))
    np.save(tmp_path / "dtype.npy", np.zeros((2, 3, 8, 8), np.int32))
    with pytest.raises(DataError, match=r"input 'x': expected dtype float32, found int32 in .*dtype\.npy"):
        collect(open_data(tmp_path / "dtype.npy", m))


def test_float64_is_cast(tmp_path: Path) -> None:
    np.save(tmp_path / "f64.npy", arr(2).astype(np.float64))
    b = collect(open_data(tmp_path / "f64.npy", conv_model()))[0]
    assert b["x"].dtype == np.float32


def test_single_sample_without_batch_axis(tmp_path: Path) -> None:
    np.save(tmp_path / "one.npy", arr(1)[0])
    b = collect(open_data(tmp_path / "one.npy", conv_model()))
    assert len(b) == 1 and b[0]["x"].shape == (1, 3, 8, 8)


def test_pickled_npy_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy: holds Python objects .*never unpickles"):
        open_data(tmp_path / "obj.npy", conv_model())
    np.savez(tmp_path / "obj.npz", x=np.array([1, "a"], dtype=object))
    with pytest.raises(DataError, match=r"obj\.npz\['x'\]: holds Python objects"):
        open_data(tmp_path / "obj.npz", conv_model())


def test_not_an_array_file(tmp_path: Path) -> None:
    (tmp_path / "junk.npy").write_bytes(b"hello")
    with pytest.raises(DataError, match="junk.npy: not a valid .npy array"):
        open_data(tmp_path / "junk.npy", conv_model())
    (tmp_path / "junk.npz").write_bytes(b"hello")
    with pytest.raises(DataError, match="junk.npz: not a valid .npz file"):
        open_data(tmp_path / "junk.npz", conv_model())
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(DataError, match="unknown data file type '.csv'"):
        open_data(tmp_path / "data.csv", conv_model())
    with pytest.raises(DataError, match="no such file or folder"):
        open_data(tmp_path / "missing.npz", conv_model())


def test_truncated_npy(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", arr(4))
    raw = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(DataError, match="t.npy: file is truncated"):
        collect(open_data(tmp_path / "t.npy", conv_model()))


def test_folder_of_arrays_and_errors(tmp_path: Path) -> None:
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", arr(3, seed=i))
    (tmp_path / "README.txt").write_text("ignored")
    src = open_data(tmp_path, conv_model(), batch_size=4)
    assert [b["x"].shape[0] for b in src] == [4, 4, 1] and src.num_samples == 9
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty: the folder holds no .npy, .npz or image files"):
        open_data(empty, conv_model())
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", arr(1))
    (mixed / "b.png").write_bytes(b"")
    with pytest.raises(DataError, match="mixes array files and images"):
        open_data(mixed, conv_model())


def test_folder_with_mismatched_shapes(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", arr(2))
    np.save(tmp_path / "b.npy", arr(2, (3, 8, 7)))
    with pytest.raises(DataError, match=r"input 'x': expected shape \[N,3,8,8\], found \[2,3,8,7\] in .*b\.npy"):
        collect(open_data(tmp_path, conv_model()))


def test_dynamic_dims_respected(tmp_path: Path) -> None:
    m = conv_model(("N", 3, "H", "W"))
    np.save(tmp_path / "a.npy", arr(3, (3, 8, 8)))
    np.save(tmp_path / "b.npy", arr(3, (3, 16, 12)))
    batches = collect(open_data(tmp_path, m, batch_size=4))
    assert [b["x"].shape for b in batches] == [(3, 3, 8, 8), (3, 3, 16, 12)]  # never stacked across shapes


def test_static_batch_forces_batch_size(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", arr(5))
    src = open_data(tmp_path / "d.npy", conv_model((1, 3, 8, 8)), batch_size=8)
    assert src.batch_size == 1 and [b["x"].shape[0] for b in src] == [1] * 5


def test_nonfinite_refused_or_skipped(tmp_path: Path) -> None:
    data = arr(6)
    data[4, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", data)
    with pytest.raises(DataError, match=r"input 'x': NaN or Inf in sample 4 of .*nan\.npy"):
        collect(open_data(tmp_path / "nan.npy", conv_model(), batch_size=2))
    kept = collect(open_data(tmp_path / "nan.npy", conv_model(), batch_size=1, nonfinite="skip"))
    assert len(kept) == 5 and all(np.isfinite(b["x"]).all() for b in kept)


def test_streaming_memory_is_bounded(tmp_path: Path) -> None:
    """64 MB of compressed samples read at batch 4 never hold more than a few batches."""
    big = np.random.default_rng(0).standard_normal((256, 3, 128, 128)).astype(np.float32)  # 50 MB
    np.savez_compressed(tmp_path / "big.npz", x=big)
    del big
    src = open_data(tmp_path / "big.npz", conv_model(("N", 3, 128, 128)), batch_size=4)
    tracemalloc.start()
    n = sum(b["x"].shape[0] for b in src)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 256
    assert peak < 8 * 4 * 3 * 128 * 128 * 4  # < 8 batches' worth (~6 MB) of a 50 MB set


def test_python_iterables() -> None:
    m = conv_model()
    batches = [{"x": arr(2, seed=i)} for i in range(3)]
    src = open_data(batches, m)
    assert len(collect(src)) == 3 and len(collect(src)) == 3  # a list is re-iterable
    src2 = open_data(lambda: iter(batches), m)
    assert len(collect(src2)) == 3 and len(collect(src2)) == 3
    one_shot = open_data(iter(batches), m)
    assert len(collect(one_shot)) == 3
    with pytest.raises(DataError, match="already consumed"):
        collect(one_shot)
    with pytest.raises(DataError, match=r"item 0 of the Python data: keys \['y'\] do not match .*missing \['x'\]"):
        collect(open_data([{"y": arr(1)}], m))
    with pytest.raises(DataError, match="expected a dict"):
        collect(open_data([arr(1)], m))
    with pytest.raises(DataError, match=r"input 'x': expected shape"):
        collect(open_data([{"x": arr(1, (3, 4, 4))}], m))


def test_random_source_is_seeded() -> None:
    specs = input_specs(conv_model(("N", 3, "H", "W")))
    a = collect(RandomSource(specs, num_samples=5, batch_size=2, seed=3, dynamic_dim=16))
    b = collect(RandomSource(specs, num_samples=5, batch_size=2, seed=3, dynamic_dim=16))
    assert [x["x"].shape for x in a] == [(2, 3, 16, 16), (2, 3, 16, 16), (1, 3, 16, 16)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["x"], y["x"])


def test_bad_batch_size_and_limit(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", arr(2))
    with pytest.raises(DataError, match="batch size must be at least 1"):
        open_data(tmp_path / "d.npy", conv_model(), batch_size=0)
    with pytest.raises(DataError, match="sample limit must be at least 1"):
        open_data(tmp_path / "d.npy", conv_model(), limit=0)


# ----------------------------------------------------------------------------- images

PIL = pytest.importorskip("PIL.Image")


def _png(path: Path, rgb: tuple[int, int, int], size=(10, 6)) -> None:
    PIL.new("RGB", size, rgb).save(path)


def test_image_folder_preprocessing(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (255, 0, 0))
    _png(tmp_path / "b.jpg", (0, 0, 255))
    m = conv_model(("N", 3, 4, 4))
    opts = ImageOptions(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    (b,) = collect(open_data(tmp_path, m, image_options=opts))
    assert b["x"].shape == (2, 3, 4, 4) and b["x"].dtype == np.float32
    np.testing.assert_allclose(b["x"][0, :, 1, 1], [1.0, -1.0, -1.0], atol=1e-6)  # red in [-1, 1]
    bgr = collect(open_data(tmp_path, m, image_options=ImageOptions(channel_order="bgr", scale=1.0)))[0]
    np.testing.assert_allclose(bgr["x"][0, :, 0, 0], [0, 0, 255], atol=1e-4)
    nhwc = collect(open_data(tmp_path, conv_model(("N", 4, 4, 3)), image_options=ImageOptions(layout="nhwc")))[0]
    assert nhwc["x"].shape == (2, 4, 4, 3)


def test_image_letterbox_pads_top_left(tmp_path: Path) -> None:
    _png(tmp_path / "wide.png", (0, 0, 0), size=(16, 8))
    opts = ImageOptions(size=(16, 16), resize="letterbox", scale=1.0)
    (b,) = collect(open_data(tmp_path, conv_model(("N", 3, "H", "W")), image_options=opts))
    assert b["x"].shape == (1, 3, 16, 16)
    assert b["x"][0, 0, 0, 0] == 0.0 and b["x"][0, 0, 15, 0] == 114.0  # image on top, padding below


def test_image_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png: cannot read image"):
        collect(open_data(tmp_path, conv_model(("N", 3, 4, 4))))
    good = tmp_path / "good"
    good.mkdir()
    _png(good / "a.png", (1, 2, 3))
    with pytest.raises(DataError, match="dynamic height/width .*--image-size"):
        open_data(good, conv_model(("N", 3, "H", "W")))
    with pytest.raises(DataError, match="images give 1 or 3 channels, the model wants 5"):
        open_data(good, conv_model(("N", 5, 4, 4)))


def test_corrupt_image_named(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (255, 0, 0))
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(50)))  # a PNG header, then garbage
    with pytest.raises(DataError, match=r"b\.png: cannot read image"):
        collect(open_data(tmp_path, conv_model(("N", 3, 4, 4))))
