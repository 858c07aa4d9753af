"""Full fine-tuning: on-device augmentation and a short real run that trains every layer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from leukoscope.config import for_device, make_config
from leukoscope.data.datasets import load_dataset
from leukoscope.data.images import read_image
from leukoscope.train.finetune import augment_batch, pack_images


def _batch(n: int = 4) -> torch.Tensor:
    ds = load_dataset("all_idb2")
    imgs = [np.ascontiguousarray(read_image(s.path)[:96, :96]) for s in ds.samples[:n]]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def test_augmentation_is_seeded_in_range_and_per_sample(data_root):
    x = _batch()
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    c = augment_batch(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    # same image twice in a batch: two different views
    twice = augment_batch(torch.stack([x[0], x[0]]), torch.Generator().manual_seed(3))
    assert (twice[0] - twice[1]).abs().mean() > 0.01
    # strength 0 leaves the image as it is (up to the resampling at the identity)
    same = augment_batch(x, torch.Generator().manual_seed(1), strength=0.0)
    assert (same - x.float() / 255).abs().max() < 1e-4
    assert torch.equal(x, _batch())  # the input is not changed


def test_full_finetune_trains_every_layer_and_writes_a_model(tmp_path, data_root):
    from leukoscope.models import load_model
    from leukoscope.models.modeldir import build_network
    from leukoscope.train.trainer import train

    # sized for a GPU, with a CPU profile: on the CPU the profile's size and epochs are what is trained
    cfg = make_config({"name": "full", "datasets": ("all_idb2",), "full_finetune": True, "input_size": 224,
                       "epochs": 40, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.05, "label_smoothing": 0.1,
                       "operating_point": "balanced", "cache_dir": str(tmp_path / "cache"), "device": "cpu",
                       "cpu": {"input_size": 64, "epochs": 2}})
    res = train(cfg, tmp_path / "full", progress=False)
    assert len(res.history) == 2 and np.isfinite(res.history[-1]["val_loss"])
    saved = make_config(file=tmp_path / "full" / "config.yaml")  # records what ran
    assert (saved.recipe.input_size, saved.recipe.epochs) == (64, 2)
    trained = load_file(str(tmp_path / "full" / "model.safetensors"))
    start, _ = build_network(cfg.spec(), 2, cfg.recipe.pretrained)
    before = start.state_dict()
    # the first convolution (frozen in the cached-stem trainer) and the head both moved
    first = next(k for k in before if k.endswith("conv_stem.weight"))
    assert not torch.allclose(trained[first], before[first])
    assert not torch.allclose(trained["head.2.weight"], before["head.2.weight"])
    info = json.loads((tmp_path / "full" / "model.json").read_text())
    assert 0 < info["threshold"] < 1 and info["preprocess"]["size"] == 64
    model = load_model(tmp_path / "full", backend="torch")
    p = model.predict_arrays([read_image(load_dataset("all_idb2").samples[0].path)])
    assert p.shape == (1, 2) and abs(p.sum() - 1) < 1e-5
    # the packed images were cached: a second pack reads them back
    assert list((tmp_path / "cache" / "packed").glob("*.pt"))


def test_full_finetune_refuses_what_only_the_stem_trainer_does():
    from leukoscope.train.trainer import train

    with pytest.raises(ValueError, match="full_finetune"):
        train(make_config({"full_finetune": True, "cam_mask": 1.0}), "/nonexistent", progress=False)


def test_pack_images_lists_unreadable_files(tmp_path, data_root):
    from leukoscope.data.datasets import Sample
    from leukoscope.preprocess.transforms import Preprocess

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    good = load_dataset("all_idb2").samples[0]
    x, ok, failed = pack_images([good, Sample(bad, "healthy", "g", "t")], Preprocess(32, (0.5,) * 3, (0.5,) * 3),
                                str(tmp_path), progress=False)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.uint8 and ok == [0] and failed[0][0] == str(bad)


def test_cpu_profile_applies_on_the_cpu_only_and_takes_only_sizing_keys():
    cfg = make_config({"input_size": 224, "epochs": 40, "cpu": {"input_size": "128", "epochs": 12}})
    assert cfg.recipe.cpu == {"input_size": 128, "epochs": 12}  # coerced when the config is built
    assert for_device(cfg, "cuda") is cfg
    cpu = for_device(cfg, "cpu")
    assert (cpu.recipe.input_size, cpu.recipe.epochs, cpu.recipe.lr) == (128, 12, cfg.recipe.lr)
    assert for_device(cpu, "cpu") == cpu  # a saved CPU config trains the same again
    with pytest.raises(ValueError, match="may set"):
        make_config({"cpu": {"datasets": "aria"}})  # what a model learns from is not a CPU setting
    with pytest.raises(ValueError, match="takes a int"):
        make_config({"cpu": {"epochs": "many"}})
