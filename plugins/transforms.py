"""Builtin test-time transforms."""
from __future__ import annotations

from torch import Tensor

from ddkit import Instances, hookimpl
from ddkit.types import TransformSpec


class Identity:
    """The untransformed view."""

    name = "identity"

    def forward_image(self, image: Tensor) -> Tensor:
        return image

    def inverse_instances(self, inst: Instances, image_size: tuple[int, int]) -> Instances:
        return inst

    def inverse_heatmaps(self, heatmaps: Tensor) -> Tensor:
        return heatmaps

    def inverse_probs(self, probs: Tensor) -> Tensor:
        return probs


@hookimpl
def ddkit_transforms():
    yield TransformSpec(name="identity", factory=Identity, summary="the untransformed image")
