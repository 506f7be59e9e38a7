"""The rewrites onnxcompress applies, one module (or package) per pass."""

from __future__ import annotations

from .canonicalize import Canonicalize
from .fuse import Fuse

__all__ = ["Canonicalize", "Fuse"]
