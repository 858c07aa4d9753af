"""Heatmap overlays a clinician can read: the image at its own resolution, heat blended in, a caption and a
colour bar."""

from __future__ import annotations

import cv2
import numpy as np

COLORMAP = cv2.COLORMAP_TURBO  # jet's hue order (blue = low, red = high) without its false bands


def colorize(heat: np.ndarray) -> np.ndarray:
    """``(H, W)`` values in [0, 1] -> RGB uint8 colours."""
    u8 = np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8)
    return cv2.applyColorMap(u8, COLORMAP)[..., ::-1].copy()


def blend(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Heat blended on the image, opacity growing with the heat (``alpha`` at the peak) so that cold regions keep
    the original pixels. Returns a new array of the image's shape."""
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"heatmap {heat.shape} and image {rgb.shape[:2]} differ in size")
    a = (alpha * np.clip(heat, 0, 1))[..., None].astype(np.float32)
    out = rgb.astype(np.float32) * (1 - a) + colorize(heat).astype(np.float32) * a
    return np.round(out).astype(np.uint8)


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float, color: tuple[int, int, int]) -> None:
    thick = max(1, round(scale * 2))
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)


def _fit_scale(text: str, width: int, scale: float) -> float:
    (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, max(1, round(scale * 2)))
    return scale * min(1.0, (width - 8) / max(tw, 1))


def colour_bar(height: int, width: int, scale: float) -> np.ndarray:
    """A vertical colour bar, 1.0 at the top, with tick labels."""
    panel = np.full((height, width, 3), 255, np.uint8)
    pad = max(6, height // 40)
    bar_w = max(8, width // 4)
    x0 = max(4, width // 8)
    vals = np.linspace(1, 0, max(height - 2 * pad, 2))[:, None].repeat(bar_w, axis=1)
    panel[pad:height - pad, x0:x0 + bar_w] = colorize(vals)
    cv2.rectangle(panel, (x0, pad), (x0 + bar_w - 1, height - pad - 1), (0, 0, 0), 1)
    s = _fit_scale("0.5", width - x0 - bar_w, scale)
    for v in (1.0, 0.5, 0.0):
        y = int(pad + (1 - v) * (height - 2 * pad - 1))
        cv2.line(panel, (x0 + bar_w, y), (x0 + bar_w + 4, y), (0, 0, 0), 1)
        _text(panel, f"{v:.1f}", (x0 + bar_w + 6, min(max(y + int(8 * s), int(14 * s)), height - 2)), s, (0, 0, 0))
    return panel


def render_overlay(rgb: np.ndarray, heat: np.ndarray, caption: str = "", bbox: list[int] | None = None,
                   alpha: float = 0.6) -> np.ndarray:
    """The blended image at the original resolution, a caption strip above it and a colour bar to its right.

    Args:
        bbox: [x0, y0, x1, y1] of the hottest region, outlined in white when given.
    """
    h, w = rgb.shape[:2]
    img = blend(rgb, heat, alpha)
    if bbox is not None:
        t = max(1, round(min(h, w) / 300))
        cv2.rectangle(img, (bbox[0], bbox[1]), (max(bbox[0], bbox[2] - 1), max(bbox[1], bbox[3] - 1)), (255, 255, 255),
                      t)
    scale = max(0.35, min(h, w) / 700)
    bar_w = max(48, round(90 * scale))
    strip_h = round(34 * scale) + 6 if caption else 0
    out = np.full((h + strip_h, w + bar_w, 3), 255, np.uint8)
    out[strip_h:, :w] = img
    out[strip_h:, w:] = colour_bar(h, bar_w, scale)
    if caption:
        s = _fit_scale(caption, w + bar_w, scale * 0.9)
        _text(out, caption, (6, strip_h - max(4, round(10 * scale))), s, (0, 0, 0))
    return out
