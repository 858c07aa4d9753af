"""Full fine-tuning: every layer of the network is trained (``full_finetune: true``).

The training images are decoded and prepared once, packed as uint8 at training resolution (cached on disk), and held
on the training device; each batch is augmented there per sample (flips, rotation, zoom, shift, brightness, contrast,
saturation and a per-channel stain gain), so that a GPU never waits for the CPU. AdamW with a one-cycle schedule,
label smoothing, bf16 autocast and channels_last on CUDA; float32 on the CPU. The epoch with the lowest validation
loss is kept; the temperature, the operating threshold and the model directory are made as by
:func:`leukoscope.train.trainer.train`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from leukoscope.config import TrainConfig, for_device, save_config
from leukoscope.data.datasets import Sample
from leukoscope.data.images import read_image
from leukoscope.errors import ImageReadError
from leukoscope.models.backbones import mean_std
from leukoscope.models.modeldir import build_network
from leukoscope.preprocess.transforms import Preprocess
from leukoscope.train.stem_cache import cache_root

log = logging.getLogger(__name__)


def pack_images(samples: list[Sample], pre: Preprocess, cache_dir: str = "", progress: bool = True,
                desc: str = "packing images") -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Every sample prepared (:meth:`Preprocess.prepare`) as uint8 (N, 3, S, S), the indices of the readable ones and
    the unreadable ``(path, reason)``. Cached under the cache folder, keyed by the files (path, size, mtime) and the
    preprocessing, so a second run (another seed, another fold) does not decode them again."""
    h = hashlib.sha256(json.dumps(pre.to_dict(), sort_keys=True, default=str).encode())
    for s in samples:
        st = os.stat(s.path) if os.path.exists(s.path) else None
        h.update(f"{s.path}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    path = cache_root(cache_dir) / "packed" / f"{h.hexdigest()[:16]}.pt"
    if path.exists():
        doc = torch.load(str(path), weights_only=True)
        return doc["x"], list(doc["ok"]), [tuple(f) for f in doc["failed"]]
    xs, ok, failed = [], [], []
    for i, s in enumerate(tqdm(samples, desc=desc, unit="img", disable=not progress, leave=False)):
        try:
            xs.append(torch.from_numpy(pre.prepare(read_image(s.path))).permute(2, 0, 1).contiguous())
            ok.append(i)
        except ImageReadError as exc:
            failed.append((str(s.path), exc.reason))
    x = torch.stack(xs) if xs else torch.zeros((0, 3, pre.size, pre.size), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "ok": ok, "failed": [list(f) for f in failed]}, str(path))
    return x, ok, failed


