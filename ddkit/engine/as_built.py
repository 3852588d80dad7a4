"""``train.iterations: 0``: a model used as built, its pretrained weights untouched (a COCO detector, an Ultralytics
``.pt``, a weights file), e.g. a teacher that labels without training.

Such a model is only meaningful when its weights set every tensor. Which tensors a model plugin initialises at
random (a class head sized for other classes, a keypoint head) is known to the plugin alone, so the core finds out
without asking: it builds the block at two torch seeds, and the tensors that differ are the random ones.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Callable, Iterator

import torch
from torch import nn

from ddkit.errors import ConfigError

__all__ = ["check_as_built", "random_tensors"]


def random_tensors(build: Callable[[], nn.Module]) -> list[str]:
    """Names of the floating-point tensors of ``build()``'s state dict that depend on the torch seed.

    ``build`` is called twice, at seeds 0 and 1, inside a forked RNG (the caller's random state is unchanged).
    """
    with torch.random.fork_rng(devices=[]), _quiet():  # the recipe check built it once already and said so
        torch.manual_seed(0)
        first = build().state_dict()
        torch.manual_seed(1)
        second = build().state_dict()
    return [k for k, v in first.items()
            if v.is_floating_point() and (second[k].shape != v.shape or not torch.equal(v, second[k]))]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No log lines or warnings from the two extra builds (a plugin's "class head of 80 of 80 classes ...")."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def check_as_built(build: Callable[[], nn.Module], where: str) -> None:
    """Refuse a model trained for 0 iterations (``where``: its section, e.g. ``recipe.yaml: teacher``) when part of
    it is random: it would label or predict with an untrained head."""
    random = random_tensors(build)
    if random:
        raise ConfigError(f"{where}.train.iterations: 0 uses the model as built, without training, but {len(random)} "
                          f"of its tensors are random, not set by weights (e.g. {', '.join(random[:3])}); set "
                          f"{where.rsplit(': ', 1)[-1]}.model.pretrained to weights of the whole model (a detector's "
                          f"COCO weights for classes COCO names, a weights file of the same classes), or train at "
                          f"least 1 iteration")
