"""Out-of-distribution scores: the detectors themselves, the model directory's detector, and the flag wherever a
prediction appears."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest

from leukoscope.models.ood import OOD_FILE, OOD_METHODS, OODDetector, fit_detector, load_detector


def _blobs(rng: np.random.Generator, n: int, d: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    means = np.full((2, d), 2.0)  # away from the origin, as pooled activations are
    means[1, 0] = 6.0
    f = means[y] + rng.normal(0, 1, (n, d))
    z = np.stack([4.0 - f[:, 0], f[:, 0] - 4.0], 1)  # logits that follow the class direction
    return f, z, y


@pytest.mark.parametrize("method", OOD_METHODS)
def test_threshold_keeps_the_asked_share_of_validation(method):
    rng = np.random.default_rng(0)
    f, z, y = _blobs(rng, 2000)
    fv, zv, _ = _blobs(rng, 1000)
    det = fit_detector(method, (f, z, y), (fv, zv), keep=0.9)
    assert det.flag(det.score(fv, zv)).mean() == pytest.approx(0.1, abs=0.005)
    ft, zt, _ = _blobs(rng, 2000)  # new draws of the same distribution: about the same share
    assert 0.06 < det.flag(det.score(ft, zt)).mean() < 0.14


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_embedding_methods_flag_far_points(method):
    rng = np.random.default_rng(1)
    f, z, y = _blobs(rng, 1500)
    fv, zv, _ = _blobs(rng, 500)
    det = fit_detector(method, (f, z, y), (fv, zv))
    far = 2.0 + rng.normal(0, 1, (200, f.shape[1]))
    far[:, 5] += 12.0  # off in a direction no class uses
    assert det.flag(det.score(far, np.zeros((200, 2)))).mean() > 0.95


def test_energy_and_msp_need_no_embeddings_and_rank_by_logits():
    det_e = fit_detector("energy", (np.zeros((4, 1)), np.zeros((4, 2)), np.zeros(4, int)),
                         (None, np.array([[0.0, 5.0], [5.0, 0.0]])))
    s = det_e.score(None, np.array([[0.0, 10.0], [0.1, 0.0]]))
    assert s[0] < s[1]  # a confident logit is less unusual
    with pytest.raises(ValueError, match="embeddings"):
        OODDetector("mahalanobis", 0.0, {}, {}).score(None, np.zeros((1, 2)))


def test_save_load_round_trip_and_weights_check(tmp_path, caplog):
    rng = np.random.default_rng(2)
    f, z, y = _blobs(rng, 600)
    det = fit_detector("mahalanobis", (f, z, y), (f[:200], z[:200]), meta={"weights_sha256": "a" * 64})
    det.save(tmp_path / OOD_FILE)
    back = load_detector(tmp_path, "a" * 64)
    assert back is not None and back.method == "mahalanobis" and back.threshold == pytest.approx(det.threshold)
    # float16 storage: scores move by far less than their spread
    assert np.abs(back.score(f, z) - det.score(f, z)).max() < 0.01 * det.score(f, z).std()
    with caplog.at_level(logging.WARNING):
        assert load_detector(tmp_path, "b" * 64) is None  # fitted for other weights: no flags, said in the log
    assert "other weights" in caplog.text
    assert load_detector(tmp_path / "missing", "a" * 64) is None


def test_logits_and_features_agree_with_logits(tiny_model_dir):
    from leukoscope.models import load_model

    for backend in ("torch", "onnx"):
        m = load_model(tiny_model_dir, backend=backend)
        x = np.random.default_rng(0).normal(0, 1, (3, 3, m.input_size, m.input_size)).astype(np.float32)
        z, f = m.logits_and_features(x)
        assert f.shape == (3, 1280)
        assert np.allclose(z, m.logits(x), atol=1e-3)


def test_training_writes_a_detector_that_flags_non_blood(tiny_model_dir, data_root):
    """The tiny model's detector (written by training) keeps most of its own test images and flags noise and a page
    of text; the flag reaches predict's CSV, the Python API and the model card."""
    import skimage.data

    from leukoscope.evaluate.run import model_parts
    from leukoscope.models import load_model
    from leukoscope.predict import predict, predict_files, write_csv

    assert (tiny_model_dir / OOD_FILE).exists()
    m = load_model(tiny_model_dir)
    assert m.ood is not None and m.ood.meta["weights_sha256"] == m.info["weights_sha256"]
    assert "## When not to trust an answer" in (tiny_model_dir / "MODEL_CARD.md").read_text()
    rng = np.random.default_rng(0)
    odd = [np.repeat(skimage.data.text()[..., None], 3, 2), rng.integers(0, 256, (200, 200, 3), dtype=np.uint8),
           skimage.data.coffee(), skimage.data.astronaut()]
    flags = [predict(im, m).ood for im in odd]
    assert sum(flags) >= 3, flags
    again = predict(odd[0], m)  # called twice: same answer
    assert again.ood == flags[0]

    test = [s.path for s in model_parts(m)["test"].samples]
    preds, failed = predict_files(m, test)
    assert not failed and all(p.ood is not None and p.ood_score is not None for p in preds)
    assert np.mean([p.ood for p in preds]) <= 0.25  # the test part looks like training (threshold keeps 95 % of val)
    out = tiny_model_dir / "preds.csv"
    write_csv(preds, m.classes, out)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[-3:] == ["ood", "ood_score", "warnings"]
    assert {r["ood"] for r in rows} <= {"true", "false"}
    assert json.dumps(preds[0].to_dict())  # JSON-ready
