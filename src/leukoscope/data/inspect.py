"""Dataset summaries and leak checks (groups on both sides, exact and near-duplicate images across a split)."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
from PIL import Image
from tqdm import tqdm

from leukoscope.data.datasets import Dataset, Sample, groups_by_class
from leukoscope.data.images import read_image
from leukoscope.data.splits import Split, groups_on_both_sides
from leukoscope.errors import ImageReadError

NEAR_DUPLICATE_BITS = 6  # difference hash 16x16, Hamming distance <= 6 (the threshold the DATA.md audits used)


@dataclass
class ImageInfo:
    sample: Sample
    size: tuple[int, int]  # (width, height)
    sha256: str  # of the file bytes
    pixel_sha256: str  # of the decoded RGB pixels: same image re-encoded differently
    dhash: np.ndarray  # 256 bools


@dataclass
class Scan:
    infos: list[ImageInfo]
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def dhash(rgb: np.ndarray, size: int = 16) -> np.ndarray:
    """Difference hash: ``size * size`` bits of horizontal gradient signs on a grayscale thumbnail."""
    gray = Image.fromarray(rgb).convert("L").resize((size + 1, size), Image.Resampling.LANCZOS)
    a = np.asarray(gray, dtype=np.int16)
    return (a[:, 1:] > a[:, :-1]).ravel()


def scan_images(samples: list[Sample], progress: bool = True) -> Scan:
    """Decode every image once; unreadable files are collected, not fatal."""
    out = Scan([])
    for s in tqdm(samples, desc="reading images", unit="img", disable=not progress, leave=False):
        try:
            raw = s.path.read_bytes()
            rgb = read_image(raw, name=str(s.path))
        except (ImageReadError, OSError) as exc:
            out.failed.append((str(s.path), getattr(exc, "reason", str(exc))))
            continue
        out.infos.append(ImageInfo(s, (rgb.shape[1], rgb.shape[0]), hashlib.sha256(raw).hexdigest(),
                                   hashlib.sha256(rgb.tobytes() + str(rgb.shape).encode()).hexdigest(), dhash(rgb)))
    return out


def summarize(ds: Dataset, progress: bool = True) -> dict:
    """Images and groups per class, images per group (min / median / max), image sizes, unreadable files."""
    scan = scan_images(ds.samples, progress=progress)
    ok = [i.sample for i in scan.infos]
    per_group = Counter(s.group for s in ok)
    counts = Counter(s.label for s in ok)
    sizes = Counter(f"{w}x{h}" for w, h in (i.size for i in scan.infos))
    gpc = groups_by_class(ds.subset(ok))
    vals = sorted(per_group.values())
    return {
        "dataset": ds.name, "root": str(ds.root), "target": ds.target, "group_by": ds.group_by,
        "n_images": len(ok), "n_groups": len(per_group),
        "classes": {c: counts.get(c, 0) for c in ds.classes},
        "groups_per_class": gpc,
        "images_per_group": {"min": vals[0] if vals else 0, "median": float(np.median(vals)) if vals else 0.0,
                             "max": vals[-1] if vals else 0},
        "image_sizes": dict(sizes.most_common()),
        "excluded": [{"path": p, "reason": r} for p, r in ds.excluded],
        "unreadable": [{"path": p, "reason": r} for p, r in scan.failed],
    }


def check_split(ds: Dataset, split: Split, progress: bool = True, near_bits: int = NEAR_DUPLICATE_BITS) -> dict:
    """Everything that leaks across the parts of ``split``: shared groups, exact and near-duplicate images."""
    part_of = split.part_of()
    in_split = [s for s in ds.samples if ds.relpath(s) in part_of]
    scan = scan_images(in_split, progress=progress)
    part = [part_of[ds.relpath(i.sample)] for i in scan.infos]

    exact = []
    for key in ("sha256", "pixel_sha256"):
        by_hash: dict[str, list[int]] = defaultdict(list)
        for k, info in enumerate(scan.infos):
            by_hash[getattr(info, key)].append(k)
        for idx in by_hash.values():
            for a, b in combinations(idx, 2):
                if part[a] != part[b]:
                    pair = sorted([ds.relpath(scan.infos[a].sample), ds.relpath(scan.infos[b].sample)])
                    if pair not in exact:
                        exact.append(pair)

    near = []
    if scan.infos:
        bits = np.stack([i.dhash for i in scan.infos]).astype(np.uint8)
        parts = np.array(part)
        for a in range(len(bits)):
            other = np.flatnonzero(parts[a + 1:] != parts[a]) + a + 1
            if not len(other):
                continue
            dist = (bits[other] != bits[a]).sum(1)
            for b, d in zip(other[dist <= near_bits], dist[dist <= near_bits]):
                pair = sorted([ds.relpath(scan.infos[a].sample), ds.relpath(scan.infos[b].sample)])
                if pair not in exact:
                    near.append({"a": pair[0], "b": pair[1], "hamming": int(d)})

    leaks = groups_on_both_sides(ds, split)
    return {
        "dataset": ds.name, "split_kind": split.kind, "parts": {k: len(v) for k, v in split.parts.items()},
        "groups_on_both_sides": leaks, "exact_duplicates_across": exact, "near_duplicates_across": near,
        "unreadable": [{"path": p, "reason": r} for p, r in scan.failed],
        "leaks": bool(leaks or exact or near),
    }
