"""Black surrounds of segmented cells: the cell's mask, and a smear-like background in their place."""

from __future__ import annotations

import cv2
import numpy as np

from leukoscope.preprocess.background import foreground_mask, replace_background
from leukoscope.preprocess.transforms import Augment


def _cell_on_black(size: int = 96) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    cv2.circle(img, (size // 2, size // 2), size // 4, (150, 90, 160), -1)
    return img


def test_replace_background_keeps_the_cell_and_lightens_the_surround():
    img = _cell_on_black()
    out = replace_background(img, np.random.default_rng(0))
    inner = np.zeros(img.shape[:2], np.uint8)
    cv2.circle(inner, (48, 48), 20, 1, -1)  # away from the soft edge
    assert np.array_equal(out[inner.astype(bool)], img[inner.astype(bool)])
    assert out[:10, :10].min() > 150  # the black corner is now a light background
    assert not np.array_equal(out, replace_background(img, np.random.default_rng(1)))  # random per call


def test_replace_background_leaves_a_cell_in_its_smear_alone():
    img = _cell_on_black()
    img[img.max(axis=2) == 0] = (230, 200, 215)
    assert foreground_mask(img) is None
    assert np.array_equal(replace_background(img, np.random.default_rng(0)), img)


def test_augment_background_draws_nothing_when_off_and_keeps_the_view_on_request():
    img = _cell_on_black()
    off = Augment()
    assert np.array_equal(off(img, np.random.default_rng(3)), off(img, np.random.default_rng(3)))
    # colour jitter off: its contrast step depends on the image mean, which the background changes
    on = Augment(background=1.0, brightness=0, contrast=0, saturation=0, hue=0, stain_jitter=0)
    replaced = on(img, np.random.default_rng(3))
    kept = on(img, np.random.default_rng(3), keep_background=True)
    assert kept[:5, :5].max() < 40 and replaced[:5, :5].min() > 100  # black kept / replaced in the corner
    mask = foreground_mask(kept, border_share=0.5)
    assert mask is not None  # the same geometry: the cell is where the replaced view has it
    cell = mask & (cv2.erode(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0)
    assert np.abs(kept[cell].astype(int) - replaced[cell].astype(int)).max() <= 2
