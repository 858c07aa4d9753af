"""Cache the frozen stem's output once per image and augmented view, so that training the top is fast on CPUs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from leukoscope.cache import cache_root  # noqa: F401  (re-exported: the trainers import it from here)
from leukoscope.data.datasets import Sample
from leukoscope.data.images import read_image
from leukoscope.errors import ImageReadError
from leukoscope.preprocess.transforms import Augment, Preprocess

log = logging.getLogger(__name__)


def stem_key(spec: dict, weights_source: str, preprocess: Preprocess, augment: Augment, seed: int) -> str:
    aug = repr(augment) + (" cutout_fill" if augment.cutout_fill else "")
    doc = json.dumps([spec.get("backbone"), spec.get("trainable_stages"), weights_source,
                      preprocess.to_dict(), aug, seed], sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def _sample_key(path: Path, view: int) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{view}"


def _view_seed(path: Path, view: int, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{path.name}|{view}|{seed}".encode()).digest()[:4], "little")


def view_image(prepared: np.ndarray, path: Path, view: int, augment: Augment, seed: int,
               keep_background: bool = False) -> np.ndarray:
    """View ``view`` of a prepared image as the cache holds it: 0 is the image itself, the others are augmented with
    a generator seeded by the file name, the view and the seed (the same view every run); ``keep_background``: the
    same view with a black surround left black."""
    if view == 0:
        return prepared
    return augment(prepared, np.random.default_rng(_view_seed(path, view, seed)), keep_background=keep_background)


class StemCache:
    """Stem outputs (float16) keyed by file, size, mtime and view; view 0 is the un-augmented image."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, torch.Tensor] = {}
        if path.exists():
            self.data = torch.load(str(path), map_location="cpu", weights_only=True)
        self._dirty = False

    def save(self) -> None:
        if self._dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A name of its own: two runs sharing the cache (e.g. benchmarks side by side) must not move each
            # other's half-written file. The last one to finish wins; the other's new entries are computed again.
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            torch.save(self.data, str(tmp))
            os.replace(tmp, self.path)  # atomic: an interrupted run never leaves a broken cache
            self._dirty = False

    @torch.inference_mode()
    def compute(self, stem: nn.Module, samples: list[Sample], views: int, preprocess: Preprocess, augment: Augment,
                seed: int, batch_size: int = 32, desc: str = "stem features",
                progress: bool = True) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
        """Features (N_ok, V, ...) for ``views`` views of each readable sample, their indices, and failures."""
        stem.eval()
        todo = []
        for i, s in enumerate(samples):
            for v in range(views):
                if _sample_key(s.path, v) not in self.data:
                    todo.append((i, v))
        failed: dict[int, str] = {}
        pbar = tqdm(total=len(todo), desc=desc, unit="img", leave=False, disable=not todo or not progress)
        batch, keys = [], []
        run = _fast_runner(stem, preprocess.size) if todo else None

        def flush() -> None:
            if batch:
                out = run(np.stack(batch)).to(torch.float16)
                for k, f in zip(keys, out):
                    self.data[k] = f.clone()
                pbar.update(len(batch))
                batch.clear()
                keys.clear()
                self._dirty = True

        current: tuple[int, np.ndarray] | None = None
        for i, v in todo:
            if i in failed:
                continue
            s = samples[i]
            try:
                if current is None or current[0] != i:
                    current = (i, preprocess.prepare(read_image(s.path)))
            except ImageReadError as exc:
                failed[i] = exc.reason
                log.warning("skipping %s", exc)
                continue
            batch.append(preprocess.normalize(view_image(current[1], s.path, v, augment, seed)))
            keys.append(_sample_key(s.path, v))
            if len(batch) >= batch_size:
                flush()
        flush()
        pbar.close()
        self.save()
        ok = [i for i in range(len(samples)) if i not in failed and all(
            _sample_key(samples[i].path, v) in self.data for v in range(views))]
        feats = torch.stack([torch.stack([self.data[_sample_key(samples[i].path, v)] for v in range(views)])
                             for i in ok]) if ok else torch.zeros(0)
        return feats, ok, [(str(samples[i].path), r) for i, r in failed.items()]


def _fast_runner(stem: nn.Module, size: int):
    """The frozen stem through ONNX Runtime when installed (~10x eager PyTorch on 2 CPU cores), else PyTorch."""
    try:
        import onnxruntime  # noqa: F401  (installed?)

        from leukoscope.models.export import export_onnx
        from leukoscope.models.modeldir import onnx_session
    except ImportError:
        return lambda x: stem(torch.from_numpy(x))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = export_onnx(stem, size, Path(tmp) / "stem.onnx")
            sess = onnx_session(path)
        except Exception as exc:  # an architecture the exporter cannot handle: stay with PyTorch
            log.warning("ONNX export of the stem failed (%s); computing features with PyTorch", exc)
            return lambda x: stem(torch.from_numpy(x))
    return lambda x: torch.from_numpy(sess.run(None, {"input": x.astype(np.float32)})[0])
