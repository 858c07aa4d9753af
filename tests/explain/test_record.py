"""The faithfulness record a model directory carries (``faithfulness.json``): verdicts per method and per kind of
image, merged across runs, stale when the weights change; what ``explain`` reports from it."""

from __future__ import annotations

import json

import pytest

from leukoscope.explain.record import image_kind, method_faithfulness, record_from_results, weights_sha256


def _results(model_dir, cis: dict, n: int = 20) -> dict:
    methods = {name: {"n": n, "mass_in_cell": {"mean": 0.9},
                      "paired_vs_random": {k: {"mean": (lo + hi) / 2, "ci": [lo, hi], "n": n}
                                           for k in ("insertion_minus_deletion", "road_combined")}}
               for name, (lo, hi) in cis.items()}
    methods["random"] = {"n": n}
    methods["cell mask (reference)"] = methods[next(iter(cis))]
    return {"model_path": str(model_dir), "cnmc": {"selection": "the test part", "part": "test", "methods": methods}}


def test_faithfulness_record_verdicts_merge_and_go_stale(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights one")
    sha = weights_sha256(tmp_path)
    rec = record_from_results(_results(tmp_path, {"gradcam": (0.05, 0.2), "cameras": (-0.1, 0.03),
                                                  "odd": (-0.3, -0.1)}), None, sha)
    assert set(rec["methods"]) == {"gradcam", "cameras", "odd"}  # neither the random map nor the reference
    (tmp_path / "faithfulness.json").write_text(json.dumps(rec))
    got = {m: method_faithfulness(tmp_path, m)["verdict"] for m in ("gradcam", "cameras", "odd", "scorecam")}
    assert got == {"gradcam": "passes", "cameras": "inconclusive", "odd": "fails", "scorecam": "not measured"}
    assert "beats a random map" in method_faithfulness(tmp_path, "gradcam")["note"]

    # a later run of one method updates that method and keeps the others (same weights) ...
    rec2 = record_from_results(_results(tmp_path, {"cameras": (0.01, 0.1)}), rec, sha)
    assert rec2["methods"]["cameras"]["insertion_minus_deletion"]["verdict"] == "passes"
    assert rec2["methods"]["gradcam"] == rec["methods"]["gradcam"]
    # ... but not entries measured on other weights
    assert set(record_from_results(_results(tmp_path, {"cameras": (0.01, 0.1)}), rec, "other")["methods"]) \
        == {"cameras"}
    # new weights in the directory make the record stale: nothing is claimed
    (tmp_path / "model.safetensors").write_bytes(b"weights two")
    stale = method_faithfulness(tmp_path, "gradcam")
    assert stale["verdict"] == "not measured" and "other weights" in stale["note"]


def test_image_sets_give_each_kind_of_image_its_own_verdict(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    sha = weights_sha256(tmp_path)
    main = record_from_results(_results(tmp_path, {"gradcam": (0.05, 0.2), "cameras": (-0.1, 0.03)}), None, sha,
                               kind="cutout", title="cells on black")
    rec = record_from_results(_results(tmp_path, {"gradcam": (0.01, 0.1), "cameras": (0.1, 0.2)}, n=44), main, sha,
                              image_set="crops", kind="smear", title="smear crops")
    assert rec["methods"] == main["methods"] and rec["kind"] == "cutout"  # the main set is kept as it was
    assert set(rec["image_sets"]["crops"]["methods"]) == {"gradcam", "cameras"}
    (tmp_path / "faithfulness.json").write_text(json.dumps(rec))

    def v(method, kind):
        return method_faithfulness(tmp_path, method, kind)["verdict"]

    assert v("cameras", "smear") == "passes"  # measured on its own kind
    assert v("cameras", "cutout") == "inconclusive"
    assert v("cameras", None) == "inconclusive"  # kind unknown: the worst over all sets
    assert v("gradcam", "smear") == v("gradcam", None) == "passes"
    note = method_faithfulness(tmp_path, "cameras", "smear")["note"]
    assert "on 20 held-out cells on black, cameras does not clearly beat a random map" in note
    assert "on 44 held-out smear crops, cameras beats a random map" in note
    assert note.index("smear crops") < note.index("measured on other images") < note.index("cells on black")
    # a later run of the set merges into it; results of the other kind go into no existing set of a kind
    rec2 = record_from_results(_results(tmp_path, {"layercam": (0.02, 0.3)}), rec, sha, image_set="crops")
    assert set(rec2["image_sets"]["crops"]["methods"]) == {"gradcam", "cameras", "layercam"}
    assert rec2["image_sets"]["crops"]["kind"] == "smear"
    with pytest.raises(ValueError, match="record them as a further image set"):
        record_from_results(_results(tmp_path, {"layercam": (0.02, 0.3)}), rec, sha, kind="smear")
    with pytest.raises(ValueError, match="record them as a further image set"):
        record_from_results(_results(tmp_path, {"layercam": (0.02, 0.3)}), rec, sha, image_set="crops", kind="cutout")
    with pytest.raises(ValueError, match="unknown image kind"):
        record_from_results(_results(tmp_path, {"gradcam": (0.1, 0.2)}), rec, sha, kind="blurry")
    # measured on the other kind only: no verdict for this one, and the note says what was measured
    (tmp_path / "faithfulness.json").write_text(json.dumps(rec2))
    only_smear = method_faithfulness(tmp_path, "layercam", "cutout")
    assert only_smear["verdict"] == "not measured" and "not been measured on cells cut out onto black" in \
        only_smear["note"] and "on 20 held-out smear crops, layercam beats" in only_smear["note"]
    assert v("layercam", "smear") == "passes"
    # a record from before kinds were kept: its set counts for every kind
    legacy = {k: val for k, val in main.items() if k != "kind"}
    (tmp_path / "faithfulness.json").write_text(json.dumps(legacy))
    assert v("cameras", "smear") == v("cameras", "cutout") == "inconclusive"


def test_image_kind_tells_a_cell_on_black_from_a_smear_image(cnmc_paths, data_root):
    from leukoscope.data.images import read_image

    assert image_kind(read_image(cnmc_paths[0])) == "cutout"
    assert image_kind(read_image(data_root / "all_idb" / "ALL_IDB2" / "img" / "Im022_1.tif")) == "smear"
    assert image_kind(read_image(data_root / "all_aria" / "Original" / "Benign" / "WBC-Benign-030.jpg")) == "smear"


def test_shipped_model_record_is_of_its_weights_and_complete_for_each_kind():
    from leukoscope.explain import METHODS
    from leukoscope.models import resolve_model_dir

    d = resolve_model_dir("leukemia-cell")
    rec = json.loads((d / "faithfulness.json").read_text())
    assert rec["weights_sha256"] == weights_sha256(d)  # re-record after retraining (explain_localisation --record)
    assert set(rec["methods"]) == set(METHODS.names())
    gc = method_faithfulness(d, "gradcam")
    assert gc["n_cells"] >= 40
    # the main set is held-out C-NMC cells on black; the further sets are held-out smear images. Every method has a
    # measured verdict on each kind (the worst over that kind's sets; on these weights no method beats the random map
    # on aria images, and the verdicts say so)
    assert rec["kind"] == "cutout" and {s["kind"] for s in rec["image_sets"].values()} == {"smear"}
    for kind in ("cutout", "smear"):
        verdicts = {m: method_faithfulness(d, m, kind)["verdict"] for m in METHODS.names()}
        assert set(verdicts.values()) <= {"passes", "inconclusive", "fails"}, (kind, verdicts)
