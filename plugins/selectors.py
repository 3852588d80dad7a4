"""Builtin selectors."""
from __future__ import annotations

from dataclasses import dataclass

from ddkit import hookimpl
from ddkit.types import SelectorSpec


@dataclass
class ScoreThresholdParams:
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")


class ScoreThreshold:
    """Keep the predictions whose score is at least a fixed threshold."""

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold

    def keep(self, scores, labels):
        """``scores [N], labels [N] -> bool mask [N]``."""
        return scores >= self.threshold


@hookimpl
def ddkit_selectors():
    yield SelectorSpec(name="score_threshold", factory=ScoreThreshold, params=ScoreThresholdParams,
                       summary="keep predictions with score >= a fixed threshold")
