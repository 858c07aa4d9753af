"""``leukoscope compare``: one split for every model, the table's exact columns, the JSON, the ROC plot, the CNN
embeddings of the embedding SVM, and the error for an unknown model name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leukoscope.cli import main as cli_main
from leukoscope.data.datasets import load_dataset
from leukoscope.evaluate.metrics import binary_metrics
from leukoscope.research.compare import TABLE_COLUMNS, CompareConfig, parse_models


@pytest.fixture(scope="module")
def idb2(data_root):
    return load_dataset("all_idb2", root=data_root / "all_idb")


@pytest.fixture(scope="module")
def compared(tmp_path_factory, data_root):
    """rf and cnn_svm on ALL-IDB2 through the CLI (the cheap models; ~30 s with warm caches)."""
    out = tmp_path_factory.mktemp("compare")
    rc = cli_main(["compare", "--dataset", "all_idb2", "--root", str(data_root / "all_idb"), "--models", "rf,cnn_svm",
                   "--out", str(out / "run"), "--json", str(out / "results" / "idb2.json"), "--n-boot", "200",
                   "--timing-images", "4", "--no-progress"])
    assert rc == 0
    return out


def test_table_has_the_exact_columns_and_one_row_per_model(compared):
    md = (compared / "run" / "compare.md").read_text().splitlines()
    assert md[0] == "| " + " | ".join(TABLE_COLUMNS) + " |"
    assert md[0] == ("| Model | Accuracy | Precision | Recall | Specificity | F1 | AUC (95% CI) | Training time | "
                     "Inference images/s |")
    rows = [line for line in md[2:] if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == ["| Random Forest (handcrafted features)",
                                                 "| SVM on frozen CNN embeddings"]
    assert all(len(r.strip("|").split("|")) == len(TABLE_COLUMNS) for r in rows)
    # the copy beside --json is the same table
    assert (compared / "results" / "idb2.md").read_text().splitlines() == md


def test_json_records_the_split_and_no_group_is_on_both_sides(compared, idb2):
    doc = json.loads((compared / "results" / "idb2.json").read_text())
    split = doc["split"]
    assert split["kind"] == "holdout" and set(split["parts"]) == {"train", "val", "test"}
    assert json.loads((compared / "run" / "split.json").read_text())["parts"] == split["parts"]
    group_of = {idb2.relpath(s): s.group for s in idb2.samples}
    assert sum(len(v) for v in split["parts"].values()) == len(idb2) == 259
    train_groups = {group_of[p] for part in ("train", "val") for p in split["parts"][part]}
    test_groups = {group_of[p] for p in split["parts"]["test"]}
    assert train_groups.isdisjoint(test_groups)
    assert len(test_groups) == split["groups"]["test"] >= 5
    # ~20% of the images in test, as whole groups allow
    assert 0.12 <= len(split["parts"]["test"]) / len(idb2) <= 0.28
    for name in ("rf", "cnn_svm"):
        pred = doc["models"][name]["predictions"]
        assert sorted(pred["paths"]) == sorted(split["parts"]["test"])  # every model scored on the same images


def test_table_numbers_are_the_metrics_of_the_saved_predictions(compared):
    doc = json.loads((compared / "results" / "idb2.json").read_text())
    assert doc["classes"] == ["healthy", "leukemic"]
    for name in ("rf", "cnn_svm"):
        m, pred = doc["models"][name], doc["models"][name]["predictions"]
        ref = binary_metrics(pred["y_true"], np.asarray(pred["proba"])[:, 1], n_boot=0)
        for key in ("accuracy", "precision", "recall", "specificity", "f1", "auc"):
            np.testing.assert_allclose(m["row"][key], ref[key], rtol=1e-3, atol=1e-4)
        assert m["row"]["auc_ci_low"] <= m["row"]["auc"] <= m["row"]["auc_ci_high"]
        # ALL-IDB2 is easy (its healthy and ALL fields differ in acquisition): both separate it well
        assert m["row"]["auc"] > 0.9
        assert m["fit_time_s"] > 0 and m["infer_images_per_s"] > 0
    assert doc["models"]["cnn_svm"]["n_features"] == 1280


def test_roc_plot_is_written(compared):
    import matplotlib.image as mpimg

    for path in (compared / "run" / "roc.png", compared / "results" / "idb2_roc.png"):
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] >= 400 and img.shape[1] >= 400
        assert img[..., :3].std() > 0.05  # not a blank canvas


def test_cnn_embeddings_are_deterministic(idb2):
    from leukoscope.research.embed_svm import EMBED_DIM, Embedder

    samples = idb2.samples[:4]
    emb = Embedder()
    a, ok_a, failed = emb.embed_samples(samples, use_cache=False)
    b, ok_b, _ = Embedder().embed_samples(samples, use_cache=False)
    assert a.shape == (4, EMBED_DIM) and ok_a == ok_b == [0, 1, 2, 3] and not failed
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all() and (a >= 0).all() and (a <= 6).all()  # pooled ReLU6 outputs
    # the cached route (float16 stem features) gives the same embeddings within half-precision error
    c, _, _ = emb.embed_samples(samples, use_cache=True)
    np.testing.assert_allclose(c, a, atol=5e-3)
    assert np.abs(a[0] - a[1]).max() > 0.1  # different cells, different embeddings


def test_unknown_model_name_suggests_the_closest(capsys):
    with pytest.raises(ValueError, match=r"Unknown model 'rff'\. Did you mean 'rf'\?"):
        parse_models("cnn,rff")
    with pytest.raises(ValueError, match=r"Unknown model 'cnn_svn'\. Did you mean 'cnn_svm'\?"):
        CompareConfig(dataset="all_idb2", models=("cnn_svn",))
    rc = cli_main(["compare", "--dataset", "all_idb2", "--models", "rf,hybird"])
    assert rc == 2
    assert "Unknown model 'hybird'. Did you mean 'hybrid'?" in capsys.readouterr().err


def test_cli_help_names_every_default_family(capsys):
    from leukoscope.research.compare import DEFAULT_MODELS

    with pytest.raises(SystemExit) as exc:
        cli_main(["compare", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in DEFAULT_MODELS), help_text  # the parser lists them without importing
