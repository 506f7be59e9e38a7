"""Input signatures: each input's batch axis (inferred from the model's symbolic
dimensions, or set by the user), the internal samples-first layout, and the checks every
batch passes against the model's inputs (see the package docstring)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from ..errors import DataError

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


def batch_count(batch: Batch) -> int:
    """How many samples a batch (internal layout: samples on axis 0) holds."""
    return next(iter(batch.values())).shape[0] if batch else 1


Dim = int | str | None


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
