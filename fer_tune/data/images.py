"""Reading an image file the way every part of fer-tune does: PIL, any mode converted to RGB uint8.

A grayscale face becomes three equal channels; a photo's EXIF rotation is applied only when asked
(camera photos in `predict` and `data faces`), and a face box in a dataset row crops the image.
An unreadable file raises `BadImage`, which callers collect (and may skip) rather than stop on.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
"""File extensions (case-insensitive) read as images by the folder-scanning sources."""

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
"""Files `predict` reads as videos (case-insensitive)."""

READ_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF", "PPM")
"""The formats PIL may decode, whatever a file's name says: a file is sniffed by its content, and
formats such as EPS would run an external program (Ghostscript) to decode."""


class BadImage(Exception):
    """An image file that cannot be read: missing, unreadable, truncated or not an image.

    Not a `UserError`: the data pipeline collects these (and may skip them) instead of stopping.
    Picklable, so it survives DataLoader worker processes.
    """

    def __init__(self, path: Any, reason: str):
        super().__init__(str(path), str(reason))
        self.path = str(path)
        self.reason = str(reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def is_video(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("._")


def row_value(row, key: str, default: Any = None) -> Any:
    try:
        return row[key]
    except (KeyError, TypeError, IndexError):
        return getattr(row, key, default)


def read_rgb(path: Path, upright: bool = False) -> np.ndarray:
    """RGB uint8 (H, W, 3); `upright` applies a photo's EXIF orientation (for camera photos)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path, formats=READ_FORMATS) as im:
            im.load()
            rgb = as_rgb(ImageOps.exif_transpose(im) if upright else im)
    except FileNotFoundError:
        raise BadImage(path, "file not found") from None
    except UnidentifiedImageError:
        raise BadImage(path, "not an image (unknown format)") from None
    except Image.DecompressionBombError as err:
        raise BadImage(path, f"image too large: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise BadImage(path, f"unreadable or truncated image: {err}") from None
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or array.size == 0:
        raise BadImage(path, f"unexpected image shape {array.shape}")
    return np.ascontiguousarray(array)


def as_rgb(im):
    """Any PIL mode as 8-bit RGB. 16- and 32-bit grayscale are scaled to 0-255 (PIL's own
    conversion clips them, turning most of a 16-bit face white); transparency is dropped."""
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # "I": how PIL opens 16-bit PNGs and TIFFs
        gray = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.clip(gray / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "F":  # floating-point TIFF: 0-1 by convention
        gray = np.nan_to_num(np.asarray(im, dtype=np.float64))
        return Image.fromarray(np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def crop_face_box(image: np.ndarray, row, path: Path) -> np.ndarray:
    box = []
    for key in ("face_x", "face_y", "face_w", "face_h"):
        value = row_value(row, key, None)
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        box.append(value)
    if any(math.isnan(v) for v in box):
        return image
    x, y, w, h = box
    height, width = image.shape[:2]
    x0 = max(0, int(math.floor(x)))
    y0 = max(0, int(math.floor(y)))
    x1 = min(width, int(math.ceil(x + w)))
    y1 = min(height, int(math.ceil(y + h)))
    if x1 <= x0 or y1 <= y0:
        raise BadImage(path, f"face box {tuple(box)} lies outside the {width}x{height} image")
    return np.ascontiguousarray(image[y0:y1, x0:x1])


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted; hidden files and folders are skipped."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        found += [Path(parent) / f for f in sorted(files)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return found


def pil_format(path: Path) -> str:
    """The PIL format name for a file name's extension (PNG when unknown)."""
    suffix = path.suffix.lower()
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}.get(suffix, "PNG")
