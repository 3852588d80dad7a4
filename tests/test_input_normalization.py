"""torchvision and timm classifiers standardise their [0, 1] input as their library's transforms do.

The reference for each is the library's own: torchvision's ``weights.transforms()`` (its ``mean`` / ``std``) and
timm's ``resolve_data_config``, applied with ``torchvision.transforms.functional.normalize`` before the plain model.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF

import ddkit
from ddkit.engine.checkpoint import load_model, save_model
from ddkit.testing.models import info_for_task

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(cfg: dict, chans: int = 3, size: int = 32) -> torch.nn.Module:
    info = info_for_task("classification", num_classes=4, image_shape=(chans, size, size))
    return ddkit.build("tasks", "classification").build_model(cfg, info).eval()


def _plain_twin(model: torch.nn.Module, plain: torch.nn.Module) -> torch.nn.Module:
    """Random weights of order one in ``model`` (a fresh head outputs ~0 for any input), and ``plain`` (the
    library's model, no hook) holding the same."""
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.rand(v.shape, generator=g) + 0.5 if "running_var" in k else
                 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    plain.load_state_dict(state)
    return plain.eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item()))


def test_torchvision_classifier_sees_its_weights_transforms_normalisation():
    torch.manual_seed(0)
    model = _build({"name": "torchvision", "arch": "resnet18"})
    transforms = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    plain = _plain_twin(model, torchvision.models.resnet18(num_classes=4))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert _close(model(x), plain(TF.normalize(x, transforms.mean, transforms.std)))
        assert not _close(model(x), plain(x))  # the standardisation changes what the model sees


@pytest.mark.parametrize("name", ["test_vit", "resnet18"])  # mean / std 0.5 and ImageNet's
def test_timm_classifier_sees_its_data_config_normalisation(name):
    import timm
    from timm.data import resolve_data_config

    torch.manual_seed(0)
    kwargs = {"img_size": 32} if "vit" in name else {}
    model = _build({"name": "timm", "model_name": name, "kwargs": kwargs})
    plain = _plain_twin(model, timm.create_model(name, pretrained=False, num_classes=4, **kwargs))
    config = resolve_data_config({}, model=plain)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert _close(model(x), plain(TF.normalize(x, config["mean"], config["std"])))
        assert not _close(model(x), plain(x))


def test_grey_input_takes_the_mean_over_rgb_and_normalize_false_turns_it_off():
    torch.manual_seed(0)
    grey = _build({"name": "torchvision", "arch": "resnet18"}, chans=1)
    off = _plain_twin(grey, _build({"name": "torchvision", "arch": "resnet18", "normalize": False}, chans=1))
    mean, std = sum((0.485, 0.456, 0.406)) / 3, sum((0.229, 0.224, 0.225)) / 3
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert _close(grey(x), off((x - mean) / std))
        assert not _close(grey(x), off(x))


def test_the_state_dict_stays_the_librarys_and_a_saved_model_keeps_its_normalisation(tmp_path):
    torch.manual_seed(0)
    cfg = {"name": "torchvision", "arch": "resnet18"}
    model = _build(cfg)
    _plain_twin(model, _build({**cfg, "normalize": False}))
    assert set(model.state_dict()) == set(torchvision.models.resnet18(num_classes=4).state_dict())
    again = load_model(save_model(model, tmp_path / "model.pt"))[1]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
