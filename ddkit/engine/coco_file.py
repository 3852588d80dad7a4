"""The one validating reader of COCO files: training data (the ``coco`` dataset), ``label.coco`` images and ground
truth, pseudo-labels read back.

``read_coco_file(path, image_root)`` -> :class:`CocoFile` whose ``images``, ``annotations`` and ``categories`` are
checked lists of dicts. Every problem is one :class:`~ddkit.errors.DataError` line naming the file, the record and
the field:

* ``images`` records need ``id`` (int), ``file_name`` (str), ``width`` and ``height`` (positive ints);
* ids of images, annotations and categories are unique (the error names the id and both record indices);
* an annotation's ``image_id`` / ``category_id`` name an existing image / category; ``bbox`` is 4 finite numbers;
  ``w, h >= 0``; ``keypoints`` (when the category has keypoint names) ``3 * K`` finite numbers, visibilities 0, 1 or 2;
  ``num_keypoints`` is the count of ``v > 0`` (filled when absent, as in crowdpose-style files, so pycocotools can
  evaluate them);
* a ``file_name`` that leaves the image root (``../../x.jpg``, an absolute path elsewhere) is refused unless
  ``allow_outside_root``;
* boxes follow :mod:`ddkit.engine.box_rule` (clipped to the image, empty ones dropped with their annotation, one
  warning per file); the returned ``bbox`` are the clipped ones.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ddkit.engine.box_rule import BOX_TOLERANCE, BoxCheck
from ddkit.errors import DataError

IMAGE_FIELDS = ("id", "file_name", "width", "height")
_SINGULAR = {"images": "image", "annotations": "annotation", "categories": "category"}


# JSON gives int / float / bool / str / list / dict / None: exact type tests first (an ABC check costs ~10x more)
def _is_int(v: Any) -> bool:
    t = type(v)
    return t is int or (t is not bool and t is not float and isinstance(v, numbers.Integral))


def _is_num(v: Any) -> bool:
    t = type(v)
    return t is float or t is int or (t is not bool and isinstance(v, numbers.Real))


def _finite(v: Any) -> bool:
    """A finite real number (not a bool; ints too large for a float are not)."""
    if type(v) is float:
        return v - v == 0.0  # False for nan and +-inf
    try:
        return _is_num(v) and math.isfinite(v)
    except OverflowError:
        return False


def _is_size(v: Any) -> bool:
    return _finite(v) and float(v).is_integer() and 0 < v < 2 ** 31


@dataclass
class CocoFile:
    """A validated COCO file. ``image_root`` is where ``file_name`` is resolved; ``data`` holds the other
    top-level keys (``info``, ``licenses``, ...)."""

    path: Path
    image_root: Path
    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    data: dict[str, Any] = field(default_factory=dict)
    boxes_clipped: int = 0
    boxes_dropped: int = 0
    box_warning: str | None = None  # the box rule's line, when the reader was asked to hold it back

    def annotations_by_image(self) -> dict[int, list[dict[str, Any]]]:
        """``{image_id: [annotation, ...]}`` with an entry (maybe empty) for every image, in file order."""
        out: dict[int, list[dict[str, Any]]] = {int(im["id"]): [] for im in self.images}
        for ann in self.annotations:
            out[int(ann["image_id"])].append(ann)
        return out

    def image_path(self, record: Mapping[str, Any]) -> Path:
        return self.image_root / str(record["file_name"])

    def target(self, record: Mapping[str, Any], num_keypoints: int | None = None,
               anns: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The training target of an image record: ``{image_id, size (H, W), boxes [N, 4] xyxy, labels [N],
        area [N], iscrowd [N]}`` plus ``keypoints [N, K, 3]`` when ``num_keypoints`` is given (``0, 0, 0`` for an
        annotation without keypoints). ``anns``: the image's annotations when already grouped."""
        iid = int(record["id"])
        if anns is None:
            anns = [a for a in self.annotations if int(a["image_id"]) == iid]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        t: dict[str, Any] = {
            "image_id": iid, "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
            "labels": torch.tensor([int(a["category_id"]) for a in anns], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns],
                                 dtype=torch.float32),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64)}
        if num_keypoints is not None:
            k = num_keypoints
            t["keypoints"] = torch.tensor([a.get("keypoints") or [0] * (3 * k) for a in anns],
                                          dtype=torch.float32).reshape(-1, k, 3)
        t["size"] = (int(record["height"]), int(record["width"]))
        return t

    @property
    def keypoint_names(self) -> list[str] | None:
        """The keypoint names of the first category (by id) that lists them, else ``None``."""
        cat = self._keypoint_category()
        return None if cat is None else [str(n) for n in cat["keypoints"]]

    @property
    def skeleton(self) -> list[list[int]] | None:
        """That category's ``skeleton`` as 0-based index pairs, else ``None``."""
        cat = self._keypoint_category()
        return None if cat is None or not cat.get("skeleton") else [[a - 1, b - 1] for a, b in cat["skeleton"]]

    def _keypoint_category(self) -> dict[str, Any] | None:
        return keypoint_category(self.categories)


