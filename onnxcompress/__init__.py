"""onnxcompress: compress trained ONNX models and prove the result against the original.

Public API::

    import onnxcompress as oc
    model, report = oc.optimize("in.onnx", "canonicalize", calibration="calib.npz", output="out.onnx")
    assert report.validation.passed
"""

from __future__ import annotations

from .api import inspect_model, measure, optimize, save, validate_models
from .data import DataSource, ImageOptions, InputSpec, open_data
from .errors import OnnxCompressError
from .model import load_model, save_model
from .passes import Canonicalize
from .pipeline import Pass, PassContext, PassReport, PassResult, Pipeline
from .registry import REGISTRY, build_pipeline
from .report import ModelSummary, OptimizeReport
from .validate import Thresholds, ValidationReport

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "Canonicalize",
    "DataSource",
    "ImageOptions",
    "InputSpec",
    "ModelSummary",
    "OnnxCompressError",
    "OptimizeReport",
    "Pass",
    "PassContext",
    "PassReport",
    "PassResult",
    "Pipeline",
    "Thresholds",
    "ValidationReport",
    "build_pipeline",
    "inspect_model",
    "load_model",
    "measure",
    "open_data",
    "optimize",
    "save",
    "save_model",
    "validate_models",
]
