"""Test-time flips: the mean logits of an image's 4 flips, the same answer for an image and its flips."""

from __future__ import annotations

import csv

import numpy as np

from leukoscope.cli import main as cli_main
from leukoscope.data.datasets import load_dataset
from leukoscope.data.images import read_image
from leukoscope.models import load_model


def _cells(n: int = 4) -> list:
    s = load_dataset("all_idb2").samples
    return [s[i].path for i in np.linspace(0, len(s) - 1, n).astype(int)]


def test_tta_logits_are_the_mean_over_the_four_flips(tiny_model_dir):
    plain = load_model(tiny_model_dir, backend="torch")
    tta = load_model(tiny_model_dir, backend="torch", tta=True)
    x = plain.prepare_batch([read_image(p) for p in _cells()])
    views = [x, x[..., ::-1], x[..., ::-1, :], x[..., ::-1, ::-1]]
    want = np.mean([plain.logits(np.ascontiguousarray(v)) for v in views], axis=0)
    np.testing.assert_allclose(tta.logits(x), want, rtol=1e-5, atol=1e-5)
    assert tta.engine == "torch+tta" and plain.engine == "torch"


def test_tta_answers_the_same_for_an_image_and_its_mirror(tiny_model_dir):
    rgb = [read_image(p) for p in _cells()]
    mirrored = [np.ascontiguousarray(im[:, ::-1]) for im in rgb]
    plain = load_model(tiny_model_dir)
    tta = load_model(tiny_model_dir, tta=True)
    assert not np.allclose(plain.predict_arrays(rgb), plain.predict_arrays(mirrored), atol=1e-4)  # not invariant
    np.testing.assert_allclose(tta.predict_arrays(rgb), tta.predict_arrays(mirrored), atol=1e-4)


def test_predict_cli_tta(tiny_model_dir, tmp_path):
    paths = _cells()
    out = tmp_path / "p.csv"
    assert cli_main(["predict", *map(str, paths), "--model", str(tiny_model_dir), "--tta", "--output", str(out),
                     "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    _, want, _ = load_model(tiny_model_dir, tta=True).predict_paths(paths)
    got = np.array([[float(r["p_healthy"]), float(r["p_leukemic"])] for r in rows])
    np.testing.assert_allclose(got, want, atol=1e-5)
    _, plain, _ = load_model(tiny_model_dir).predict_paths(paths)
    assert not np.allclose(got, plain, atol=1e-4)
