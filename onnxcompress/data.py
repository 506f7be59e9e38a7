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
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import dataclasses
import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import onnx
from onnx import helper

from .errors import DataError

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
Dim = int | str | None

ARRAY_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


_BATCH_AXES: contextvars.ContextVar[dict[str, int | None]] = contextvars.ContextVar("batch_axes", default={})


@contextlib.contextmanager
def batch_axes(axes: Mapping[str, int | None] | None) -> Iterator[None]:
    """Within the block, these inputs have these batch axes (None: held constant)."""
    token = _BATCH_AXES.set(dict(axes or {}))
    try:
        yield
    finally:
        _BATCH_AXES.reset(token)


def infer_batch_axes(inputs: Sequence[tuple[str, Sequence[Dim]]]) -> dict[str, int | None]:
    """Each input's batch axis, or None (module docstring), with :func:`batch_axes`'s
    overrides applied; an override outside an input's rank is a :class:`DataError`."""
    symbol = next((shape[0] for _, shape in inputs if len(shape) and isinstance(shape[0], str)), None)
    out: dict[str, int | None] = {}
    for name, shape in inputs:
        if not len(shape):
            out[name] = None
        elif symbol is not None and symbol in shape:
            out[name] = list(shape).index(symbol)
        elif not isinstance(shape[0], int) or symbol is None:
            out[name] = 0
        else:
            out[name] = None
    ranks = {n: len(sh) for n, sh in inputs}
    for name, axis in _BATCH_AXES.get().items():
        if name not in ranks:
            raise DataError(f"batch axis given for '{name}', which is not an input (inputs: {', '.join(ranks)})")
        if axis is not None and not 0 <= axis < ranks[name]:
            raise DataError(f"input '{name}': batch axis {axis} is outside its rank {ranks[name]}")
        out[name] = axis
    return out


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype, shape (int, symbolic name or None per axis),
    batch axis (None: held constant, the same array with every batch)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]
    batch_axis: int | None = 0

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def static_batch(self) -> int | None:
        if self.batch_axis is None or not self.shape:
            return None
        d = self.shape[self.batch_axis]
        return d if isinstance(d, int) else None

    @property
    def sample_shape(self) -> tuple[Dim, ...]:
        """The shape of one sample: the model's shape without the batch axis."""
        if self.batch_axis is None:
            return self.shape
        return self.shape[: self.batch_axis] + self.shape[self.batch_axis + 1:]

    def model_shape(self, internal: Sequence[int]) -> list[int]:
        """The model-layout shape of a batch whose internal shape (samples on axis 0) is ``internal``."""
        if self.batch_axis is None:
            return list(internal[1:])
        rest = list(internal[1:])
        return rest[: self.batch_axis] + [int(internal[0])] + rest[self.batch_axis:]

    def shape_str(self) -> str:
        return "[" + ",".join("?" if d is None else str(d) for d in self.shape) + "]"


