"""The one image preprocessing of campe: any PIL image (or decoded video frame) -> the model's RGB input, and the
policy for images that cannot be decoded.

    from campe.data.imageprep import preprocess_image, decode_image, ImageDecodeError, SkipCounter
    x = preprocess_image(pil_image, size=224)     # uint8 torch [3, 224, 224]: what model.encode_image takes
    x = preprocess_image(frame_hwc_uint8, 224)    # a video frame (RGB array [H, W, 3]), same resize and border
    x = decode_image(jpeg_bytes)                  # open + preprocess_image (size None: keep the size);
                                                  # undecodable bytes -> ImageDecodeError (callers name shard + key)

Training (shard images), caching (checks each image decodes), evaluation (image files, video frames) and any later
inference all call preprocess_image, so a photo gives the same pixels whichever way it enters the model.

Colour conversion (to 8-bit RGB):
- 16-bit grey ("I;16", "I;16B", "I;16L", "I;16N", and "I", which is how Pillow presents 16-bit PNG/TIFF/PGM data;
  "I" values are clipped to 0..65535 first) is rescaled to 8 bits, v -> round(v / 257) (65535 -> 255, and an 8-bit
  image stored as 16 bits, v8 * 257, comes back exactly). Pillow's own convert("RGB") clips such images at 255
  instead, which turns a photo almost white. 16-bit RGB(A) files Pillow already reads as 8-bit (high byte).
- Alpha ("RGBA", "LA", "PA", premultiplied "RGBa"/"La", and "P"/"RGB" with a transparency entry) is matted on
  white, with img2dataset's own formula and rounding (`alpha / 255 * rgb + 255 - alpha`, np.rint), so a
  transparent PNG evaluated directly equals the same PNG after `campe download`. A grey PNG's transparency entry
  is ignored, as OpenCV (so img2dataset) ignores it.
- Everything else goes through Pillow's convert("RGB"): palette "P", 1-bit "1" (0 / 255), "L", "CMYK"
  (R = (255 - C)(255 - K) / 255), "YCbCr", "HSV"; "F" is taken as 0..255. A mode Pillow cannot convert is an
  ImageDecodeError.
- EXIF orientation and ICC profiles are not applied: img2dataset (OpenCV, IMREAD_UNCHANGED) applies neither, and
  the training images are what it wrote.

Size: `size=None` keeps the image as it is (shards are already at the download size); otherwise img2dataset's
`resize_mode: border`, step for step (albumentations LongestMaxSize + PadIfNeeded in img2dataset 1.47): the longer
side is scaled to `size` (the shorter to max(1, round(side * size / longer))) with OpenCV INTER_AREA when shrinking
and INTER_LANCZOS4 when enlarging, then centred on a white `size` x `size` canvas (the odd pixel of padding goes to
the bottom / right). An image already `size` x `size` is not resampled.

Undecodable images: the stages skip them with a warning (UndecodableImageWarning) naming the shard or file and the
key, count them, and stop with TooManySkipsError once they pass `max_skip_fraction` of the samples (the same key in
the `cache`, `train` and `evaluate` sections, default 0.01). SkipCounter does this for one stage run.
"""
from __future__ import annotations

import io
import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

BORDER = 255  # img2dataset's border colour and alpha matte: white
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
TRANSPARENT_KEY_MODES = ("P", "RGB")  # a PNG/GIF transparency entry that OpenCV (so img2dataset) applies
DEFAULT_MAX_SKIP_FRACTION = 0.01
SHOWN_SKIPS = 10  # skips warned one by one (and named in errors / metrics); the rest are counted


class ImageDecodeError(ValueError):
    """Bytes or a file that do not decode to an image (or to one that can be converted to RGB)."""


class UndecodableImageWarning(UserWarning):
    """A sample was skipped because its image (or video) cannot be decoded (the message names where it is)."""


class TooManySkipsError(ValueError):
    """More samples were undecodable than `max_skip_fraction` allows."""


@dataclass(frozen=True)
class SkippedSample:
    """One skipped sample: `where` (a shard path, an annotation file or set) and its `key` there, and why."""
    where: str
    key: str
    reason: str

    @property
    def id(self) -> str:
        return f"{self.where}:{self.key}"


# ------------------------------------------------------------------------------------------------- preprocessing

