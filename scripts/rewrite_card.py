"""Rewrite MODEL_CARD.md of a trained model directory from its own config, split, model.json and metrics.json
(no retraining; the numbers are the ones the training run measured).

    .venv/bin/python scripts/rewrite_card.py runs/leukemia-cell
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from leukoscope.config import make_config
from leukoscope.data.splits import Split
from leukoscope.evaluate.report import write_card
from leukoscope.train.trainer import load_training_data

out = Path(sys.argv[1])
cfg = make_config(file=out / "config.yaml")
write_card(out, cfg, load_training_data(cfg), Split.load(out / "split.json"),
           json.loads((out / "model.json").read_text()), json.loads((out / "metrics.json").read_text()))
print(f"rewrote {out / 'MODEL_CARD.md'}")