def to_model_layout(axes: Mapping[str, int | None], batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch (samples on axis 0) in the model's layout: the samples moved to each
    input's batch axis; an input without one fed as its first sample's value."""
    out = {}
    for k, v in batch.items():
        axis = axes.get(k, 0)
        if axis == 0:
            out[k] = v
        elif axis is None:
            out[k] = np.array(v[0])  # (ascontiguousarray would make a 0-d value 1-d)
        else:
            out[k] = np.ascontiguousarray(np.moveaxis(v, 0, axis))
    return out


def model_feeds(sess: Any, batch: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """``batch`` in the layout of the onnxruntime session ``sess``'s inputs (the batch
    itself where every input's batch axis is 0)."""
    axes = getattr(sess, "_onnxcompress_axes", None)
    if axes is None:
        axes = infer_batch_axes([(i.name, [d if isinstance(d, (int, str)) else None for d in (i.shape or [])])
                                 for i in sess.get_inputs()])
        try:
            sess._onnxcompress_axes = axes
        except AttributeError:  # a session type without attributes: infer each time
            pass
    if all(a == 0 for a in axes.values()):
        return batch
    return to_model_layout(axes, batch)


def to_internal(spec: InputSpec, arr: np.ndarray, n: int | None = None) -> np.ndarray:
    """An array in the model's layout (``n`` samples for a constant input) as a batch
    with the samples on axis 0."""
    if spec.batch_axis is None:
        return np.repeat(arr[None], n or 1, axis=0)
    if spec.batch_axis == 0 or arr.ndim <= spec.batch_axis:
        return arr
    return np.ascontiguousarray(np.moveaxis(arr, spec.batch_axis, 0))


def model_shapes(model: onnx.ModelProto, batch: Mapping[str, np.ndarray], samples: int | None = None,
                 ) -> dict[str, list[int]]:
    """The model-layout shapes of ``batch`` (samples on axis 0), with ``samples`` samples
    instead of the batch's where given."""
    specs = {sp.name: sp for sp in input_specs(model)}
    out = {}
    for k, v in batch.items():
        internal = [samples if samples is not None else v.shape[0], *v.shape[1:]]
        out[k] = specs[k].model_shape(internal) if k in specs else internal
    return out


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs excluded), with their batch axes."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise DataError(f"input '{vi.name}': only tensor inputs are supported")
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"input '{vi.name}': unsupported element type {tt.elem_type}") from None
        dims: list[Dim] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        specs.append(InputSpec(vi.name, dtype, tuple(dims)))
    axes = infer_batch_axes([(sp.name, sp.shape) for sp in specs])
    return [dataclasses.replace(sp, batch_axis=axes[sp.name]) for sp in specs]


# ----------------------------------------------------------------------------- checking


def check_array(spec: InputSpec, arr: np.ndarray, where: str, *, batched: bool = True) -> np.ndarray:
    """Check ``arr`` (a batch with its samples on axis 0 when ``batched``) against
    ``spec``; return it, maybe cast.

    Floating data of another precision is cast (with a log message), and so are integers
    whose values the model's integer or bool type holds; any other dtype mismatch, a
    wrong rank or a wrong static dimension is a :class:`DataError`.
    """
    want_shape = ((spec.static_batch,) + spec.sample_shape) if batched else spec.shape
    shown = spec.model_shape(arr.shape) if batched and arr.ndim == len(want_shape) else list(arr.shape)
    found = "[" + ",".join(str(d) for d in shown) + "]"
    if arr.ndim != len(want_shape):
        rank = arr.ndim - 1 if batched else arr.ndim  # a batch has the samples axis in front, constants too
        raise DataError(
            f"input '{spec.name}': expected rank {spec.rank} {spec.shape_str()}, found rank {rank} {found} in {where}"
        )
    for axis, (want, got) in enumerate(zip(want_shape, arr.shape)):
        if isinstance(want, int) and want != got:
            model_axis = axis
            if batched:  # internal axis → the model's: 0 is the batch axis, the rest skip it
                b = spec.batch_axis
                model_axis = b if axis == 0 else axis - 1 + (b is not None and b <= axis - 1)
            raise DataError(
                f"input '{spec.name}': expected shape {spec.shape_str()}, found {found} in {where} (axis {model_axis})"
            )
    if arr.dtype != spec.dtype:
        if np.issubdtype(arr.dtype, np.floating) and np.issubdtype(spec.dtype, np.floating):
            log.debug("input '%s': casting %s to %s (%s)", spec.name, arr.dtype, spec.dtype, where)
            arr = arr.astype(spec.dtype)
        elif (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_) and (
                np.issubdtype(spec.dtype, np.integer) or spec.dtype == np.bool_) and np.array_equal(
                arr.astype(spec.dtype).astype(arr.dtype), arr):
            log.debug("input '%s': casting %s to %s (%s)", spec.name, arr.dtype, spec.dtype, where)
            arr = arr.astype(spec.dtype)
        else:
            raise DataError(f"input '{spec.name}': expected dtype {spec.dtype}, found {arr.dtype} in {where}")
    return arr


def _finite_rows(name: str, arr: np.ndarray, where: str, first_index: int, policy: str) -> np.ndarray:
    """Boolean mask of samples without NaN/Inf; raises on the first bad one under 'error'."""
    if not np.issubdtype(arr.dtype, np.floating) or arr.ndim == 0:
        return np.ones(arr.shape[0] if arr.ndim else 1, dtype=bool)
    good = np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
    if not good.all():
        idx = int(np.flatnonzero(~good)[0]) + first_index
        if policy == "error":
            raise DataError(
                f"input '{name}': NaN or Inf in sample {idx} of {where} "
                "(use nonfinite='skip' / --skip-nonfinite to skip such samples)"
            )
        log.warning("input '%s': skipping %d sample(s) with NaN/Inf in %s", name, int((~good).sum()), where)
    return good


