"""Training on CUDA: the GPU run computes what the CPU run computes, and mixed precision trains a model that loads and
predicts on a CPU-only machine. These need a CUDA GPU and are skipped without one (CI has none); they were run on a
GPU machine as ``pytest tests/train/test_cuda.py`` (docs/DEVELOPERS.md, "Training on a GPU")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from leukoscope.config import make_config
from leukoscope.train.trainer import train, training_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Real cells: ALL-IDB2 crops and C-NMC cells cut out on black (those exercise crop: cutout and the cam_mask loss).
BASE = {"name": "cuda-check", "datasets": ("all_idb2", "cnmc2019"), "epochs": 3, "aug_views": 1, "patience": 10,
        "batch_size": 16, "crop": "cutout", "cam_mask": 1.0, "seed": 0}


def test_asking_for_cuda_without_a_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        training_device("cuda")
    assert training_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="Unknown device 'gpu'"):
        training_device("gpu")


def test_ddp_backend_follows_the_training_device(monkeypatch):
    from leukoscope.train.distributed import backend_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert backend_for("cpu") == "gloo"  # two CPU processes on a GPU machine: gloo, the GPU untouched
    with pytest.raises(ValueError, match="--nproc_per_node=1"):
        backend_for("auto")  # two processes, one GPU: a clear error instead of NCCL's duplicate-GPU failure
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert backend_for("cuda") == "nccl"


@needs_cuda
def test_float32_cuda_run_follows_the_cpu_run(tmp_path, monkeypatch):
    """Same config, seed and cached stem features: CUDA in float32 must reproduce the CPU run's losses up to
    floating-point order, so the device moves (weights, class weights, masks, batches) are all right. Without dropout
    (CUDA draws its masks from another generator) and without TF32 (cuDNN's default on Ampere and later)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = {**BASE, "dropout": 0.0}
    cpu = train(make_config({**cfg, "device": "cpu"}), tmp_path / "cpu", progress=False)
    gpu = train(make_config({**cfg, "device": "cuda", "amp": False}), tmp_path / "gpu", progress=False)
    lc, lg = (np.array([h["train_loss"] for h in r.history]) for r in (cpu, gpu))
    vc, vg = (np.array([h["val_loss"] for h in r.history]) for r in (cpu, gpu))
    print("train loss cpu", lc, "cuda", lg, "val loss cpu", vc, "cuda", vg)
    assert len(lc) == len(lg)
    np.testing.assert_allclose(lg[0], lc[0], rtol=1e-3)  # the first epoch starts from identical weights
    # then float order drifts a little (measured on an H200: at most 2e-4 relative over 3 epochs)
    np.testing.assert_allclose(lg, lc, rtol=5e-3)
    np.testing.assert_allclose(vg, vc, rtol=5e-3)
    info = json.loads((tmp_path / "gpu" / "model.json").read_text())
    assert info["trained_on"]["device"] == "cuda" and info["trained_on"]["amp"] is False
    assert json.loads((tmp_path / "cpu" / "model.json").read_text())["trained_on"]["device"] == "cpu"


@needs_cuda
def test_mixed_precision_run_trains_and_its_model_predicts_on_cpu(tmp_path, data_root):
    from leukoscope.models import load_model

    res = train(make_config({**BASE, "device": "cuda", "amp": True, "epochs": 4}), tmp_path / "amp", progress=False)
    hist = res.history
    print("amp history", hist)
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in hist)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert all(np.isfinite(h["cam_outside"]) for h in hist)  # the cam_mask loss ran under autocast
    info = json.loads((tmp_path / "amp" / "model.json").read_text())
    assert info["trained_on"]["device"] == "cuda" and info["trained_on"]["amp"] is True
    assert info["trained_on"]["gpu"] == torch.cuda.get_device_name(0)
    weights = load_file(str(tmp_path / "amp" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())  # no half weights saved
    assert "Trained on CUDA (" in (tmp_path / "amp" / "MODEL_CARD.md").read_text()

    # the model directory loads on a CPU and answers for its held-out images
    model = load_model(tmp_path / "amp", backend="torch")
    test = json.loads((tmp_path / "amp" / "split.json").read_text())["parts"]["test"]
    ok, probs, failed = model.predict_paths([data_root / p for p in test])
    assert len(ok) == len(test) and not failed
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert next(model.module.parameters()).device.type == "cpu"
