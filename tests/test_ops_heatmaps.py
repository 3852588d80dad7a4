"""ddkit.ops.heatmaps against torchvision's Keypoint R-CNN decoding and simple references."""
from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import heatmaps_to_keypoints as tv_heatmaps_to_keypoints

from ddkit.ops.geometry import COCO_FLIP_INDICES
from ddkit.ops.heatmaps import average_heatmaps, flip_heatmaps, heatmaps_to_keypoints, spatial_softmax


def _random_rois(n: int, g: torch.Generator, max_side: float = 60.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * max_side + 0.3  # includes sub-pixel RoIs (clamped to 1 px)
    rois = torch.cat([xy, xy + wh], 1)
    rois[: n // 4, 2:] = rois[: n // 4, :2] + torch.tensor([20.0, 30.0])  # repeated sizes share a batch
    return rois


@pytest.mark.parametrize("seed", range(4))
def test_heatmaps_to_keypoints_matches_torchvision(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 12, 17
    maps = torch.randn(n, k, 14, 14, generator=g)
    rois = _random_rois(n, g)
    want_xy, want_scores = tv_heatmaps_to_keypoints(maps, rois)
    got = heatmaps_to_keypoints(maps, rois)
    assert got.shape == (n, k, 3) and got.dtype == torch.float32
    # same arithmetic in the same order: bit for bit
    assert torch.equal(got[..., :2], want_xy[..., :2])
    assert torch.equal(got[..., 2], want_scores)


def test_heatmaps_to_keypoints_non_square_maps_and_peaks():
    # a single peak at cell (i, j) decodes to that cell's centre in the RoI (up to one upsampled pixel)
    maps = torch.zeros(1, 2, 8, 10)
    maps[0, 0, 2, 7] = 5.0
    maps[0, 1, 6, 1] = 3.0
    rois = torch.tensor([[10.0, 20.0, 50.0, 52.0]])  # 40 x 32 px: cells of 4 x 4 px
    kp = heatmaps_to_keypoints(maps, rois)
    assert kp[0, 0, :2].tolist() == pytest.approx([10 + 7.5 * 4, 20 + 2.5 * 4], abs=1.0)
    assert kp[0, 1, :2].tolist() == pytest.approx([10 + 1.5 * 4, 20 + 6.5 * 4], abs=1.0)
    want_xy, want_scores = tv_heatmaps_to_keypoints(maps, rois)
    torch.testing.assert_close(kp[..., :2], want_xy[..., :2])
    torch.testing.assert_close(kp[..., 2], want_scores)


def test_heatmaps_to_keypoints_empty_and_errors():
    assert heatmaps_to_keypoints(torch.zeros(0, 17, 14, 14), torch.zeros(0, 4)).shape == (0, 17, 3)
    with pytest.raises(ValueError, match="rois"):
        heatmaps_to_keypoints(torch.zeros(2, 17, 14, 14), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="maps"):
        heatmaps_to_keypoints(torch.zeros(17, 14, 14), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="non-finite"):
        heatmaps_to_keypoints(torch.zeros(1, 1, 4, 4), torch.tensor([[0.0, 0.0, float("nan"), 4.0]]))


def test_flip_heatmaps_is_an_involution_that_swaps_channels():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 17, 5, 7, generator=g)
    flipped = flip_heatmaps(maps, COCO_FLIP_INDICES)
    assert torch.equal(flip_heatmaps(flipped, COCO_FLIP_INDICES), maps)
    assert torch.equal(flipped[:, 1], maps[:, 2].flip(-1))  # left eye <- right eye, mirrored
    assert torch.equal(flipped[:, 0], maps[:, 0].flip(-1))
    with pytest.raises(ValueError, match="K=17"):
        flip_heatmaps(maps, [0, 2, 1])


def test_flip_heatmaps_agrees_with_flipping_keypoints():
    """Decoding flipped maps in a RoI equals mirroring the decoded keypoints inside the RoI (W - x about the RoI)."""
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(4, 17, 14, 14, generator=g)
    rois = torch.tensor([[0.0, 0.0, 28.0, 42.0]]).repeat(4, 1)  # 2 px per cell: upsampling is exact-ish
    kp = heatmaps_to_keypoints(maps, rois)
    kp_f = heatmaps_to_keypoints(flip_heatmaps(maps, COCO_FLIP_INDICES), rois)
    mirrored = kp[:, list(COCO_FLIP_INDICES)]
    torch.testing.assert_close(kp_f[..., 0], 28.0 - mirrored[..., 0], atol=1.0, rtol=0)
    torch.testing.assert_close(kp_f[..., 1], mirrored[..., 1], atol=1e-5, rtol=0)


def test_spatial_softmax_and_average():
    g = torch.Generator().manual_seed(2)
    maps = torch.randn(3, 2, 4, 5, 6, generator=g)
    p = spatial_softmax(maps)
    torch.testing.assert_close(p.sum((-2, -1)), torch.ones(3, 2, 4))
    ref = torch.softmax(maps.reshape(3, 2, 4, -1), -1).reshape(maps.shape)
    torch.testing.assert_close(p, ref)
    torch.testing.assert_close(average_heatmaps(maps, "logits"), maps.mean(0))
    torch.testing.assert_close(average_heatmaps(maps, "softmax"), ref.mean(0))
    with pytest.raises(ValueError, match="mode"):
        average_heatmaps(maps, "median")
    with pytest.raises(ValueError, match=r"\[V, N, K, h, w\]"):
        average_heatmaps(maps[0], "logits")
