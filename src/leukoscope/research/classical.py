"""Classical baselines: handcrafted cell features fed to a Random Forest or an RBF SVM.

Features (see :data:`FEATURE_NAMES`): nucleus and cytoplasm are segmented (:mod:`leukoscope.preprocess.segment`),
then morphology (area, perimeter, circularity, eccentricity, solidity, nucleus-to-cytoplasm ratio ...), colour
statistics in RGB, HSV and Lab, texture (GLCM / Haralick, uniform LBP) and Hu moments are computed. Areas and
lengths are in pixels of the image shrunk to :data:`~leukoscope.preprocess.segment.WORK_SIZE` on its longer side.

Every split here is group-aware: the SVM's C and gamma are tuned, and its Platt calibration is fitted, on
StratifiedGroupKFold folds of the *training* groups only (``SVC(probability=True)`` is not used: it is deprecated
and calibrates on folds that ignore groups).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
from skimage.measure import regionprops

from leukoscope._registry import Registry
from leukoscope.data.datasets import Dataset, Sample
from leukoscope.data.images import read_image
from leukoscope.errors import ImageReadError, LeukoscopeError
from leukoscope.preprocess.segment import Segmentation, check_rgb, segment_cell, to_work_size

log = logging.getLogger(__name__)

# Bump when any feature changes: cached vectors of another version are not reused.
FEATURE_VERSION = 1
CACHE_ENV = "LEUKOSCOPE_CACHE"  # the project's cache root (shared with the CNN stem cache)

_SHAPE = ("area", "perimeter", "circularity", "eccentricity", "solidity", "extent", "major_axis", "minor_axis")
_COLOUR_CH = ("R", "G", "B", "S", "V", "L", "a", "b")
_GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "entropy")
_GLCM_DIST = (1, 2)
_GLCM_LEVELS = 32
_LBP_P, _LBP_R = 8, 1


def _feature_names() -> list[str]:
    names = [f"{r}_{s}" for r in ("nucleus", "cell") for s in _SHAPE]
    names += ["nc_ratio", "nucleus_cell_area_ratio", "nucleus_lobes", "nucleus_centre_offset"]
    for region in ("nucleus", "cytoplasm"):
        names += [f"{region}_{ch}_{stat}" for ch in _COLOUR_CH for stat in ("mean", "std")]
        names += [f"{region}_hue_cos", f"{region}_hue_sin"]
    names += [f"nucleus_minus_cytoplasm_{ch}" for ch in ("L", "a", "b")]
    for region in ("nucleus", "cell"):
        names += [f"{region}_glcm_{p}_d{d}" for d in _GLCM_DIST for p in _GLCM_PROPS]
    for region in ("nucleus", "cytoplasm"):
        names += [f"{region}_lbp_{i}" for i in range(_LBP_P + 2)]
    names += [f"{r}_hu{i}" for r in ("nucleus", "cell") for i in range(1, 8)]
    return names


FEATURE_NAMES: tuple[str, ...] = tuple(_feature_names())


# ----------------------------------------------------------------------------------------------------------------
# Features of one image
# ----------------------------------------------------------------------------------------------------------------
def shape_features(mask: np.ndarray) -> dict[str, float]:
    """Morphology of the largest region of a boolean mask, in pixels.

    Circularity is ``4 pi area / perimeter^2`` with the Crofton perimeter (close to 1 for a digital disk).
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return dict.fromkeys(_SHAPE, 0.0)
    lab, n = ndi.label(mask)
    props = max(regionprops(lab), key=lambda p: p.area) if n > 1 else regionprops(lab)[0]
    area = float(props.area)
    perimeter = float(props.perimeter_crofton) if area > 1 else 1.0
    return {
        "area": area,
        "perimeter": perimeter,
        "circularity": float(min(4 * np.pi * area / max(perimeter, 1e-6) ** 2, 1.5)),
        "eccentricity": float(props.eccentricity),
        "solidity": float(props.solidity),
        "extent": float(props.extent),
        "major_axis": float(props.axis_major_length),
        "minor_axis": float(props.axis_minor_length),
    }


