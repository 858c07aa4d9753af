"""Seed ensembles: several trained image models of one split in one model directory.

The ensemble answers with the mean of its members' logits, calibrated by a temperature fitted on the shared
validation part (and, for ``operating_point: balanced``, a threshold chosen there). Its out-of-distribution detector
and quality reference are fitted again for it; embeddings and heatmaps come from the first member. Its test part is
scored once, when it is made, as a trained model's is.

    leukoscope ensemble runs/m_s0 runs/m_s1 runs/m_s2 --out runs/m_ensemble
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from leukoscope.config import make_config
from leukoscope.data.splits import Split
from leukoscope.models.modeldir import LoadedModel, load_model

log = logging.getLogger(__name__)

MEMBERS_DIR = "members"
# what a member brings: its network and the record that rebuilds it
MEMBER_FILES = ("model.json", "model.safetensors")


def check_members(dirs: list[Path]) -> None:
    """The members must share classes, preprocessing, architecture and split (the same validation and test images)."""
    if len(dirs) < 2:
        raise ValueError(f"an ensemble needs at least two model directories, got {len(dirs)}")
    infos = []
    for d in dirs:
        if not (d / "model.json").exists() or not (d / "split.json").exists():
            raise FileNotFoundError(f"{d} is not a trained image model directory (model.json and split.json needed)")
        info = json.loads((d / "model.json").read_text())
        if info.get("kind", "image") != "image" or info.get("members"):
            raise ValueError(f"{d}: an ensemble member must be a single image model")
        infos.append(info)
    for d, info in zip(dirs[1:], infos[1:]):
        for key in ("classes", "preprocess", "spec", "datasets", "target"):
            if info.get(key) != infos[0].get(key):
                raise ValueError(f"{d} differs from {dirs[0]} in {key!r}: {info.get(key)} vs {infos[0].get(key)}")
        if Split.load(d / "split.json").parts != Split.load(dirs[0] / "split.json").parts:
            raise ValueError(f"{d} has another split than {dirs[0]}: train the members with one split_seed "
                             "(or split file)")


def make_ensemble(member_dirs: list[str | Path], out: str | Path, progress: bool = False) -> LoadedModel:
    """Write the ensemble of ``member_dirs`` to ``out`` (see the module docstring) and return it loaded."""
    from leukoscope.evaluate.run import model_logits, model_parts
    from leukoscope.train.trainer import calibrate, load_training_data, score_and_document

    dirs = [Path(d) for d in member_dirs]
    check_members(dirs)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new directory for the ensemble")
    shutil.copytree(dirs[0], out, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "*.onnx",
                                                                "model.int8.*", "faithfulness.json", MEMBERS_DIR))
    rel = []
    for k, d in enumerate(dirs[1:], start=1):
        (out / MEMBERS_DIR / str(k)).mkdir(parents=True)
        for f in MEMBER_FILES:
            shutil.copy2(d / f, out / MEMBERS_DIR / str(k) / f)
        rel.append(f"{MEMBERS_DIR}/{k}")
    info = json.loads((out / "model.json").read_text())
    info["members"] = rel
    info["ensemble"] = {"of": [str(d) for d in dirs], "combination": "mean of the members' logits"}
    (out / "model.json").write_text(json.dumps(info, indent=1))

    model = load_model(out)
    parts = model_parts(model)
    val_logits, y_val, _, _ = model_logits(model, parts["val"], progress=progress)
    cfg = make_config(file=out / "config.yaml")
    info["temperature"], info["threshold"] = calibrate(cfg, val_logits, y_val, len(model.classes))
    (out / "model.json").write_text(json.dumps(info, indent=1))
    model = load_model(out)
    test_logits, y_test, test_samples, _ = model_logits(model, parts["test"], progress=progress)
    training = json.loads((dirs[0] / "metrics.json").read_text()).get("training", {}) | {
        "ensemble_members": len(dirs)}
    score_and_document(out, cfg, load_training_data(cfg), Split.load(out / "split.json"), info, (y_val, val_logits),
                       (y_test, test_logits, test_samples), training)
    log.info("wrote the ensemble of %d members to %s", len(dirs), out)
    return load_model(out)
