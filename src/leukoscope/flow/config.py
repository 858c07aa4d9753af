"""Flow model configuration: frozen dataclasses with defaults; a YAML file overrides them, CLI flags override it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from leukoscope.flow.classifier import ClassifierSpec
from leukoscope.flow.features import FeatureSpec

__all__ = ["DataSpec", "CVSpec", "FlowConfig", "load_flow_config"]


@dataclass(frozen=True)
class DataSpec:
    """Where the training cases come from.

    Attributes:
        input: ``fcs`` (features computed here from FCS events) or ``table`` (a per-subject feature CSV).
        dataset: ``flowcap2`` (the FlowCAP-II AML folder) or ``manifest`` (a CSV ``path,subject,label[,tube]``).
        root: FlowCAP-II folder (None: found under the data root).
        manifest: the manifest CSV when ``dataset`` is ``manifest``.
        table: the feature CSV for ``input: table`` (None: FlowCAP-II ``features/AML_features.csv``).
        sources: FlowCAP-II FCS folders to use: ``raw`` (30,000 events) and/or ``cytodx`` (500 events).
    """

    input: str = "fcs"
    dataset: str = "flowcap2"
    root: str | None = None
    manifest: str | None = None
    table: str | None = None
    sources: tuple[str, ...] = ("raw", "cytodx")

    def __post_init__(self) -> None:
        if self.input not in ("fcs", "table"):
            raise ValueError(f"data.input must be 'fcs' or 'table', got {self.input!r}")
        if self.dataset not in ("flowcap2", "manifest"):
            raise ValueError(f"data.dataset must be 'flowcap2' or 'manifest', got {self.dataset!r}")
        if self.dataset == "manifest" and self.input == "fcs" and not self.manifest:
            raise ValueError("data.dataset is 'manifest' but data.manifest (a CSV path) is not set")


@dataclass(frozen=True)
class CVSpec:
    """Outer subject-level stratified cross-validation that produces the reported metrics."""

    folds: int = 4
    repeats: int = 5
    seed: int = 0
    n_boot: int = 1000
    threshold: float = 0.5


@dataclass(frozen=True)
class FlowConfig:
    """Everything that defines a flow model and how it was evaluated."""

    name: str = "flow-aml"
    data: DataSpec = field(default_factory=DataSpec)
    features: FeatureSpec = field(default_factory=FeatureSpec)
    model: ClassifierSpec = field(default_factory=ClassifierSpec)
    cv: CVSpec = field(default_factory=CVSpec)

    @classmethod
    def from_dict(cls, d: dict) -> FlowConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown flow config key(s) {sorted(unknown)}; known: {sorted(known)}")
        kw: dict = {}
        if "name" in d:
            kw["name"] = str(d["name"])
        if "data" in d:
            kw["data"] = _sub(DataSpec, d["data"] or {}, "data", tuple_keys={"sources"})
        if "features" in d:
            kw["features"] = FeatureSpec.from_dict(d["features"] or {})
        if "model" in d:
            kw["model"] = ClassifierSpec.from_dict(d["model"] or {})
        if "cv" in d:
            kw["cv"] = _sub(CVSpec, d["cv"] or {}, "cv")
        return cls(**kw)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "data": {f.name: (list(v) if isinstance(v := getattr(self.data, f.name), tuple) else v)
                     for f in fields(self.data)},
            "features": self.features.to_dict(),
            "model": self.model.to_dict(),
            "cv": {f.name: getattr(self.cv, f.name) for f in fields(self.cv)},
        }

    def with_overrides(self, **sections: dict) -> FlowConfig:
        """A copy with some fields of some sections replaced, e.g. ``with_overrides(model={"kind": "logreg"})``."""
        d = self.to_dict()
        for section, values in sections.items():
            if section == "name":
                d["name"] = values
                continue
            if section not in d or not isinstance(values, dict):
                raise ValueError(f"unknown flow config section {section!r}")
            d[section].update({k: v for k, v in values.items() if v is not None})
        return FlowConfig.from_dict(d)


def _sub(cls: type, d: dict, section: str, tuple_keys: set[str] = frozenset()):  # noqa: B006
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {section} option(s) {sorted(unknown)}; known: {sorted(known)}")
    return replace(cls(), **{k: (tuple(v) if k in tuple_keys and v is not None else v) for k, v in d.items()})


def load_flow_config(path: str | Path | None = None) -> FlowConfig:
    """Defaults, overridden by a YAML file when given."""
    if path is None:
        return FlowConfig()
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"flow config {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"flow config {path} must be a mapping, got {type(data).__name__}")
    try:
        return FlowConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
