"""Passes, their options, and the pipeline that runs them.

A pass is a class with a ``name``, a frozen dataclass ``Options`` (typed fields with
defaults and help text: no option dicts read with ``get``), and a ``run`` that takes a
model and a :class:`PassContext` and returns a :class:`PassResult` (the new model,
whether it changed, and per-pass statistics). A :class:`Pipeline` runs passes in order,
times them, records a :class:`PassReport` per pass, and names the pass in any error.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import time
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx

from .errors import OnnxCompressError, OptionError, PassError
from .progress import NullProgress, Progress

if typing.TYPE_CHECKING:
    from .data import DataSource

log = logging.getLogger(__name__)


@dataclass
class PassContext:
    """What a pass may use besides the model: calibration data, provider, seed, progress."""

    calibration: DataSource | None = None
    provider: str = "cpu"
    seed: int = 0
    progress: Progress = field(default_factory=NullProgress)
    #: what a pass may keep for its next run with this context, keyed by content it checks
    #: itself (the search runs int8 twice on the same model: its statistics are reused)
    cache: dict[str, Any] = field(default_factory=dict)

    def calibration_sample(self) -> dict[str, np.ndarray] | None:
        """The first calibration batch in the model's layout (None without calibration
        data): what a shape probe feeds, so that a scalar such as a sample rate has a
        value the model accepts, where zeros may take another branch of an If."""
        if self.calibration is None:
            return None
        from .data import first_batch, to_model_layout

        axes = {sp.name: sp.batch_axis for sp in getattr(self.calibration, "specs", [])}
        return to_model_layout(axes, first_batch(self.calibration))


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) model, whether it changed, statistics for
    the report, and ``outcome``: a typed result (a frozen dataclass the pass defines) for
    callers that act on it, such as the search; stats are for reading, not for code."""

    model: onnx.ModelProto
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    outcome: Any = None


@dataclass
class PassReport:
    """One pipeline step as recorded in the report."""

    name: str
    options: dict[str, Any]
    modified: bool
    stats: dict[str, Any]
    seconds: float
    outcome: Any = field(default=None, repr=False)  #: the pass's typed result (not in the JSON report)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) if f.name != "options" else dict(self.options)
                for f in dataclasses.fields(self) if f.name != "outcome"}


@dataclass(frozen=True)
class NoOptions:
    """A pass without options."""


class Pass(abc.ABC):
    """Base class of every pass. Subclasses set ``name``, ``summary`` and ``Options``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    #: True when the rewrite computes the same function (validated with tight tolerances).
    exact: ClassVar[bool] = True
    #: For exact passes: the largest output change, relative to the output's range, that
    #: validation allows (float rounding).
    rel_range: ClassVar[float] = 1e-4

    def __init__(self, options: Any | None = None) -> None:
        if options is None:
            options = self.Options()
        elif not isinstance(options, self.Options):
            raise OptionError(f"pass '{self.name}': options must be {self.Options.__name__}, got {type(options).__name__}")
        check = getattr(options, "check", None)  # the one validation point of an options class
        if callable(check):
            try:
                check()
            except ValueError as exc:
                raise OptionError(f"pass '{self.name}': {exc}") from None
        self.options = options

    def check_context(self, ctx: PassContext) -> None:
        """Raise :class:`OptionError` where the pass cannot run with ``ctx`` (e.g. it needs
        calibration data); the pipeline asks every pass before it runs the first."""

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "Pass":
        """Build the pass from ``{option: value}``; values may be strings (CLI) or typed (TOML)."""
        return cls(parse_options(cls.name, cls.Options, raw))

    @abc.abstractmethod
    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Rewrite ``model``; may modify it in place and must return it in the result."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


# ----------------------------------------------------------------------------- options


#: the namespace of experimental options in pipeline specs: ``int8:experimental.refit=true``
EXPERIMENTAL = "experimental."


@dataclass(frozen=True)
class OptionInfo:
    name: str
    type_name: str
    default: Any
    help: str
    experimental: bool = False


def describe_options(options_cls: type) -> list[OptionInfo]:
    hints = typing.get_type_hints(options_cls)
    out = []
    for f in dataclasses.fields(options_cls):
        out.append(OptionInfo(option_key(f), _type_name(hints[f.name]), f.default, str(f.metadata.get("help", "")),
                              is_experimental(f)))
    return out


def is_experimental(f: dataclasses.Field) -> bool:  # type: ignore[type-arg]
    """Research toggles and tuning knobs (``metadata['experimental']``): hidden from
    ``onnxcompress passes`` without ``--all``, named ``experimental.NAME`` in specs, and
    without any promise that they stay."""
    return bool(f.metadata.get("experimental", False))


def option_key(f: dataclasses.Field) -> str:  # type: ignore[type-arg]
    """The user-facing name of an option field: ``metadata['key']`` ('global' for
    ``global_``) or the field name, under ``experimental.`` for an experimental one."""
    key = str(f.metadata.get("key", f.name))
    return EXPERIMENTAL + key if is_experimental(f) else key


def _flatten_experimental(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A TOML table ``[passes.experimental]`` (``{"experimental": {...}}``) as dotted keys."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == EXPERIMENTAL.rstrip(".") and isinstance(value, Mapping):
            out.update({EXPERIMENTAL + str(k): v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(value: Any, where: str) -> bool:
    """``value`` as a boolean (true/false, yes/no, on/off, 1/0); anything else is an
    :class:`OptionError` naming ``where``. The one boolean parser of options and tolerances."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise OptionError(f"{where}: {value!r} is not a boolean (true/false)")


