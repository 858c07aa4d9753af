"""The public API called the way a user calls it: every function in ``leukoscope.__all__`` twice (the second call
once failed: the submodule ``leukoscope.predict`` replaced the function), in a fresh interpreter whatever was imported
first; every shipped model loads with ``load_model(name)`` and predicts on an input of its kind; ``leukoscope models``
lists them all."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import leukoscope
from leukoscope.cli import main
from leukoscope.models.modeldir import SHIPPED_DIR, model_kind

# one DeepAPL patient's first cells (patient-level models) and a FlowCAP-II subject in the CytoDx subset (flow models)
PATIENT, N_CELLS = "Patient_00", 6
FCS = "flowcap2_aml_cytodx_fcs/sample12.fcs"  # subject 9, AML (a training subject: a check of the call, not a score)


@pytest.fixture(scope="module")
def cell(data_root) -> Path:
    from leukoscope.data.datasets import load_dataset

    return load_dataset("aria").samples[0].path  # a Benign cell


@pytest.fixture(scope="module")
def field(data_root) -> Path:
    path = data_root / "all_idb" / "ALL_IDB1" / "im" / "Im086_0.jpg"  # a healthy field with one white cell
    if not path.exists():
        pytest.fail(f"ALL-IDB1 field not found: looked for {path}")
    return path


@pytest.fixture(scope="module")
def patient_folder(data_root, tmp_path_factory) -> Path:
    src = data_root / "aml_multiclass" / "Data" / "All" / PATIENT
    if not src.is_dir():
        pytest.fail(f"DeepAPL data not found: looked for {src}")
    out = tmp_path_factory.mktemp("patients") / PATIENT
    out.mkdir()
    for p in sorted(q for q in src.rglob("*") if q.suffix.lower() in (".jpg", ".png"))[:N_CELLS]:
        shutil.copy(p, out / p.name)
    return out


@pytest.fixture(scope="module")
def fcs_file() -> Path:
    from leukoscope.errors import DatasetNotFoundError
    from leukoscope.flow.data import flow_data_root

    try:
        return flow_data_root() / FCS
    except DatasetNotFoundError as exc:  # fail with the places looked at
        pytest.fail(str(exc))


# ------------------------------------------------------------------------------------ every public function, twice
def _call_twice(name: str, cell: Path) -> None:
    fn = getattr(leukoscope, name)
    assert callable(fn) and getattr(leukoscope, name) is fn
    if name == "list_datasets":
        a, b = fn(), fn()
        assert a == b and {"aria", "all_idb2", "deepapl"} <= set(a)
    elif name == "load_dataset":
        a, b = fn("aria"), fn("aria")
        assert [s.path for s in a.samples] == [s.path for s in b.samples] and len(a.samples) > 100
    elif name == "shipped_models":
        a, b = fn(), fn()
        assert a == b == sorted(p.parent.name for p in SHIPPED_DIR.glob("*/*.safetensors"))
        assert {"leukemia-cell", "apl", "wbc-detector"} <= set(a)
    elif name == "load_model":
        a, b = fn(), fn("leukemia-cell")
        assert a.name == b.name == "leukemia-cell" and a.classes == b.classes == ["healthy", "leukemic"]
    elif name == "predict":
        model = leukoscope.load_model()
        a, b = fn(cell, model), fn(str(cell), "leukemia-cell")
        assert a.label == b.label and a.label in model.classes
        np.testing.assert_allclose(list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-6)
        np.testing.assert_allclose(sum(a.probabilities.values()), 1.0, atol=1e-5)
        assert a.confidence == pytest.approx(a.probabilities[a.label])
    elif name == "explain":
        from leukoscope.data.images import read_image

        rgb = read_image(cell)
        before = rgb.copy()
        a, b = fn(cell, model=leukoscope.load_model()), fn(rgb, model="leukemia-cell")
        assert np.array_equal(rgb, before)  # the input is not modified
        assert a.label == b.label == leukoscope.predict(cell).label
        assert a.heatmap.shape == b.heatmap.shape == rgb.shape[:2]
        assert 0 <= a.heatmap.min() and a.heatmap.max() <= 1 and a.heatmap.max() > 0
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-4)
    else:
        raise AssertionError(f"leukoscope.{name} is public but this test does not call it: add it here")


PUBLIC = [n for n in leukoscope.__all__ if n != "__version__"]


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_function_works_twice(name, cell):
    _call_twice(name, cell)


def test_public_names_are_the_functions_even_after_their_submodules_are_imported():
    import importlib

    for name in ("predict", "explain"):
        module = importlib.import_module(f"leukoscope.{name}")
        assert sys.modules[f"leukoscope.{name}"] is module
        fn = getattr(leukoscope, name)
        assert fn is getattr(module, name) and fn.__module__.startswith(f"leukoscope.{name}")
    from leukoscope import explain, predict

    assert predict is leukoscope.predict and explain is leukoscope.explain
    assert set(PUBLIC) <= set(dir(leukoscope))


@pytest.mark.parametrize("first", ["nothing", "submodules"])
def test_fresh_interpreter_calls_each_function_twice(first, cell):
    """The bug showed only in a fresh interpreter (the first call imported the submodule that replaced the function)."""
    script = textwrap.dedent(f"""
        import sys
        {"import leukoscope.predict, leukoscope.explain.cam" if first == "submodules" else ""}
        import leukoscope
        if {first == "nothing"}:
            assert "torch" not in sys.modules, "import leukoscope imported torch"
        model = leukoscope.load_model()
        labels = [leukoscope.predict({str(cell)!r}, model).label for _ in range(2)]
        labels += [leukoscope.explain({str(cell)!r}, model=model).label for _ in range(2)]
        from leukoscope import explain, predict
        labels += [predict({str(cell)!r}, model).label, explain({str(cell)!r}, model=model).label]
        print(" ".join(labels))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    labels = res.stdout.split()
    assert len(labels) == 6 and len(set(labels)) == 1 and labels[0] == leukoscope.predict(cell).label


