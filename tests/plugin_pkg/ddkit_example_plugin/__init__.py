"""A third-party aggregator: keep, per class, the single highest-scoring box over all views."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddkit import Instances, hookimpl
from ddkit.types import AggregatorSpec


@dataclass
class BestPerClassParams:
    min_score: float = 0.0


class BestPerClass:
    def __init__(self, min_score: float = 0.0):
        self.min_score = min_score

    def __call__(self, views: list[Instances], image_size: tuple[int, int]) -> Instances:
        if not views or sum(len(v) for v in views) == 0:
            return Instances.empty(image_size=image_size)
        allv = Instances(torch.cat([v.boxes for v in views]), torch.cat([v.scores for v in views]),
                         torch.cat([v.labels for v in views]), image_size=image_size)
        allv = allv[allv.scores >= self.min_score].sorted_by_score()
        first = torch.zeros(len(allv), dtype=torch.bool)
        seen: set[int] = set()
        for i, label in enumerate(allv.labels.tolist()):
            if label not in seen:
                seen.add(label)
                first[i] = True
        return allv[first]

    def batch(self, views_per_image, image_sizes):
        return [self(v, s) for v, s in zip(views_per_image, image_sizes)]


@hookimpl
def ddkit_aggregators():
    yield AggregatorSpec(name="best_per_class", factory=BestPerClass, params=BestPerClassParams,
                         summary="keep the best box of each class over all views (example plugin)")