def _convert(pass_name: str, key: str, tp: Any, value: Any) -> Any:
    where = f"pass '{pass_name}', option '{key}'"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", ""))):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(pass_name, key, a, value)
            except OptionError as exc:
                errors.append(str(exc))
        raise OptionError(f"{where}: {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices or (isinstance(value, str) and value in [str(c) for c in choices]):
            return next(c for c in choices if c == value or str(c) == value)
        raise OptionError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    if tp is bool:
        return parse_bool(value, where)
    if tp is int:
        if isinstance(value, bool):
            raise OptionError(f"{where}: {value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise OptionError(f"{where}: {value!r} is not an integer")
    if tp is float:
        if isinstance(value, bool):
            raise OptionError(f"{where}: {value!r} is not a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise OptionError(f"{where}: {value!r} is not a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise OptionError(f"{where}: {value!r} is not a string")
    raise OptionError(f"{where}: unsupported option type {tp!r}")  # a bug in the pass definition


def parse_options(pass_name: str, options_cls: type, raw: Mapping[str, Any]) -> Any:
    """Check ``raw`` against the dataclass ``options_cls`` and build it.

    Unknown keys are refused with the list of valid ones; values are converted to the
    declared field types (strings from the command line, typed values from TOML).
    """
    hints = typing.get_type_hints(options_cls)
    fields = {option_key(f): f for f in dataclasses.fields(options_cls)}
    values: dict[str, Any] = {}
    for key, value in _flatten_experimental(raw).items():
        if key not in fields:
            if EXPERIMENTAL + key in fields:
                raise OptionError(f"pass '{pass_name}': option '{key}' is experimental: write {EXPERIMENTAL}{key}={value}")
            valid = ", ".join(sorted(k for k in fields if not k.startswith(EXPERIMENTAL))) or "(this pass takes no options)"
            hidden = sum(k.startswith(EXPERIMENTAL) for k in fields)
            more = f" (and {hidden} experimental ones: onnxcompress passes --all)" if hidden else ""
            raise OptionError(f"pass '{pass_name}': unknown option '{key}'; valid options: {valid}{more}")
        name = fields[key].name
        values[name] = _convert(pass_name, key, hints[name], value)
    try:
        return options_cls(**values)  # checked where the pass is made (Pass.__init__)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"pass '{pass_name}': {exc}") from None


# ----------------------------------------------------------------------------- pipeline


class Pipeline:
    """An ordered list of passes; ``run`` applies them and reports per pass."""

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    @property
    def exact(self) -> bool:
        """True when every pass computes the same function as its input."""
        return all(p.exact for p in self.passes)

    @property
    def rel_range(self) -> float:
        """The rounding tolerance of the exact passes (the largest of theirs)."""
        return max((p.rel_range for p in self.passes if p.exact), default=1e-4)

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> tuple[onnx.ModelProto, list[PassReport]]:
        ctx = ctx or PassContext()
        for p in self.passes:  # every pass can run here, before the first one does
            p.check_context(ctx)
        reports: list[PassReport] = []
        for p in self.passes:
            start = time.perf_counter()
            log.info("running pass %s", p.name)
            try:
                result = p.run(model, ctx)
            except PassError:
                raise
            except OnnxCompressError as exc:
                err = PassError(p.name, str(exc))
                err.exit_code = exc.exit_code
                raise err from exc
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # a bug in the pass: say which pass, keep the cause
                raise PassError(p.name, f"internal error: {type(exc).__name__}: {exc}") from exc
            model = result.model
            reports.append(
                PassReport(
                    name=p.name,
                    options=dataclasses.asdict(p.options),
                    modified=result.modified,
                    stats=result.stats,
                    seconds=time.perf_counter() - start,
                    outcome=result.outcome,
                )
            )
        return model, reports

    def __repr__(self) -> str:
        return f"Pipeline({self.passes!r})"