# ------------------------------------------------------------------------------ every shipped model, by its kind
def _predict_image(model, cell: Path, **_) -> tuple[str, dict[str, float]]:
    p = leukoscope.predict(cell, model)
    return p.label, p.probabilities


def _predict_patient(model, patient_folder: Path, **_) -> tuple[str, dict[str, float]]:
    from leukoscope.diagnose import diagnose

    (r,) = diagnose([patient_folder], model=model)
    assert r.patient == PATIENT and r.n_cells == N_CELLS and not r.skipped
    assert r.label == ("APL" if r.p_apl >= model.threshold else "AML")
    return r.label, {"AML": r.p_aml, "APL": r.p_apl}


def _predict_flow(model, fcs_file: Path, **_) -> tuple[str, dict[str, float]]:
    from leukoscope.flow.model import predict_files

    rows, errors = predict_files(model, [fcs_file])
    assert errors == [] and len(rows) == 1
    assert rows[0]["label"] == "aml"  # a training subject: the call works, not a measure of accuracy
    return rows[0]["label"], {c: rows[0][f"p_{c}"] for c in model.classes}


def _predict_detector(model, field: Path, **_) -> tuple[str, dict[str, float]]:
    from leukoscope.data.images import read_image

    found = model.detect(read_image(field))
    # Im086_0: a lymphocyte at (1333, 702) among red cells and platelets
    assert min(np.hypot(c.x - 1333, c.y - 702) for c in found.cells) < 0.3 * found.rbc_diameter
    return "white cell", {"white cell": 1.0}


PREDICT_BY_KIND = {"image": _predict_image, "patient": _predict_patient, "flow": _predict_flow,
                   "detector": _predict_detector}


@pytest.mark.parametrize("name", leukoscope.shipped_models())
def test_every_shipped_model_loads_by_name_and_predicts(name, cell, patient_folder, fcs_file, field):
    kind = json.loads((SHIPPED_DIR / name / "model.json").read_text())["kind"]  # every shipped model says its kind
    assert model_kind(SHIPPED_DIR / name) == kind
    assert kind in PREDICT_BY_KIND, f"shipped model {name!r} of kind {kind!r}: add how it predicts to this test"
    model = leukoscope.load_model(name)
    label, proba = PREDICT_BY_KIND[kind](model, cell=cell, patient_folder=patient_folder, fcs_file=fcs_file,
                                         field=field)
    assert list(proba) == list(model.classes) and label in proba
    assert all(0 <= p <= 1 for p in proba.values())
    np.testing.assert_allclose(sum(proba.values()), 1.0, atol=1e-5)


