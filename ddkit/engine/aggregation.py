"""Running instance aggregators over many images (labelling, ``ddkit bench`` and ``ddkit fuse`` share these)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ddkit.errors import ConfigError, PluginContractError
from ddkit.types import Instances

PROBS_CONTRACT = "(labels [N] int, scores [N] finite float)"


def build_instance_aggregator(method_cfg: Mapping[str, Any] | str, registry: Any = None,
                              where: str = "fuse method") -> Any:
    """Build an aggregator of input type ``instances`` from a config block (``"wbf"`` or ``{name: wbf, ...}``)."""
    from ddkit.plugin_manager import get_registry

    registry = registry or get_registry()
    entry, _ = registry.params("aggregators", method_cfg, where=where)
    if getattr(entry.spec, "input", "instances") != "instances":
        names = [s.name for s in registry.specs("aggregators") if getattr(s, "input", "instances") == "instances"]
        raise ConfigError(f"aggregator {entry.spec.name!r} ensembles {entry.spec.input}, not boxes; "
                          f"use one of: {', '.join(names)}")
    return registry.build("aggregators", method_cfg, where=where)


def carries_keypoints(aggregator: Any) -> bool:
    """Whether an instance aggregator (or its factory class) puts keypoints on its output: fused ones
    (``fuses_keypoints``) or those of the input box each output box comes from (``keeps_keypoints``)."""
    return bool(getattr(aggregator, "fuses_keypoints", False) or getattr(aggregator, "keeps_keypoints", False))


def keypoint_aggregators(registry: Any = None) -> list[str]:
    """The names of the registered instance aggregators that carry keypoints (:func:`carries_keypoints`)."""
    from ddkit.plugin_manager import get_registry

    specs = (registry or get_registry()).specs("aggregators")
    return [s.name for s in specs if getattr(s, "input", "instances") == "instances" and carries_keypoints(s.factory)]


def check_probs_output(out: Any, num_images: int, num_classes: int, who: str = "aggregator") -> tuple[Tensor, Tensor]:
    """Validate what a ``probs`` aggregator returned for ``probs [V, N, C]``: ``(labels [N] int in [0, C), scores [N]
    finite float)``; raise :class:`PluginContractError` naming the aggregator and what was wrong (as
    :func:`ddkit.engine.select.check_selection` does for selectors). Returns ``(labels int64, scores float32)``."""
    want = f"{who} must return {PROBS_CONTRACT} for {num_images} images"
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        got = f"{len(out)} values" if isinstance(out, (tuple, list)) else type(out).__name__
        raise PluginContractError(f"{want}, got {got}")
    labels, scores = out
    for what, t in (("labels", labels), ("scores", scores)):
        if not isinstance(t, Tensor) or tuple(t.shape) != (num_images,):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise PluginContractError(f"{want}, got {what} {shape}")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise PluginContractError(f"{want}, got labels of dtype {labels.dtype}")
    if num_images and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise PluginContractError(f"{want}, got labels {int(labels.min())}..{int(labels.max())} for {num_classes} "
                                  f"classes (labels are column indices 0..{num_classes - 1})")
    if not scores.is_floating_point() or not bool(torch.isfinite(scores).all()):
        bad = "non-finite scores" if scores.is_floating_point() else f"scores of dtype {scores.dtype}"
        raise PluginContractError(f"{want}, got {bad}")
    return labels.long(), scores.float()


def aggregate_images(agg: Any, views_per_image: Sequence[Sequence[Instances]],
                     sizes: Sequence[tuple[int, int]], who: str = "aggregator") -> list[Instances]:
    """Run an instance aggregator over many images: ``agg.batch`` when it has one, else one call per image.

    ``views_per_image[i]`` holds image ``i``'s per-view :class:`Instances`; ``sizes[i]`` is its ``(H, W)``."""
    views_per_image = [list(v) for v in views_per_image]
    sizes = [tuple(int(x) for x in s) for s in sizes]
    if not views_per_image:
        return []
    batch = getattr(agg, "batch", None)
    if callable(batch):
        out = list(batch(views_per_image, sizes))
    else:
        out = [agg(views, size) for views, size in zip(views_per_image, sizes)]
    if len(out) != len(views_per_image):
        raise PluginContractError(f"{who} returned {len(out)} results for {len(views_per_image)} images")
    return out
