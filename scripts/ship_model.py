"""Copy a trained model directory into the package as a shipped model (no checkpoints), checking its size.

    .venv/bin/python scripts/ship_model.py runs/leukemia-cell leukemia-cell
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

KEEP = ("model.safetensors", "model.json", "config.yaml", "metrics.json", "MODEL_CARD.md", "split.json", "history.csv",
        "roc.png", "confusion.png", "reliability.png", "evaluation.md")
LIMIT_MB = 25


def main() -> None:
    src, name = Path(sys.argv[1]), sys.argv[2]
    dst = Path(__file__).resolve().parents[1] / "src" / "leukoscope" / "weights" / name
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in KEEP:
        if (src / f).exists():
            shutil.copy2(src / f, dst / f)
    size = sum(p.stat().st_size for p in dst.iterdir()) / 2**20
    if size > LIMIT_MB:
        raise SystemExit(f"{dst} is {size:.1f} MB, above {LIMIT_MB} MB")
    print(f"shipped {name}: {size:.1f} MB in {dst}")


if __name__ == "__main__":
    main()