# ----------------------------------------------------------------------------- array streams


@dataclass
class ArrayEntry:
    """One array in a ``.npy`` file or a ``.npz`` member, readable as a stream."""

    file: Path
    key: str | None  # npz member name without ".npy"; None for a .npy file
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    note: str = ""

    @property
    def where(self) -> str:
        return (f"{self.file}" if self.key is None else f"{self.file}['{self.key}']") + self.note

    def _open(self) -> tuple[IO[bytes], zipfile.ZipFile | None]:
        if self.key is None:
            return self.file.open("rb"), None
        zf = zipfile.ZipFile(self.file)
        return zf.open(self.key + ".npy"), zf

    def read_all(self) -> np.ndarray:
        """The whole array."""
        return next(self.iter_chunks(max(1, self.shape[0] if self.shape else 1)))

    def iter_chunks(self, rows: int) -> Iterator[np.ndarray]:
        """Yield consecutive slices of ``rows`` along axis 0 (a 0-d/1-sample array as one)."""
        fh, zf = self._open()
        try:
            _read_header(fh, self.where)
            if self.fortran_order or len(self.shape) == 0:  # rare: read whole, then slice
                size = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
                arr = np.frombuffer(_read_exact(fh, size, self.where), dtype=self.dtype)
                arr = arr.reshape(self.shape, order="F" if self.fortran_order else "C")
                if arr.ndim == 0:
                    yield arr.copy()
                    return
                for start in range(0, arr.shape[0], rows):
                    yield np.ascontiguousarray(arr[start : start + rows])
                return
            n = self.shape[0]
            row_items = int(np.prod(self.shape[1:], dtype=np.int64))
            row_bytes = row_items * self.dtype.itemsize
            for start in range(0, n, rows):
                count = min(rows, n - start)
                buf = _read_exact(fh, count * row_bytes, self.where)
                yield np.frombuffer(buf, dtype=self.dtype).reshape((count, *self.shape[1:])).copy()
        finally:
            fh.close()
            if zf is not None:
                zf.close()


def _read_exact(fh: IO[bytes], size: int, where: str) -> bytes:
    chunks = []
    remaining = size
    while remaining:
        b = fh.read(remaining)
        if not b:
            raise DataError(f"{where}: file is truncated")
        chunks.append(b)
        remaining -= len(b)
    return b"".join(chunks)


def _read_header(fh: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise DataError(f"{where}: not a valid .npy array ({exc})") from None
    if dtype.hasobject:
        raise DataError(f"{where}: holds Python objects (a pickled array); refused, onnxcompress never unpickles")
    return tuple(int(s) for s in shape), bool(fortran), np.dtype(dtype)


def scan_array_file(path: Path) -> dict[str | None, ArrayEntry]:
    """Read the headers of a ``.npy`` or ``.npz`` file (no data)."""
    if path.suffix.lower() == ".npy":
        try:
            with path.open("rb") as fh:
                shape, fortran, dtype = _read_header(fh, str(path))
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror})") from None
        return {None: ArrayEntry(path, None, shape, dtype, fortran)}
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a valid .npz file ({exc})") from None
    entries: dict[str | None, ArrayEntry] = {}
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[: -len(".npy")]
            try:
                with zf.open(info) as fh:
                    shape, fortran, dtype = _read_header(fh, f"{path}['{key}']")
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"{path}['{key}']: cannot read ({exc})") from None
            entries[key] = ArrayEntry(path, key, shape, dtype, fortran)
    if not entries:
        raise DataError(f"{path}: the .npz file holds no arrays")
    return entries


# ----------------------------------------------------------------------------- sources