def test_a_classical_model_directory_loads_through_the_same_door(tmp_path, data_root):
    from leukoscope.data.datasets import load_dataset
    from leukoscope.data.images import read_image
    from leukoscope.errors import LeukoscopeError
    from leukoscope.research.classical import ClassicalConfig, ClassicalModel, extract_features

    ds = load_dataset("aria")
    by_class = {c: [s for s in ds.samples if s.label == c][:6] for c in ds.classes[:2]}
    samples = [s for ss in by_class.values() for s in ss]
    X = np.stack([extract_features(read_image(s.path)) for s in samples])
    y = [ds.classes.index(s.label) for s in samples]
    model = ClassicalModel("rf", ds.classes[:2], ClassicalConfig(n_estimators=20)).fit(X, y, [s.group for s in samples])
    model.save(tmp_path / "rf")
    assert model_kind(tmp_path / "rf") == "classical"
    with pytest.raises(LeukoscopeError, match="pickle"):  # never unpickled without the user's word
        leukoscope.load_model(tmp_path / "rf")
    loaded = leukoscope.load_model(tmp_path / "rf", allow_pickle=True)
    assert isinstance(loaded, ClassicalModel) and loaded.classes == model.classes
    np.testing.assert_allclose(loaded.predict_proba(X), model.predict_proba(X))


# -------------------------------------------------------------------------------------------------------- errors
def test_unknown_names_and_kinds_say_what_was_meant(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown model 'apll'\. Did you mean 'apl'\?"):
        leukoscope.load_model("apll")
    with pytest.raises(ValueError, match=r"Unknown model kind 'imgae'\. Did you mean 'image'\?"):
        leukoscope.load_model("apl", kind="imgae")
    with pytest.raises(ValueError, match=r"'apl' is a patient model, not an image model: .*diagnose"):
        leukoscope.load_model("apl", kind="image")
    with pytest.raises(ValueError, match=r"backend='torch': for image models only; 'flow-aml' is a flow model"):
        leukoscope.load_model("flow-aml", backend="torch")
    d = tmp_path / "m"
    shutil.copytree(SHIPPED_DIR / "apl", d)
    info = json.loads((d / "model.json").read_text())
    (d / "model.json").write_text(json.dumps({**info, "kind": "imgae"}))
    with pytest.raises(ValueError, match=r"model\.json: Unknown model kind 'imgae'\. Did you mean 'image'\?"):
        leukoscope.load_model(d)
    del info["kind"]  # written before model.json had a kind: told by its contents
    (d / "model.json").write_text(json.dumps(info))
    assert model_kind(d) == "patient" and leukoscope.load_model(d).method == info["method"]


@pytest.mark.parametrize("name", leukoscope.shipped_models())
def test_a_model_json_without_kind_is_told_by_its_contents(name, tmp_path):
    info = json.loads((SHIPPED_DIR / name / "model.json").read_text())
    kind = info.pop("kind")
    (tmp_path / "model.json").write_text(json.dumps(info))
    assert model_kind(tmp_path) == kind


def test_a_loaded_model_of_another_kind_is_refused_with_how_to_use_it(cell):
    apl = leukoscope.load_model("apl")
    with pytest.raises(TypeError, match=r"PatientModel 'apl', a patient model .*leukoscope\.diagnose\.diagnose"):
        leukoscope.predict(cell, apl)


# --------------------------------------------------------------------------------------------- leukoscope models
def test_models_command_lists_every_shipped_model_with_kind_classes_and_input(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == leukoscope.shipped_models()
    for name, r in rows.items():
        info = json.loads((SHIPPED_DIR / name / "model.json").read_text())
        assert r["kind"] == info["kind"]
        assert r["classes"] == list(leukoscope.load_model(name).classes)
    assert rows["apl"]["input"].startswith("a folder") and "FCS" in rows["flow-aml"]["input"]
    assert "cell image" in rows["leukemia-cell"]["input"]
    assert rows["leukemia-cell"]["metrics"]["auc"] == pytest.approx(
        json.loads((SHIPPED_DIR / "leukemia-cell" / "metrics.json").read_text())["per_image"]["auc"])
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert all(f"{name} ({r['kind']} model" in text for name, r in rows.items())
