"""Training: Adam/AdamW, class-weighted loss or balanced sampling, cosine schedule, early stopping on the group-level
validation split, best/last checkpoints with resume, seeds, progress bars, a CSV metrics log, temperature calibration,
and a model directory at the end. Runs on CPU, on CUDA with mixed precision, and under ``torchrun`` (DDP)."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from leukoscope.config import TrainConfig, for_device, save_config
from leukoscope.data.datasets import Dataset, Sample, combine, load_dataset
from leukoscope.data.images import read_image, read_readable
from leukoscope.data.splits import Split, assert_no_leak, group_split
from leukoscope.models.backbones import mean_std
from leukoscope.models.modeldir import build_network, round_weights, save_model_dir, softmax
from leukoscope.preprocess.stain import fit_stain
from leukoscope.preprocess.transforms import Augment, Preprocess
from leukoscope.train.cam_mask import class_maps, outside_share, view_masks
from leukoscope.train.stem_cache import StemCache, cache_root, stem_key

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_training_data(cfg: TrainConfig) -> Dataset:
    parts = [load_dataset(n, root=cfg.roots.get(n), target=cfg.target) for n in cfg.datasets]
    return parts[0] if len(parts) == 1 else combine(parts, name="+".join(cfg.datasets))


def make_or_load_split(cfg: TrainConfig, ds: Dataset) -> Split:
    if cfg.split:
        split = Split.load(cfg.split)
    else:
        seed = cfg.split_seed if cfg.split_seed >= 0 else cfg.seed
        split = group_split(ds, test_size=cfg.test_size, val_size=cfg.val_size, seed=seed)
    assert_no_leak(ds, split)
    return split


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Trainable(nn.Module):
    """The trained part of a network (``top`` + ``head``) as one module, for the optimiser and DDP."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList(net.trainable_modules())
        self.net = [net]  # not a submodule: the frozen stem stays out of DDP's parameter set

    def forward(self, f: torch.Tensor, with_maps: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits from stem features; with ``with_maps`` also every class's activation map (B, C, H, W) (a CNN with
        a linear head only; see :mod:`leukoscope.train.cam_mask`)."""
        net = self.net[0]
        if not with_maps:
            return net.head(net.top(f))
        a = net._top(f)
        return net.head(net.pool(a)), class_maps(a, net.head[-1].weight)


@dataclasses.dataclass
class FitResult:
    out: Path
    metrics: dict
    history: list[dict]


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature T minimising the validation NLL of softmax(logits / T)."""
    z = torch.tensor(logits, dtype=torch.float64)
    t = torch.tensor(y, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z / log_t.exp(), t)
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


DEVICES = ("auto", "cpu", "cuda")


def training_device(name: str) -> torch.device:
    """The device ``device: name`` trains on: ``auto`` takes CUDA when a GPU is visible; ``cuda`` without one is an
    error, not a silent CPU run."""
    if name not in DEVICES:
        raise ValueError(f"Unknown device {name!r}. Available: {list(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for, but PyTorch sees no CUDA GPU (torch.cuda.is_available() is "
                         "False); use device: auto or cpu, or install a CUDA build of PyTorch")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> FitResult:
    """Train a model as ``cfg`` says and write its model directory to ``out``.

    The stages: :func:`_prepare` (data, split, network, preprocessing), :func:`_inputs` (cached stem features or
    images of each part), :func:`_fit` (the epochs, with checkpoints and early stopping) and :func:`write_model`.
    ``full_finetune`` recipes go to :func:`leukoscope.train.finetune.train_full` instead."""
    check_source_weights(cfg.recipe.source_weights, cfg.datasets)  # before minutes of data loading
    device = training_device(cfg.device)  # a bad device fails here, before minutes of data loading
    cfg = for_device(cfg, device.type)
    if cfg.recipe.full_finetune:
        from leukoscope.train.finetune import train_full

        return train_full(cfg, out, progress)
    run = _prepare(cfg, Path(out), device)
    data, failures = _inputs(run, progress)
    masks = _cam_masks(run, data["train"], progress) if cfg.recipe.cam_mask else None
    history, best_epoch, ddp_info = _fit(run, data, masks, resume, progress)
    net, trainable, cpu = run.net, run.trainable, torch.device("cpu")
    net.cpu().eval()
    return FitResult(*write_model(
        cfg, run.out, net, run.net_spec, run.ds, run.split, run.pre, run.weights_source, device,
        val=(data["val"][1].numpy(), lambda: _logits(trainable, net, data["val"][0], cfg, cpu, run.pre)),
        test=(data["test"][1].numpy(), lambda: _logits(trainable, net, data["test"][0], cfg, cpu, run.pre),
              data["test"][2]),
        history=history, best_epoch=best_epoch, t0=run.t0, failures=failures, n_train=len(data["train"][1]),
        rank=run.rank, world=run.world, ddp_info=ddp_info))


