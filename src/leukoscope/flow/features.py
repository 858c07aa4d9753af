"""Per-subject features from the events of one or more tubes.

For each tube and channel: quantiles, mean and standard deviation of the transformed values; for each fluorescence
channel, the fraction of events above fixed linear thresholds (e.g. above 10 = beyond the first decade of a
4-decade log scale); optionally the proportion of the subject's events in each of ``n_clusters`` k-means clusters
fitted on the pooled events of the *training* subjects (so the clusters are refitted inside every CV fold).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from leukoscope.flow.compensation import compensate
from leukoscope.flow.data import FlowCase
from leukoscope.flow.fcs import FCSReadError, FlowSample, match_channels, read_fcs
from leukoscope.flow.transforms import arcsinh, logicle

__all__ = ["FeatureSpec", "Featurizer", "case_events", "sample_matrix", "TUBE4_CHANNELS"]

TUBE4_CHANNELS = ("FS Lin", "SS Log", "FL1 Log", "FL2 Log", "FL3 Log", "FL4 Log", "FL5 Log")


@dataclass(frozen=True)
class FeatureSpec:
    """How events become per-subject features.

    Attributes:
        tubes: tube numbers a case must provide (one FCS file each).
        channels: ``$PnN`` of the channels used, in order.
        positions: 1-based column positions used where a ``$PnN`` is not found (None: names only).
        dataset: which data set of multi-data-set files to read (0 = first).
        compensation: ``none`` or ``file`` (the file's ``$SPILLOVER`` / ``$DFCiTOj``). The FlowCAP-II files appear
            to be compensated on the instrument already (see docs/FLOW.md), hence ``none`` by default.
        transform: ``arcsinh`` or ``logicle`` for the non-linear channels.
        cofactor: arcsinh cofactor.
        logicle_params: logicle ``(T, M, W, A)``.
        linear_channels: channels kept linear, divided by their ``$PnR`` (scatter on a linear amplifier).
        quantiles: per-channel quantiles.
        moments: add per-channel mean and standard deviation.
        thresholds: fraction of events above each of these linear values, per non-linear channel.
        n_clusters: k-means clusters per tube for cluster proportions (0 = none).
        cluster_events: events drawn per training subject to fit the clusters.
        max_events: use at most this many events per file (seeded random subset; None = all).
        seed: seed of event sub-sampling and k-means.
    """

    tubes: tuple[int, ...] = (4,)
    channels: tuple[str, ...] = TUBE4_CHANNELS
    positions: tuple[int, ...] | None = None
    dataset: int = 0
    compensation: str = "none"
    transform: str = "arcsinh"
    cofactor: float = 5.0
    logicle_params: tuple[float, float, float, float] = (10000.0, 4.5, 0.5, 0.0)
    linear_channels: tuple[str, ...] = ("FS Lin",)
    quantiles: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
    moments: bool = True
    thresholds: tuple[float, ...] = (10.0, 100.0)
    n_clusters: int = 8
    cluster_events: int = 2000
    max_events: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.compensation not in ("none", "file"):
            raise ValueError(f"compensation must be 'none' or 'file', got {self.compensation!r}")
        if self.transform not in ("arcsinh", "logicle"):
            raise ValueError(f"transform must be 'arcsinh' or 'logicle', got {self.transform!r}")
        if not self.tubes or not self.channels:
            raise ValueError("a feature spec needs at least one tube and one channel")
        if any(not 0.0 <= q <= 1.0 for q in self.quantiles):
            raise ValueError(f"quantiles must lie in [0, 1], got {self.quantiles}")
        unknown = set(self.linear_channels) - set(self.channels)
        if unknown:
            raise ValueError(f"linear_channels {sorted(unknown)} are not among channels {list(self.channels)}")

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown feature option(s) {sorted(unknown)}; known: {sorted(known)}")
        tuple_keys = {"tubes", "channels", "positions", "logicle_params", "linear_channels", "quantiles", "thresholds"}
        return cls(**{k: (tuple(v) if k in tuple_keys and v is not None else v) for k, v in d.items()})

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    def transform_values(self, x: np.ndarray) -> np.ndarray:
        if self.transform == "arcsinh":
            return arcsinh(x, self.cofactor)
        t, m, w, a = self.logicle_params
        return logicle(x, t=t, m=m, w=w, a=a)


def sample_matrix(sample: FlowSample, spec: FeatureSpec) -> np.ndarray:
    """The (n_events, n_channels) transformed matrix of ``spec.channels`` from one data set."""
    idx = match_channels(sample.channels, list(spec.channels), list(spec.positions) if spec.positions else None,
                         source=sample.path)
    events = sample.events
    if spec.compensation == "file":
        if sample.spillover is None:
            raise FCSReadError(sample.path, "compensation='file' but the file has no $SPILLOVER or $DFCiTOj keywords")
        events = compensate(events, sample.channels, sample.spillover)
    x = events[:, idx]
    if spec.max_events is not None and x.shape[0] > spec.max_events:
        rng = np.random.default_rng(spec.seed)
        x = x[np.sort(rng.choice(x.shape[0], spec.max_events, replace=False))]
    out = np.empty_like(x)
    for j, name in enumerate(spec.channels):
        if name in spec.linear_channels:
            rng_j = sample.ranges[idx[j]] if sample.ranges and sample.ranges[idx[j]] > 0 else 1.0
            out[:, j] = x[:, j] / rng_j
        else:
            out[:, j] = spec.transform_values(x[:, j])
    return out


def case_events(case: FlowCase, spec: FeatureSpec) -> dict[int, np.ndarray]:
    """Transformed event matrices of a case, keyed by tube. A single-tube spec takes a case's only file whatever
    its tube key (manifests without a tube column)."""
    out = {}
    for tube in spec.tubes:
        if tube in case.files:
            path = case.files[tube]
        elif len(spec.tubes) == 1 and len(case.files) == 1:
            path = next(iter(case.files.values()))
        else:
            raise ValueError(f"subject {case.subject!r} has no file for tube {tube} "
                             f"(it has tubes {sorted(case.files)})")
        out[tube] = sample_matrix(read_fcs(path, dataset=spec.dataset), spec)
    return out


class Featurizer:
    """Turns per-tube event matrices into one feature vector per subject; fit only matters for cluster proportions."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.cluster_centers: dict[int, np.ndarray] = {}
        self.cluster_mean: dict[int, np.ndarray] = {}
        self.cluster_scale: dict[int, np.ndarray] = {}

    @property
    def is_fitted(self) -> bool:
        return self.spec.n_clusters == 0 or len(self.cluster_centers) == len(self.spec.tubes)

    def _nonlinear(self) -> list[int]:
        return [j for j, c in enumerate(self.spec.channels) if c not in self.spec.linear_channels]

    @property
    def feature_names(self) -> list[str]:
        s = self.spec
        names = []
        for tube in s.tubes:
            for c in s.channels:
                names += [f"t{tube}:{c}:q{round(q * 100):02d}" for q in s.quantiles]
                if s.moments:
                    names += [f"t{tube}:{c}:mean", f"t{tube}:{c}:sd"]
            for j in self._nonlinear():
                names += [f"t{tube}:{s.channels[j]}:gt{thr:g}" for thr in s.thresholds]
            names += [f"t{tube}:cluster{k}" for k in range(s.n_clusters)]
        return names

    def fit(self, events: list[dict[int, np.ndarray]]) -> Featurizer:
        """Fit the k-means clusters on the pooled events of these (training) subjects."""
        s = self.spec
        if s.n_clusters == 0:
            return self
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        rng = np.random.default_rng(s.seed)
        for tube in s.tubes:
            pooled = []
            for ev in events:
                x = ev[tube]
                take = min(s.cluster_events, x.shape[0])
                pooled.append(x[rng.choice(x.shape[0], take, replace=False)])
            pooled = np.concatenate(pooled)
            mean, scale = pooled.mean(0), pooled.std(0)
            scale[scale == 0] = 1.0
            with threadpool_limits(1):
                km = KMeans(n_clusters=s.n_clusters, n_init=4, random_state=s.seed).fit((pooled - mean) / scale)
            # order clusters by their first coordinate so the feature names are stable across refits
            order = np.lexsort(km.cluster_centers_.T[::-1])
            self.cluster_centers[tube] = km.cluster_centers_[order]
            self.cluster_mean[tube], self.cluster_scale[tube] = mean, scale
        return self

    def transform(self, events: list[dict[int, np.ndarray]]) -> np.ndarray:
        """(n_subjects, n_features)."""
        if not self.is_fitted:
            raise RuntimeError("Featurizer.fit must run before transform when n_clusters > 0")
        s = self.spec
        nonlin = self._nonlinear()
        thr_t = [s.transform_values(np.asarray([thr], dtype=float))[0] for thr in s.thresholds]
        rows = []
        for ev in events:
            feats = []
            for tube in s.tubes:
                x = ev[tube]
                if s.quantiles:
                    q = np.quantile(x, s.quantiles, axis=0)  # (n_q, C)
                for j in range(x.shape[1]):
                    if s.quantiles:
                        feats.extend(q[:, j])
                    if s.moments:
                        feats += [x[:, j].mean(), x[:, j].std()]
                for j in nonlin:
                    feats += [float((x[:, j] > t).mean()) for t in thr_t]
                if s.n_clusters:
                    feats.extend(self._proportions(tube, x))
            rows.append(feats)
        out = np.asarray(rows, dtype=np.float64).reshape(len(events), len(self.feature_names))
        return out

    def _proportions(self, tube: int, x: np.ndarray) -> np.ndarray:
        z = (x - self.cluster_mean[tube]) / self.cluster_scale[tube]
        c = self.cluster_centers[tube]
        d2 = (z * z).sum(1)[:, None] - 2 * z @ c.T + (c * c).sum(1)[None, :]
        return np.bincount(d2.argmin(1), minlength=len(c)) / x.shape[0]

    def arrays(self) -> dict[str, np.ndarray]:
        """Fitted state as named arrays (for safetensors)."""
        out = {}
        for tube in self.cluster_centers:
            out[f"featurizer.t{tube}.centers"] = self.cluster_centers[tube]
            out[f"featurizer.t{tube}.mean"] = self.cluster_mean[tube]
            out[f"featurizer.t{tube}.scale"] = self.cluster_scale[tube]
        return out

    @classmethod
    def from_arrays(cls, spec: FeatureSpec, arrays: dict[str, np.ndarray]) -> Featurizer:
        f = cls(spec)
        if spec.n_clusters:
            for tube in spec.tubes:
                try:
                    f.cluster_centers[tube] = np.asarray(arrays[f"featurizer.t{tube}.centers"], dtype=np.float64)
                    f.cluster_mean[tube] = np.asarray(arrays[f"featurizer.t{tube}.mean"], dtype=np.float64)
                    f.cluster_scale[tube] = np.asarray(arrays[f"featurizer.t{tube}.scale"], dtype=np.float64)
                except KeyError as exc:
                    raise ValueError(f"model parameters lack the clusters of tube {tube}: {exc}") from exc
                if f.cluster_centers[tube].shape != (spec.n_clusters, len(spec.channels)):
                    raise ValueError(f"cluster centres of tube {tube} have shape {f.cluster_centers[tube].shape}, "
                                     f"expected {(spec.n_clusters, len(spec.channels))}")
        return f
