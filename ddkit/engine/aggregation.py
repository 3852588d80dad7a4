"""Running instance aggregators over many images (labelling, ``ddkit bench`` and ``ddkit fuse`` share these)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ddkit.errors import ConfigError
from ddkit.types import Instances


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


def aggregate_images(agg: Any, views_per_image: Sequence[Sequence[Instances]],
                     sizes: Sequence[tuple[int, int]]) -> list[Instances]:
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
        raise RuntimeError(f"aggregator returned {len(out)} results for {len(views_per_image)} images")
    return out
