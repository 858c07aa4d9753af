"""Training speed of full fine-tuning (every layer) against the cached-stem trainer's step, on this machine.

    python benchmarks/finetune_speed.py --sizes 128 160 224 --batch 32 --steps 5 \
        --json benchmarks/results/finetune_speed.json

For each input size: images per second of one full training step of EfficientNet-Lite0 (on-device augmentation,
forward, backward, AdamW) on random uint8 images, and, as the baseline in the same run, of the cached-stem trainer's
step (the last stage and the head on stem features). The median over ``--steps`` timed steps after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from leukoscope.config import make_config
from leukoscope.models.modeldir import build_network
from leukoscope.train.finetune import augment_batch, normalise


def _time(step, n: int) -> float:
    step()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_size(size: int, batch: int, steps: int) -> dict:
    """Images per second of a full training step and of the cached-stem step at ``size`` px."""
    cfg = make_config({"input_size": size})
    net, _ = build_network(cfg.spec(), 2, cfg.recipe.pretrained)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    y = torch.randint(0, 2, (batch,))
    gen = torch.Generator().manual_seed(0)
    mean, std = (0.5,) * 3, (0.5,) * 3
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def full() -> None:
        loss = torch.nn.functional.cross_entropy(net(normalise(augment_batch(x, gen), mean, std)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.no_grad():
        feats = net.stem(normalise(x.float() / 255, mean, std))
    opt_top = torch.optim.Adam([p for m in net.trainable_modules() for p in m.parameters()], lr=1e-4)

    def cached() -> None:
        loss = torch.nn.functional.cross_entropy(net.head(net.top(feats)), y)
        opt_top.zero_grad()
        loss.backward()
        opt_top.step()

    t_full, t_top = _time(full, steps), _time(cached, steps)
    return {"size": size, "batch": batch, "full_images_per_s": batch / t_full,
            "cached_stem_images_per_s": batch / t_top, "ratio": t_full / t_top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[128, 160, 224])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for size in args.sizes:
        rows.append(measure_size(size, args.batch, args.steps))
        print(f"{size:>4} px  full {rows[-1]['full_images_per_s']:7.1f} img/s   cached-stem step "
              f"{rows[-1]['cached_stem_images_per_s']:8.1f} img/s   ({rows[-1]['ratio']:.1f}x slower)", flush=True)
    res = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
