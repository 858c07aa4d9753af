"""Deletion / insertion AUC on a score whose answer is known."""

from __future__ import annotations

import numpy as np

from leukoscope.explain.faithfulness import deletion_insertion, random_map


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
