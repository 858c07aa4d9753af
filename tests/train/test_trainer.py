"""Training on real data: loss falls, seeded runs repeat exactly, resume continues, DDP keeps ranks identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from leukoscope.config import make_config, parse_set
from leukoscope.train import trainer
from leukoscope.train.trainer import fit_temperature, train

BASE = {"name": "t", "datasets": ("all_idb2",), "epochs": 3, "aug_views": 1, "patience": 10, "batch_size": 32}


def test_loss_falls_and_model_directory_is_complete(tiny_model_dir):
    hist = json.loads((tiny_model_dir / "history.json").read_text())
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    for f in ("model.safetensors", "model.json", "config.yaml", "metrics.json", "MODEL_CARD.md", "split.json",
              "roc.png", "confusion.png", "reliability.png", "evaluation.html", "history.csv"):
        assert (tiny_model_dir / f).exists(), f
    info = json.loads((tiny_model_dir / "model.json").read_text())
    assert info["classes"] == ["healthy", "leukemic"] and info["weights_source"].startswith("package:")
    n = sum(v.numel() for v in load_file(str(tiny_model_dir / "model.safetensors")).values()
            if v.is_floating_point() and v.ndim > 0)
    assert n >= info["n_parameters"] * 0.99  # BN buffers are in the file too, parameters are all there
    m = json.loads((tiny_model_dir / "metrics.json").read_text())
    assert m["per_image"]["n"] == len(json.loads((tiny_model_dir / "split.json").read_text())["parts"]["test"])
    assert m["per_image"]["auc"] > 0.8  # even 4 epochs on cached features separate ALL-IDB2 blasts (measured ~0.97)


def test_two_seeded_runs_give_the_same_numbers(tmp_path, tiny_model_dir):
    cfg = make_config(BASE)
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_interruption_reaches_the_same_weights(tmp_path, monkeypatch, tiny_model_dir):
    cfg = make_config({**BASE, "epochs": 4})
    full = train(cfg, tmp_path / "full", progress=False)
    real = trainer._write_history

    def interrupt(out, history):
        real(out, history)
        if len(history) == 2:
            raise KeyboardInterrupt("simulated crash after epoch 2")

    monkeypatch.setattr(trainer, "_write_history", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(trainer, "_write_history", real)
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert len(resumed.history) == 4
    np.testing.assert_allclose([h["val_loss"] for h in resumed.history], [h["val_loss"] for h in full.history],
                               rtol=1e-5)


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path, tiny_model_dir):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "leukoscope", "train", "--no-progress", "--out", str(out), "--set", "name=ddp", "datasets=all_idb2",
           "epochs=2", "aug_views=1", "batch_size=32",
           "device=cpu"]  # gloo on CPU also on a machine with a GPU
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = json.loads((out / "metrics.json").read_text())["training"]["ddp"]
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    a, b = ddp["final_weight_checksums"]
    assert a == b


def test_temperature_scaling_fixes_overconfidence():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    margin = np.where(rng.random(2000) < 0.8, 1.0, -1.0) * (2 * y - 1)  # 80% right
    logits = np.stack([-margin, margin], 1) * 4.0  # far too confident for 80% accuracy
    t = fit_temperature(logits, y)
    acc = float(((margin > 0) == (y == 1)).mean())
    # the NLL optimum puts sigmoid(8 / T) at the empirical accuracy: T = 8 / logit(acc) (~5.8 for 80%)
    np.testing.assert_allclose(t, 8.0 / np.log(acc / (1 - acc)), rtol=1e-3)


def test_config_layers_and_unknown_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\nepochs: 7\ndatasets: [aria, all_idb2]\n")
    cfg = make_config(parse_set(["epochs=9", "lr=0.01", "cache_stem=false"]), f)
    assert (cfg.name, cfg.datasets) == ("x", ("aria", "all_idb2"))
    assert (cfg.recipe.epochs, cfg.recipe.lr, cfg.recipe.cache_stem) == (9, 0.01, False)
    f.write_text("epohcs: 3\n")
    with pytest.raises(ValueError, match=r"Unknown config key 'epohcs' in .*Did you mean 'epochs'\?"):
        make_config(file=f)
    with pytest.raises(ValueError, match="takes a int"):
        make_config({"epochs": "many"})
    # a config.yaml saved by an older version (the shipped models' hold `workers`, which nothing read) still loads
    shipped = Path(__file__).resolve().parents[2] / "src/leukoscope/weights/leukemia-cell/config.yaml"
    assert "workers" in shipped.read_text() and not hasattr(make_config(file=shipped), "workers")


def test_training_cli_writes_the_model(tmp_path, capsys, tiny_model_dir):
    from leukoscope.cli import main

    out = tmp_path / "cli"
    assert main(["train", "--set", "name=cli", "datasets=all_idb2", "epochs=2", "aug_views=1", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "test (held-out groups): accuracy" in text
    assert Path(out / "model.safetensors").exists()


def test_source_class_weights_balance_classes_within_each_source():
    from types import SimpleNamespace

    from leukoscope.train.trainer import source_class_weights

    # source a: 3 healthy, 1 leukemic; source b: 2 leukemic only
    samples = [SimpleNamespace(source=s) for s in "aaaabb"]
    y = np.array([0, 0, 0, 1, 1, 1])
    w = source_class_weights(y, samples, 2).numpy()
    np.testing.assert_allclose(w, [4 / 6, 4 / 6, 4 / 6, 2.0, 1.0, 1.0], rtol=1e-6)
    assert w[:3].sum() == pytest.approx(w[3])  # classes weigh equally inside source a
    assert w[:4].sum() == pytest.approx(4) and w[4:].sum() == pytest.approx(2)  # each source keeps its share


def test_training_on_subclasses_answers_with_the_classes(tmp_path, data_root):
    import csv

    from leukoscope.data.datasets import load_dataset
    from leukoscope.models import load_model
    from leukoscope.train.trainer import train

    ds = load_dataset("all_idb2", root=data_root / "all_idb")
    picked = ds.samples[::4]  # 65 crops from every source field
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient", "stage"])
        for i, s in enumerate(picked):  # leukemic crops get one of two made-up stages; healthy ones none
            w.writerow([s.path, s.label, s.group, ("early" if i % 2 else "late") if s.label == "leukemic" else ""])
    cfg = make_config({"name": "sub", "datasets": ("manifest",), "roots": {"manifest": str(tmp_path)},
                       "target": "label", "subclasses": "stage", "input_size": 96, "epochs": 2, "aug_views": 1,
                       "batch_size": 16, "test_size": 0.25, "val_size": 0.2})
    res = train(cfg, tmp_path / "m", progress=False)
    info = json.loads((tmp_path / "m" / "model.json").read_text())
    assert info["classes"] == ["healthy", "leukemic"]
    assert info["spec"]["subclasses"] == ["healthy", "leukemic/early", "leukemic/late"]  # empty stage: no subclass
    assert info["spec"]["subclass_groups"] == [0, 1, 1]
    assert res.metrics["per_image"]["n"] > 0
    model = load_model(tmp_path / "m", backend="torch")
    p = model.predict_paths([picked[0].path, picked[1].path])[1]
    assert p.shape == (2, 2) and np.allclose(p.sum(1), 1, atol=1e-6)


def test_sample_weights_multiply_class_balance_by_source_weight():
    from types import SimpleNamespace

    from leukoscope.train.trainer import sample_weights

    y = np.array([0, 0, 0, 1, 1, 1])
    samples = [SimpleNamespace(source=s) for s in "aaaabb"]
    cw = torch.tensor([0.5, 2.0])
    w = sample_weights(y, samples, 2, "weights", cw, {"b": 3}).numpy()
    np.testing.assert_allclose(w, [0.5, 0.5, 0.5, 2.0, 6.0, 6.0])
    w = sample_weights(y, samples, 2, "none", None, {"a": 0.5}).numpy()
    np.testing.assert_allclose(w, [0.5, 0.5, 0.5, 0.5, 1.0, 1.0])


def test_equal_source_weights_train_as_without_them(tmp_path, tiny_model_dir):
    a = train(make_config({**BASE, "epochs": 2}), tmp_path / "a", progress=False)
    b = train(make_config({**BASE, "epochs": 2, "source_weights": {"all_idb2": 2.5}}), tmp_path / "b", progress=False)
    for ha, hb in zip(a.history, b.history, strict=True):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-4)
        assert ha["val_loss"] == pytest.approx(hb["val_loss"], rel=1e-4)


@pytest.mark.parametrize("weights, message", [({"aria": 2}, "not among the datasets"),
                                              ({"all_idb2": 0}, "positive numbers")])
def test_bad_source_weights_fail_before_loading_data(tmp_path, monkeypatch, weights, message):
    monkeypatch.setattr(trainer, "load_dataset", lambda *a, **k: pytest.fail("data loaded"), raising=False)
    with pytest.raises(ValueError, match=message):
        train(make_config({**BASE, "source_weights": weights}), tmp_path / "m", progress=False)


def test_split_seed_keeps_the_split_when_the_weights_seed_changes(data_root):
    from leukoscope.train.trainer import load_training_data, make_or_load_split

    base = {"datasets": ("all_idb2",), "roots": {"all_idb2": str(data_root / "all_idb" / "ALL_IDB2")}}
    ds = load_training_data(make_config(base))
    parts = {}
    for name, extra in (("seed0", {"seed": 0}), ("seed1", {"seed": 1}), ("seed1_split0", {"seed": 1, "split_seed": 0})):
        parts[name] = make_or_load_split(make_config({**base, **extra}), ds).parts
    assert parts["seed1"]["test"] != parts["seed0"]["test"]  # the seed moves the split...
    assert parts["seed1_split0"] == parts["seed0"]  # ...unless split_seed pins it


def test_operating_point_and_half_precision_weights(tmp_path, data_root):
    from leukoscope.models import load_model

    cfg = make_config({"name": "op", "datasets": ("all_idb2",), "epochs": 2, "aug_views": 1, "batch_size": 32,
                       "operating_point": "balanced", "weights_dtype": "float16"})
    res = train(cfg, tmp_path / "op", progress=False)
    info = json.loads((tmp_path / "op" / "model.json").read_text())
    t = info["threshold"]
    assert 0 < t < 1 and info["weights_dtype"] == "float16"
    state = load_file(str(tmp_path / "op" / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    val = res.metrics["operating_point"]["val"]  # chosen there: sensitivity and specificity as equal as counts allow
    n_pos, n_neg = val["n_pos"], val["n"] - val["n_pos"]
    assert abs(val["sensitivity"] - val["specificity"]) <= 1 / min(n_pos, n_neg) + 1e-9
    assert "## Operating point" in (tmp_path / "op" / "MODEL_CARD.md").read_text()
    # the loaded model answers at the stored threshold
    model = load_model(tmp_path / "op", backend="torch")
    assert model.threshold == t
    assert model.decide(np.array([1 - t, t])) == 1 and model.decide(np.array([1 - t + 1e-3, t - 1e-3])) == 0
    with pytest.raises(ValueError, match="Unknown operating_point"):
        make_config({"operating_point": "youden"})


@pytest.mark.parametrize("key, value", [("model", "vit"), ("denoise", "gauss"), ("stain", "vahadane"),
                                        ("crop", "centre"), ("optimizer", "sgd"), ("balance", "oversample"),
                                        ("schedule", "step"), ("device", "tpu"), ("weights_dtype", "int8")])
def test_every_named_choice_is_checked_when_the_config_is_built(key, value):
    with pytest.raises(ValueError, match=f"Unknown {key} '{value}'. Available"):
        make_config({key: value})


def test_settings_and_recipe_are_apart_and_save_as_one_flat_file(tmp_path):
    from dataclasses import fields

    from leukoscope.config import Recipe, TrainConfig, save_config

    settings = {f.name for f in fields(TrainConfig)} - {"recipe"}
    assert not settings & {f.name for f in fields(Recipe)}  # a key belongs to one of the two
    assert {"datasets", "target", "operating_point", "seed"} <= settings
    assert {"lr", "epochs", "backbone", "augment"} <= {f.name for f in fields(Recipe)}
    cfg = make_config({"name": "m", "lr": 0.005, "operating_point": "balanced"})
    save_config(cfg, tmp_path / "config.yaml")
    assert make_config(file=tmp_path / "config.yaml") == cfg
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        make_config({"epochs": 0})
    with pytest.raises(ValueError, match="leave a training part"):
        make_config({"test_size": 0.5, "val_size": 0.5})
    with pytest.raises(ValueError, match="'augment' may set"):
        make_config({"augment": {"rotate": 90, "extra": {}}})
