"""Loading and saving ONNX models safely.

* :func:`load_model` reads a ``.onnx`` file, refuses anything that is not a model
  (random bytes, truncated protobufs, other protobuf messages, unsupported opsets) and
  resolves external tensor data itself, refusing locations that are absolute or that
  resolve (symbolic links followed) outside the model's folder.
* :func:`save_model` writes atomically: everything goes to a temporary folder next to
  the target and is renamed into place only once complete, so a failed run leaves no
  partial output. Tensor data moves to a ``<name>.data`` file when the serialized model
  would pass protobuf's 2 GB limit, or when asked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from .errors import ExternalDataError, ModelLoadError, ModelSaveError

log = logging.getLogger(__name__)

#: Default-domain opsets onnxcompress accepts (onnxruntime runs 7 and up).
MIN_OPSET = 7
MAX_OPSET = onnx.defs.onnx_opset_version()

#: Protobuf cannot serialize a message of 2 GiB or more; stay clear of it.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = int(1.8 * 2**30)


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Yield ``graph`` and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Yield every TensorProto that can hold data: initializers, sparse initializers,
    and tensor-valued node attributes, in the main graph and all subgraphs."""
    for graph in iter_graphs(model.graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices


def node_attr(node: onnx.NodeProto, name: str, default: object = None) -> Any:
    """The value of a node attribute (bytes decoded to str), or ``default``."""
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the tensors ``names`` (each once, after
    the outputs it already has; a name that is one of them is not added again), for
    reading intermediate tensors from an onnxruntime session."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in have)
    return m


def default_opset(model: onnx.ModelProto) -> int | None:
    """The model's default-domain (``ai.onnx``) opset version, or None if absent."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def _check_model_structure(model: onnx.ModelProto, path: Path) -> None:
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise ModelLoadError(f"{path}: not an ONNX model (the protobuf has no graph or IR version)")
    if not model.opset_import:
        raise ModelLoadError(f"{path}: not an ONNX model (no opset_import)")
    opset = default_opset(model)
    if opset is None:
        raise ModelLoadError(f"{path}: the model imports no default-domain (ai.onnx) opset")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelLoadError(
            f"{path}: unsupported opset {opset} (onnxcompress supports ai.onnx opsets "
            f"{MIN_OPSET} to {MAX_OPSET})"
        )
    if len(model.graph.output) == 0:
        raise ModelLoadError(f"{path}: the graph has no outputs")


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def resolve_external_location(base_dir: Path, location: str, tensor_name: str) -> Path:
    """Return the real path of an external-data file, refusing anything outside ``base_dir``.

    Absolute paths, drive letters, ``..`` escapes and symbolic links that leave the
    model's folder are all refused: a crafted model must not read arbitrary files.
    """
    where = f"tensor '{tensor_name}'"
    if not location:
        raise ExternalDataError(f"{where}: external data has no location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (
        len(location) > 1 and location[1] == ":"
    ):
        raise ExternalDataError(f"{where}: external data location '{location}' is absolute; refused")
    root = base_dir.resolve()
    target = (root / location).resolve()
    if target != root and root not in target.parents:
        raise ExternalDataError(
            f"{where}: external data location '{location}' resolves outside the model's "
            f"folder {root}; refused"
        )
    if not target.is_file():
        raise ExternalDataError(f"{where}: external data file '{location}' not found in {root}")
    return target


def load_external_data(model: onnx.ModelProto, base_dir: Path) -> int:
    """Read every external tensor's bytes into the model (in place); return the count."""
    count = 0
    for tensor in iter_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _external_info(tensor)
        path = resolve_external_location(base_dir, info.get("location", ""), tensor.name)
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError as exc:
            raise ExternalDataError(f"tensor '{tensor.name}': bad external data offset/length ({exc})") from None
        size = path.stat().st_size
        if offset < 0 or offset > size or (length is not None and (length < 0 or offset + length > size)):
            raise ExternalDataError(
                f"tensor '{tensor.name}': external data range offset={offset} length={length} "
                f"lies outside '{info['location']}' ({size} bytes)"
            )
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read() if length is None else fh.read(length)
        tensor.raw_data = data
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        count += 1
    return count


def check_tensor_sizes(model: onnx.ModelProto) -> None:
    """Refuse tensors whose data does not match their dtype and shape."""
    for t in iter_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type in (0, onnx.TensorProto.STRING):
            continue
        if any(d < 0 for d in t.dims):
            raise ModelLoadError(f"tensor '{t.name}': negative dimension in shape {list(t.dims)}")
        count = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        if t.HasField("raw_data"):
            try:
                itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            except (KeyError, TypeError, ValueError):
                raise ModelLoadError(f"tensor '{t.name}': unknown data type {t.data_type}") from None
            if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
                expected = (count + 1) // 2
            else:
                expected = count * itemsize
            if len(t.raw_data) != expected:
                raise ModelLoadError(
                    f"tensor '{t.name}': holds {len(t.raw_data)} bytes of data, but its shape {list(t.dims)} of "
                    f"{onnx.TensorProto.DataType.Name(t.data_type)} needs {expected}"
                )


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or raise :class:`ModelLoadError`."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a folder, not an ONNX file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{p}: cannot read ({exc.strerror})") from None
    if not data:
        raise ModelLoadError(f"{p}: empty file, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"{p}: not an ONNX file or truncated protobuf ({type(exc).__name__}: {exc})"
        ) from None
    _check_model_structure(model, p)
    try:
        n = load_external_data(model, p.parent)
    except ExternalDataError as exc:
        raise ExternalDataError(f"{p}: {exc}") from None
    if n:
        log.info("loaded %d external tensors for %s", n, p)
    try:
        check_tensor_sizes(model)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{p}: {exc}") from None
    return model


