"""CAM: hooks only inside `with`, exceptions propagate, the module comes back as it was, token maps reshape right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from leukoscope.data.images import read_image
from leukoscope.explain import CAM, METHODS, get_method, occlusion_map, tokens_to_grid
from leukoscope.explain.cam import CAMERAS_SCALES, MultiScaleCAM, fine_layer, resolve_layer

SIZE = 64  # the input size of the conftest models


def _x(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (1, 3, SIZE, SIZE)).astype(np.float32))


def test_tokens_to_grid_drops_the_class_token_and_keeps_positions():
    b, g, c = 2, 3, 5
    grid = torch.arange(b * g * g * c, dtype=torch.float32).reshape(b, g * g, c)
    tokens = torch.cat([torch.full((b, 1, c), -1.0), grid], 1)  # class token first
    out = tokens_to_grid(tokens)
    assert out.shape == (b, c, g, g)
    # token 1 + (row * g + col) lands at [:, :, row, col]
    torch.testing.assert_close(out[1, :, 2, 1], grid[1, 2 * g + 1])
    assert (out != -1).all()
    assert tokens_to_grid(grid).shape == (b, c, g, g)  # no class token
    conv = torch.zeros(1, 4, 7, 7)
    assert tokens_to_grid(conv) is conv
    with pytest.raises(ValueError, match="neither g\\*g nor 1 \\+ g\\*g"):
        tokens_to_grid(torch.zeros(1, 12, 4))


# Score-CAM on the hybrid is covered by test_quiet_scorecam_equals_the_library
CASES = [(k, m) for k in ("cnn", "hybrid") for m in ("gradcam", "gradcam++", "layercam", "cameras")] + [
    ("cnn", "scorecam")]


@pytest.mark.parametrize("kind,method", CASES)
def test_cam_maps_and_no_leftovers(request, kind, method, no_hooks, cnmc_paths):
    model = request.getfixturevalue(f"{kind}_model")
    module = model.module
    # Score-CAM runs one forward pass per channel: on the CNN explain a 24-channel layer, not the 1280-channel one
    explicit = "backbone.blocks.1" if (kind, method) == ("cnn", "scorecam") else None
    layer = resolve_layer(module, get_method(method), explicit, model.target_layer)
    before = [p.requires_grad for p in module.parameters()]
    x = torch.from_numpy(model.preprocess(read_image(cnmc_paths[0])))[None]
    x0 = x.clone()
    with CAM(module, method, layer) as cam:
        assert no_hooks(module), "hooks should be attached inside the block"
        maps = cam(x, [1])
    assert maps.shape == (1, SIZE, SIZE) and maps.dtype == np.float32
    assert 0.0 <= maps.min() and maps.max() <= 1.0 and maps.max() > 0.5  # scaled to [0, 1], not all zero
    assert no_hooks(module) == []
    assert [p.requires_grad for p in module.parameters()] == before
    assert all(p.grad is None for p in module.parameters())
    assert not any(m.training for m in module.modules())
    torch.testing.assert_close(x, x0, rtol=0, atol=0)


def test_hybrid_default_layer_is_the_token_layer(hybrid_model):
    assert hybrid_model.target_layer == "encoder.layers.1.norm1"
    assert resolve_layer(hybrid_model.module, get_method("gradcam"), None, hybrid_model.target_layer) == \
        "encoder.layers.1.norm1"
    assert fine_layer(hybrid_model.module, "x") == "backbone.blocks.4"


@pytest.mark.parametrize("exc", [RuntimeError("boom"), IndexError("the library's own __exit__ swallows these")])
def test_hooks_removed_and_exception_propagates(cnn_model, exc, no_hooks):
    module = cnn_model.module
    module.train()  # a module in training mode comes back in training mode
    try:
        with pytest.raises(type(exc), match=str(exc)):
            with CAM(module, "gradcam", cnn_model.target_layer):
                assert no_hooks(module)
                raise exc
        assert no_hooks(module) == []
        assert all(m.training for m in module.modules())
        assert all(p.requires_grad for p in module.parameters())
    finally:
        module.eval()


def test_failure_inside_the_library_also_cleans_up(cnn_model, no_hooks):
    module = cnn_model.module
    with pytest.raises(ValueError, match="target classes for a batch"):
        with CAM(module, "gradcam", cnn_model.target_layer) as cam:
            cam(_x(), [0, 1])
    with pytest.raises(IndexError):
        with CAM(module, "gradcam", cnn_model.target_layer) as cam:
            cam(_x(), [5])  # class 5 of a 2-class model: the library indexes out of range
    assert no_hooks(module) == []


def test_lock_is_held_inside_and_released_after(cnn_model):
    import threading

    lock = threading.Lock()
    with pytest.raises(RuntimeError):
        with CAM(cnn_model.module, "gradcam", cnn_model.target_layer, lock=lock):
            assert lock.locked()
            raise RuntimeError
    assert not lock.locked()


def test_cam_outside_with_is_refused(cnn_model, no_hooks):
    cam = CAM(cnn_model.module, "gradcam", cnn_model.target_layer)
    with pytest.raises(RuntimeError, match="inside a `with` block"):
        cam(_x(), [0])
    assert no_hooks(cnn_model.module) == []


def test_quiet_scorecam_equals_the_library(hybrid_model, capsys, no_hooks):
    module, layer = hybrid_model.module, hybrid_model.target_layer
    x = _x(3)
    with CAM(module, "scorecam", layer) as cam:
        ours = cam(x, [0])
    assert capsys.readouterr().err == ""  # no progress bar
    assert no_hooks(module) == [] and ours.shape == (1, SIZE, SIZE) and 0 <= ours.min() and ours.max() <= 1
    lib = ScoreCAM(module, [module.get_submodule(layer)], reshape_transform=tokens_to_grid)
    try:
        with torch.enable_grad():
            ref = lib(x.clone().requires_grad_(True), [ClassifierOutputTarget(0)])
    finally:
        lib.activations_and_grads.release()
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_occlusion_finds_the_region_a_toy_score_reads():
    # score = mean of the top-left 16 x 16 block: only occluding that block lowers it
    x = torch.zeros(1, 3, 64, 64)
    x[:, :, :16, :16] = 1.0
    heat = occlusion_map(lambda b: b[:, :, :16, :16].mean(dim=(1, 2, 3)), x, grid=4)
    assert heat.shape == (64, 64)
    assert np.unravel_index(heat.argmax(), heat.shape) < (16, 16)
    assert heat[:16, :16].mean() > 5 * heat[32:, 32:].mean()
    np.testing.assert_allclose(heat[40:, 40:], 0.0, atol=1e-6)


def test_unknown_method_and_layer_messages(cnn_model):
    with pytest.raises(ValueError, match="Did you mean 'gradcam'"):
        get_method("gradcm")
    assert {"gradcam", "gradcam++", "layercam", "scorecam", "occlusion"} <= set(METHODS.names())
    with pytest.raises(ValueError, match="has no layer 'backbone.nope'"):
        resolve_layer(cnn_model.module, get_method("gradcam"), "backbone.nope", cnn_model.target_layer)
    with pytest.raises(ValueError, match="needs no hooks"):
        CAM(cnn_model.module, "occlusion", cnn_model.target_layer)


class _PatchNet(torch.nn.Module):
    """A fully convolutional toy network: brightness of 32 x 32 patches (stride 32), ReLU, global mean, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 32, stride=32, bias=False)
        self.act = torch.nn.ReLU()
        self.fc = torch.nn.Linear(1, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1 / (3 * 32 * 32))
            self.fc.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