def keypoint_category(categories: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first category (by id) that lists ``keypoints`` names, else ``None``."""
    listing = [c for c in categories if isinstance(c, dict) and isinstance(c.get("keypoints"), list) and c["keypoints"]]
    return min(listing, key=lambda c: c["id"], default=None)


def load_json(path: Path) -> Any:
    """A JSON file's content; one :class:`DataError` naming the file when it is a folder, missing, empty or no JSON."""
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a JSON file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None


def _records(data: dict[str, Any], key: str, path: Path, required: bool) -> list[dict[str, Any]]:
    value = data.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise DataError(f"{path}: missing list {key!r}" if value is None else
                        f"{path}: field {key!r} must be a list, got {type(value).__name__}")
    for i, rec in enumerate(value):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: {key}[{i}] must be an object, got {json.dumps(rec)[:60]}")
    return value


def _unique_ids(records: list[dict[str, Any]], key: str, path: Path, required: bool) -> dict[int, int]:
    """``{id: record index}``; an error for a missing / non-integer (when ``required``) or duplicate id."""
    seen: dict[int, int] = {}
    for i, rec in enumerate(records):
        if "id" not in rec and not required:
            continue
        rid = rec.get("id")
        if not _is_int(rid):
            what = "missing field 'id'" if "id" not in rec else f"field 'id' must be an integer, got {rid!r}"
            raise DataError(f"{path}: {key}[{i}]: {what}")
        if int(rid) in seen:
            raise DataError(f"{path}: {_SINGULAR[key]} id {rid} is not unique: {key}[{seen[int(rid)]}] and {key}[{i}] "
                            f"both use it; give every record its own id")
        seen[int(rid)] = i
    return seen


def _check_images(images: list[dict[str, Any]], path: Path, root: Path, allow_outside_root: bool) -> None:
    root_abs = os.path.normpath(os.path.abspath(root))
    files: dict[str, int] = {}  # normalised file_name -> image id: one picture, one record
    for i, im in enumerate(images):
        for f in IMAGE_FIELDS:
            if f not in im:
                raise DataError(f"{path}: images[{i}] (id {im.get('id', '?')}): missing field {f!r}; image records "
                                f"need {', '.join(IMAGE_FIELDS)}")
        if not isinstance(im["file_name"], str) or not im["file_name"]:
            raise DataError(f"{path}: images[{i}] (id {im['id']}): field 'file_name' must be a non-empty string")
        name = os.path.normpath(im["file_name"])
        if name in files:
            raise DataError(f"{path}: images {files[name]} and {im['id']} both have file_name {im['file_name']!r}: "
                            "the second's annotations would be trained on the first's picture; give each picture "
                            "one image record (merge their annotations under one id)")
        files[name] = im["id"]
        for f in ("width", "height"):
            if not _is_size(im[f]):
                raise DataError(f"{path}: images[{i}] (id {im['id']}): field {f!r} must be a positive integer, "
                                f"got {im[f]!r}")
        if not allow_outside_root:
            full = os.path.normpath(os.path.join(root_abs, im["file_name"]))
            if os.path.commonpath([root_abs, full]) != root_abs:
                raise DataError(f"{path}: images[{i}] (id {im['id']}): file_name {im['file_name']!r} is outside the "
                                f"image root {root_abs}; move the image there or set allow_outside_root: true")


def _check_categories(cats: list[dict[str, Any]], path: Path) -> None:
    names: dict[str, int] = {}  # classes are matched by name (eval, predict --coco, a recipe's parts): once each
    for i, cat in enumerate(cats):
        where = f"{path}: categories[{i}] (id {cat['id']})"
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: field 'name' must be a non-empty string (the class name, e.g. \"person\"), "
                            f"got {name!r}")
        if name in names:
            raise DataError(f"{path}: categories {names[name]} and {cat['id']} are both named {name!r}: ddkit "
                            "matches classes by name; give each category its own name (or merge the two)")
        names[name] = cat["id"]
        kps = cat.get("keypoints")
        if kps is not None and (not isinstance(kps, list) or not all(isinstance(n, str) for n in kps)):
            raise DataError(f"{where}: field 'keypoints' must be a list of names")
        _check_skeleton(cat.get("skeleton"), len(kps or []), where)


def _check_keypoint_names(cats: list[dict[str, Any]], anns: list[dict[str, Any]], path: Path) -> None:
    """A category whose ``keypoints`` list has the wrong length makes all its annotations disagree alike: blame the
    category (the one place to fix), not its first annotation or its skeleton."""
    lengths: dict[int, list[int]] = {}
    for a in anns:
        if _is_int(a.get("category_id")) and isinstance(a.get("keypoints"), list):
            lengths.setdefault(a["category_id"], []).append(len(a["keypoints"]))
    for i, cat in enumerate(cats):
        names, counts = cat.get("keypoints"), lengths.get(cat["id"], [])
        if not (isinstance(names, list) and names and len(counts) > 1 and len(set(counts)) == 1):
            continue  # one annotation, or several lengths: the annotations are blamed one by one
        n = counts[0]
        if n % 3 == 0 and n != 3 * len(names):
            raise DataError(f"{path}: categories[{i}] (id {cat['id']}): field 'keypoints' lists {len(names)} names "
                            f"but every annotation of the category has {n} values ({n // 3} keypoints x 3); fix the "
                            f"category's keypoints (and skeleton)")


def _check_skeleton(skeleton: Any, k: int, where: str) -> None:
    """COCO's ``skeleton``: pairs of 1-based keypoint indices (``[16, 14]`` joins the 16th and 14th keypoints)."""
    if skeleton is None or (skeleton == [] and not k):
        return
    ok = isinstance(skeleton, list) and all(
        isinstance(e, list) and len(e) == 2 and all(_is_int(v) and 1 <= v <= k for v in e) for e in skeleton)
    if not ok:
        raise DataError(f"{where}: field 'skeleton' must be a list of [i, j] pairs of 1-based indices into its "
                        f"{k} 'keypoints' (COCO's convention), got {str(skeleton)[:80]}")


def _check_annotation(ann: dict[str, Any], i: int, path: Path, images: dict[int, int],
                      cat_k: dict[int, int]) -> None:
    where = f"{path}: annotation id {ann.get('id', '?')} (annotations[{i}])"
    if not _is_int(ann.get("image_id")) or ann["image_id"] not in images:
        raise DataError(f"{where}: field image_id {ann.get('image_id')!r} is not an image id of the file")
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in cat_k:
        raise DataError(f"{where}: field category_id {ann.get('category_id')!r} is not in categories "
                        f"{sorted(cat_k)[:10]}")
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_num(v) for v in bbox):
        raise DataError(f"{where}: field bbox {bbox!r} must be [x, y, w, h] (4 numbers)")
    if not all(_finite(v) for v in bbox):
        raise DataError(f"{where}: field bbox {bbox!r} has a non-finite value")
    if bbox[2] < 0 or bbox[3] < 0:
        raise DataError(f"{where}: field bbox {bbox!r} has a negative width or height ([x, y, w, h] with w, h >= 0)")
    for f in ("iscrowd", "area"):
        if f in ann and not _finite(ann[f]):
            raise DataError(f"{where}: field {f!r} must be a number, got {ann[f]!r}")
    k = cat_k[ann["category_id"]]
    if k and "keypoints" in ann:
        kp = ann["keypoints"]
        if not isinstance(kp, list) or len(kp) != 3 * k or not all(_finite(v) for v in kp):
            n = len(kp) if isinstance(kp, list) else type(kp).__name__
            raise DataError(f"{where}: field keypoints must be {3 * k} finite numbers ({k} keypoints x 3), got "
                            f"{n} values" + ("" if not isinstance(kp, list) or len(kp) != 3 * k else " (non-finite)"))
        _check_visibility(ann, kp, where)


