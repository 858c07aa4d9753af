"""Reading microscope images robustly: every format and mode to 8-bit RGB, with errors that name the file."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from leukoscope.errors import ImageReadError

T = TypeVar("T")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# A whole smear field is ~5 Mpx; a stitched tile may be far larger, but 100 Mpx RGB is already 300 MB decoded.
MAX_PIXELS = int(os.environ.get("LEUKOSCOPE_MAX_PIXELS", 100_000_000))

# Pillow's own decompression-bomb limit stays on; truncated files must fail, never half-decode.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_image(source: str | Path | bytes, name: str | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Read an image as an ``(H, W, 3)`` uint8 RGB array.

    Handles PNG, JPEG, TIFF (8/16-bit, multi-page: first page), BMP; grayscale, palette, RGBA, CMYK;
    EXIF orientation.

    Args:
        source: a path, or the raw bytes of an uploaded file.
        name: how to refer to ``source`` in errors when it is bytes.
        max_pixels: refuse images with more pixels than this (default ``LEUKOSCOPE_MAX_PIXELS`` or 100 M).

    Raises:
        ImageReadError: naming the file and the reason.
    """
    label = str(source) if not isinstance(source, bytes) else (name or "<upload>")
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        if not path.exists():
            raise ImageReadError(label, "file does not exist")
        if path.is_dir():
            raise ImageReadError(label, "is a directory, not an image file")
        data = path.read_bytes()
    if len(data) == 0:
        raise ImageReadError(label, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below is clearer
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > limit:
                raise ImageReadError(label, f"image is {w}x{h} = {w * h:,} pixels, above the limit of {limit:,}")
            if w == 0 or h == 0:
                raise ImageReadError(label, f"image has zero size {w}x{h}")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            if img.format == "TIFF" and _is_high_bit_depth(img):
                return _read_tiff_high_bit(data, label)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img, label)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(label, f"refused as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(label, "not a recognised image format (PNG, JPEG, TIFF or BMP expected)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower() or "premature" in reason.lower():
            reason = f"file is truncated or corrupt ({reason})"
        elif isinstance(exc, OSError) and not reason.startswith("file"):
            # A TIFF mode Pillow cannot decode (e.g. 48-bit RGB) may still be readable with tifffile.
            if data[:4] in (b"II*\x00", b"MM\x00*"):
                return _read_tiff_high_bit(data, label)
            reason = f"corrupt image data ({reason})"
        raise ImageReadError(label, reason) from exc


def _is_high_bit_depth(img: Image.Image) -> bool:
    return img.mode.startswith("I;16") or img.mode in ("I", "F") or ";16" in img.mode


def _read_tiff_high_bit(data: bytes, label: str) -> np.ndarray:
    try:
        import tifffile
    except ImportError as exc:  # pragma: no cover - tifffile comes with scikit-image
        raise ImageReadError(label, "16-bit TIFF needs the 'tifffile' package") from exc
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            arr = tif.pages[0].asarray()
    except Exception as exc:
        raise ImageReadError(label, f"corrupt TIFF ({exc})") from exc
    return _array_to_rgb8(np.asarray(arr), label)


def _array_to_rgb8(arr: np.ndarray, label: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar TIFF
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if np.issubdtype(arr.dtype, np.floating) and arr.max() <= 1.0 and arr.min() >= 0.0:
            arr = arr * 255.0
        else:
            hi = arr.max()
            bits = 16 if hi > 255 else 8
            arr = arr / (2**bits - 1) * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageReadError(label, f"image must be RGB or grayscale, got array of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _to_rgb(img: Image.Image, label: str) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite on white: transparent background in a smear crop is slide glass, not black.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"), dtype=np.uint8).copy()
    if mode in ("L", "P", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    if _is_high_bit_depth(img):
        return _array_to_rgb8(np.asarray(img), label)
    raise ImageReadError(label, f"image must be RGB or grayscale, got mode {mode!r}")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter): the one batching loop of inference and
    evaluation (``LoadedModel.predict_paths``, ``predict.predict_files``, ``evaluate.run.model_logits``,
    ``models.ood.embed_images``)."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def read_readable(items: Iterable[T], failures: list[tuple[str, str]], path: Callable[[T], str | Path] = Path,
                  ) -> Iterator[tuple[T, np.ndarray]]:
    """``(item, RGB image)`` for every item whose image reads; each one that does not is appended to ``failures`` as
    ``(path, reason)`` and skipped (the one loop that training, evaluation and fitting read their images with).

    Args:
        items: paths, or anything ``path`` turns into one (e.g. ``lambda s: s.path`` for dataset samples).
    """
    for item in items:
        p = path(item)
        try:
            rgb = read_image(p)
        except ImageReadError as exc:
            failures.append((str(p), exc.reason))
            continue
        yield item, rgb