def to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL image -> uint8 RGB [H, W, 3] (the conversions of the module docstring)."""
    mode = im.mode
    if mode in ALPHA_MODES or (mode in TRANSPARENT_KEY_MODES and "transparency" in im.info):
        rgba = np.array(im.convert("RGBA"))
        alpha = rgba[..., 3:]
        # img2dataset's alpha matting (resizer.py), expression and rounding as written there.
        out = alpha / 255 * rgba[..., :3] + 255 - alpha
        return np.rint(out.clip(min=0, max=255)).astype(np.uint8)
    if mode == "RGB":
        return np.array(im)
    if mode in SIXTEEN_BIT_MODES:
        v = np.array(im)
        if mode == "I":
            v = np.clip(v, 0, 65535)
        grey = ((v.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257), exact in integers
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(im.convert("RGB"))


def letterbox(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3] exactly as img2dataset's resize_mode "border" (module docstring)."""
    h, w = rgb.shape[:2]
    if (h, w) == (size, size):
        return rgb
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        import cv2  # only when resizing: the happy path (images at the model's size) never imports it

        interpolation = cv2.INTER_AREA if max(h, w) > size else cv2.INTER_LANCZOS4
        rgb = cv2.resize(np.ascontiguousarray(rgb), (nw, nh), interpolation=interpolation)
    out = np.full((size, size, 3), BORDER, dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = rgb
    return out


def preprocess_image(image: Image.Image | np.ndarray, size: int | None = None) -> torch.Tensor:
    """A PIL image (any mode) or an RGB uint8 array [H, W, 3] (a video frame) -> uint8 tensor [3, S, S] for the
    model (S = size; size None keeps H x W)."""
    if isinstance(image, Image.Image):
        rgb = to_rgb(image)
    else:
        rgb = np.asarray(image)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected a PIL image or an RGB uint8 array [H, W, 3], got {rgb.dtype} "
                             f"{list(rgb.shape)}")
    if size is not None:
        rgb = letterbox(rgb, size)
    if not rgb.flags.writeable:
        rgb = rgb.copy()
    return torch.from_numpy(rgb).permute(2, 0, 1)


def decode_image(source: bytes | str | Path, size: int | None = None) -> torch.Tensor:
    """Encoded image bytes or an image file -> preprocess_image(...). Anything that keeps it from decoding
    (unknown format, truncated or garbage data, a mode with no RGB conversion) is an ImageDecodeError with the
    decoder's reason; a file that cannot be opened at all (missing, no permission) stays an OSError."""
    f = open(source, "rb") if isinstance(source, (str, Path)) else io.BytesIO(source)
    with f:
        try:
            with Image.open(f) as im:
                return preprocess_image(im, size)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - decoders raise many types (OSError, SyntaxError, ValueError, ...)
            raise ImageDecodeError(f"{type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------------------- skip policy

def check_skip_fraction(skipped: int, total: int, max_fraction: float, what: str, first: Iterable[str],
                        param: str) -> None:
    """TooManySkipsError when `skipped` undecodable samples are more than max_fraction of `total`; the message
    names the first few of `first` (ids "where:key", in the order found)."""
    if skipped > max_fraction * total:
        named = list(itertools.islice(first, SHOWN_SKIPS))
        shown = ", ".join(named) + (", ..." if skipped > len(named) else "")
        raise TooManySkipsError(
            f"{what}: {skipped} of {total} samples could not be decoded ({skipped / max(total, 1):.2%}), more than "
            f"{param}={max_fraction} allows; first: {shown}. Re-download or remove them, or raise {param}")


class SkipCounter:
    """Skips of one stage run: each `skip(where, key, reason)` warns (the first SHOWN_SKIPS one by one), is counted,
    and raises TooManySkipsError once the count passes max_fraction of `total` (the samples the run reads)."""

    def __init__(self, what: str, total: int, max_fraction: float, param: str):
        self.what, self.total, self.max_fraction, self.param = what, total, max_fraction, param
        self.count = 0
        self.first: list[str] = []

    def add_known(self, ids: Sequence[str]) -> None:
        """Skips found by an earlier run (already warned about then): counted, not warned again."""
        self.count += len(ids)
        self.first.extend(ids[:max(0, SHOWN_SKIPS - len(self.first))])
        self.check()

    def skip(self, where: str, key: str, reason: str) -> None:
        """One more skipped sample: `key` of `where` (a shard, a set), `reason` e.g. "undecodable image (...)"."""
        self.count += 1
        if len(self.first) < SHOWN_SKIPS:
            self.first.append(f"{where}:{key}")
            more = "" if len(self.first) < SHOWN_SKIPS else " (further skips are counted, not shown)"
            warnings.warn(f"{self.what}: skipping {key} of {where}: {reason}{more}", UndecodableImageWarning,
                          stacklevel=2)
        self.check()

    def check(self) -> None:
        check_skip_fraction(self.count, self.total, self.max_fraction, self.what, self.first, self.param)

    def record(self) -> dict:
        """{"count", "first"}: what the stage writes into its metrics."""
        return {"count": self.count, "first": list(self.first)}


def validate_max_skip_fraction(value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"max_skip_fraction must be in [0, 1], got {value}")
