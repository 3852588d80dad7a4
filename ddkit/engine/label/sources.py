"""Unlabeled image sources: a folder of image files, the images of a COCO JSON, or a dataset's items."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ddkit.engine.coco_file import read_coco_file
from ddkit.engine.data import (IMAGE_EXTENSIONS, HiddenLabels, LABEL_KEYS, adapt_image, get_target, item_file,
                               read_image)
from ddkit.engine.label.config import LabelConfig
from ddkit.engine.teacher_cache import files_fingerprint
from ddkit.errors import ConfigError
from ddkit.types import DatasetInfo

log = logging.getLogger("ddkit.label")

@dataclass
class Item:
    """One unlabeled image as read by a source (``image is None``: unreadable, ``reason`` says why)."""

    index: int
    image_id: int
    file_name: str
    image: Tensor | None
    target: dict[str, Any] | None = None  # hidden ground truth
    reason: str | None = None


class Source:
    """Unlabeled images in a fixed order. ``load(i) -> Item`` never raises for a bad image."""

    image_root: str | None = None
    has_ground_truth: bool = False

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> Item:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def image_files(self) -> list[str]:
        """The image files it reads as resolved paths (for the overlap check with the data's parts); ``[]`` when it
        reads a dataset's items (the data section checks its own parts)."""
        return []


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()


def _image_files(root: Path) -> list[str]:
    """The image files under ``root`` (recursively, sorted), relative to it; hidden folders and files
    (``.ipynb_checkpoints/``, macOS ``._*``) left out, as the ``image_folder`` dataset leaves them out."""
    rels = (p.relative_to(root) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(str(r) for r in rels if not any(part.startswith(".") for part in r.parts) and (root / r).is_file())


class FolderSource(Source):
    """The image files under a folder (recursively, sorted by path, hidden ones left out); ids are positions
    ``0..N-1``. With ``image_shape`` (a fixed-size classifier's input ``[C, H, W]``) images are converted to it; with
    ``files`` (paths relative to ``root``) those files only, in that order (``ddkit predict`` on one image file)."""

    def __init__(self, root: str | Path, image_shape: Sequence[int] | None = None,
                 files: Sequence[str] | None = None):
        self.image_shape = image_shape
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"label.images: {self.root} is not a folder")
        self.files = [str(f) for f in files] if files is not None else _image_files(self.root)
        self.image_root = str(self.root.resolve())

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> Item:
        try:
            image = adapt_image(read_image(self.root / self.files[i]), self.image_shape)
            return Item(i, i, self.files[i], image)
        except Exception as err:  # noqa: BLE001 - any failure skips the image
            return Item(i, i, self.files[i], None, reason=_reason(err))

    def describe(self) -> dict[str, Any]:
        """What it reads: ``files`` digests every image file's path, size and mtime (a stat, no read), so a
        replaced, added or deleted image changes it (and the shard fingerprint: the shards are labelled again)."""
        return {"kind": "folder", "root": self.image_root, "num_images": len(self),
                "files": files_fingerprint(self.image_files())}

    def image_files(self) -> list[str]:
        return [str((self.root / f).resolve()) for f in self.files]


class CocoSource(Source):
    """The images a COCO JSON lists (in its order); its annotations, if any, are the hidden ground truth."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None,
                 image_shape: Sequence[int] | None = None, categories: Sequence[Mapping[str, Any]] | None = None):
        self.image_shape = image_shape
        self.path = Path(path)
        coco = read_coco_file(self.path, image_root, need_annotations=False)  # the one validating COCO reader
        self.images = [{"id": int(im["id"]), "file_name": str(im["file_name"])} for im in coco.images]
        self.image_root = str(coco.image_root.resolve())
        self.anns = coco.annotations_by_image()
        self.categories = coco.categories
        self.has_ground_truth = bool(coco.annotations)
        if self.has_ground_truth and categories is not None:
            self._to_teacher_ids(categories)

    def _to_teacher_ids(self, categories: Sequence[Mapping[str, Any]]) -> None:
        """The hidden ground truth in the teacher's category ids, matched by name when the file's ids differ (a
        YOLO-id teacher on a COCO file): the quality report compares ids. The file's classes the teacher lacks are
        left out of it, with one warning naming them; none in common leaves no ground truth (no report)."""
        ours = {str(c.get("name")): int(c["id"]) for c in categories}
        theirs = {int(c["id"]): str(c.get("name")) for c in self.categories}
        if all(ours.get(name) == cid for cid, name in theirs.items()):
            return
        to_ours = {cid: ours[name] for cid, name in theirs.items() if name in ours}
        lacking = sorted(name for name in theirs.values() if name not in ours)
        if lacking:
            log.warning("label.coco %s: %d of its categories are not the teacher's (%s%s): %s", self.path,
                        len(lacking), ", ".join(map(repr, lacking[:4])), ", ..." if len(lacking) > 4 else "",
                        "their annotations are left out of the quality report" if to_ours else
                        "no quality report (give a COCO file of the teacher's classes for one)")
        self.anns = {im: [{**a, "category_id": to_ours[int(a["category_id"])]} for a in anns
                          if int(a["category_id"]) in to_ours] for im, anns in self.anns.items()}
        self.has_ground_truth = bool(to_ours)
        if to_ours:
            log.info("label.coco %s: categories matched to the teacher's by name (%d)", self.path, len(to_ours))

    def __len__(self) -> int:
        return len(self.images)

    def _target(self, image_id: int) -> dict[str, Any]:
        anns = self.anns.get(image_id, [])
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        t = {"image_id": image_id, "boxes": boxes,
             "labels": torch.tensor([int(a["category_id"]) for a in anns], dtype=torch.int64),
             "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
             "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32)}
        if anns and all("keypoints" in a for a in anns):
            t["keypoints"] = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(len(anns), -1, 3)
        return t

    def load(self, i: int) -> Item:
        im = self.images[i]
        target = self._target(im["id"]) if self.has_ground_truth else None
        try:
            image = adapt_image(read_image(Path(self.image_root) / im["file_name"]), self.image_shape)
            return Item(i, im["id"], im["file_name"], image, target)
        except Exception as err:  # noqa: BLE001
            return Item(i, im["id"], im["file_name"], None, target, reason=_reason(err))

    def describe(self) -> dict[str, Any]:
        return {"kind": "coco", "file": str(self.path.resolve()), "image_root": self.image_root,
                "num_images": len(self), "files": files_fingerprint(self.image_files() + [str(self.path.resolve())])}

    def image_files(self) -> list[str]:
        return [str((Path(self.image_root) / im["file_name"]).resolve()) for im in self.images]


class DatasetSource(Source):
    """A dataset's items (e.g. the unlabeled split), made to fit ``image_shape`` like the folder's. With a
    :class:`~ddkit.engine.data.HiddenLabels` view, its ``ground_truth`` is read (one decode per image) and kept as
    the hidden ground truth."""

    def __init__(self, dataset: Any, name: str = "dataset", image_shape: Sequence[int] | None = None):
        self.dataset = dataset
        self.name = name
        self.image_shape = image_shape
        self.gt = getattr(dataset, "ground_truth", None)
        self.has_ground_truth = self.gt is not None
        root = getattr(dataset, "image_root", None) or getattr(self.gt, "image_root", None)
        self.image_root = None if root is None else str(root)

    def __len__(self) -> int:
        return len(self.dataset)

    def _file_name(self, i: int, target: Mapping[str, Any], image_id: int) -> str:
        if "file_name" in target:
            return str(target["file_name"])
        path = item_file(self.dataset, i)
        return str(path) if path is not None else str(image_id)

    def load(self, i: int) -> Item:
        gt = None
        try:
            if self.gt is not None:
                image, gt = self.gt[i]
                target = HiddenLabels._hide(gt)
            else:
                image, target = self.dataset[i]
        except Exception as err:  # noqa: BLE001
            try:
                meta = get_target(self.gt if self.gt is not None else self.dataset, i)
            except Exception:  # noqa: BLE001
                meta = {}
            image_id = int(meta.get("image_id", i))
            gt = meta if self.gt is not None and any(k in meta for k in LABEL_KEYS) else None
            return Item(i, image_id, self._file_name(i, meta, image_id), None, gt, reason=_reason(err))
        image_id = int(target.get("image_id", i))
        if not isinstance(image, Tensor) or image.ndim != 3:
            return Item(i, image_id, self._file_name(i, target, image_id), None, gt,
                        reason=f"not an image tensor [C, H, W]: {type(image).__name__}")
        return Item(i, image_id, self._file_name(i, target, image_id), adapt_image(image, self.image_shape), gt)

    def describe(self) -> dict[str, Any]:
        return {"kind": "dataset", "name": self.name, "type": type(self.dataset).__name__, "num_images": len(self)}


class ImageRange(torch.utils.data.Dataset):
    """Items ``[start, stop)`` of a source, as a DataLoader dataset."""

    def __init__(self, source: Source, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Item:
        return self.source.load(self.start + i)


def as_list(items: list[Item]) -> list[Item]:
    """DataLoader collate: the batch's items as they are."""
    return items


def make_source(cfg: LabelConfig, unlabeled: Any, info: DatasetInfo) -> Source:
    """The source a label section and the ``unlabeled`` argument name (see :func:`label_dataset`)."""
    if isinstance(unlabeled, Source):
        return unlabeled
    shape = info.extra.get("image_shape") if info.extra else None
    if cfg.coco:
        return CocoSource(cfg.coco, cfg.images, shape, info.categories)
    if cfg.images:
        return FolderSource(cfg.images, shape)
    if unlabeled is None:
        raise ConfigError("label: nothing to label: give label.images (a folder), label.coco (a COCO json) or a "
                          "data section with an unlabeled split")
    return DatasetSource(unlabeled, name="unlabeled", image_shape=shape)


def check_not_empty(source: Source, cfg: LabelConfig) -> None:
    """Refuse, naming the setting and the folder or file, a source with no image to label."""
    if len(source) > 0:
        return
    described = source.describe()
    field = "label.coco" if cfg.coco else "label.images" if cfg.images else "data: the unlabeled part"
    where = described.get("file") or described.get("root")
    fix = f"point it at images ({', '.join(IMAGE_EXTENSIONS)})" if cfg.images and not cfg.coco else \
        "give it the images to label"
    raise ConfigError(f"{field}: nothing to label, {where + ' holds no images' if where else 'no images'}; {fix}")
