"""Pseudo-label files: writing them (streaming, atomically) and reading them back as a training dataset.

Detection and keypoints: a COCO JSON with the labeled set's categories. Every readable unlabeled image is listed in
``images`` (``id``, ``file_name``, ``height``, ``width`` and ``ddkit_index``, its position in the unlabeled source);
``annotations`` hold the selected instances (``bbox`` ``xywh``, ``score``; keypoints ``x, y, v`` with ``v = 2`` for
selected keypoints and ``0, 0, 0`` for the others, COCO's "not labeled"). Classification: the same layout with one
annotation ``{image_id, category_id, score}`` per selected image and only selected images listed
(``"ddkit_format": "image-labels"``). ``info`` holds the provenance (teacher checkpoint and its sha256,
transforms, aggregator, selector, thresholds) and the dataset info (keypoints, flip indices, sigmas).

:class:`PseudoLabelDataset` reads such a file back; its items are ``(image, target)`` exactly like the training
datasets' (see :mod:`ddkit.engine.task`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ddkit.errors import DataError
from ddkit.io import _atomic
from ddkit.types import DatasetInfo, Instances

IMAGE_LABELS = "image-labels"
COCO = "coco"


def _r(x: float, nd: int) -> float:
    return round(float(x), nd)


class PseudoLabelWriter:
    """Streams images and annotations into two temporary files, then assembles the JSON atomically on
    :meth:`close` (memory holds neither the image list nor the annotations).

    Args:
        path: the output JSON.
        fmt: ``"coco"`` (instances) or ``"image-labels"`` (classification).
        categories: the categories block, :func:`coco_categories` of the labeled set's info.
        info: the ``info`` block (provenance).
    """

    def __init__(self, path: str | Path, fmt: str, categories: Sequence[Mapping[str, Any]], info: Mapping[str, Any]):
        if fmt not in (COCO, IMAGE_LABELS):
            raise ValueError(f"fmt must be {COCO!r} or {IMAGE_LABELS!r}, got {fmt!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fmt = fmt
        self.categories = [dict(c) for c in categories]
        self.info = dict(info)
        self._tmpdir = tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        self._images = open(os.path.join(self._tmpdir, "images"), "w")
        self._anns = open(os.path.join(self._tmpdir, "annotations"), "w")
        self._num_images = 0
        self._num_anns = 0

    def _item(self, fh, count: int, obj: Mapping[str, Any]) -> None:
        fh.write(("" if count == 0 else ",\n") + json.dumps(obj, separators=(",", ":")))

    def add_image(self, image_id: int, file_name: str, height: int, width: int, index: int) -> None:
        # formatted by hand: json.dumps of a dict costs more than everything else per image
        self._images.write(("" if self._num_images == 0 else ",\n")
                           + f'{{"id":{int(image_id)},"file_name":{json.dumps(str(file_name))},'
                             f'"height":{int(height)},"width":{int(width)},"ddkit_index":{int(index)}}}')
        self._num_images += 1

    def add_instances(self, image_id: int, inst: Instances, keypoint_visible: Tensor | None = None) -> None:
        """Selected instances of one image (``keypoint_visible [N, K]`` bool; default all visible)."""
        boxes = inst.boxes.tolist()
        scores = inst.scores.tolist()
        labels = inst.labels.tolist()
        kps = None if inst.keypoints is None else inst.keypoints.tolist()
        vis = None if keypoint_visible is None else keypoint_visible.tolist()
        for j, (b, s, c) in enumerate(zip(boxes, scores, labels)):
            w, h = b[2] - b[0], b[3] - b[1]
            ann: dict[str, Any] = {"id": self._num_anns + 1, "image_id": int(image_id), "category_id": int(c),
                                   "bbox": [_r(b[0], 2), _r(b[1], 2), _r(w, 2), _r(h, 2)],
                                   "area": _r(w * h, 2), "iscrowd": 0, "score": _r(s, 5)}
            if kps is not None:
                flat: list[float] = []
                n_vis = 0
                for k, (x, y, _) in enumerate(kps[j]):
                    if vis is None or vis[j][k]:
                        flat += [_r(x, 2), _r(y, 2), 2]
                        n_vis += 1
                    else:
                        flat += [0, 0, 0]
                ann["keypoints"] = flat
                ann["num_keypoints"] = n_vis
            self._item(self._anns, self._num_anns, ann)
            self._num_anns += 1

    def add_label(self, image_id: int, category_id: int, score: float) -> None:
        self._anns.write(("" if self._num_anns == 0 else ",\n")
                         + f'{{"id":{self._num_anns + 1},"image_id":{int(image_id)},'
                           f'"category_id":{int(category_id)},"score":{_r(score, 5)!r}}}')
        self._num_anns += 1

    def close(self) -> Path:
        self._images.close()
        self._anns.close()

        def write(fh) -> None:
            head = {"info": self.info, "licenses": [], "categories": self.categories}
            if self.fmt == IMAGE_LABELS:
                head = {"ddkit_format": IMAGE_LABELS, **head}
            text = json.dumps(head, indent=1)
            fh.write(text[:-2] + ',\n "images": [\n')  # reopen the object after "categories"
            with open(os.path.join(self._tmpdir, "images")) as src:
                shutil.copyfileobj(src, fh)
            fh.write('\n],\n "annotations": [\n')
            with open(os.path.join(self._tmpdir, "annotations")) as src:
                shutil.copyfileobj(src, fh)
            fh.write("\n]\n}\n")

        try:
            _atomic(self.path, "w", write)
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        for fh in (self._images, self._anns):
            if not fh.closed:
                fh.close()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    @property
    def num_annotations(self) -> int:
        return self._num_anns


def coco_categories(info: DatasetInfo) -> list[dict[str, Any]]:
    """The ``categories`` of a COCO file written for ``info``: ``{id, name}``, and for a keypoint dataset COCO's
    ``keypoints`` (names; ``keypoint_<i>`` where the dataset has none) and ``skeleton`` (1-based pairs), so that the
    file reads back as a keypoint dataset in ddkit, pycocotools and detectron2."""
    cats = [{"id": int(c["id"]), "name": str(c["name"])} for c in info.categories]
    k = info.num_keypoints
    if not k:
        return cats
    names = info.extra.get("keypoint_names") or [f"keypoint_{i}" for i in range(k)]
    skeleton = [[int(a) + 1, int(b) + 1] for a, b in info.extra.get("skeleton") or []]
    return [{**c, "keypoints": list(names), "skeleton": skeleton} for c in cats]


# ------------------------------------------------------------------------------------------------ reading back
def info_from_pseudo(data: Mapping[str, Any]) -> DatasetInfo:
    meta = (data.get("info") or {}).get("dataset_info") or {}
    return DatasetInfo(categories=[{"id": int(c["id"]), "name": str(c["name"])} for c in data.get("categories", [])],
                       num_keypoints=meta.get("num_keypoints"), flip_indices=meta.get("flip_indices"),
                       keypoint_sigmas=meta.get("keypoint_sigmas"), extra=dict(meta.get("extra") or {}))


class PseudoLabelDataset(Dataset):
    """A pseudo-label file as a training dataset: items ``(image [C, H, W] in [0, 1], target)`` with
    ``target = {image_id, label}`` (classification) or ``{image_id, boxes [N, 4] xyxy, labels [N], area, iscrowd
    (, keypoints [N, K, 3] with visibility 0/2)}``.

    Args:
        path: the file written by ``ddkit label`` (``label/pseudo_labels.json``).
        source: the unlabeled dataset the images come from (its item ``ddkit_index`` is read); default: read
            ``image_root / file_name``.
        image_root: where the files are (default: ``info.image_root`` of the file).
        skip_empty: leave out images without any pseudo-label (detection; classification lists only labelled
            images anyway).
    """

    def __init__(self, path: str | Path, source: Any = None, image_root: str | Path | None = None,
                 skip_empty: bool = False):
        self.path = Path(path)
        try:
            with open(self.path) as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"{self.path}: cannot read pseudo-label file: {err}") from None
        if not isinstance(data, dict) or not isinstance(data.get("info") or {}, dict):
            raise DataError(f"{self.path}: not a pseudo-label file (a COCO object written by ddkit label)")
        self.info = info_from_pseudo(data)
        self.classification = data.get("ddkit_format") == IMAGE_LABELS
        self.source = _image_source(self.path, (data.get("info") or {}).get("source"), source)
        root = image_root if image_root is not None else (data.get("info") or {}).get("image_root")
        self.image_root = None if root is None else Path(root)
        if not self.classification:  # the one COCO validation and box rule of every reader
            from ddkit.engine.coco_file import validate_coco

            coco = validate_coco(data, self.path, self.image_root, allow_outside_root=True, need_annotations=False,
                                 num_keypoints=self.info.num_keypoints)
            data = {**data, "annotations": coco.annotations}
        anns: dict[int, list[dict[str, Any]]] = {}
        for ann in data.get("annotations", []):
            anns.setdefault(int(ann["image_id"]), []).append(ann)
        self.images = [im for im in data.get("images", []) if not (skip_empty and int(im["id"]) not in anns)]
        self._anns = anns
        if source is None and self.image_root is None and not all(Path(im["file_name"]).is_absolute()
                                                                   for im in self.images):
            raise DataError(f"{self.path}: the images are not files (no image_root in its info); pass the "
                            f"unlabeled dataset as source")

    def check_files(self) -> None:
        """Every image file is where the pseudo-labels say (``info.image_root`` / ``file_name``), when the images
        are read from files (no ``source``): images moved after labelling are named with this file and its recorded
        root before training, not as one unreadable image during it."""
        if self.source is not None:
            return
        root = Path(self.image_root or "/")
        missing = [im["file_name"] for im in self.images if not (root / im["file_name"]).is_file()]
        if missing:
            raise DataError(f"{self.path}: {len(missing)} of {len(self.images)} image(s) are not under its "
                            f"info.image_root {self.image_root} (e.g. {missing[0]}; moved or deleted since "
                            f"labelling?); put the images back there, or set info.image_root in the file to the "
                            f"images' new folder")

    def __len__(self) -> int:
        return len(self.images)

    def get_target(self, i: int) -> dict[str, Any]:
        im = self.images[i]
        anns = self._anns.get(int(im["id"]), [])
        if self.classification:
            return {"image_id": int(im["id"]), "label": int(anns[0]["category_id"])}
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        target = {"image_id": int(im["id"]), "boxes": boxes,
                  "labels": torch.tensor([int(a["category_id"]) for a in anns], dtype=torch.int64),
                  "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
                  "iscrowd": torch.zeros(len(anns), dtype=torch.int64)}
        if self.info.num_keypoints:
            k = self.info.num_keypoints
            target["keypoints"] = torch.tensor([a.get("keypoints", [0] * (3 * k)) for a in anns],
                                               dtype=torch.float32).reshape(-1, k, 3)
        return target

    def load_image(self, i: int) -> Tensor:
        """Image ``i`` made to fit ``info``'s ``image_shape`` (when the dataset has one), exactly as the labeled
        dataset's own images and the label stage's (a folder of RGB photos for a grey 28x28 classifier)."""
        from ddkit.engine.data import adapt_image, read_image

        im = self.images[i]
        if self.source is not None:
            image = self.source[int(im["ddkit_index"])][0]
        else:
            image = read_image(Path(self.image_root or "/") / im["file_name"])
        return adapt_image(image, (self.info.extra or {}).get("image_shape"))

    def __getitem__(self, i: int):
        return self.load_image(i), self.get_target(i)


def _image_source(path: Path, labelled: Any, source: Any) -> Any:
    """The dataset to read the images from: ``source`` only when the pseudo-labels were made from a dataset's items
    (their ``ddkit_index`` is a position in it), never when ``ddkit label`` read a folder or a COCO file
    (``label.images`` / ``label.coco``: the positions are that source's, the images its files). Files written before
    ``info.source`` existed keep ``source``."""
    if source is None or not isinstance(labelled, Mapping):
        return source
    if labelled.get("kind") != "dataset":
        return None
    made_from = labelled.get("num_images")
    if isinstance(made_from, int) and made_from != len(source):
        raise DataError(f"{path}: made from {made_from} unlabeled images, but this data's unlabeled part holds "
                        f"{len(source)}: the pseudo-labels are another split's (data.split changed?); label this "
                        f"split again (ddkit label), or train with the data they were made for")
    return source


def load_pseudo_dataset(path: str | Path, source: Any = None, image_root: str | Path | None = None,
                        skip_empty: bool = False) -> PseudoLabelDataset:
    """Read ``ddkit label``'s output back as a training dataset (see :class:`PseudoLabelDataset`)."""
    return PseudoLabelDataset(path, source=source, image_root=image_root, skip_empty=skip_empty)