@dataclasses.dataclass
class _Run:
    """What every stage of a cached-stem training run shares."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    rank: int
    world: int
    ds: Dataset
    split: Split
    parts: dict[str, Dataset]
    net: nn.Module
    net_spec: dict
    weights_source: str
    trainable: _Trainable
    pre: Preprocess
    aug: Augment
    subclasses: list[str]
    sub_groups: list[int]
    t0: float


def _prepare(cfg: TrainConfig, out: Path, device: torch.device) -> _Run:
    """Seeds, threads, the data and its split, the network with only its trained part trainable, the preprocessing
    and augmentation; the split and config are written to ``out`` (rank 0)."""
    r = cfg.recipe
    rank, world = _dist_info()
    seed_everything(cfg.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    ds = load_training_data(cfg)
    split = make_or_load_split(cfg, ds)
    parts = {p: split.subset(ds, p) for p in ("train", "val", "test")}
    if not len(parts["val"]):
        raise ValueError("the split has no validation part; early stopping and calibration need one")
    subclasses, sub_groups = subclass_labels(ds, r.subclasses)
    net_spec = cfg.spec() | ({"subclasses": subclasses, "subclass_groups": sub_groups} if subclasses else {})
    net, weights_source = build_network(net_spec, len(ds.classes), r.pretrained)
    mean, std = mean_std(r.backbone)
    stain = None
    if r.stain != "none":
        ref = Path(r.stain_reference) if r.stain_reference else parts["train"].samples[0].path
        stain = fit_stain(r.stain, read_image(ref))
        stain["reference"] = str(ref)
    pre = Preprocess(r.input_size, tuple(mean), tuple(std), r.denoise, stain, crop=r.crop)
    aug = Augment(**({"cutout_fill": r.crop == "cutout"} | r.augment))
    for p in net.parameters():
        p.requires_grad_(False)
    trainable = _Trainable(net)
    for p in trainable.parameters():
        p.requires_grad_(True)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        split.save(out / "split.json")
        save_config(cfg, out / "config.yaml")
    return _Run(cfg, out, device, rank, world, ds, split, parts, net, net_spec, weights_source, trainable, pre, aug,
                subclasses, sub_groups, time.time())


def _inputs(run: _Run, progress: bool) -> tuple[dict[str, tuple], list[tuple[str, str]]]:
    """Per part ``(inputs, labels, samples)``: cached stem features (N, views, C, H, W) by default, else prepared
    images; and the unreadable ``(path, reason)``."""
    cfg, r = run.cfg, run.cfg.recipe
    y_of = {c: i for i, c in enumerate(run.ds.classes)}
    failures: list[tuple[str, str]] = []
    if not r.cache_stem:
        return {name: _load_images(part, run.pre, failures) for name, part in run.parts.items()}, failures
    key = stem_key(cfg.spec(), run.weights_source, run.pre, run.aug, cfg.seed)
    cache = StemCache(cache_root(cfg.cache_dir) / "stem" / f"{key}.pt")
    if run.world > 1:  # rank 0 fills the cache, the others read it
        if run.rank == 0:
            for name, part in run.parts.items():
                cache.compute(run.net._stem, part.samples, 1 + r.aug_views if name == "train" else 1, run.pre,
                              run.aug, cfg.seed)
        dist.barrier()
        cache = StemCache(cache.path)
    data = {}
    for name, part in run.parts.items():
        views = 1 + r.aug_views if name == "train" else 1
        feats, ok, failed = cache.compute(run.net._stem, part.samples, views, run.pre, run.aug, cfg.seed,
                                          desc=f"stem features ({name}, {views} view(s))", progress=progress)
        failures += failed
        data[name] = (feats, torch.tensor([y_of[part.samples[i].label] for i in ok]), [part.samples[i] for i in ok])
    return data, failures


def _optimiser(run: _Run) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """Adam(W) with the head at ``lr`` and the trained backbone stages at ``backbone_lr``; cosine or no schedule."""
    r, net = run.cfg.recipe, run.net
    head_params = list(net.head.parameters())
    head_ids = {id(p) for p in head_params}
    body_params = [p for p in run.trainable.parameters() if id(p) not in head_ids]
    groups = [{"params": head_params, "lr": r.lr}]
    if body_params:
        groups.append({"params": body_params, "lr": r.backbone_lr})
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[r.optimizer]
    opt = opt_cls(groups, weight_decay=r.weight_decay)
    return opt, (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=r.epochs) if r.schedule == "cosine" else None)


def _loss(run: _Run, data: dict) -> tuple:
    """The training loss ``loss_fn(logits, y, w)``, the per-sample weights of train and val (None unless the balance
    is by source or sources are weighted) and the training class counts."""
    r, n_classes = run.cfg.recipe, len(run.ds.classes)
    counts = np.bincount(data["train"][1].numpy(), minlength=n_classes).astype(float)
    class_w = (torch.tensor(counts.sum() / np.maximum(counts, 1) / len(counts), dtype=torch.float32)
               if r.balance == "weights" else None)
    weights = None
    if class_w is not None:
        # a subclass weighs what its class weighs: the classes stay balanced as without subclasses
        weights = (class_w[torch.as_tensor(run.sub_groups)] if run.subclasses else class_w).to(run.device)
    # balance 'source': every sample weighs n_source / (n_classes * n_source_class), classes balanced within each
    # source, so no source can teach "this source means that class"
    sample_w = None
    if r.balance == "source" or r.source_weights:
        # the validation loss is unweighted by class except under 'source' (as without source weights)
        sample_w = {name: sample_weights(data[name][1].numpy(), data[name][2], n_classes, r.balance,
                                         class_w if name == "train" else None, r.source_weights).to(run.device)
                    for name in ("train", "val")}
        weights = None  # in the sample weights now
    ce = nn.CrossEntropyLoss(weight=weights, label_smoothing=r.label_smoothing,
                             reduction="none" if sample_w else "mean")

    def loss_fn(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        return ce(logits, y) if w is None else (ce(logits, y) * w).sum() / w.sum()
    return loss_fn, sample_w, counts


def _fit(run: _Run, data: dict, masks: tuple | None, resume: bool, progress: bool) -> tuple[list[dict], int, dict]:
    """The epochs: seeded order (or balanced sampling), a view per image and epoch, the cam_mask loss where set,
    validation loss, checkpoints (``last.pt`` every epoch, ``best.pt`` on improvement), early stopping, resume.
    Leaves the best epoch's weights in ``run.trainable``; returns the history, the best epoch and (DDP) the ranks'
    checksums of their final weights."""
    cfg, r, net, trainable, device = run.cfg, run.cfg.recipe, run.net, run.trainable, run.device
    net.to(device)
    opt, sched = _optimiser(run)
    loss_fn, sample_w, counts = _loss(run, data)
    model = trainable
    if run.world > 1:
        model = nn.parallel.DistributedDataParallel(
            trainable, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")

    ckpt_dir = run.out / "checkpoints"
    start_epoch, best_loss, bad_epochs, history = 0, math.inf, 0, []
    if resume and (ckpt_dir / "last.pt").exists():
        state = torch.load(str(ckpt_dir / "last.pt"), map_location="cpu", weights_only=True)
        trainable.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched and "scheduler" in state:
            sched.load_state_dict(state["scheduler"])
        start_epoch, best_loss, bad_epochs = int(state["epoch"]) + 1, float(state["best_loss"]), int(state["bad"])
        torch.set_rng_state(state["torch_rng"])  # dropout masks continue as if never interrupted
        history = (json.loads((run.out / "history.json").read_text()) if (run.out / "history.json").exists()
                   else [])
        log.info("resuming after epoch %d", start_epoch)

    x_tr, y_tr, _ = data["train"]
    n_train = len(y_tr)
    # what the loss compares the head's output with: subclasses when training on them, else the classes
    y_fit = (torch.tensor([run.subclasses.index(subclass_of(s, r.subclasses)) for s in data["train"][2]])
             if run.subclasses else y_tr)
    for epoch in tqdm(range(start_epoch, r.epochs), desc="epochs", unit="ep", disable=not progress or run.rank != 0,
                      leave=False):
        rng = np.random.default_rng(cfg.seed * 1000 + epoch)
        if r.balance == "sampler":
            w = 1.0 / counts[y_tr.numpy()]
            order = rng.choice(n_train, n_train, replace=True, p=w / w.sum())
        else:
            order = rng.permutation(n_train)
        order = order[run.rank::run.world]  # each rank its own share (DistributedSampler's rule, in a seeded order)
        model.train()
        tot, n, cam_tot, cam_n = 0.0, 0, 0.0, 0
        for i in range(0, len(order), r.batch_size):
            idx = order[i:i + r.batch_size]
            if r.cache_stem:
                views = rng.integers(0, x_tr.shape[1], len(idx))
                xb = x_tr[idx, views].float()
            else:
                xb = torch.from_numpy(np.stack([run.pre.normalize(run.aug(x_tr[j], rng)) for j in idx]))
                xb = net.stem(xb.to(device))
            yb = y_fit[idx].to(device)
            with torch.autocast(device.type, enabled=cfg.amp and device.type == "cuda"):
                wb = None if sample_w is None else sample_w["train"][idx]
                if masks is None:
                    loss = loss_fn(model(xb.to(device)), yb, wb)
                else:
                    logits, cams = model(xb.to(device), with_maps=True)
                    loss = loss_fn(logits, yb, wb)
                    sel = masks[1][idx]
                    if sel.any():
                        share = outside_share(cams[sel.to(device)][:, masks[2]].float(),
                                              masks[0][idx, views][sel].to(device))
                        loss = loss + r.cam_mask * share
                        cam_tot += share.item() * int(sel.sum())
                        cam_n += int(sel.sum())
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            tot += loss.item() * len(idx)
            n += len(idx)
        if sched:
            sched.step()
        val_logits = _logits(trainable, net, data["val"][0], cfg, device, run.pre)
        val_ce = nn.functional.cross_entropy(torch.tensor(val_logits), data["val"][1], reduction="none")
        val_loss = float(val_ce.mean() if sample_w is None else (val_ce * sample_w["val"].cpu()).sum()
                         / sample_w["val"].sum().cpu())
        val_acc = float((val_logits.argmax(1) == data["val"][1].numpy()).mean())
        history.append({"epoch": epoch, "train_loss": tot / max(n, 1), "val_loss": val_loss, "val_accuracy": val_acc,
                        "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - run.t0, 2)})
        if masks is not None:  # mean share of the abnormal maps outside the cell, images with a mask
            history[-1]["cam_outside"] = cam_tot / cam_n if cam_n else float("nan")
        improved = val_loss < best_loss - 1e-4
        best_loss, bad_epochs = (val_loss, 0) if improved else (best_loss, bad_epochs + 1)
        if run.rank == 0:
            state = {"model": trainable.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                     "best_loss": best_loss, "bad": bad_epochs, "torch_rng": torch.get_rng_state()}
            if sched:
                state["scheduler"] = sched.state_dict()
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            torch.save(state, str(ckpt_dir / "last.pt"))
            if improved:
                torch.save({"model": trainable.state_dict(), "epoch": epoch}, str(ckpt_dir / "best.pt"))
            _write_history(run.out, history)
        if bad_epochs >= r.patience:
            log.info("early stop at epoch %d (no val-loss improvement for %d epochs)", epoch, r.patience)
            break
    ddp_info = {}
    if run.world > 1:
        ddp_info = _check_replicas(trainable)  # of the final weights, before each rank loads the best ones
        dist.barrier()  # rank 0 has written best.pt
    best = torch.load(str(ckpt_dir / "best.pt"), map_location="cpu", weights_only=True)
    trainable.load_state_dict(best["model"])
    return history, int(best["epoch"]), ddp_info


def _check_replicas(trainable: _Trainable) -> dict:
    """Every rank reports a checksum of its final weights: DDP must have kept them identical."""
    local = torch.tensor([float(sum(p.double().sum() for p in trainable.parameters()))], dtype=torch.float64)
    sums = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sums, local)
    return {"world_size": dist.get_world_size(), "backend": dist.get_backend(),
            "final_weight_checksums": [float(x.item()) for x in sums]}


def json_safe(obj):
    """``obj`` with NaN and infinities as None (JSON has no NaN: an AUC of a one-class source is undefined, not a
    number) and NumPy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_model(cfg: TrainConfig, out: Path, net: nn.Module, net_spec: dict, ds: Dataset, split: Split,
                pre: Preprocess, weights_source: str, device: torch.device, val: tuple, test: tuple,
                history: list[dict], best_epoch: int, t0: float, failures: list, n_train: int, rank: int = 0,
                world: int = 1, ddp_info: dict | None = None) -> tuple[Path, dict, list[dict]]:
    """The end of every training path: round the weights to ``cfg.weights_dtype``, fit the temperature and the
    operating threshold on validation, score the test part once, and write the model directory (rank 0).

    Args:
        net: the trained network on the CPU, in eval mode.
        val: ``(labels, logits_fn)``; test: ``(labels, logits_fn, samples)``; each ``logits_fn()`` gives the
            network's logits after the rounding.
    """
    round_weights(net, cfg.weights_dtype)  # everything below measures the weights as they are saved
    y_val, y_test = val[0], test[0]
    val_logits = val[1]()
    temperature, threshold = calibrate(cfg, val_logits, y_val, len(ds.classes))
    test_logits = test[1]()
    info = {
        "name": cfg.name, "spec": net_spec, "classes": ds.classes, "target": cfg.target,
        "preprocess": pre.to_dict(), "temperature": temperature, "target_layer": net.target_layer,
        "weights_source": weights_source, "datasets": list(cfg.datasets), "best_epoch": best_epoch,
        "threshold": threshold,
        "trained_seconds": round(time.time() - t0, 1),
        "trained_on": {"device": device.type, "amp": bool(cfg.amp and device.type == "cuda"), "world_size": world,
                       "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                       "torch": torch.__version__},
    }
    metrics: dict = {}
    if rank == 0:
        info = save_model_dir(out, net, info, cfg.weights_dtype)
        training = {"n_train": n_train, "epochs_run": len(history), "best_epoch": best_epoch,
                    "unreadable": [{"path": p, "reason": r} for p, r in failures], "seconds": info["trained_seconds"]}
        if ddp_info:
            training["ddp"] = ddp_info
        metrics = score_and_document(out, cfg, ds, split, info, (y_val, val_logits),
                                     (y_test, test_logits, test[2]), training)
    return out, metrics, history


def calibrate(cfg: TrainConfig, val_logits: np.ndarray, y_val: np.ndarray, n_classes: int) -> tuple[float,
                                                                                                 float | None]:
    """The temperature fitted on validation, and for ``operating_point: balanced`` (two classes) the threshold there
    where sensitivity equals specificity (else None)."""
    temperature = fit_temperature(val_logits, y_val)
    if cfg.operating_point != "balanced" or n_classes != 2:
        return temperature, None
    from leukoscope.evaluate.metrics import balanced_threshold

    return temperature, balanced_threshold(y_val, softmax(val_logits / temperature)[:, 1])


def score_and_document(out: Path, cfg: TrainConfig, ds: Dataset, split: Split, info: dict, val: tuple, test: tuple,
                       training: dict) -> dict:
    """Score the test part once and write what a model directory holds beside its weights: evaluation plots,
    metrics.json (with the operating point and ``training``), the model card, and the out-of-distribution detector
    and quality reference. ``val``: ``(labels, logits)``; ``test``: ``(labels, logits, samples)``; ``info``: the
    model.json record (temperature, threshold). Returns the metrics."""
    from leukoscope.evaluate.report import evaluate_predictions, write_card

    (y_val, val_logits), (y_test, test_logits, samples) = val, test
    temperature, threshold = info["temperature"], info.get("threshold")
    metrics = evaluate_predictions(ds.classes, y_test, test_logits, temperature, samples, out_dir=out,
                                   val=(y_val, val_logits), title=f"{info['name']} on held-out groups")
    if threshold is not None:  # the answers the model gives: at the operating threshold chosen on validation
        from leukoscope.evaluate.metrics import binary_metrics

        metrics["operating_point"] = {
            "aim": "sensitivity = specificity on validation", "threshold": threshold,
            "val": binary_metrics(y_val, softmax(val_logits / temperature)[:, 1], threshold),
            "test": binary_metrics(y_test, softmax(test_logits / temperature)[:, 1], threshold)}
    metrics["training"] = training | {"n_val": len(y_val), "n_test": len(y_test)}
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=1))
    write_card(out, cfg, ds, split, info, metrics)
    if {"train", "val"} <= set(split.parts):  # the out-of-distribution flag and the quality warnings
        from leukoscope.train.trust import fit_trust

        fit_trust(out, {p: split.subset(ds, p) for p in ("train", "val", "test") if p in split.parts},
                  progress=False)
    return metrics