class DataSource(abc.ABC):
    """A re-iterable source of batches for a model's inputs."""

    def __init__(self, specs: Sequence[InputSpec], batch_size: int = 8, limit: int | None = None) -> None:
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise DataError(f"sample limit must be at least 1, got {limit}")
        self.specs = list(specs)
        static = {s.static_batch for s in self.specs if s.static_batch is not None}
        if len(static) == 1:
            fixed = static.pop()
            if fixed != batch_size:
                log.info("model batch dimension is fixed at %d; using batch size %d", fixed, fixed)
            batch_size = fixed
        self.batch_size = batch_size
        self.limit = limit

    @property
    def num_samples(self) -> int | None:
        """Samples one pass yields, when known in advance (for progress bars)."""
        return None

    @abc.abstractmethod
    def _samples(self) -> Iterator[tuple[Batch, str]]:
        """Yield chunks ``({name: array with samples on axis 0}, where)``, unchecked."""

    def __iter__(self) -> Iterator[Batch]:
        if not self.specs:  # a model without inputs: one empty feed
            yield {}
            return
        pending: list[Batch] = []
        pending_n = 0
        pending_key: tuple[tuple[int, ...], ...] | None = None
        total = 0
        for chunk, where in self._samples():
            for spec in self.specs:
                chunk[spec.name] = check_array(spec, chunk[spec.name], where)
            n = next(iter(chunk.values())).shape[0]
            if self.limit is not None:
                if total >= self.limit:
                    break
                if total + n > self.limit:
                    chunk = {k: v[: self.limit - total] for k, v in chunk.items()}
                    n = self.limit - total
            total += n
            key = tuple(chunk[s.name].shape[1:] for s in self.specs)
            if pending and key != pending_key:  # dynamic dims changed: cannot stack
                yield from self._flush(pending)
                pending, pending_n = [], 0
            pending_key = key
            pending.append(chunk)
            pending_n += n
            if pending_n >= self.batch_size:
                merged = _concat(pending)
                full = (pending_n // self.batch_size) * self.batch_size
                for start in range(0, full, self.batch_size):
                    yield {k: v[start : start + self.batch_size] for k, v in merged.items()}
                rest = {k: v[full:] for k, v in merged.items()}
                pending_n -= full
                pending = [rest] if pending_n else []
        yield from self._flush(pending)

    def _flush(self, pending: list[Batch]) -> Iterator[Batch]:
        if not pending:
            return
        merged = _concat(pending)
        n = next(iter(merged.values())).shape[0]
        if n == 0:
            return
        fixed = any(s.static_batch is not None for s in self.specs)
        if fixed and n != self.batch_size:
            log.warning("dropping %d sample(s) that do not fill the model's fixed batch of %d", n, self.batch_size)
            return
        yield merged


def _concat(chunks: list[Batch]) -> Batch:
    if len(chunks) == 1:
        return chunks[0]
    return {k: np.concatenate([c[k] for c in chunks], axis=0) for k in chunks[0]}


class ArrayFilesSource(DataSource):
    """``.npy``/``.npz`` files (one file, or a folder of them), streamed."""

    def __init__(
        self,
        files: Sequence[Path],
        specs: Sequence[InputSpec],
        batch_size: int = 8,
        limit: int | None = None,
        nonfinite: Literal["error", "skip"] = "error",
    ) -> None:
        super().__init__(specs, batch_size, limit)
        self.nonfinite = nonfinite
        self.files = list(files)
        self._counts: list[int] = []
        self._plan = [self._match(f) for f in self.files]

    def _match(self, path: Path) -> dict[str, ArrayEntry]:
        entries = scan_array_file(path)
        names = [s.name for s in self.specs]
        if None in entries:  # a .npy file
            if len(self.specs) != 1:
                raise DataError(
                    f"{path}: a .npy file can only feed a single-input model; this model has inputs "
                    f"{', '.join(names)}: use a .npz with arrays named after them"
                )
            plan = {names[0]: entries[None]}
        elif all(n in entries for n in names):
            plan = {n: entries[n] for n in names}
        elif len(self.specs) == 1 and ("x" in entries or len(entries) == 1):
            plan = {names[0]: entries["x"] if "x" in entries else next(iter(entries.values()))}
        else:
            missing = [n for n in names if n not in entries]
            raise DataError(
                f"{path}: no array for input(s) {', '.join(repr(m) for m in missing)}; the file holds "
                f"{', '.join(repr(k) for k in entries)} (name arrays after the model's inputs"
                + (", or use 'x')" if len(names) == 1 else ")")
            )
        counts = set()
        seen: list[str] = []
        for name, entry in plan.items():
            spec = next(s for s in self.specs if s.name == name)
            if spec.batch_axis is not None and len(entry.shape) == spec.rank:
                seen.append(f"'{name}' {entry.shape[spec.batch_axis]} on axis {spec.batch_axis}")
            if spec.batch_axis is None:  # held constant: the array as the model takes it
                if len(entry.shape) != spec.rank:
                    raise DataError(
                        f"input '{name}' is held constant (no batch axis): expected rank {spec.rank} "
                        f"{spec.shape_str()}, found rank {len(entry.shape)} {list(entry.shape)} in {entry.where}"
                        + (" (give its batch axis with --batch-axis NAME=K)" if len(entry.shape) == spec.rank + 1 else ""))
            elif len(entry.shape) == spec.rank:
                counts.add(entry.shape[spec.batch_axis])
            elif len(entry.shape) == spec.rank - 1:
                counts.add(1)
            else:
                raise DataError(
                    f"input '{name}': expected rank {spec.rank} {spec.shape_str()} (or {spec.rank - 1} for a single "
                    f"sample), found rank {len(entry.shape)} {list(entry.shape)} in {entry.where}"
                )
        if len(counts) > 1:
            raise DataError(f"{path}: the inputs' batch axes hold different sample counts ({', '.join(seen)}); "
                            "where an input's samples lie along another axis, say so with --batch-axis NAME=K")
        self._counts.append(counts.pop() if counts else 1)
        return plan

    @property
    def num_samples(self) -> int | None:
        n = sum(self._counts)
        return n if self.limit is None else min(n, self.limit)

    def _samples(self) -> Iterator[tuple[Batch, str]]:
        rows = max(1, self.batch_size)
        for plan in self._plan:
            streams: dict[str, Iterator[np.ndarray]] = {}
            constants: dict[str, np.ndarray] = {}
            for name, entry in plan.items():
                spec = next(s for s in self.specs if s.name == name)
                if spec.batch_axis is None:
                    constants[name] = entry.read_all()
                elif len(entry.shape) == spec.rank - 1:  # one sample: add the batch axis
                    entry = dataclasses.replace(entry, note=" (read as one sample without a batch axis)")
                    plan = {**plan, name: entry}
                    streams[name] = iter([entry.read_all()[None, ...]])
                elif spec.batch_axis == 0:
                    streams[name] = entry.iter_chunks(rows)
                else:  # samples along another axis: read whole, then slice (a state tensor is small)
                    whole = np.moveaxis(entry.read_all(), spec.batch_axis, 0)
                    streams[name] = (np.ascontiguousarray(whole[i:i + rows]) for i in range(0, len(whole), rows))
            where = next(iter(plan.values())).where
            index = 0
            while True:
                parts = {name: next(it, None) for name, it in streams.items()}
                if any(v is None for v in parts.values()) or (not parts and index):
                    break
                chunk: Batch = {k: v for k, v in parts.items() if v is not None}
                n = next(iter(chunk.values())).shape[0] if chunk else 1
                for name, value in constants.items():
                    chunk[name] = np.repeat(value[None], n, axis=0)
                good = np.ones(n, dtype=bool)
                for name, arr in chunk.items():
                    good &= _finite_rows(name, arr, plan[name].where, index, self.nonfinite)
                if not good.all():
                    chunk = {k: v[good] for k, v in chunk.items()}
                if good.any():
                    yield chunk, where
                index += n


@dataclass(frozen=True)
class ImageOptions:
    """How images become a model input: resize, normalize, order channels, lay out.

    ``value = (pixel * scale - mean) / std`` per channel after resizing.
    """

    size: tuple[int, int] | None = None  # (height, width); default: the model input's static size
    resize: Literal["stretch", "letterbox", "crop"] = "stretch"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0
    channel_order: Literal["rgb", "bgr"] = "rgb"
    layout: Literal["nchw", "nhwc"] = "nchw"
    pad_value: float = 114.0


class ImageFolderSource(DataSource):
    """A folder of PNG/JPEG images, decoded one by one (needs the ``images`` extra)."""

    def __init__(
        self,
        files: Sequence[Path],
        specs: Sequence[InputSpec],
        options: ImageOptions,
        batch_size: int = 8,
        limit: int | None = None,
    ) -> None:
        super().__init__(specs, batch_size, limit)
        if len(self.specs) != 1:
            raise DataError(f"image folders can feed single-input models only; this model has {len(self.specs)} inputs")
        spec = self.specs[0]
        if spec.rank != 4:
            raise DataError(f"input '{spec.name}': image data needs a rank-4 input, the model has {spec.shape_str()}")
        try:
            import PIL.Image  # noqa: F401
        except ImportError:
            raise DataError("reading images needs Pillow: pip install 'onnxcompress[images]'") from None
        h_axis, w_axis, c_axis = (2, 3, 1) if options.layout == "nchw" else (1, 2, 3)
        size = options.size
        if size is None:
            h, w = spec.shape[h_axis], spec.shape[w_axis]
            if not (isinstance(h, int) and isinstance(w, int)):
                raise DataError(
                    f"input '{spec.name}' has dynamic height/width {spec.shape_str()}: give the image size (--image-size HxW)"
                )
            size = (h, w)
        channels = spec.shape[c_axis]
        if isinstance(channels, int) and channels not in (1, 3):
            raise DataError(f"input '{spec.name}': images give 1 or 3 channels, the model wants {channels}")
        self.channels = channels if isinstance(channels, int) else 3
        self.size = size
        self.options = options
        self.files = list(files)

    @property
    def num_samples(self) -> int | None:
        return len(self.files) if self.limit is None else min(len(self.files), self.limit)

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        o = self.options
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                h, w = self.size
                if o.resize == "stretch":
                    im = im.resize((w, h), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32)
                elif o.resize == "crop":  # short side to the target, centre crop
                    s = max(h / im.height, w / im.width)
                    im = im.resize((max(w, round(im.width * s)), max(h, round(im.height * s))), Image.BILINEAR)
                    left, top = (im.width - w) // 2, (im.height - h) // 2
                    arr = np.asarray(im.crop((left, top, left + w, top + h)), dtype=np.float32)
                else:  # letterbox, top-left, pad value
                    s = min(h / im.height, w / im.width)
                    nw, nh = max(1, round(im.width * s)), max(1, round(im.height * s))
                    im = im.resize((nw, nh), Image.BILINEAR)
                    shape = (h, w) if self.channels == 1 else (h, w, 3)
                    arr = np.full(shape, o.pad_value, dtype=np.float32)
                    arr[:nh, :nw] = np.asarray(im, dtype=np.float32)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read image ({exc})") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.channels == 3 and o.channel_order == "bgr":
            arr = arr[:, :, ::-1]
        c = arr.shape[2]
        mean = np.asarray(o.mean[:c], dtype=np.float32)
        std = np.asarray(o.std[:c], dtype=np.float32)
        arr = (arr * np.float32(o.scale) - mean) / std
        if o.layout == "nchw":
            arr = arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr[None], dtype=np.float32)

    def _samples(self) -> Iterator[tuple[Batch, str]]:
        name = self.specs[0].name
        for path in self.files:
            yield {name: self._load(path)}, str(path)


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


def _internal(specs: Sequence[InputSpec], chunk: Batch, where: str) -> Batch:
    """A batch in the model's layout (as a user hands it over) with its samples on axis 0."""
    by_name = {sp.name: sp for sp in specs}
    counts = {arr.shape[sp.batch_axis] for k, arr in chunk.items()
              if (sp := by_name[k]).batch_axis is not None and arr.ndim == sp.rank}
    if len(counts) > 1:
        raise DataError(f"{where}: inputs hold different sample counts {sorted(counts)} on their batch axes")
    n = counts.pop() if counts else 1
    out = {}
    for k, arr in chunk.items():
        sp = by_name[k]
        if sp.batch_axis is not None and arr.ndim != sp.rank:
            raise DataError(f"input '{k}': expected rank {sp.rank} {sp.shape_str()}, found rank {arr.ndim} "
                            f"{list(arr.shape)} in {where}")
        out[k] = to_internal(sp, arr, n)
    return out


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
        n = next(iter(batch.values())).shape[0] if batch else 1
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

