"""Small real networks for explanation tests: EfficientNet-Lite0 with its packaged ImageNet weights (no download),
at a 64-pixel input so that every method, Score-CAM included, runs in about a second on a shared CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leukoscope.models import LoadedModel, build_network
from leukoscope.preprocess.transforms import Preprocess

SIZE = 64


def _model(kind: str, size: int = SIZE) -> LoadedModel:
    torch.manual_seed(0)
    # a narrow Transformer (32 channels) keeps Score-CAM, one forward pass per channel, cheap
    spec = {"model": kind, "backbone": "efficientnet_lite0", "input_size": size, "dim": 32, "heads": 2}
    module, source = build_network(spec, 2, pretrained="auto")
    assert source.startswith("package:"), source  # real ImageNet weights, offline
    module.eval()
    return LoadedModel(f"test-{kind}", Path("."), module, ["healthy", "leukemic"], Preprocess(size=size), 1.0,
                       {"target_layer": module.target_layer, "spec": spec}, backend="torch")


@pytest.fixture(scope="session")
def cnn_model() -> LoadedModel:
    return _model("cnn")


@pytest.fixture(scope="session")
def hybrid_model() -> LoadedModel:
    return _model("hybrid")


@pytest.fixture(scope="session")
def cnmc_paths(data_root) -> list[Path]:
    from leukoscope.data.datasets import load_dataset

    ds = load_dataset("cnmc2019", root=data_root / "cnmc2019")
    assert len(ds.samples) > 100, f"expected the 238 C-NMC 2019 images under {ds.root}"
    return [s.path for s in ds.samples]


def _hooks_left(module: torch.nn.Module) -> list[str]:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [f"{name or '<root>'}.{k}" for name, m in module.named_modules() for k in kinds if getattr(m, k, None)]


@pytest.fixture(scope="session")
def no_hooks():
    """``no_hooks(module)``: names of submodules that still carry a hook of any kind."""
    return _hooks_left


@pytest.fixture()
def onnx_twin(tmp_path):
    """``onnx_twin(model)``: the same network as a model on the ONNX backend (for the stem; logits stay PyTorch), with
    its own cache key, so that explanations take the ONNX Runtime stem path."""
    import dataclasses

    def make(model: LoadedModel) -> LoadedModel:
        info = dict(model.info, weights_sha256=f"test-{model.name}-{tmp_path.name}")
        return dataclasses.replace(model, path=tmp_path, info=info, backend="onnx", _session=None, _part_sessions={})

    return make