def _colour_stats(planes: dict[str, np.ndarray], hue: np.ndarray, mask: np.ndarray) -> list[float]:
    out = []
    for ch in _COLOUR_CH:
        v = planes[ch][mask]
        out += [float(v.mean()), float(v.std())]
    h = hue[mask]
    out += [float(np.cos(h).mean()), float(np.sin(h).mean())]
    return out


def _glcm_features(gray: np.ndarray, mask: np.ndarray) -> list[float]:
    """Haralick-type GLCM properties of the pixels inside ``mask`` only (averaged over 4 directions)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    g, m = gray[y0:y1, x0:x1].astype(np.float32), mask[y0:y1, x0:x1]
    lo, hi = np.percentile(g[m], [1, 99])
    # Levels 1..32 inside the mask, 0 outside; pairs touching 0 are dropped so the border does not count.
    q = np.clip((g - lo) / max(hi - lo, 1e-6) * (_GLCM_LEVELS - 1), 0, _GLCM_LEVELS - 1).astype(np.uint8) + 1
    q[~m] = 0
    P = graycomatrix(q, distances=list(_GLCM_DIST), angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4],
                     levels=_GLCM_LEVELS + 1, symmetric=True, normed=False)[1:, 1:].astype(np.float64)
    out = []
    for di in range(len(_GLCM_DIST)):
        Pd = P[:, :, di : di + 1, :]
        if Pd.sum() == 0:
            out += [0.0] * len(_GLCM_PROPS)
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            for prop in _GLCM_PROPS:
                val = graycoprops(Pd, prop)
                val = val[np.isfinite(val)]
                out.append(float(val.mean()) if val.size else 0.0)
    return out


def _lbp_hist(lbp: np.ndarray, mask: np.ndarray) -> list[float]:
    h = np.bincount(lbp[mask].astype(int), minlength=_LBP_P + 2)[: _LBP_P + 2].astype(float)
    return list(h / max(h.sum(), 1.0))


def _hu(mask: np.ndarray) -> list[float]:
    hu = cv2.HuMoments(cv2.moments(mask.astype(np.uint8), binaryImage=True)).ravel()
    # Log scale: raw Hu moments span many orders of magnitude.
    return [float(-np.sign(v) * np.log10(abs(v))) if v != 0 else 0.0 for v in hu]


def _n_lobes(rgb: np.ndarray, nucleus: np.ndarray) -> float:
    """Dark chromatin blobs inside the nucleus: ~1 for round nuclei, 2-5 for segmented neutrophils."""
    g = rgb[..., 1].astype(np.float32)
    v = g[nucleus]
    if v.size < 20:
        return 1.0
    dark = nucleus & (g <= np.percentile(v, 60))
    lab, n = ndi.label(cv2.morphologyEx(dark.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)))
    if n == 0:
        return 1.0
    sizes = np.bincount(lab.ravel())[1:]
    return float((sizes >= 0.05 * nucleus.sum()).sum())


def features_from_segmentation(rgb: np.ndarray, seg: Segmentation) -> np.ndarray:
    """The feature vector of an (already shrunk) image and its segmentation, in :data:`FEATURE_NAMES` order."""
    nucleus, cell = seg.nucleus, seg.cell
    cyto = seg.cytoplasm
    if cyto.sum() < 10:
        # No cytoplasm found (blast with a thin rim, or a cut-out cell): use a thin ring around the nucleus.
        ring = ndi.binary_dilation(nucleus, iterations=3) & ~nucleus
        cyto = ring if ring.any() else nucleus
    h, w = nucleus.shape
    nuc_s, cell_s = shape_features(nucleus), shape_features(cell)
    cyto_area = max(cell_s["area"] - nuc_s["area"], 1.0)
    cy, cx = ndi.center_of_mass(nucleus)
    offset = float(np.hypot(cy - (h - 1) / 2, cx - (w - 1) / 2) / np.hypot(h, w))
    vec = [nuc_s[k] for k in _SHAPE] + [cell_s[k] for k in _SHAPE]
    vec += [nuc_s["area"] / cyto_area, nuc_s["area"] / max(cell_s["area"], 1.0), _n_lobes(rgb, nucleus), offset]

    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL).astype(np.float32)
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    f = rgb.astype(np.float32)
    planes = {"R": f[..., 0], "G": f[..., 1], "B": f[..., 2], "S": hsv[..., 1], "V": hsv[..., 2],
              "L": lab[..., 0] * (100 / 255), "a": lab[..., 1] - 128, "b": lab[..., 2] - 128}
    hue = hsv[..., 0] * (2 * np.pi / 256)
    nuc_c, cyto_c = _colour_stats(planes, hue, nucleus), _colour_stats(planes, hue, cyto)
    vec += nuc_c + cyto_c
    vec += [float(planes[ch][nucleus].mean() - planes[ch][cyto].mean()) for ch in ("L", "a", "b")]

    # Texture on the green channel: Romanowsky-stained chromatin has most contrast there.
    green = rgb[..., 1]
    vec += _glcm_features(green, nucleus) + _glcm_features(green, cell)
    lbp = local_binary_pattern(green, _LBP_P, _LBP_R, method="uniform")
    vec += _lbp_hist(lbp, nucleus) + _lbp_hist(lbp, cyto)
    vec += _hu(nucleus) + _hu(cell)
    out = np.asarray(vec, dtype=np.float64)
    if out.shape != (len(FEATURE_NAMES),):  # pragma: no cover - guards edits that forget a name
        raise RuntimeError(f"feature vector has {out.size} values but FEATURE_NAMES has {len(FEATURE_NAMES)}")
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def extract_features(rgb: np.ndarray) -> np.ndarray:
    """Handcrafted features of one single-cell image.

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB, e.g. from :func:`leukoscope.data.images.read_image`.

    Returns:
        A float64 vector of ``len(FEATURE_NAMES)`` finite values.
    """
    rgb = to_work_size(check_rgb(rgb))
    return features_from_segmentation(rgb, segment_cell(rgb))


# ----------------------------------------------------------------------------------------------------------------
# Features of many images, with a cache
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FailedImage:
    """An image that could not be read (it is left out of training and evaluation)."""

    index: int
    path: str
    reason: str


def _cache_key(path: Path) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}|v{FEATURE_VERSION}|{len(FEATURE_NAMES)}"
    return hashlib.sha1(raw.encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$LEUKOSCOPE_CACHE/features``, else ``~/.cache/leukoscope/features``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "leukoscope")).expanduser() / "features"


class FeatureCache:
    """Feature vectors keyed by file path + mtime + size + feature version, stored as ``.npz`` shards in a folder.

    Each run that computes new vectors adds one shard (written atomically); shards are merged when many pile up.
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory).expanduser()
        self.prefix = f"features-v{FEATURE_VERSION}-n{len(FEATURE_NAMES)}-"

    def _shards(self) -> list[Path]:
        return sorted(self.dir.glob(f"{self.prefix}*.npz")) if self.dir.is_dir() else []

    def load(self) -> dict[str, np.ndarray]:
        table: dict[str, np.ndarray] = {}
        for shard in self._shards():
            try:
                with np.load(shard, allow_pickle=False) as z:
                    table.update(zip(z["keys"].tolist(), z["X"], strict=True))
            except Exception as exc:  # a half-written or foreign file: ignore it, recompute
                log.warning("ignoring unreadable feature cache shard %s (%s)", shard, exc)
        return table

    def add(self, new: dict[str, np.ndarray]) -> None:
        if not new:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        shards = self._shards()
        if len(shards) >= 16:
            merged = self.load() | new
            self._write(merged)
            for s in shards:
                s.unlink(missing_ok=True)
        else:
            self._write(new)

    def _write(self, table: dict[str, np.ndarray]) -> None:
        keys = np.array(list(table), dtype="U40")
        X = np.stack(list(table.values())).astype(np.float64)
        final = self.dir / f"{self.prefix}{uuid.uuid4().hex[:12]}.npz"
        tmp = final.with_suffix(".tmp.npz")
        np.savez(tmp, keys=keys, X=X)
        os.replace(tmp, final)