def content_digest(model: onnx.ModelProto, arrays: Iterable[Mapping[str, np.ndarray]] = (), *extra: object) -> str:
    """A digest of ``model`` (its graph, initializers included), the named ``arrays`` (the
    samples, and any other data a result depends on) and ``extra`` (by ``repr``): the key
    under which a pass may reuse what it measured on the same model and data. The graph is hashed piece by piece (subgraphs with
    their nodes), so a model past protobuf's 2 GB limit has one too."""
    h = hashlib.sha1()
    g = model.graph
    for part in (*model.opset_import, *g.input, *g.output, *g.node, *g.initializer, *g.sparse_initializer):
        h.update(part.SerializeToString())
    for named in arrays:
        for k in sorted(named):
            h.update(k.encode())
            h.update(np.ascontiguousarray(named[k]).tobytes())
    h.update(repr(extra).encode())
    return h.hexdigest()


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Approximate bytes of tensor data held in the model (raw and typed fields)."""
    total = 0
    for t in iter_tensors(model):
        total += len(t.raw_data)
        total += 4 * (len(t.float_data) + len(t.int32_data))
        total += 8 * (len(t.int64_data) + len(t.double_data) + len(t.uint64_data))
        total += sum(len(s) for s in t.string_data)
    return total


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def _write_with_external_data(model: onnx.ModelProto, model_path: Path, data_name: str, min_size: int) -> None:
    """Serialize ``model`` to ``model_path`` with tensors of ``min_size`` bytes or more in
    ``model_path.parent / data_name``. The in-memory model is restored afterwards."""
    moved: list[tuple[onnx.TensorProto, bytes]] = []
    data_path = model_path.parent / data_name
    try:
        with data_path.open("wb") as fh:
            for tensor in iter_tensors(model):
                if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
                    continue
                raw = tensor.raw_data
                if len(raw) < min_size:
                    continue
                offset = fh.tell()
                pad = (-offset) % 4096  # page-aligned so onnxruntime can mmap
                fh.write(b"\0" * pad)
                offset += pad
                fh.write(raw)
                moved.append((tensor, raw))
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
            fh.flush()
            os.fsync(fh.fileno())
        _write_bytes(model_path, model.SerializeToString())
    finally:
        for tensor, raw in moved:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = raw


def _write_bytes(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    min_external_size: int = 1024,
) -> list[Path]:
    """Atomically write ``model`` to ``path``; return the files written.

    ``external_data=None`` decides automatically (external when the tensors exceed
    ~1.8 GB, below protobuf's 2 GB limit); ``True`` forces ``<name>.data`` beside the
    model for tensors of ``min_external_size`` bytes or more.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise ModelSaveError(f"{target}: output folder {folder} does not exist")
    if target.is_dir():
        raise ModelSaveError(f"{target}: is a folder")
    use_external = external_data if external_data is not None else tensor_bytes(model) > EXTERNAL_THRESHOLD
    data_name = target.name + ".data"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise ModelSaveError(f"{target}: cannot write in {folder} ({exc.strerror})") from None
    try:
        tmp_model = tmp / target.name
        if use_external:
            _write_with_external_data(model, tmp_model, data_name, min_external_size)
        else:
            try:
                blob = model.SerializeToString()
            except ValueError as exc:  # protobuf: message too large
                raise ModelSaveError(f"{target}: model too large to serialize ({exc}); use external data") from None
            _write_bytes(tmp_model, blob)
        written = [target]
        if use_external:
            os.replace(tmp / data_name, folder / data_name)
            written.append(folder / data_name)
        os.replace(tmp_model, target)
        return written
    except OSError as exc:
        raise ModelSaveError(f"{target}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def serialized_size(model: onnx.ModelProto) -> int:
    """Bytes the model takes on disk (tensor data included). Over protobuf's 2 GB limit
    ``ByteSize`` fails (EncodeError): then tensor bytes plus the size of every other part
    of the graph, which is what a save with external data writes."""
    from google.protobuf.message import EncodeError

    try:
        return model.ByteSize()
    except (ValueError, RuntimeError, EncodeError):
        g = model.graph
        parts = list(g.node) + list(g.input) + list(g.output) + list(g.value_info)
        return tensor_bytes(model) + sum(p.ByteSize() for p in parts)