def test_cameras_resolves_detail_finer_than_the_layer_stride(no_hooks):
    # An 8 x 8 bright square inside one 32 x 32 cell of the layer's grid (2 x 2 at 64 px): at one size the map can
    # only light up that whole cell; run at 4 x the size the layer's grid is 8 x 8 and the map finds the square.
    net = _PatchNet().eval()
    x = torch.zeros(1, 3, 64, 64)
    x[:, :, 8:16, 40:48] = 1.0
    square = np.zeros((64, 64), bool)
    square[8:16, 40:48] = True
    near = np.zeros((64, 64), bool)
    near[4:20, 36:52] = True  # the square and 4 px around it
    maps = {}
    for scales in [(1,), CAMERAS_SCALES]:
        with CAM(net, "cameras", "act", scales=scales) as cam:
            maps[scales] = cam(x, [1])[0]
        assert no_hooks(net) == []
    one, multi = maps[(1,)], maps[CAMERAS_SCALES]
    assert multi.shape == (64, 64) and 0 <= multi.min() and multi.max() == pytest.approx(1.0, abs=1e-4)
    mass = {k: float(m[near].sum() / m.sum()) for k, m in maps.items()}
    assert mass[CAMERAS_SCALES] > 0.45 and mass[CAMERAS_SCALES] > 2 * mass[(1,)], mass
    # single size: a bilinear blow-up of the 2 x 2 grid, its peak off the square (in the cell's corner) and no cold
    # part in the square's cell; the multi-scale map is cold (< 0.2) in most of that cell, away from the square
    assert square[np.unravel_index(int(multi.argmax()), multi.shape)]
    assert not square[np.unravel_index(int(one.argmax()), one.shape)]
    assert one[:32, 32:].min() > 0.2 and (multi[:32, 32:] < 0.2).mean() > 0.5


