"""Calibration data: formats, checks with precise messages, streaming, images."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.data import ImageOptions, RandomSource, input_specs, open_data
from onnxcompress.errors import DataError
from onnxcompress.validate import Thresholds

from .builders import fvi, make_model, run


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


def _vad_model() -> onnx.ModelProto:
    """A voice-activity-style model: audio [N, 512], state [2, N, 128] (batch on axis 1),
    sample rate sr (0-d int64); outputs prob [N, 1] and the new state [2, N, 128]."""
    from onnx import TensorProto

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((512, 128)) / 22).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((128, 1)) / 11).astype(np.float32), "V"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array(16000.0, np.float32), "ref_sr")]
    nodes = [helper.make_node("MatMul", ["audio", "W"], ["h"]),
             helper.make_node("ReduceSum", ["state", "zero"], ["s"], keepdims=0),
             helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["srf", "ref_sr"], ["k"]),
             helper.make_node("Add", ["h", "s"], ["hs"]),
             helper.make_node("Mul", ["hs", "k"], ["hk"]),
             helper.make_node("Tanh", ["hk"], ["t"]),
             helper.make_node("MatMul", ["t", "V"], ["logit"]),
             helper.make_node("Sigmoid", ["logit"], ["prob"]),
             helper.make_node("Unsqueeze", ["t", "zero"], ["t0"]),
             helper.make_node("Unsqueeze", ["h", "zero"], ["h0"]),
             helper.make_node("Concat", ["t0", "h0"], ["new_state"], axis=0)]
    inputs = [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["N", 512]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 128]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, [])]
    outputs = [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1]),
               helper.make_tensor_value_info("new_state", TensorProto.FLOAT, [2, "N", 128])]
    return make_model(nodes, inputs, outputs, inits)


def _vad_data(path, n: int = 24, state_axis: int = 1) -> None:
    rng = np.random.default_rng(4)
    state = rng.standard_normal((2, n, 128)).astype(np.float32)
    np.savez(path, audio=rng.standard_normal((n, 512)).astype(np.float32),
             state=state if state_axis == 1 else state.transpose(1, 0, 2), sr=np.array(16000))


def test_batch_axes_are_inferred_from_the_symbolic_dims() -> None:
    specs = {s.name: s for s in input_specs(_vad_model())}
    assert (specs["audio"].batch_axis, specs["state"].batch_axis, specs["sr"].batch_axis) == (0, 1, None)
    assert specs["state"].sample_shape == (2, 128) and specs["sr"].sample_shape == ()


def test_a_model_with_state_and_scalar_inputs_is_fed_in_its_own_layout(tmp_path) -> None:
    """Samples of 'state' lie on its axis 1, 'sr' is the same for every batch: the data
    stream slices them as the model takes them, and every pass runs on them."""
    import onnxcompress as oc
    from onnxcompress.data import model_feeds
    from onnxcompress.validate import make_session

    m = _vad_model()
    _vad_data(tmp_path / "d.npz")
    src = open_data(tmp_path / "d.npz", m, batch_size=8)
    assert src.num_samples == 24
    batches = list(src)
    assert [b["state"].shape for b in batches] == [(8, 2, 128)] * 3 and batches[0]["sr"].shape == (8,)
    sess = make_session(m)
    feeds = model_feeds(sess, batches[1])
    assert feeds["state"].shape == (2, 8, 128) and feeds["sr"].shape == () and int(feeds["sr"]) == 16000
    raw = np.load(tmp_path / "d.npz")
    want = run(m, {"audio": raw["audio"][8:16], "state": raw["state"][:, 8:16], "sr": raw["sr"]})
    np.testing.assert_array_equal(sess.run(None, feeds)[1], want[1])
    for passes in ("canonicalize,fuse", "prune:macs_ratio=0.7", "lowrank", "int8:guard=false"):
        _, rep = oc.optimize(m, passes, calibration=tmp_path / "d.npz", latency=False)
        assert rep.validation is not None and rep.validation.samples == 24, passes
    _, rep = oc.optimize(m, "canonicalize,fuse", calibration=tmp_path / "d.npz", latency=False)
    assert rep.validation.passed


def test_a_wrong_batch_axis_is_one_error_naming_the_input(tmp_path) -> None:
    import onnxcompress as oc

    m = _vad_model()
    _vad_data(tmp_path / "d.npz", state_axis=0)  # state saved as [N, 2, 128]
    with pytest.raises(DataError, match="'state' 2 on axis 1.*--batch-axis"):
        list(open_data(tmp_path / "d.npz", m))
    # exported with a fixed batch of 1 ([2, 1, 128]): inferred as a constant input; said otherwise, fed per sample
    fixed = _vad_model()
    fixed.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 1
    _vad_data(tmp_path / "f.npz")
    with pytest.raises(DataError, match="input 'state'"):
        list(open_data(tmp_path / "f.npz", fixed))
    _, rep = oc.optimize(fixed, "canonicalize", calibration=tmp_path / "f.npz", latency=False,
                         batch_axes={"state": 1}, thresholds=Thresholds.exact())
    assert rep.validation.passed and rep.validation.samples == 24
    with pytest.raises(DataError, match="batch axis 3 is outside its rank"):
        oc.optimize(m, "canonicalize", calibration=tmp_path / "d.npz", batch_axes={"state": 3})


def test_python_batches_in_the_model_layout() -> None:
    import onnxcompress as oc

    m = _vad_model()
    rng = np.random.default_rng(0)
    data = [{"audio": rng.standard_normal((4, 512)).astype(np.float32),
             "state": rng.standard_normal((2, 4, 128)).astype(np.float32), "sr": np.int64(8000)} for _ in range(3)]
    _, rep = oc.optimize(m, "canonicalize,fuse", calibration=data, latency=False)
    assert rep.validation.passed and rep.validation.samples == 12


def test_a_constant_input_of_the_wrong_rank_names_its_rank() -> None:
    from onnxcompress.data import check_array

    sr = {s.name: s for s in input_specs(_vad_model())}["sr"]
    with pytest.raises(DataError, match=r"input 'sr': expected rank 0 \[\], found rank 1"):
        check_array(sr, np.zeros((4, 3), np.int64), "test data")  # 4 samples of a [3] value