def augment_batch(x: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Per-sample random augmentation of a uint8 batch (B, 3, S, S) on its own device; float in [0, 1] out.

    Flips and any rotation (a cell has no orientation), zoom 0.8-1.25 and shift up to 8 % (scale differs between
    microscopes), brightness and contrast +-25 %, saturation +-30 % and a per-channel gain of +-10 % (stains differ
    between laboratories), each scaled by ``strength`` (0: no change, no flip). Pixels that come from outside the
    image are filled by reflection."""
    b, dev = x.shape[0], x.device

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=gen, device=dev)

    img = x.float() / 255.0
    angle = u(-math.pi, math.pi) * min(1.0, strength)
    scale = torch.exp(u(math.log(0.8), math.log(1.25)) * strength)
    flip = torch.where(torch.rand(b, generator=gen, device=dev) < (0.5 if strength > 0 else 0.0), -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, u(-0.08, 0.08) * strength], 1),
                         torch.stack([sin * flip, cos, u(-0.08, 0.08) * strength], 1)], 1)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    bright = 1 + u(-0.25, 0.25, 1, 1, 1) * strength
    contrast = 1 + u(-0.25, 0.25, 1, 1, 1) * strength
    sat = 1 + u(-0.3, 0.3, 1, 1, 1) * strength
    gain = 1 + u(-0.1, 0.1, 3, 1, 1) * strength
    grey = (0.299 * img[:, :1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:]).expand_as(img)
    img = grey + (img - grey) * sat
    mean = img.mean(dim=(1, 2, 3), keepdim=True)
    img = (img - mean) * contrast + mean
    return (img * bright * gain).clamp(0, 1)


def normalise(img: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    m = torch.tensor(mean, device=img.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=img.device).view(1, 3, 1, 1)
    return (img - m) / s


@torch.inference_mode()
def batched_logits(net: nn.Module, x: torch.Tensor, mean: tuple, std: tuple, device: torch.device,
                   batch_size: int = 128) -> np.ndarray:
    """Logits of packed uint8 images (no augmentation), float32 on the CPU."""
    net.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = normalise(x[i:i + batch_size].to(device).float() / 255.0, mean, std)
        if device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            z = net(xb)
        out.append(z.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def train_full(cfg: TrainConfig, out: str | Path, progress: bool = True):
    """Train every layer as ``cfg`` says and write the model directory to ``out`` (see the module docstring)."""
    from leukoscope.train.trainer import (
        FitResult,
        _write_history,
        load_training_data,
        make_or_load_split,
        sample_weights,
        seed_everything,
        training_device,
        write_model,
    )

    device = training_device(cfg.device)
    cfg = for_device(cfg, device.type)
    r = cfg.recipe
    if r.subclasses or r.cam_mask or r.stain != "none" or r.model != "cnn" or r.balance == "sampler":
        raise ValueError("full_finetune trains a plain CNN with a weighted loss: subclasses, cam_mask, stain "
                         "normalisation, balance: sampler and the hybrid model need the cached-stem trainer "
                         "(full_finetune: false)")
    out = Path(out)
    seed_everything(cfg.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ds = load_training_data(cfg)
    split = make_or_load_split(cfg, ds)
    parts = {p: split.subset(ds, p) for p in ("train", "val", "test")}
    if not len(parts["val"]):
        raise ValueError("the split has no validation part; choosing the epoch and calibrating need one")
    net, weights_source = build_network(cfg.spec(), len(ds.classes), r.pretrained)
    mean, std = mean_std(r.backbone)
    pre = Preprocess(r.input_size, tuple(mean), tuple(std), r.denoise, None, crop=r.crop)
    out.mkdir(parents=True, exist_ok=True)
    split.save(out / "split.json")
    save_config(cfg, out / "config.yaml")

    y_of = {c: i for i, c in enumerate(ds.classes)}
    data, failures = {}, []
    for name, part in parts.items():
        x, ok, failed = pack_images(part.samples, pre, cfg.cache_dir, progress, desc=f"packing {name} images")
        failures += failed
        samples = [part.samples[i] for i in ok]
        data[name] = (x, torch.tensor([y_of[s.label] for s in samples]), samples)

    x_tr, y_tr, s_tr = data["train"]
    counts = np.bincount(y_tr.numpy(), minlength=len(ds.classes)).astype(float)
    class_w = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(counts), dtype=torch.float32)
    w_tr = sample_weights(y_tr.numpy(), s_tr, len(ds.classes), r.balance,
                          class_w if r.balance == "weights" else None, r.source_weights).to(device)
    x_dev, y_dev = x_tr.to(device), y_tr.to(device)  # the training set lives on the device, as uint8
    net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    for p in net.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    steps = r.epochs * max(1, math.ceil(len(y_tr) / r.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr, total_steps=steps, pct_start=0.15)
    ce = nn.CrossEntropyLoss(label_smoothing=r.label_smoothing, reduction="none")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    best_loss, best_state, best_epoch, history, t0 = math.inf, None, -1, [], time.time()
    for epoch in tqdm(range(r.epochs), desc="epochs", unit="ep", disable=not progress, leave=False):
        net.train()
        order = torch.randperm(len(y_dev), generator=gen, device=device)
        tot, n = 0.0, 0
        for i in range(0, len(order), r.batch_size):
            idx = order[i:i + r.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            xb = normalise(augment_batch(x_dev[idx], gen, r.augment_strength), mean, std)
            if device.type == "cuda":
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                logits = net(xb)
            wb = w_tr[idx]
            loss = (ce(logits.float(), y_dev[idx]) * wb).sum() / wb.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
            n += len(idx)
        val_logits = batched_logits(net, data["val"][0], mean, std, device)
        val_loss = float(F.cross_entropy(torch.tensor(val_logits), data["val"][1]))
        val_acc = float((val_logits.argmax(1) == data["val"][1].numpy()).mean())
        history.append({"epoch": epoch, "train_loss": tot / max(n, 1), "val_loss": val_loss, "val_accuracy": val_acc,
                        "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2)})
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    _write_history(out, history)
    net.load_state_dict(best_state)
    net = net.cpu().to(memory_format=torch.contiguous_format).eval()
    cpu = torch.device("cpu")
    return FitResult(*write_model(
        cfg, out, net, cfg.spec(), ds, split, pre, weights_source, device,
        val=(data["val"][1].numpy(), lambda: batched_logits(net, data["val"][0], mean, std, cpu)),
        test=(data["test"][1].numpy(), lambda: batched_logits(net, data["test"][0], mean, std, cpu), data["test"][2]),
        history=history, best_epoch=best_epoch, t0=t0, failures=failures, n_train=len(y_tr)))