def _span_residual(m: np.ndarray, g: int) -> float:
    """How far (RMS) ``m`` lies from every bilinear blow-up of a ``g`` x ``g`` grid plus a constant (least squares)."""
    basis = torch.eye(g * g).reshape(g * g, 1, g, g)
    up = torch.nn.functional.interpolate(basis, size=m.shape, mode="bilinear", align_corners=False)
    a = np.concatenate([up.reshape(g * g, -1).T.numpy(), np.ones((m.size, 1), np.float32)], 1).astype(np.float64)
    coef = np.linalg.lstsq(a, m.ravel().astype(np.float64), rcond=None)[0]
    return float(np.sqrt(np.mean((a @ coef - m.ravel()) ** 2)))


def test_cameras_grid_is_finer_on_a_real_cell(cnn_model, cnmc_paths):
    # At 64 px the target layer (stride 32) is a 2 x 2 grid; at 4 x 64 px it is 8 x 8. The single-size map is a
    # bilinear blow-up of a 2 x 2 grid; the multi-scale map is one of an 8 x 8 grid and far from any 2 x 2 one.
    x = torch.from_numpy(cnn_model.preprocess(read_image(cnmc_paths[3])))[None]
    maps = {}
    for scales in [(1,), CAMERAS_SCALES]:
        with CAM(cnn_model.module, "cameras", cnn_model.target_layer, scales=scales) as cam:
            maps[scales] = cam(x)[0]
    one, multi = maps[(1,)], maps[CAMERAS_SCALES]
    native, finest = SIZE // 32, int(SIZE * max(CAMERAS_SCALES)) // 32
    assert _span_residual(one, native) < 1e-4
    assert _span_residual(multi, finest) < 1e-4
    assert _span_residual(multi, native) > 0.05 and _span_residual(multi, finest // 2) > 0.02


def test_cameras_refuses_a_model_of_one_input_size(no_hooks):
    class FixedSize(torch.nn.Module):  # a flatten + linear head: only 64 x 64 inputs fit
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 * SIZE * SIZE, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).flatten(1))

    net = FixedSize().eval()
    with pytest.raises(ValueError, match="runs the network at 128x128 px .* FixedSize cannot take that size"):
        with CAM(net, "cameras", "conv", scales=(1, 2)) as cam:
            cam(_x())
    assert no_hooks(net) == [] and all(p.requires_grad for p in net.parameters())
    with CAM(net, "cameras", "conv", scales=(1,)) as cam:  # at its own size it works
        assert cam(_x()).shape == (1, SIZE, SIZE)


def test_cameras_scales_are_checked(cnn_model):
    with pytest.raises(ValueError, match="must include 1"):
        MultiScaleCAM(cnn_model.module, [cnn_model.module.get_submodule("backbone.bn2")], scales=(2, 3))
    with pytest.raises(ValueError, match="runs at one input size"):
        CAM(cnn_model.module, "gradcam", cnn_model.target_layer, scales=(1, 2))
    assert get_method("cameras").scales == CAMERAS_SCALES and get_method("gradcam").scales == ()