def extract_dataset_features(
    samples: Sequence[Sample] | Sequence[str | Path],
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[np.ndarray, list[FailedImage]]:
    """Features of many images, skipping (and reporting) the ones that cannot be read.

    Args:
        samples: dataset samples or image paths.
        cache_dir: where vectors are cached (default ``$LEUKOSCOPE_CACHE/features``, else
            ``~/.cache/leukoscope/features``); reruns on unchanged files read them from there.
        use_cache: ``False`` computes everything and writes nothing.
        progress: show a tqdm progress bar for the images not in the cache.

    Returns:
        ``X`` of shape ``(len(samples), len(FEATURE_NAMES))`` with NaN rows for unreadable images, and the list of
        those images with the reason.
    """
    from tqdm.auto import tqdm

    paths = [Path(s.path) if isinstance(s, Sample) else Path(s) for s in samples]
    X = np.full((len(paths), len(FEATURE_NAMES)), np.nan)
    failed: list[FailedImage] = []
    cache = FeatureCache(cache_dir if cache_dir is not None else default_cache_dir()) if use_cache else None
    table = cache.load() if cache else {}
    todo: list[tuple[int, str | None]] = []
    for i, p in enumerate(paths):
        try:
            key = _cache_key(p) if cache else None
        except OSError as exc:
            failed.append(FailedImage(i, str(p), f"file does not exist or cannot be read ({exc.strerror})"))
            continue
        if key is not None and key in table:
            X[i] = table[key]
        else:
            todo.append((i, key))
    new: dict[str, np.ndarray] = {}
    for i, key in tqdm(todo, desc="features", unit="img", disable=not progress or not todo):
        try:
            X[i] = extract_features(read_image(paths[i]))
        except ImageReadError as exc:
            failed.append(FailedImage(i, str(paths[i]), exc.reason))
            continue
        if key is not None:
            new[key] = X[i]
    if cache:
        try:
            cache.add(new)
        except OSError as exc:
            log.warning("could not write the feature cache in %s: %s", cache.dir, exc)
    failed.sort(key=lambda f: f.index)
    for f in failed:
        log.warning("skipped unreadable image %s: %s", f.path, f.reason)
    return X, failed


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassicalConfig:
    """Settings of the classical models.

    Attributes:
        n_estimators: trees in the Random Forest.
        svm_C: C values tried for the SVM.
        svm_gamma: gamma values tried, as multiples of ``1 / n_features`` (features are standardised).
        inner_splits: group folds of the training data for SVM tuning and Platt calibration.
        seed: random state of the forest and of the inner folds.
        n_jobs: worker processes for the forest and the grid search.
    """

    n_estimators: int = 500
    svm_C: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0, 30.0)
    svm_gamma: tuple[float, ...] = (0.25, 1.0, 4.0)
    inner_splits: int = 3
    seed: int = 0
    n_jobs: int = 1


