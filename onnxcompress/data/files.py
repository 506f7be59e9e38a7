"""``.npy``/``.npz`` files and folders of them, read as a stream of samples: only one
batch plus one file's header is in memory, compressed or not; nothing is unpickled."""

from __future__ import annotations

import dataclasses
import logging
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np

from ..errors import DataError
from .source import DataSource
from .specs import Batch, InputSpec, _finite_rows, batch_count

log = logging.getLogger(__name__)

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
                n = batch_count(chunk)
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
