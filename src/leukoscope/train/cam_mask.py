"""Teach a CNN to look at the cell: a loss on the share of its class activation map outside the cell.

Where a training image is a segmented cell on a black background (C-NMC 2019), the cell's mask is free. With
``cam_mask: W`` in the training config, each such image adds ``W x`` the share of each abnormal class's activation
map (CAM: ``relu(sum_k w_ck A_k)`` of the last feature map ``A``; for a global-average-pooled linear head this is what
Grad-CAM computes at that layer) that lies outside the mask, averaged over the images with a mask and the abnormal
classes. Other images (cells in their smear) add nothing. The normal classes' maps are left free: constrained, they
vanished (all-zero maps on healthy C-NMC cells), since a class of a softmax can lose all its positive evidence
without any prediction changing. This is attention supervision in the manner of "right for the right
reasons" (Ross et al. 2017), applied to the CAM rather than to input gradients, so that it costs one small product
per batch on the cached stem features.

The maps it moves onto the cell are not thereby faithful: measured with deletion / insertion and ROAD against a
random map (``leukoscope faithfulness``; runs in ``benchmarks/results/cam_mask_experiments/``), the weights tried cost
faithfulness that the cutout crop alone (``crop: cutout``) keeps.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from tqdm import tqdm

from leukoscope.data.datasets import Sample
from leukoscope.data.images import read_image
from leukoscope.errors import ImageReadError
from leukoscope.preprocess.background import foreground_mask
from leukoscope.preprocess.transforms import Augment, Preprocess
from leukoscope.train.stem_cache import view_image


def view_masks(samples: list[Sample], views: int, preprocess: Preprocess, augment: Augment, seed: int, grid: int,
               progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample and view as the stem cache made it, the share of each of ``grid x grid`` cells inside the
    cell's mask: (N, V, grid, grid) float32, and (N,) bool saying which samples have a mask at all."""
    masks = torch.zeros(len(samples), views, grid, grid)
    has = torch.zeros(len(samples), dtype=torch.bool)
    for i, s in enumerate(tqdm(samples, desc="cell masks", unit="img", leave=False, disable=not progress)):
        try:
            img = preprocess.prepare(read_image(s.path))
        except ImageReadError:
            continue
        if foreground_mask(img) is None:
            continue
        for v in range(views):
            m = foreground_mask(view_image(img, s.path, v, augment, seed, keep_background=True), border_share=0.5)
            if m is None:
                break
            masks[i, v] = torch.from_numpy(cv2.resize(m.astype(np.float32), (grid, grid),
                                                      interpolation=cv2.INTER_AREA))
        else:
            has[i] = True
    return masks, has


def class_maps(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CAMs of every class, (B, C, H, W): ``relu(sum_k weight[c, k] * features[:, k])``."""
    return torch.relu(torch.einsum("ck,bkhw->bchw", weight, features))


def outside_share(cams: torch.Tensor, inside: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over images and classes of the share of each CAM outside the cell; ``inside`` is (B, H, W) in [0, 1]."""
    total = cams.sum(dim=(2, 3))
    outside = (cams * (1 - inside)[:, None]).sum(dim=(2, 3))
    return (outside / (total + eps)).mean()
