"""onnxcompress: compress trained ONNX models and prove the result against the original.

Public API::

    import onnxcompress as oc
    model, report = oc.optimize("in.onnx", "canonicalize", calibration="calib.npz", output="out.onnx")
    assert report.validation.passed

    # the default pipeline: search prune, lowrank and int8 within an accuracy budget
    model, report = oc.optimize("in.onnx", calibration="calib.npz", search=oc.SearchOptions(max_drop=0.01))
"""

from __future__ import annotations

from .api import inspect_model, measure, optimize, save, validate_models
from .data import DataSource, ImageOptions, InputSpec, open_data
from .errors import OnnxCompressError, OptionError
from .model import load_model, save_model
from .passes import Canonicalize, Fuse
from .pipeline import Pass, PassContext, PassReport, PassResult, Pipeline
from .registry import REGISTRY, build_pipeline
from .report import ModelSummary, OptimizeReport
from .search import SearchOptions, SearchReport, Trial
from .validate import Thresholds, ValidationReport

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "Canonicalize",
    "DataSource",
    "Fuse",
    "ImageOptions",
    "InputSpec",
    "ModelSummary",
    "OnnxCompressError",
    "OptionError",
    "OptimizeReport",
    "Pass",
    "PassContext",
    "PassReport",
    "PassResult",
    "Pipeline",
    "SearchOptions",
    "SearchReport",
    "Thresholds",
    "Trial",
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