def _check_visibility(ann: dict[str, Any], kp: list[Any], where: str) -> None:
    """COCO's visibilities are 0 (not labelled), 1 (labelled, hidden), 2 (visible); ``num_keypoints`` counts the
    labelled ones: pycocotools skips a person whose ``num_keypoints`` is 0, so a wrong count changes its AP."""
    bad = next((j for j, v in enumerate(kp[2::3]) if v not in (0, 1, 2)), None)
    if bad is not None:
        raise DataError(f"{where}: field keypoints: visibility {kp[3 * bad + 2]!r} of keypoint {bad} must be 0 (not "
                        f"labelled), 1 (labelled, hidden) or 2 (visible)")
    labelled = sum(1 for v in kp[2::3] if v > 0)
    if "num_keypoints" not in ann:  # crowdpose-style files: pycocotools needs it
        ann["num_keypoints"] = labelled
    elif ann["num_keypoints"] != labelled:
        raise DataError(f"{where}: field num_keypoints is {ann['num_keypoints']!r} but {labelled} keypoints have "
                        f"v > 0; set num_keypoints to {labelled} (pycocotools skips a person with 0)")


def _apply_box_rule(path: Path, images: list[dict[str, Any]], anns: list[dict[str, Any]],
                    index: dict[int, int], tolerance: float) -> tuple[list[dict[str, Any]], BoxCheck]:
    """Clip every bbox to its image, drop the annotations whose box is empty (one warning for the file)."""
    check = BoxCheck(str(path), tolerance)
    if not anns:
        return anns, check
    xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
    xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    image_hw = torch.tensor([[im["height"], im["width"]] for im in images], dtype=torch.float64)
    sizes = image_hw[torch.tensor([index[a["image_id"]] for a in anns], dtype=torch.int64)]
    boxes, keep = check.apply(xyxy, sizes, lambda i: f"annotation id {anns[i].get('id', '?')} (annotations[{i}], "
                                                     f"image {anns[i]['image_id']})")
    out = [a for a, k in zip(anns, keep.tolist()) if k]
    changed = torch.nonzero((boxes != xyxy[keep]).any(1)).flatten().tolist()
    for j, b in zip(changed, boxes[changed].tolist()):
        out[j] = {**out[j], "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
    return out, check


PSEUDO_DESCRIPTION = "ddkit pseudo-labels"  # info.description of the files ddkit label writes


def _default_image_root(data: dict[str, Any], path: Path) -> Path:
    """Where ``file_name`` is relative to when no folder is given: the JSON's folder, except for ddkit's own
    pseudo-label files, which record their images' folder in ``info.image_root`` (they live in the run folder)."""
    info = data.get("info")
    ours = isinstance(info, dict) and info.get("description") == PSEUDO_DESCRIPTION
    if ours and isinstance(info.get("image_root"), str):
        return path.parent / info["image_root"]  # recorded absolute; a relative one is the JSON's
    return path.parent


def read_coco_file(path: str | Path, image_root: str | Path | None = None, *, allow_outside_root: bool = False,
                   need_annotations: bool = True, box_tolerance: float = BOX_TOLERANCE,
                   warn_boxes: bool = True) -> CocoFile:
    """Read and validate a COCO file (see the module docstring).

    Args:
        path: the JSON file.
        image_root: the folder ``file_name`` is relative to (default: the JSON's folder; for a ddkit pseudo-label
            file, the ``info.image_root`` it records).
        allow_outside_root: accept ``file_name`` values that leave ``image_root``.
        need_annotations: ``False`` accepts a file with only ``images`` (an image list to label).
        box_tolerance: pixels a box may stick out of its image silently (see :mod:`ddkit.engine.box_rule`).
        warn_boxes: ``False`` holds the box rule's warning back in ``box_warning`` (a caller that checks the
            image sizes first: boxes clipped to a wrong width / height would be a misleading first message).

    Raises:
        DataError: one line naming the file, the record and the field.
    """
    path = Path(path)
    return validate_coco(load_json(path), path, image_root, allow_outside_root=allow_outside_root,
                         need_annotations=need_annotations, box_tolerance=box_tolerance, warn_boxes=warn_boxes)


def validate_coco(data: Any, path: str | Path, image_root: str | Path | None = None, *,
                  allow_outside_root: bool = False, need_annotations: bool = True,
                  box_tolerance: float = BOX_TOLERANCE, num_keypoints: int | None = None,
                  warn_boxes: bool = True) -> CocoFile:
    """:func:`read_coco_file` for a COCO dict already loaded from ``path`` (the dict is not modified).
    ``num_keypoints``: the K every annotation's keypoints have (default: from the categories' keypoint names)."""
    path = Path(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: a COCO file is a JSON object with 'images', 'annotations' and 'categories', "
                        f"got a {type(data).__name__}")
    root = Path(image_root) if image_root is not None else _default_image_root(data, path)
    images = _records(data, "images", path, required=True)
    anns = _records(data, "annotations", path, required=need_annotations)
    cats = _records(data, "categories", path, required=need_annotations or bool(anns))
    img_index = _unique_ids(images, "images", path, required=True)
    _unique_ids(anns, "annotations", path, required=False)
    _unique_ids(cats, "categories", path, required=True)
    _check_images(images, path, root, allow_outside_root)
    if num_keypoints is None:  # K from the categories' names: a wrong list shows in every annotation
        _check_keypoint_names(cats, anns, path)
    _check_categories(cats, path)
    cat_k = {int(c["id"]): num_keypoints or len(c.get("keypoints") or []) for c in cats}
    anns = [dict(a) for a in anns]
    for i, ann in enumerate(anns):
        _check_annotation(ann, i, path, img_index, cat_k)
    anns, check = _apply_box_rule(path, images, anns, img_index, box_tolerance)
    if warn_boxes:
        check.warn()
    rest = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    return CocoFile(path=path, image_root=root, images=images, annotations=anns, categories=cats, data=rest,
                    boxes_clipped=check.clipped, boxes_dropped=check.dropped,
                    box_warning=None if warn_boxes else check.message())
