"""Calibration and validation data: ``.npy``, ``.npz``, folders, images, iterables.

Every source yields batches ``{input_name: ndarray}`` checked against the model's inputs
(rank, static dimensions, dtype) and never holds more than one batch plus one file's
header in memory: ``.npy`` files and ``.npz`` members (compressed or not) are read as a
stream of samples, batch by batch. Nothing is ever unpickled.

Layout conventions. Each input has a batch axis, or none:

* inferred from the model's symbolic dimensions where they tie inputs together: the name
  on axis 0 of the first input that has one (``N`` in audio ``[N, 512]``) marks the
  batch axis of every input that carries it (state ``[2, N, 128]``: axis 1);
* an input without that name: axis 0 where it is not static, else none where another
  input has the batch name (a ``[2, 128]`` table), else axis 0 (a static batch);
* a 0-d input (a sample rate, a threshold) has none;
* ``batch_axes({"state": 1, "sr": None})`` (CLI ``--batch-axis state=1``) overrides.

An array whose rank equals the input's rank holds samples stacked along the batch axis;
an array of one rank less is a single sample. An input without a batch axis is held
constant: its array is fed as it is with every batch. A model whose batch dimension is
static (``[1, 3, 416, 416]``) gets batches of exactly that size.

Inside onnxcompress every batch has its samples on axis 0, whatever the model's layout
(a constant input repeated per sample), so that batches slice and stack alike;
:func:`model_feeds` turns a batch into the model's layout where a session runs it.

Modules: specs.py (input signatures and checks), source.py (the base class), files.py
(.npy/.npz), images.py (image folders); this one opens any of them (:func:`open_data`)
and holds the in-memory and random sources."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from ..errors import DataError
from .files import ArrayEntry, ArrayFilesSource, scan_array_file
from .images import ImageFolderSource, ImageOptions
from .source import DataSource, _internal
from .specs import (
    Batch,
    Dim,
    InputSpec,
    batch_axes,
    batch_count,
    check_array,
    infer_batch_axes,
    input_specs,
    model_feeds,
    model_shapes,
    to_internal,
    to_model_layout,
)

log = logging.getLogger(__name__)

ARRAY_SUFFIXES = (".npy", ".npz")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class IterableSource(DataSource):
    """Batches from Python: any iterable (or zero-argument callable returning one) of
    ``{input_name: ndarray}``. A one-shot iterator can be iterated only once."""

    def __init__(
        self,
        data: Iterable[Mapping[str, Any]] | Callable[[], Iterable[Mapping[str, Any]]],
        specs: Sequence[InputSpec],
        limit: int | None = None,
    ) -> None:
        super().__init__(specs, batch_size=1, limit=limit)
        self.batch_size = 1 << 30  # user batches pass through as given
        self._data = data
        self._one_shot = not callable(data) and iter(data) is data  # type: ignore[arg-type]
        self._used = False

    def __iter__(self) -> Iterator[Batch]:
        # user batches are not re-batched: yield each as given, checked
        total = 0
        for chunk, where in self._samples():
            for spec in self.specs:
                chunk[spec.name] = check_array(spec, chunk[spec.name], where)
            if self.limit is not None:
                if total >= self.limit:
                    return
                n = next(iter(chunk.values())).shape[0]
                if total + n > self.limit:
                    chunk = {k: v[: self.limit - total] for k, v in chunk.items()}
                total += n
            yield chunk

    def _samples(self) -> Iterator[tuple[Batch, str]]:
        if self._one_shot and self._used:
            raise DataError(
                "the calibration iterator was already consumed; pass a list, a re-iterable, or a function returning a new iterator"
            )
        self._used = True
        source = self._data() if callable(self._data) else self._data
        names = {s.name for s in self.specs}
        for i, item in enumerate(source):
            where = f"item {i} of the Python data"
            if not isinstance(item, Mapping):
                raise DataError(f"{where}: expected a dict {{input name: array}}, got {type(item).__name__}")
            unknown = set(item) - names
            missing = names - set(item)
            if unknown or missing:
                raise DataError(
                    f"{where}: keys {sorted(map(str, item))} do not match the model's inputs {sorted(names)}"
                    + (f" (missing {sorted(missing)})" if missing else "")
                    + (f" (unknown {sorted(map(str, unknown))})" if unknown else "")
                )
            chunk = {}
            for k, v in item.items():
                arr = np.asarray(v)
                if arr.dtype.hasobject:
                    raise DataError(f"{where}: input '{k}' is an object array")
                chunk[str(k)] = arr
            yield _internal(self.specs, chunk, where), where


class RandomSource(DataSource):
    """Seeded random inputs shaped from the model (dynamic dims from ``dynamic_dim``)."""

    def __init__(
        self,
        specs: Sequence[InputSpec],
        num_samples: int = 8,
        batch_size: int = 8,
        seed: int = 0,
        dynamic_dim: int = 64,
        shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        super().__init__(specs, batch_size, num_samples)
        self.seed = seed
        self.dynamic_dim = dynamic_dim
        self.shapes = dict(shapes or {})

    @property
    def num_samples(self) -> int | None:
        return self.limit

    def sample_shape(self, spec: InputSpec) -> tuple[int, ...]:
        if spec.name in self.shapes:
            given = [int(d) for d in self.shapes[spec.name]]
            if spec.batch_axis is not None and len(given) == spec.rank:
                del given[spec.batch_axis]
            return tuple(given)
        return tuple(d if isinstance(d, int) else self.dynamic_dim for d in spec.sample_shape)

    def _samples(self) -> Iterator[tuple[Batch, str]]:
        rng = np.random.default_rng(self.seed)
        assert self.limit is not None
        for start in range(0, self.limit, self.batch_size):
            n = min(self.batch_size, self.limit - start)
            chunk = {}
            for spec in self.specs:
                shape = (n, *self.sample_shape(spec))
                if np.issubdtype(spec.dtype, np.floating):
                    chunk[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
                elif spec.dtype == np.bool_:
                    chunk[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
                else:
                    chunk[spec.name] = rng.integers(0, 8, shape).astype(spec.dtype)
            yield chunk, f"random data (seed {self.seed})"


def _list_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    arrays, images, other = [], [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        suffix = p.suffix.lower()
        if suffix in ARRAY_SUFFIXES:
            arrays.append(p)
        elif suffix in IMAGE_SUFFIXES:
            images.append(p)
        else:
            other.append(p)
    if other:
        log.warning("ignoring %d file(s) in %s that are neither arrays nor images (e.g. %s)", len(other), folder, other[0].name)
    return arrays, images


def open_data(
    source: str | os.PathLike[str] | DataSource | Iterable[Mapping[str, Any]] | Callable[[], Iterable[Mapping[str, Any]]],
    model: onnx.ModelProto,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    image_options: ImageOptions | None = None,
    nonfinite: Literal["error", "skip"] = "error",
) -> DataSource:
    """Turn a path (``.npy``, ``.npz``, folder of arrays or images), a :class:`DataSource`,
    or a Python iterable of ``{input: array}`` into a checked :class:`DataSource`."""
    specs = input_specs(model)
    if isinstance(source, DataSource):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if path.is_dir():
            arrays, images = _list_folder(path)
            if arrays and images:
                raise DataError(f"{path}: the folder mixes array files and images; keep one kind")
            if arrays:
                return ArrayFilesSource(arrays, specs, batch_size, limit, nonfinite)
            if images:
                return ImageFolderSource(images, specs, image_options or ImageOptions(), batch_size, limit)
            raise DataError(f"{path}: the folder holds no .npy, .npz or image files")
        suffix = path.suffix.lower()
        if suffix in ARRAY_SUFFIXES:
            return ArrayFilesSource([path], specs, batch_size, limit, nonfinite)
        if suffix in IMAGE_SUFFIXES:
            return ImageFolderSource([path], specs, image_options or ImageOptions(), batch_size, limit)
        raise DataError(f"{path}: unknown data file type '{path.suffix}' (expected .npy, .npz, an image, or a folder)")
    if isinstance(source, (Iterable, Callable)):  # type: ignore[arg-type]
        return IterableSource(source, specs, limit)  # type: ignore[arg-type]
    raise DataError(f"cannot use {type(source).__name__} as data")


def first_batch(source: DataSource) -> Batch:
    for batch in source:
        return batch
    raise DataError("the data source yielded no samples")


def take_samples(source: Iterable[Batch], limit: int, skip: int = 0) -> list[Batch]:
    """``limit`` samples of a data source after the first ``skip``, as batches (cut at the edges)."""
    out: list[Batch] = []
    got = 0
    for batch in source:
        n = batch_count(batch)
        if skip >= n:
            skip -= n
            continue
        if skip:
            batch = {k: v[skip:] for k, v in batch.items()}
            n -= skip
            skip = 0
        if got + n > limit:
            batch = {k: v[: limit - got] for k, v in batch.items()}
            n = limit - got
        out.append(batch)
        got += n
        if got >= limit:
            break
    return out


def batch_of(pool: Batch, size: int, model: onnx.ModelProto | None = None) -> Batch:
    """``size`` samples from ``pool`` (repeated if it is smaller): the feeds of a latency
    measurement. An input whose batch dimension ``model`` fixes gets that many instead."""
    fixed = {s.name: s.static_batch for s in input_specs(model)} if model is not None else {}
    out = {}
    for k, v in pool.items():
        want = fixed.get(k) or size
        if v.shape[0] < want:
            v = np.concatenate([v] * -(-want // v.shape[0]), axis=0)
        out[k] = np.ascontiguousarray(v[:want])
    return out


class LimitedSource:
    """Iterate a data source but stop after ``limit`` samples (0 = all)."""

    def __init__(self, data: Iterable[Batch], limit: int) -> None:
        self.data, self.limit = data, limit
        total = getattr(data, "num_samples", None)
        self.num_samples = min(total, limit) if (limit and total) else (limit or total)

    def __iter__(self) -> Iterator[Batch]:
        if not self.limit:
            yield from self.data
            return
        yield from take_samples(self.data, self.limit)


__all__ = [
    "ARRAY_SUFFIXES", "IMAGE_SUFFIXES", "ArrayEntry", "ArrayFilesSource", "Batch", "DataSource", "Dim", "ImageFolderSource",
    "ImageOptions", "InputSpec", "IterableSource", "LimitedSource", "RandomSource", "batch_axes", "batch_count", "batch_of",
    "check_array", "first_batch", "infer_batch_axes", "input_specs", "model_feeds", "model_shapes", "open_data", "scan_array_file",
    "take_samples", "to_internal", "to_model_layout",
]
