"""``Preprocess(crop="cutout")``: a cell cut out onto black is cropped to the square around it, and maps go back."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from leukoscope.preprocess.background import cutout_frame, is_cutout_view
from leukoscope.preprocess.transforms import Augment, Preprocess, crop_square
from leukoscope.train.stem_cache import stem_key


def _cell_on_black(h: int = 120, w: int = 160, centre: tuple[int, int] = (100, 50), r: int = 20) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    cv2.circle(img, centre, r, (150, 90, 160), -1)  # centre is (x, y)
    return img


def test_cutout_frame_is_the_square_around_the_cell():
    y0, x0, side = cutout_frame(_cell_on_black())
    # the disk spans x 80..120 and y 30..70 (41 px); 2 % margin per side -> 43 px, centred on it
    assert side == 43
    assert (y0, x0) == (29, 79)
    smear = _cell_on_black()
    smear[smear.max(axis=2) == 0] = (230, 200, 215)
    assert cutout_frame(smear) is None  # not a cut-out cell: the whole image is used


def test_crop_square_pads_with_black_past_the_image():
    img = np.full((10, 10, 3), 200, np.uint8)
    out = crop_square(img, -2, 5, 6)
    assert out.shape == (6, 6, 3)
    assert (out[:2] == 0).all() and (out[2:, :5] == 200).all() and (out[2:, 5:] == 0).all()


def test_prepare_crops_cut_out_cells_and_leaves_other_images_whole():
    img = _cell_on_black()
    whole, cropped = Preprocess(size=64), Preprocess(size=64, crop="cutout")
    # the cell fills the cropped input (most of it, bar the black corners) and little of the whole one
    assert (cropped.prepare(img).max(axis=2) > 30).mean() > 0.65  # a disk fills pi / 4 / 1.04^2 = 0.73 of its square
    assert (whole.prepare(img).max(axis=2) > 30).mean() < 0.1
    smear = _cell_on_black()
    smear[smear.max(axis=2) == 0] = (230, 200, 215)
    assert np.array_equal(cropped.prepare(smear), whole.prepare(smear))


def test_to_image_puts_a_map_back_where_the_crop_came_from():
    img = _cell_on_black()
    pre = Preprocess(size=64, crop="cutout")
    heat = pre.to_image(np.ones((64, 64), np.float32), img)
    assert heat.shape == img.shape[:2]
    y0, x0, side = pre.frame(img)
    assert heat[y0:y0 + side, x0:x0 + side].min() == 1.0
    assert heat.sum() == side * side  # zero everywhere the network did not see
    # without a crop it is a plain resize
    assert Preprocess(size=64).to_image(np.ones((64, 64), np.float32), img).min() == 1.0


def test_unknown_crop_is_refused_and_old_model_dicts_still_load():
    with pytest.raises(ValueError, match="Unknown crop"):
        Preprocess(crop="centre")
    d = Preprocess().to_dict()
    assert "crop" not in d  # old model directories and stem-cache keys are unchanged by the option
    assert Preprocess.from_dict(d).crop == "none"
    assert Preprocess.from_dict(Preprocess(crop="cutout").to_dict()).crop == "cutout"


def test_cutout_fill_rotates_over_black_without_mirror_images_of_the_cell():
    pre = Preprocess(size=96, crop="cutout")
    view = pre.prepare(_cell_on_black())
    assert is_cutout_view(view)
    plain = dict(brightness=0, contrast=0, saturation=0, hue=0, stain_jitter=0, flip=False, scale=(1.0, 1.0))
    # seed 4 draws 39.9 degrees for both; near 45 degrees a square's corners come from furthest outside
    black = Augment(rotate=45.0, **plain, cutout_fill=True)(view, np.random.default_rng(4))
    mirror = Augment(rotate=45.0, **plain)(view, np.random.default_rng(4))
    corners = np.zeros(view.shape[:2], bool)
    corners[:12, :12] = corners[:12, -12:] = corners[-12:, :12] = corners[-12:, -12:] = True
    assert black[corners].max() < 30  # black corners
    assert mirror[corners].max() > 100  # reflection copies bits of the cell there
    # the option is part of the stem-cache key, though not of the repr old keys were made from
    assert repr(Augment(cutout_fill=True)) == repr(Augment())
    spec = {"backbone": "efficientnet_lite0", "trainable_stages": 1}
    assert stem_key(spec, "w", pre, Augment(cutout_fill=True), 0) != stem_key(spec, "w", pre, Augment(), 0)
