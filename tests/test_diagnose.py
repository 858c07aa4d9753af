"""Patient-level diagnosis: the `diagnose` CLI on real DeepAPL patients (exact columns, patient = folder name, truncated
cells skipped and named), the gated-attention MIL's invariances, and the shipped cell-type model's parameter count
against its card."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
import torch

from leukoscope.cli import main
from leukoscope.data.datasets import load_dataset
from leukoscope.data.images import is_image_path
from leukoscope.diagnose import CSV_COLUMNS, GatedAttentionMIL, MILConfig, fit_mil, load_patient_model
from leukoscope.models.modeldir import SHIPPED_DIR

TRUNCATED = {"Patient_37": "BL_6611696.jpg", "Patient_58": "SMU_15364290.jpg"}


@pytest.fixture(scope="module")
def deepapl(data_root):
    root = data_root / "aml_multiclass"
    if not (root / "Data" / "All").is_dir():
        pytest.fail(f"DeepAPL data not found: looked for {root / 'Data' / 'All'}")
    return load_dataset("deepapl", root=root)


@pytest.fixture(scope="module")
def patient_dirs(deepapl):
    return [deepapl.root / "Data" / "All" / name for name in TRUNCATED]


@pytest.fixture(scope="module")
def cli_run(patient_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("diagnose")
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["diagnose", *map(str, patient_dirs), "--output", str(out / "d.csv"), "--report", str(out / "rep"),
                   "--top", "2"])
    return rc, out, err.getvalue()


def test_cli_csv_columns_patients_and_cell_counts(cli_run, patient_dirs):
    rc, out, err = cli_run
    assert rc == 1  # cells were skipped: the same convention as `leukoscope predict`
    with (out / "d.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert [r["patient"] for r in rows] == list(TRUNCATED)
    threshold = load_patient_model("apl").threshold
    for r, d in zip(rows, patient_dirs, strict=True):
        n_files = sum(1 for p in d.rglob("*") if p.is_file() and is_image_path(p))
        assert int(r["n_cells"]) == n_files - 1  # the truncated JPEG is not a cell
        assert TRUNCATED[r["patient"]] in err and f"{r['patient']}: skipped unreadable cell" in err
        p_aml, p_apl, conf = float(r["p_AML"]), float(r["p_APL"]), float(r["confidence"])
        np.testing.assert_allclose(p_aml + p_apl, 1.0, atol=2e-6)
        assert r["label"] == ("APL" if p_apl >= threshold else "AML")
        assert 0.0 <= float(r["ood_share"]) <= 1.0  # the cell-type model's out-of-distribution flags, per patient
        np.testing.assert_allclose(conf, max(p_aml, p_apl) if threshold == 0.5 else (p_apl if r["label"] == "APL"
                                                                                     else p_aml), atol=1e-6)


def test_cli_report_shows_probability_differential_and_heatmaps(cli_run):
    _, out, _ = cli_run
    rows = {r["patient"]: r for r in csv.DictReader((out / "d.csv").open())}
    index = (out / "rep" / "index.html").read_text()
    for name, r in rows.items():
        assert f">{name}</a>" in index
        page = (out / "rep" / f"{name}.html").read_text()
        assert f"P(APL) = {float(r['p_APL']):.3f}" in page
        counts = [int(m) for m in re.findall(r"<tr><td>[^<]+</td><td>(\d+)</td><td>[\d.]+</td>", page)]
        assert len(counts) == 15 and sum(counts) == int(r["n_cells"])  # the differential covers every readable cell
        assert page.count("alt='Grad-CAM' src='data:image/png;base64,") == 2  # --top 2, heatmaps inlined
        assert TRUNCATED[name] in page  # the skipped file is named in the report too


def test_mil_attention_sums_to_one_and_is_permutation_invariant():
    torch.manual_seed(0)
    mil = GatedAttentionMIL(48, hidden=16, attention=8).eval()
    bag = torch.randn(23, 48)
    perm = torch.randperm(23)
    with torch.no_grad():
        logit, att = mil(bag)
        logit_p, att_p = mil(bag[perm])
    np.testing.assert_allclose(float(att.sum()), 1.0, rtol=1e-6)
    assert att.shape == (23,) and bool((att > 0).all())
    np.testing.assert_allclose(float(logit_p), float(logit), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(att_p.numpy(), att[perm].numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"a bag must be \(n >= 1, 48\), got \(0, 48\)"):
        mil(torch.zeros(0, 48))


def test_mil_learns_a_bag_level_signal():
    # positive bags hide 3 shifted cells among 20: a bag mean dilutes them, attention should find them
    rng = np.random.default_rng(0)
    bags, y = [], []
    for i in range(24):
        b = rng.normal(size=(20, 8)).astype(np.float32)
        if i % 2:
            b[:3, 0] += 4.0
        bags.append(b)
        y.append(i % 2)
    mil = fit_mil(bags, np.array(y), MILConfig(hidden=16, attention=8, epochs=15, dropout=0.0, lr=3e-3, keep=1.0))
    with torch.no_grad():
        logits = np.array([float(mil(torch.from_numpy(b))[0]) for b in bags])
        att = [mil(torch.from_numpy(b))[1].numpy() for b in bags[1::2]]
    acc = ((logits > 0) == np.array(y, bool)).mean()
    assert acc >= 0.9
    assert np.mean([a[:3].sum() for a in att]) > 0.6  # the 3 shifted cells hold most attention (uniform: 0.15)


def test_shipped_cell_type_parameter_count_matches_card():
    from leukoscope.models import load_model

    d = SHIPPED_DIR / "cell-type"
    card = (d / "MODEL_CARD.md").read_text()
    m = re.search(r"(\d+) parameters in all", card)
    assert m, f"{d / 'MODEL_CARD.md'} states no parameter count"
    model = load_model("cell-type", backend="torch")
    assert sum(p.numel() for p in model.module.parameters()) == int(m.group(1))
    assert len(model.classes) == 15 and "Blast, no lineage spec" in model.classes and "Promyelocyte" in model.classes
    assert (d / "model.safetensors").stat().st_size < 25 * 2**20


def test_shipped_apl_model_card_and_parameter_count():
    pm = load_patient_model("apl")
    card = (SHIPPED_DIR / "apl" / "MODEL_CARD.md").read_text()
    m = re.search(r"Parameters in `model.safetensors`: (\d+)", card)
    assert m and int(m.group(1)) == pm.n_parameters == pm.info["n_parameters"]
    assert pm.method in ("mil", "mean", "proportions") and pm.classes == ("AML", "APL")


def test_patients_from_folders_and_manifest(deepapl, patient_dirs, tmp_path):
    from leukoscope.diagnose import patients_from

    by_patient: dict[str, list] = {}
    for s in deepapl.samples:
        by_patient.setdefault(s.group, []).append(s)
    manifest = tmp_path / "m.csv"
    rows = [(s.path, s.labels["diagnosis"], p) for p in ("Patient_00", "Patient_01") for s in by_patient[p][:3]]
    with manifest.open("w", newline="") as f:  # DeepAPL paths hold commas ("Blast, no lineage spec"): quote them
        w = csv.writer(f)
        w.writerow(["path", "label", "patient"])
        w.writerows(rows)
    got = patients_from([patient_dirs[0], manifest])
    assert [p.name for p in got] == ["Patient_37", "Patient_00", "Patient_01"]
    assert [len(p.paths) for p in got[1:]] == [3, 3]
    assert len(got[0].paths) == sum(1 for s in deepapl.samples if s.group == "Patient_37")
    with pytest.raises(ValueError, match="patient 'Patient_37' is given twice"):
        patients_from([patient_dirs[0], patient_dirs[0]])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        patients_from([tmp_path / "nope"])


def test_cell_scorer_matches_bag_scores_and_heatmap_is_informative(deepapl):
    from leukoscope.data.images import read_image
    from leukoscope.diagnose import Diagnoser

    d = Diagnoser("apl")
    cells = [s.path for s in deepapl.samples if s.group == "Patient_00"][:4]
    images = [read_image(p) for p in cells]
    r = d.diagnose_images("Patient_00", images, cells)
    assert r.n_cells == 4 and r.cell_proba.shape == (4, 15)
    np.testing.assert_allclose(r.cell_proba.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(r.weights.sum(), 1.0, atol=1e-5)
    # the Grad-CAM network scores a cell exactly as the bag scorer does
    np.testing.assert_allclose(d.scorer().predict_arrays(images)[:, 1], r.cell_scores, atol=1e-4)
    for target in ("APL", "AML"):
        heat = d.heatmap(images[0], target=target)
        assert heat.shape == images[0].shape[:2] and 0 <= heat.min() and heat.max() <= 1
        assert heat.max() - heat.min() > 0.5  # not a flat map


def test_cli_names_an_unknown_patient_model(patient_dirs, capsys):
    assert main(["diagnose", str(patient_dirs[0]), "--model", "aplx"]) == 2
    assert "Unknown patient model 'aplx'. Did you mean 'apl'?" in capsys.readouterr().err
