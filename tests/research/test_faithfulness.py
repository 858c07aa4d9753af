"""Deletion / insertion AUC and ROAD on a score whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from leukoscope.research.faithfulness import deletion_insertion, random_map, road


def _score(batch: np.ndarray) -> np.ndarray:
    # the "class probability" is the mean brightness of the top-left 16 x 16 block
    return batch[:, :16, :16].astype(np.float64).mean(axis=(1, 2, 3)) / 255.0


def test_right_map_beats_inverted_and_random_maps():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:16, :16] = 255  # a bright block on black: blurring it (insertion's start) dims the block
    right = np.zeros((64, 64), np.float32)
    right[:16, :16] = 1.0
    good = deletion_insertion(_score, img, right, steps=16)
    bad = deletion_insertion(_score, img, 1.0 - right, steps=16)
    rnd = deletion_insertion(_score, img, random_map(64, seed=1), steps=16)
    # deleting the 256 block pixels first (1/16 of the image) zeroes the score after the first step
    np.testing.assert_allclose(good["deletion"], 0.5 * (1 / 16), rtol=1e-6)
    assert good["deletion_curve"][0] == 1.0 and good["deletion_curve"][1] == 0.0
    # the inverted map deletes the block last: the score stays 1 for 15 of the 16 steps
    np.testing.assert_allclose(bad["deletion"], 15 / 16 + 0.5 / 16, rtol=1e-6)
    assert good["deletion"] < rnd["deletion"] < bad["deletion"]
    assert good["insertion"] > rnd["insertion"] > bad["insertion"]
    s0 = good["insertion_curve"][0]  # the blurred image's score
    assert 0.2 < s0 < 0.9 and good["insertion_curve"][1] == 1.0
    np.testing.assert_allclose(good["insertion"], (s0 + 1) / 2 / 16 + 15 / 16, rtol=1e-6)
    assert len(good["insertion_curve"]) == 17


def test_random_map_is_smooth_and_seeded():
    a, b = random_map(64, seed=0), random_map(64, seed=0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (64, 64) and 0 <= a.min() and a.max() <= 1
    assert np.abs(np.diff(a, axis=0)).max() < 0.15  # bilinear from 7 x 7: no pixel-level noise


def _texture_score(batch: np.ndarray) -> np.ndarray:
    # the "class probability" is the contrast (std) of the top-left 16 x 16 block: imputation from the neighbours
    # smooths a removed patch, so removing that block's pixels lowers it, removing others leaves it
    return batch[:, :16, :16].astype(np.float64).std(axis=(1, 2, 3)) / 128.0


def test_road_ranks_the_right_map_first():
    rng = np.random.default_rng(0)
    img = np.full((48, 48, 3), 128, np.uint8)
    img[:16, :16] = rng.integers(0, 256, (16, 16, 3))  # a textured block on grey
    right = np.zeros((48, 48), np.float32)
    right[:16, :16] = 1.0
    good = road(_texture_score, img, right, percentiles=(10, 50))
    bad = road(_texture_score, img, 1.0 - right, percentiles=(10, 50))
    rnd = road(_texture_score, img, random_map(48, seed=1), percentiles=(10, 50))
    s0 = _texture_score(img[None])[0]
    # removing the most relevant 10% (230 of the block's 256 pixels) leaves 26 textured pixels in a smooth patch
    assert good["morf_curve"][0] < 0.6 * s0
    # the inverted map removes grey pixels first: the block is untouched at 10% and 50%
    np.testing.assert_allclose(bad["morf_curve"], s0, rtol=1e-6)
    assert good["morf"] < rnd["morf"] < bad["morf"]
    assert good["lerf"] > rnd["lerf"] > bad["lerf"]
    assert good["combined"] > rnd["combined"] > bad["combined"]
    assert good["percentiles"] == [10, 50] and len(good["lerf_curve"]) == 2


def test_road_rejects_a_map_of_another_size():
    with pytest.raises(ValueError, match="differ in size"):
        road(_texture_score, np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4), np.float32))
