"""Image alterations that imitate what goes wrong at a microscope: defocus, exposure, stain colour, magnification.

Used to check that a model's quality warnings and out-of-distribution flag notice them (tests and
``benchmarks/quality_checks.py``). Each takes and returns an ``(H, W, 3)`` uint8 RGB image of the same size.
"""

from __future__ import annotations

import cv2
import numpy as np


def blur(img: np.ndarray, sigma256: float) -> np.ndarray:
    """Gaussian defocus; ``sigma256`` is the standard deviation in pixels of a 256-pixel image (scaled with size)."""
    return cv2.GaussianBlur(img, (0, 0), sigma256 * max(img.shape[:2]) / 256)


def gain(img: np.ndarray, g: float) -> np.ndarray:
    """Exposure: every channel times ``g`` (below 1 darker, above 1 brighter, clipped at white)."""
    return np.clip(img.astype(np.float32) * g, 0, 255).astype(np.uint8)


def swap(img: np.ndarray, order: tuple[int, int, int]) -> np.ndarray:
    """Channels reordered, e.g. ``(2, 1, 0)``: a BGR image read as RGB."""
    return np.ascontiguousarray(img[..., list(order)])


def hue(img: np.ndarray, degrees: float) -> np.ndarray:
    """Hue rotated by ``degrees``: another stain's colour."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + round(degrees / 360 * 256)) % 256
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB_FULL)


def zoom_in(img: np.ndarray, z: float) -> np.ndarray:
    """The centre ``1/z`` of the image enlarged to its size: a ``z`` times higher magnification."""
    h, w = img.shape[:2]
    ch, cw = round(h / z), round(w / z)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return cv2.resize(img[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