def _cam_masks(run: _Run, train: tuple, progress: bool) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(masks (N, V, g, g), has-a-mask (N,), the abnormal classes' indices) of the training images for ``cam_mask``,
    g the last feature map's side. Only the abnormal classes' maps are constrained: a healthy cell is the absence of
    abnormal evidence, and a constrained healthy map simply vanishes (measured: all-zero maps on healthy C-NMC
    cells), since a class of a softmax can lose all its positive evidence without changing a prediction."""
    from leukoscope.data.datasets import NORMAL_CLASS_NAMES

    r, classes = run.cfg.recipe, run.ds.classes
    abnormal = [i for i, c in enumerate(classes) if c.lower() not in NORMAL_CLASS_NAMES]
    feats, _, samples = train
    if not r.cache_stem or r.model != "cnn" or r.subclasses or not isinstance(run.net.head[-1], nn.Linear):
        raise ValueError("cam_mask needs a CNN with cached stem features and no subclasses")
    if not abnormal or len(abnormal) == len(classes):
        raise ValueError(f"cam_mask needs normal and abnormal classes (normal: {list(NORMAL_CLASS_NAMES)}); "
                         f"the model's classes are {classes}")
    run.trainable.eval()  # batch norm must not learn from this one-image pass
    with torch.no_grad():
        grid = run.trainable(feats[:1, 0].float(), with_maps=True)[1].shape[-1]
    masks, has = view_masks(samples, feats.shape[1], run.pre, run.aug, run.cfg.seed, grid, progress)
    log.info("cam_mask: %d of %d training images are cells on black with a mask", int(has.sum()), len(samples))
    if not has.any():
        raise ValueError("cam_mask: no training image is a cell on a black background (nothing to learn from)")
    return masks, has, abnormal


def _load_images(part: Dataset, pre: Preprocess, failures: list) -> tuple[list[np.ndarray], torch.Tensor, list]:
    imgs, ys, ok = [], [], []
    index = {c: i for i, c in enumerate(part.classes)}
    samples = tqdm(part.samples, desc="reading images", unit="img", leave=False)
    for s, rgb in read_readable(samples, failures, lambda s: s.path):
        imgs.append(pre.prepare(rgb))
        ys.append(index[s.label])
        ok.append(s)
    return imgs, torch.tensor(ys), ok


@torch.inference_mode()
def _logits(trainable: _Trainable, net: nn.Module, x: torch.Tensor | list, cfg: TrainConfig,
            device: torch.device, pre: Preprocess) -> np.ndarray:
    trainable.eval()
    out = []
    for i in range(0, len(x), 128):
        if cfg.recipe.cache_stem:
            xb = x[i:i + 128, 0].float().to(device)
        else:
            xb = net.stem(torch.from_numpy(np.stack([pre.normalize(im) for im in x[i:i + 128]])).to(device))
        z = trainable(xb)
        out.append((net.coarse(z) if hasattr(net, "coarse") else z).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def subclass_of(sample: Sample, label: str) -> str:
    """``class/sub`` when the sample has the finer ``label`` (not empty) and it differs from its class, else its
    class."""
    sub = sample.labels.get(label) if label else None
    return f"{sample.label}/{sub}" if sub and sub != sample.label else sample.label


def subclass_labels(ds: Dataset, label: str) -> tuple[list[str], list[int]]:
    """The subclasses a model trained with ``subclasses: label`` has, in class order, and the class of each
    (``[], []`` when ``label`` is empty). Each sample's subclass is :func:`subclass_of`."""
    if not label:
        return [], []
    cls = {subclass_of(s, label): ds.classes.index(s.label) for s in ds.samples}
    if len(cls) == len(ds.classes):
        have = sorted({k for s in ds.samples for k in s.labels})
        raise ValueError(f"no sample of {ds.name!r} has a label {label!r} that refines its class; labels: {have}")
    subs = sorted(cls, key=lambda n: (cls[n], n != ds.classes[cls[n]], n))
    return subs, [cls[n] for n in subs]


def sample_weights(y: np.ndarray, samples: list, n_classes: int, balance: str, class_weights: torch.Tensor | None,
                   source_weights: dict) -> torch.Tensor:
    """Per-sample loss weights: the class balance (``balance`` ``source``: :func:`source_class_weights`;
    ``weights``: ``class_weights[y]``; else 1) times the sample's source weight (``source_weights``, default 1).
    The loss is their weighted mean, so with equal source weights it is the class-weighted loss."""
    if balance == "source":
        w = source_class_weights(y, samples, n_classes)
    elif class_weights is not None:
        w = class_weights[torch.as_tensor(y, dtype=torch.long)]
    else:
        w = torch.ones(len(y), dtype=torch.float32)
    return w * torch.tensor([float(source_weights.get(getattr(s, "source", ""), 1.0)) for s in samples],
                            dtype=torch.float32)


def check_source_weights(weights: dict, datasets: tuple[str, ...]) -> None:
    unknown = sorted(set(weights) - set(datasets))
    if unknown:
        raise ValueError(f"source_weights names {unknown}, not among the datasets {list(datasets)}")
    bad = {k: v for k, v in weights.items() if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0}
    if bad:
        raise ValueError(f"source_weights must be positive numbers, got {bad}")


def source_class_weights(y: np.ndarray, samples: list, n_classes: int) -> torch.Tensor:
    """Per-sample weights ``n_s / (n_classes_in_s * n_sc)``: each source keeps its share of the total weight and its
    classes weigh equally within it (classes absent from a source are not counted)."""
    src = np.array([getattr(s, "source", "") or "" for s in samples])
    w = np.ones(len(y), np.float64)
    for s in np.unique(src):
        m = src == s
        c = np.bincount(y[m], minlength=n_classes)
        present = int((c > 0).sum())
        w[m] = m.sum() / (present * c[y[m]])
    return torch.tensor(w, dtype=torch.float32)


def _write_history(out: Path, history: list[dict]) -> None:
    (out / "history.json").write_text(json.dumps(history, indent=1))
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    try:
        from torch.utils.tensorboard import SummaryWriter  # only when tensorboard is installed
    except ImportError:
        return
    with SummaryWriter(str(out / "tensorboard")) as tb:
        h = history[-1]
        for k, v in h.items():
            if k != "epoch":
                tb.add_scalar(k, v, h["epoch"])
