"""Training on subclasses, answering with classes: the pooling arithmetic, the label bookkeeping, and a model
directory whose network has subclass logits (load, PyTorch vs ONNX Runtime, Grad-CAM through the pooled logits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leukoscope.data.datasets import combine, load_dataset
from leukoscope.models import build_network, load_model
from leukoscope.models.modeldir import save_model_dir
from leukoscope.models.net import SubclassPooling
from leukoscope.preprocess.transforms import Preprocess
from leukoscope.train.trainer import subclass_labels, subclass_of


def test_pooled_probability_is_the_sum_of_the_subclasses():
    pool = SubclassPooling([0, 0, 1, 1, 1], 2)
    z = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [80.0, 79.0, -50.0, -60.0, -70.0]])  # large logits: stable
    p_sub = z.softmax(1)
    p = pool(z).softmax(1)
    torch.testing.assert_close(p, torch.stack([p_sub[:, :2].sum(1), p_sub[:, 2:].sum(1)], 1), rtol=0, atol=1e-6)
    assert torch.isfinite(pool(z)).all()
    with pytest.raises(ValueError, match="every one of the 3 classes"):
        SubclassPooling([0, 0, 2], 3)


def test_subclasses_of_the_leukemia_cell_data(data_root):
    parts = [load_dataset(n, root=data_root / f, target="binary")
             for n, f in (("aria", "all_aria"), ("all_idb2", "all_idb"), ("cnmc2019", "cnmc2019"))]
    ds = combine(parts, name="three")
    subs, groups = subclass_labels(ds, "subtype")
    assert subs == ["healthy", "healthy/Benign", "leukemic", "leukemic/Early", "leukemic/Pre", "leukemic/Pro"]
    assert groups == [0, 0, 1, 1, 1, 1]
    by_source = {}
    for s in ds.samples:
        by_source.setdefault(s.source, set()).add(subclass_of(s, "subtype"))
    assert by_source["aria"] == set(subs[1:2] + subs[3:])  # aria: its subtypes only
    assert by_source["all_idb2"] == by_source["cnmc2019"] == {"healthy", "leukemic"}
    assert subclass_labels(ds, "") == ([], [])
    with pytest.raises(ValueError, match="no sample of 'x' has a label 'stage'"):
        subclass_labels(combine(parts[1:], name="x"), "stage")


def test_model_directory_with_subclasses_answers_with_classes(tmp_path, data_root):
    spec = {"model": "cnn", "backbone": "efficientnet_lite0", "input_size": 64, "trainable_stages": 1,
            "subclasses": ["healthy", "healthy/Benign", "leukemic", "leukemic/Early"], "subclass_groups": [0, 0, 1, 1]}
    torch.manual_seed(0)
    net, _ = build_network(spec, 2, pretrained="auto")
    net.eval()
    assert net.head[-1].out_features == 4
    info = {"name": "sub-test", "spec": spec, "classes": ["healthy", "leukemic"], "target": "binary",
            "preprocess": Preprocess(size=64).to_dict(), "temperature": 1.0, "target_layer": net.target_layer}
    save_model_dir(tmp_path, net, info)
    torch_model = load_model(tmp_path, backend="torch")
    onnx_model = load_model(tmp_path, backend="onnx")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (80, 90, 3), dtype=np.uint8) for _ in range(3)]
    p_torch = torch_model.predict_arrays(images)
    assert p_torch.shape == (3, 2)
    np.testing.assert_allclose(p_torch.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(onnx_model.predict_arrays(images), p_torch, atol=1e-4)
    with torch.no_grad():
        sub = net.head(net.top(net.stem(torch.from_numpy(torch_model.prepare_batch(images))))).softmax(1).numpy()
    np.testing.assert_allclose(p_torch[:, 1], sub[:, 2:].sum(1), atol=1e-5)  # P(leukemic) = its subclasses' sum
    from leukoscope.explain import explain

    e = explain(images[0], torch_model)
    assert e.heatmap.shape == (80, 90) and list(e.probabilities) == ["healthy", "leukemic"]
    e_fast = explain(images[0], onnx_model)  # stem in ONNX Runtime, top in PyTorch through the pooled logits
    assert e_fast.label == e.label
    np.testing.assert_allclose(e_fast.heatmap, e.heatmap, atol=0.05)
