"""Transforms: the contract over every registered transform (builtin or installed), plus builtin specifics."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ddkit
from ddkit import ConfigError, Instances
from ddkit.ops import geometry as G
from ddkit.testing import build_examples, registered
from ddkit.testing.transforms import (check_heatmaps_match_keypoints, check_image_matches_boxes, check_roundtrip,
                                      check_transform, check_views, random_instances, views_of)


def _all_views():
    """(id, view) for every view of every example of every registered transform."""
    out = []
    for entry in registered("transforms"):
        for i, built in enumerate(build_examples(entry)):
            views = views_of(built)
            check_views(views)
            out += [(f"{entry.spec.name}[{i}]-{v.name}", v) for v in views]
    return out


VIEWS = _all_views()


def test_every_registered_transform_has_views():
    names = {vid.split("[")[0] for vid, _ in VIEWS}
    assert names == set(ddkit.get_registry().names("transforms"))


@pytest.mark.parametrize("view", [v for _, v in VIEWS], ids=[i for i, _ in VIEWS])
def test_transform_contract(view):
    check_transform(view)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("view", [v for _, v in VIEWS], ids=[i for i, _ in VIEWS])
def test_roundtrip_random(view, seed):
    """inverse(forward(x)) == x for random boxes and keypoints, on odd image sizes."""
    size = [(37, 53), (28, 28), (101, 64)][seed]
    check_roundtrip(view, image_size=size, n=50, seed=seed)


# ---------------------------------------------------------------------------------------------- the checks can fail
class _OffByOneFlip(ddkit.get_registry().get("transforms", "hflip").spec.factory):
    """A flip with the discrete convention x -> W - 1 - x on boxes (inconsistent with the image flip)."""

    def forward_instances(self, inst, image_size):
        out = super().forward_instances(inst, image_size)
        return Instances(out.boxes - 1, out.scores, out.labels, out.keypoints, out.image_size)


class _NoChannelSwap(ddkit.get_registry().get("transforms", "hflip").spec.factory):
    def inverse_heatmaps(self, heatmaps):
        return heatmaps.flip(-1)


class _NoInverse(ddkit.get_registry().get("transforms", "hflip").spec.factory):
    def inverse_instances(self, inst, image_size):
        return inst


def test_checks_catch_broken_views():
    with pytest.raises(AssertionError, match="rectangle"):
        check_image_matches_boxes(_OffByOneFlip())
    with pytest.raises(AssertionError, match="inverse_heatmaps disagrees"):
        check_heatmaps_match_keypoints(_NoChannelSwap())
    with pytest.raises(AssertionError, match="inverse.forward"):
        check_roundtrip(_NoInverse())
    with pytest.raises(AssertionError, match="unique"):
        check_views([ddkit.build("transforms", "hflip"), ddkit.build("transforms", "hflip")])


# ------------------------------------------------------------------------------------------------------- hflip
def test_hflip_convention_and_involution():
    flip = ddkit.build("transforms", "hflip")
    image = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    assert torch.equal(flip.forward_image(flip.forward_image(image)), image)
    assert torch.equal(flip.forward_image(image)[:, :, 0], image[:, :, -1])
    # pixel j covers [j, j+1): a box around column 0 of a width-5 image lands around column 4
    inst = Instances(torch.tensor([[0.0, 1.0, 1.0, 2.0]]), torch.ones(1), torch.zeros(1, dtype=torch.int64))
    assert flip.forward_instances(inst, (3, 5)).boxes.tolist() == [[4.0, 1.0, 5.0, 2.0]]
    # exact involution on dyadic coordinates
    g = torch.Generator().manual_seed(0)
    inst = random_instances(100, (480, 640), 17, generator=g)
    inst = Instances((inst.boxes * 64).round() / 64, inst.scores, inst.labels, (inst.keypoints * 64).round() / 64)
    twice = flip.inverse_instances(flip.forward_instances(inst, (480, 640)), (480, 640))
    assert torch.equal(twice.boxes, inst.boxes) and torch.equal(twice.keypoints, inst.keypoints)


def test_hflip_keypoints_swap_left_right():
    flip = ddkit.build("transforms", "hflip")
    kps = torch.zeros(1, 17, 3)
    kps[0, 1] = torch.tensor([10.0, 5.0, 0.9])  # left eye
    kps[0, 2] = torch.tensor([20.0, 5.0, 0.8])  # right eye
    inst = Instances(torch.tensor([[5.0, 2.0, 25.0, 30.0]]), torch.ones(1), torch.zeros(1, dtype=torch.int64), kps)
    out = flip.inverse_instances(inst, (40, 100))
    # what the flipped view calls the left eye is the original's right eye, mirrored
    assert out.keypoints[0, 2].tolist() == pytest.approx([90.0, 5.0, 0.9])
    assert out.keypoints[0, 1].tolist() == pytest.approx([80.0, 5.0, 0.8])
    assert out.boxes.tolist() == [[75.0, 2.0, 95.0, 30.0]]


def test_hflip_custom_flip_indices_and_errors():
    flip = ddkit.build("transforms", {"name": "hflip", "flip_indices": [1, 0, 2]})
    kps = torch.tensor([[[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [3.0, 3.0, 3.0]]])
    inst = Instances(torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.ones(1), torch.zeros(1, dtype=torch.int64), kps)
    out = flip.inverse_instances(inst, (4, 4))
    assert out.keypoints[0, :, 0].tolist() == [2.0, 3.0, 1.0]
    with pytest.raises(ConfigError, match="flip_indices"):
        ddkit.build("transforms", {"name": "hflip", "flip_indices": [1, 2, 0]})  # not an involution
    with pytest.raises(ConfigError, match="flip_indices"):
        ddkit.build("transforms", {"name": "hflip", "flip_indices": [0, 0]})
    with pytest.raises(ValueError, match="K=3"):
        ddkit.build("transforms", "hflip").inverse_instances(inst, (4, 4))


# ------------------------------------------------------------------------------------------------------- scale
def test_scale_views_names_and_sizes():
    views = ddkit.build("transforms", {"name": "scale", "flip": True})
    assert [v.name for v in views][:4] == ["scale400", "scale400_flip", "scale500", "scale500_flip"]
    assert len(views) == 18
    assert views[-1].output_size((480, 640)) == (1200, 1600)
    capped = ddkit.build("transforms", {"name": "scale", "sizes": [800], "max_size": 1000})[0]
    assert capped.output_size((480, 640)) == (750, 1000)
    assert capped.output_size((640, 480)) == (1000, 750)
    f = ddkit.build("transforms", {"name": "scale", "factors": [0.5]})[0]
    assert f.name == "scale_x0.5" and f.output_size((28, 28)) == (14, 14)


def test_scale_image_interpolation():
    view = ddkit.build("transforms", {"name": "scale", "factors": [0.5, 2.0]})
    image = torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(0))
    down, up = (v.forward_image(image) for v in view)
    want_down = F.interpolate(image[None], size=(10, 15), mode="bilinear", align_corners=False, antialias=True)[0]
    want_up = F.interpolate(image[None], size=(40, 60), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(down, want_down)
    torch.testing.assert_close(up, want_up)
    # a constant image stays constant, also antialiased
    assert torch.allclose(view[0].forward_image(torch.full((1, 20, 30), 0.3)), torch.tensor(0.3))
    # uint8 images keep their dtype
    u8 = (image * 255).to(torch.uint8)
    assert view[0].forward_image(u8).dtype == torch.uint8


def test_scale_inverse_maps_to_original_frame():
    view = ddkit.build("transforms", {"name": "scale", "sizes": [50], "flip": True})[1]  # scale50_flip
    assert view.name == "scale50_flip"
    # (H, W) = (20, 40) -> (50, 100); a box [0, 0, 10, 5] in the transformed (flipped) image
    inst = Instances(torch.tensor([[0.0, 0.0, 10.0, 5.0]]), torch.ones(1), torch.zeros(1, dtype=torch.int64))
    out = view.inverse_instances(inst, (20, 40))
    assert out.boxes[0].tolist() == pytest.approx([36.0, 0.0, 40.0, 2.0])
    assert out.image_size == (20, 40)


def test_scale_param_errors():
    for bad in ({"sizes": [400], "factors": [1.0]}, {"sizes": [0]}, {"factors": [-1.0]}, {"max_size": 0},
                {"sizes": [400, 400]}, {"sizes": []}):
        with pytest.raises(ConfigError):
            ddkit.build("transforms", {"name": "scale", **bad})


# --------------------------------------------------------------------------------------------------- translate
def test_translate_image_and_instances():
    view = ddkit.build("transforms", {"name": "translate", "shifts": [[2, -1]]})[0]
    assert view.name == "translate_dx2_dy-1"
    image = torch.arange(1 * 4 * 5, dtype=torch.float32).reshape(1, 4, 5) + 1
    out = view.forward_image(image)
    assert out.shape == image.shape
    assert torch.equal(out[0, :3, 2:], image[0, 1:, :3])
    assert float(out[0, :, :2].abs().sum()) == 0 and float(out[0, 3].abs().sum()) == 0
    inst = Instances(torch.tensor([[2.0, 0.0, 4.0, 2.0]]), torch.ones(1), torch.zeros(1, dtype=torch.int64))
    assert view.inverse_instances(inst, (4, 5)).boxes.tolist() == [[0.0, 1.0, 2.0, 3.0]]
    # predictions on the zero-filled border map outside the original image and are clamped to it
    inst = Instances(torch.tensor([[0.0, 0.0, 3.0, 4.0]]), torch.ones(1), torch.zeros(1, dtype=torch.int64))
    assert view.inverse_instances(inst, (4, 5)).boxes.tolist() == [[0.0, 1.0, 1.0, 4.0]]
    probs = torch.softmax(torch.randn(3, 10), -1)
    assert torch.equal(view.inverse_probs(probs), probs)


def test_translate_param_errors():
    for bad in ([[1.5, 0]], [[1, 0, 2]], [], [[1, 0], [1, 0]]):
        with pytest.raises(ConfigError):
            ddkit.build("transforms", {"name": "translate", "shifts": bad})


# ------------------------------------------------------------------------------------------------- photometric
def test_photometric_views():
    b = ddkit.build("transforms", {"name": "brightness", "factors": [0.5, 2.0]})
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(b[0].forward_image(image), image * 0.5)
    torch.testing.assert_close(b[1].forward_image(image), (image * 2).clamp(0, 1))
    cj = ddkit.build("transforms", {"name": "color_jitter", "brightness": 1.0, "contrast": 1.0, "saturation": 0.0})
    gray = cj.forward_image(image)
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    inst = random_instances(5, (8, 8), 17)
    assert torch.equal(cj.inverse_instances(inst, (8, 8)).boxes, inst.boxes)
    with pytest.raises(ConfigError, match="contrast"):
        ddkit.build("transforms", {"name": "color_jitter", "contrast": -1.0})


# ------------------------------------------------------------------------------------------------ geometry ops
def test_geometry_ops_keep_dtype_and_do_not_mutate():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    before = boxes.clone()
    for out in (G.hflip_boxes(boxes, 10), G.scale_boxes(boxes, 2, 3), G.translate_boxes(boxes, 1, 1),
                G.clip_boxes(boxes, (3, 3))):
        assert out.dtype == torch.float64
    assert torch.equal(boxes, before)
    assert G.scale_boxes(boxes, 2, 3).tolist() == [[2.0, 6.0, 6.0, 12.0]]
    assert G.clip_boxes(boxes, (3, 2)).tolist() == [[1.0, 2.0, 2.0, 3.0]]
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        G.hflip_boxes(torch.zeros(3), 10)
    with pytest.raises(ValueError, match="exactly one"):
        G.resized_size((10, 10))
    assert G.translate_image(torch.ones(1, 3, 3), 5, 0).sum() == 0