def inner_group_splits(y: np.ndarray, groups: Sequence[str], n_splits: int, seed: int = 0
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
    """StratifiedGroupKFold folds of the training data: no group on both sides of any fold.

    ``n_splits`` is lowered to the number of groups when there are fewer.
    """
    from leukoscope.data.splits import group_folds

    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"group-aware tuning needs at least 2 groups in the training data, got {n_groups}")
    return group_folds(y, groups, min(n_splits, n_groups), seed, quiet=True)


def _make_rf(config: ClassicalConfig) -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=config.n_estimators, random_state=config.seed, n_jobs=config.n_jobs)


def _make_svm(config: ClassicalConfig) -> Any:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return make_pipeline(StandardScaler(), SVC(kernel="rbf", class_weight="balanced"))


CLASSICAL_MODELS: Registry[Callable[[ClassicalConfig], Any]] = Registry("classical model")
CLASSICAL_MODELS.register("rf")(_make_rf)
CLASSICAL_MODELS.register("svm")(_make_svm)


@dataclass
class ClassicalModel:
    """A fitted Random Forest (``"rf"``) or calibrated RBF SVM with its scaler (``"svm"``).

    ``fit`` takes integer labels ``0 .. C-1`` (indices into ``classes``) and the group of each row; the SVM is tuned
    and calibrated on group folds of those rows only. ``predict_proba`` always returns ``C`` columns, zeros for a
    class absent from the training data.
    """

    kind: str
    classes: list[str]
    config: ClassicalConfig = field(default_factory=ClassicalConfig)
    estimator_: Any = None
    best_params_: dict = field(default_factory=dict)
    inner_splits_: list = field(default_factory=list)
    fit_time_s_: float = float("nan")

    def __post_init__(self) -> None:
        CLASSICAL_MODELS.get(self.kind)  # "Unknown classical model 'svn'. Did you mean 'svm'?"
        self.classes = list(self.classes)

    def fit(self, X: np.ndarray, y: Sequence[int], groups: Sequence[str]) -> ClassicalModel:
        X, y, groups = _check_X(X), np.asarray(y, dtype=int), np.asarray(groups)
        if not (len(X) == len(y) == len(groups)):
            raise ValueError(f"X, y and groups must have the same length, got {len(X)}, {len(y)}, {len(groups)}")
        if y.size and (y.min() < 0 or y.max() >= len(self.classes)):
            raise ValueError(f"labels must be in 0..{len(self.classes) - 1} (classes {self.classes}), got "
                             f"{sorted(set(y.tolist()))}")
        if len(np.unique(y)) < 2:
            raise ValueError(f"training data has a single class ({self.classes[y[0]] if y.size else 'none'})")
        t0 = time.perf_counter()
        base = CLASSICAL_MODELS.get(self.kind)(self.config)
        if self.kind == "svm":
            self.estimator_ = self._fit_svm(base, X, y, groups)
        else:
            self.estimator_ = base.fit(X, y)
        self.fit_time_s_ = time.perf_counter() - t0
        return self

    def _fit_svm(self, base: Any, X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> Any:
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.model_selection import GridSearchCV

        cfg = self.config
        splits = inner_group_splits(y, groups, cfg.inner_splits, cfg.seed)
        self.inner_splits_ = splits
        grid = {"svc__C": list(cfg.svm_C), "svc__gamma": [g / X.shape[1] for g in cfg.svm_gamma]}
        scoring = "roc_auc" if len(np.unique(y)) == 2 else "balanced_accuracy"
        search = GridSearchCV(base, grid, scoring=scoring, cv=splits, n_jobs=cfg.n_jobs, refit=False,
                              error_score=np.nan)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            search.fit(X, y)
        self.best_params_ = {"C": search.best_params_["svc__C"], "gamma": search.best_params_["svc__gamma"],
                             "inner_score": float(search.best_score_), "scoring": scoring}
        base.set_params(**search.best_params_)
        # Platt scaling on decision values predicted out-of-fold on the same group folds, then one final SVM.
        cal = CalibratedClassifierCV(base, method="sigmoid", cv=splits, ensemble=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            cal.fit(X, y)
        return cal

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if self.estimator_ is None:
            raise LeukoscopeError("ClassicalModel is not fitted: call fit(X, y, groups) or ClassicalModel.load(dir)")
        X = _check_X(X)
        p = self.estimator_.predict_proba(X)
        out = np.zeros((len(X), len(self.classes)))
        out[:, np.asarray(self.estimator_.classes_, dtype=int)] = p
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)

    def save(self, directory: str | Path) -> Path:
        """Write ``classical.json`` (kind, classes, feature names and version, config, tuned parameters) and
        ``estimator.joblib``.

        The estimator is a **pickle** (scikit-learn forests have no safe format without skops, which is not a
        dependency). Such a directory is only for the user's own, locally trained model; never load one from
        someone else.
        """
        import joblib
        import sklearn

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"format": "leukoscope-classical", "kind": self.kind, "classes": self.classes,
                "feature_version": FEATURE_VERSION, "feature_names": list(FEATURE_NAMES),
                "config": asdict(self.config), "best_params": self.best_params_, "fit_time_s": self.fit_time_s_,
                "sklearn_version": sklearn.__version__}
        (d / "classical.json").write_text(json.dumps(meta, indent=1))
        joblib.dump(self.estimator_, d / "estimator.joblib")
        return d

    @classmethod
    def load(cls, directory: str | Path, *, allow_pickle: bool = False) -> ClassicalModel:
        """Load a directory written by :meth:`save`.

        Args:
            allow_pickle: must be ``True``: the estimator is a pickle, which runs code when loaded. Pass it only for
                a directory you trained yourself.
        """
        d = Path(directory)
        meta_path = d / "classical.json"
        if not meta_path.is_file():
            raise LeukoscopeError(f"{d} is not a classical model directory (no classical.json)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "leukoscope-classical":
            raise LeukoscopeError(f"{meta_path} is not a leukoscope classical model (format {meta.get('format')!r})")
        if meta.get("feature_version") != FEATURE_VERSION or meta.get("feature_names") != list(FEATURE_NAMES):
            raise LeukoscopeError(f"{d} was trained on features v{meta.get('feature_version')}; this leukoscope "
                                  f"computes v{FEATURE_VERSION}: retrain it")
        if not allow_pickle:
            raise LeukoscopeError(f"{d / 'estimator.joblib'} is a pickle and runs code when loaded; pass "
                                  "allow_pickle=True only for a model you trained yourself")
        import joblib

        cfg = meta.get("config", {})
        config = ClassicalConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
        model = cls(meta["kind"], meta["classes"], config)
        model.estimator_ = joblib.load(d / "estimator.joblib")
        model.best_params_ = meta.get("best_params", {})
        model.fit_time_s_ = meta.get("fit_time_s", float("nan"))
        return model


def _check_X(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(FEATURE_NAMES):
        raise ValueError(f"X must be (n, {len(FEATURE_NAMES)}) feature rows, got shape {X.shape}")
    if not np.isfinite(X).all():
        bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
        raise ValueError(f"X has non-finite values in {bad.size} row(s), e.g. row {bad[0]} (unreadable images must be "
                         "dropped before fitting)")
    return X


# ----------------------------------------------------------------------------------------------------------------
# Out-of-fold evaluation on a Split
# ----------------------------------------------------------------------------------------------------------------
def _rounds(ds: Dataset, split: Any) -> list[tuple[list[Sample], list[Sample]]]:
    if split.kind == "kfold":
        return [tuple(d.samples for d in split.fold(ds, k)) for k in range(split.n_folds)]
    if split.kind == "holdout":
        train = split.subset(ds, "train").samples + (split.subset(ds, "val").samples if "val" in split.parts else [])
        return [(train, split.subset(ds, "test").samples)]
    raise ValueError(f"split kind must be 'kfold' or 'holdout', got {split.kind!r}")


def _timed_inference(model: ClassicalModel, samples: Sequence[Sample]) -> tuple[int, float]:
    """End-to-end seconds (read, segment, features, predict) for ``samples``, skipping unreadable ones."""
    rows, t0 = [], time.perf_counter()
    for s in samples:
        try:
            rows.append(extract_features(read_image(s.path)))
        except ImageReadError:
            continue
    if rows:
        model.predict_proba(np.stack(rows))
    return len(rows), time.perf_counter() - t0


def cross_validate_classical(
    ds: Dataset,
    split: Any,
    kind: str,
    config: ClassicalConfig | None = None,
    cache_dir: str | Path | None = None,
    timing_images: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Out-of-fold probabilities of a classical model on a group-aware :class:`~leukoscope.data.splits.Split`.

    Holdout: fit on train + val, predict test. K-fold: for each fold, fit on the others and predict it.

    Args:
        ds: the dataset the split was made for.
        split: a holdout or k-fold split.
        kind: ``"rf"`` or ``"svm"``.
        timing_images: images per round timed end to end (uncached read + features + predict) for images/s.

    Returns:
        ``proba`` (N, C), ``y_true`` (N,), ``groups``, ``paths`` (relative), ``fold`` (round index per row),
        ``classes``, ``failed`` (unreadable images, left out), ``fit_time_s`` (sum over rounds) and
        ``fit_time_s_per_round``,
        ``infer_images_per_s`` (end to end), ``predict_images_per_s`` (model only, features given),
        ``feature_extraction_s``, ``best_params`` per round (SVM), ``n_features``.
    """
    config = config or ClassicalConfig()
    CLASSICAL_MODELS.get(kind)
    rounds = _rounds(ds, split)
    needed = {ds.relpath(s): s for tr, te in rounds for s in (*tr, *te)}
    all_samples = list(needed.values())
    t0 = time.perf_counter()
    X_all, failed = extract_dataset_features(all_samples, cache_dir=cache_dir, progress=progress)
    feature_s = time.perf_counter() - t0
    row = {ds.relpath(s): i for i, s in enumerate(all_samples)}
    bad = {f.index for f in failed}
    index = {c: i for i, c in enumerate(ds.classes)}

    def rows_of(samples: Sequence[Sample]) -> np.ndarray:
        return np.array([row[ds.relpath(s)] for s in samples if row[ds.relpath(s)] not in bad], dtype=int)

    probas, y_true, groups, paths, folds = [], [], [], [], []
    fit_times, predict_rates, infer_rates, best = [], [], [], []
    for k, (train, test) in enumerate(rounds):
        tr, te = rows_of(train), rows_of(test)
        y_tr = np.array([index[all_samples[i].label] for i in tr])
        model = ClassicalModel(kind, ds.classes, config)
        model.fit(X_all[tr], y_tr, [all_samples[i].group for i in tr])
        fit_times.append(model.fit_time_s_)
        best.append(model.best_params_)
        t1 = time.perf_counter()
        p = model.predict_proba(X_all[te])
        predict_rates.append(len(te) / max(time.perf_counter() - t1, 1e-9))
        if timing_images > 0:
            n, secs = _timed_inference(model, [all_samples[i] for i in te[:timing_images]])
            if n:
                infer_rates.append(n / secs)
        probas.append(p)
        y_true += [index[all_samples[i].label] for i in te]
        groups += [all_samples[i].group for i in te]
        paths += [ds.relpath(all_samples[i]) for i in te]
        folds += [k] * len(te)
    return {
        "kind": kind, "dataset": ds.name, "target": ds.target, "classes": list(ds.classes),
        "proba": np.concatenate(probas) if probas else np.zeros((0, len(ds.classes))),
        "y_true": np.asarray(y_true, dtype=int), "groups": groups, "paths": paths, "fold": np.asarray(folds, dtype=int),
        "failed": [{"path": f.path, "reason": f.reason} for f in failed],
        "fit_time_s": float(np.sum(fit_times)), "fit_time_s_per_round": [float(t) for t in fit_times],
        "infer_images_per_s": float(np.median(infer_rates)) if infer_rates else float("nan"),
        "predict_images_per_s": float(np.median(predict_rates)),
        "feature_extraction_s": feature_s, "best_params": best, "n_features": len(FEATURE_NAMES),
        "config": asdict(config),
    }
