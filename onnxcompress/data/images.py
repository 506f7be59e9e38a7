"""Folders of images (PNG, JPEG, ...), resized, scaled and laid out as the model
expects (needs Pillow: ``pip install "onnxcompress[images]"``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import DataError
from .source import DataSource
from .specs import Batch, InputSpec

log = logging.getLogger(__name__)

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
