"""Contract checks for datasets (kind ``datasets``): item format, ``.info`` and ``get_target``.

    from ddkit.testing.datasets import check_dataset
    check_dataset(my_dataset)
"""
from __future__ import annotations

from typing import Any

import torch

from ddkit.engine.data import get_target
from ddkit.engine.keypoint_meta import FLIP_UNKNOWN
from ddkit.types import DatasetInfo


def check_target(target: dict[str, Any], info: DatasetInfo, where: str = "target") -> None:
    """One target against the conventions of :mod:`ddkit.engine.task`."""
    assert isinstance(target, dict), f"{where}: a target must be a dict, got {type(target).__name__}"
    assert isinstance(target.get("image_id"), int), f"{where}: target['image_id'] must be an int"
    ids = {int(c["id"]) for c in info.categories}
    if "label" in target:
        assert isinstance(target["label"], int) and target["label"] in ids, \
            f"{where}: label {target['label']!r} is not a category id"
        return
    boxes, labels = target.get("boxes"), target.get("labels")
    assert isinstance(boxes, torch.Tensor) and boxes.dtype == torch.float32 and boxes.ndim == 2 \
        and boxes.shape[1] == 4, f"{where}: boxes must be float32 [N, 4]"
    assert isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.shape == (len(boxes),), \
        f"{where}: labels must be int64 [N]"
    assert all(int(c) in ids for c in labels), f"{where}: a label is not a category id"
    if len(boxes):
        assert bool(((boxes[:, 2:] - boxes[:, :2]) >= 0).all()), f"{where}: boxes must be xyxy with x1 >= x0"
    if info.num_keypoints:
        kps = target.get("keypoints")
        assert isinstance(kps, torch.Tensor) and kps.shape == (len(boxes), info.num_keypoints, 3), \
            f"{where}: keypoints must be [N, {info.num_keypoints}, 3]"


def check_info(info: Any) -> None:
    assert isinstance(info, DatasetInfo), "a dataset needs .info: DatasetInfo"
    assert info.categories and all("id" in c and "name" in c for c in info.categories), \
        "info.categories must be [{id, name}, ...]"
    ids = [int(c["id"]) for c in info.categories]
    assert len(set(ids)) == len(ids), "category ids must be unique"
    if info.num_keypoints:
        k = info.num_keypoints
        if info.flip_indices is None:  # allowed only when the dataset says why (a flip then asks for the option)
            assert info.extra.get(FLIP_UNKNOWN), f"flip_indices is None without info.extra[{FLIP_UNKNOWN!r}]"
        else:
            assert sorted(info.flip_indices) == list(range(k)), "flip_indices must be a permutation of range(K)"
            assert all(info.flip_indices[info.flip_indices[i]] == i for i in range(k)), \
                "flip_indices must be an involution"
        assert info.keypoint_sigmas is not None and len(info.keypoint_sigmas) == k, "keypoint_sigmas must have K values"


def check_dataset(dataset: Any, max_items: int = 3) -> None:
    """``.info``, ``len``, items ``(float [C, H, W] in [0, 1], target)`` and ``get_target(i) == item target``."""
    check_info(dataset.info)
    assert len(dataset) > 0, "the dataset is empty"
    for i in list(range(min(max_items, len(dataset)))) + [len(dataset) - 1]:
        image, target = dataset[i]
        assert isinstance(image, torch.Tensor) and image.dtype == torch.float32 and image.ndim == 3, \
            f"item {i}: image must be float32 [C, H, W]"
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0, f"item {i}: pixels must be in [0, 1]"
        check_target(target, dataset.info, where=f"item {i}")
        if "boxes" in target and len(target["boxes"]):
            h, w = image.shape[-2:]
            assert float(target["boxes"][:, 2].max()) <= w + 1 and float(target["boxes"][:, 3].max()) <= h + 1, \
                f"item {i}: boxes outside the image"
        fast = get_target(dataset, i)
        assert fast.keys() == target.keys(), f"item {i}: get_target keys differ from the item's"
        for key, value in target.items():
            other = fast[key]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            assert same, f"item {i}: get_target()[{key!r}] differs from the item's target"
        shape = dataset.info.extra.get("image_shape")
        if shape:
            assert list(image.shape) == list(shape), f"item {i}: image shape {tuple(image.shape)} != info {shape}"
