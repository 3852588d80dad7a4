"""Builtin aggregators."""
from __future__ import annotations

import torch
from torch import Tensor

from ddkit import hookimpl
from ddkit.types import AggregatorSpec


class ProbMean:
    """Average the class probabilities of every view; the argmax is the hard label, its mean probability the score."""

    def __call__(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """``probs [V, N, C]`` (views, images, classes) -> ``(labels [N] int64, scores [N])``."""
        if probs.ndim != 3:
            raise ValueError(f"prob_mean expects probs of shape [V, N, C], got {tuple(probs.shape)}")
        scores, labels = probs.float().mean(0).max(-1)
        return labels, scores


@hookimpl
def ddkit_aggregators():
    yield AggregatorSpec(name="prob_mean", factory=ProbMean, input="probs",
                         summary="average class probabilities over views, argmax -> hard label")
