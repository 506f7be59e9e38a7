"""Error hierarchy of onnxcompress.

Every mistake a user can make (a missing file, a file that is not an ONNX model, bad
calibration data, an unknown pass or option, a missing execution provider) raises an
:class:`OnnxCompressError` whose message is one line naming the file, node, tensor or
option at fault. The CLI turns it into that line on stderr and ``exit_code`` (2 unless
a subclass says otherwise), without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations


class OnnxCompressError(Exception):
    """A problem the user can fix; one line, exit code 2."""

    exit_code: int = 2


class ModelLoadError(OnnxCompressError):
    """The model file is missing, unreadable, not ONNX, or not supported."""


class ExternalDataError(ModelLoadError):
    """External tensor data is missing, malformed, or points outside the model's folder."""


class ModelSaveError(OnnxCompressError):
    """The output cannot be written (same path as the input, unwritable folder, ...)."""


class DataError(OnnxCompressError):
    """Calibration or validation data does not fit the model or cannot be read."""


class OptionError(OnnxCompressError):
    """Unknown pass, unknown option, or an option value of the wrong type."""


class ProviderError(OnnxCompressError):
    """The requested onnxruntime execution provider is not available."""


class RuntimeModelError(OnnxCompressError):
    """onnxruntime refused to load or run a model."""


class PassError(OnnxCompressError):
    """A pass failed; the message names the pass."""

    def __init__(self, pass_name: str, message: str) -> None:
        prefix = f"pass '{pass_name}': "
        super().__init__(message if message.startswith(prefix) else prefix + message)
        self.pass_name = pass_name


class ValidationFailed(OnnxCompressError):
    """The optimized model's outputs differ from the original beyond the thresholds."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """SIGINT (exit 130) or SIGTERM (exit 143). A ``KeyboardInterrupt`` so that no
    ``except Exception`` in library code can swallow it; cleanup runs in ``finally``."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        super().__init__(f"interrupted by {signal_name}; no output was written")
        self.exit_code = exit_code
