"""Dataset helpers of the engine: targets without decoding images, splits, hidden labels, readability checks.

``split_dataset`` cuts any dataset into labeled / unlabeled / test parts by fraction and seed (stratified by class
for classification). The unlabeled part is a :class:`HiddenLabels` view: training code sees only images and
``image_id``; ``.ground_truth`` keeps the labels for measuring pseudo-label quality.

``build_data(cfg.data)`` resolves a recipe's ``data`` section, in either layout::

    data: {dataset: {name: mnist5k}, split: {labeled: 0.1, unlabeled: 0.7, test: 0.2, seed: 0}}
    data: {train: {dataset: {...}}, unlabeled: {dataset: {...}}, test: {dataset: {...}}}
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from ddkit.engine.keypoint_meta import first_keypoint_difference
from ddkit.errors import ConfigError, DataError
from ddkit.types import DatasetInfo

log = logging.getLogger("ddkit.data")

LABEL_KEYS = ("label", "boxes", "labels", "keypoints", "area", "iscrowd")


def get_target(dataset: Any, index: int) -> dict[str, Any]:
    """The target of item ``index`` without decoding its image when the dataset offers ``get_target``."""
    fn = getattr(dataset, "get_target", None)
    if fn is not None:
        return fn(index)
    return dataset[index][1]


def get_info(dataset: Any) -> DatasetInfo:
    info = getattr(dataset, "info", None)
    if not isinstance(info, DatasetInfo):
        raise ConfigError(f"{type(dataset).__name__} has no .info (DatasetInfo); every ddkit dataset needs one")
    return info


class Subset(Dataset):
    """Items ``indices`` of ``dataset``; keeps ``.info`` and the fast ``get_target``."""

    def __init__(self, dataset: Any, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.info = get_info(dataset)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]

    def get_target(self, i: int) -> dict[str, Any]:
        return get_target(self.dataset, self.indices[i])


class HiddenLabels(Dataset):
    """A view of a dataset without its labels: targets keep only ``image_id`` (and non-label keys such as ``size``).

    Attributes:
        ground_truth: the same items with their labels, for measuring pseudo-label quality only.
    """

    def __init__(self, dataset: Any):
        self.ground_truth = dataset
        self.info = get_info(dataset)

    def __len__(self) -> int:
        return len(self.ground_truth)

    @staticmethod
    def _hide(target: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in target.items() if k not in LABEL_KEYS}

    def __getitem__(self, i: int):
        image, target = self.ground_truth[i]
        return image, self._hide(target)

    def get_target(self, i: int) -> dict[str, Any]:
        return self._hide(get_target(self.ground_truth, i))


class TransferOnly(Dataset):
    """An unlabeled part as part of a KD transfer set (Hinton et al. 2015): its items, labels hidden, each target
    marked ``unlabeled: True`` so that a task whose native loss can leave them out (``trains_on_unlabeled``) does,
    and only the loss terms that read the teacher learn from them. ``info``: the training part's (a folder of images
    alone names no classes)."""

    def __init__(self, dataset: HiddenLabels, info: DatasetInfo):
        self.dataset = dataset
        self.info = info

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, target = self.dataset[i]
        return image, {**target, "unlabeled": True}

    def get_target(self, i: int) -> dict[str, Any]:
        return {**get_target(self.dataset, i), "unlabeled": True}


class ConcatDataset(Dataset):
    """Several datasets of one task back to back (labeled first); ``.info`` is the first one's."""

    def __init__(self, datasets: Sequence[Any]):
        if not datasets:
            raise ValueError("ConcatDataset needs at least one dataset")
        self.datasets = list(datasets)
        self.info = get_info(self.datasets[0])
        self.offsets = [0]
        for ds in self.datasets:
            self.offsets.append(self.offsets[-1] + len(ds))

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, i: int) -> tuple[Any, int]:
        if i < 0:
            i += len(self)
        for k in range(len(self.datasets)):
            if i < self.offsets[k + 1]:
                return self.datasets[k], i - self.offsets[k]
        raise IndexError(i)

    def __getitem__(self, i: int):
        ds, j = self._locate(i)
        return ds[j]

    def get_target(self, i: int) -> dict[str, Any]:
        ds, j = self._locate(i)
        return get_target(ds, j)


class ClassesByName(Dataset):
    """A dataset read with another's categories: each item's class ids (a classifier's ``label``, the ``labels`` of
    instances) become the ids their class names have in ``info`` (``ids``: ``{own id: id in info}``); ``.info`` is
    ``info``."""

    def __init__(self, dataset: Any, info: DatasetInfo, ids: Mapping[int, int]):
        self.dataset = dataset
        self.info = info
        self.ids = {int(k): int(v) for k, v in ids.items()}

    def __len__(self) -> int:
        return len(self.dataset)

    def _relabel(self, target: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(target)
        if "label" in out:
            out["label"] = self.ids[int(out["label"])]
        if "labels" in out:
            labels = torch.as_tensor(out["labels"])
            out["labels"] = torch.tensor([self.ids[int(c)] for c in labels.reshape(-1).tolist()],
                                         dtype=torch.int64).reshape(labels.shape)
        return out

    def __getitem__(self, i: int):
        image, target = self.dataset[i]
        return image, self._relabel(target)

    def get_target(self, i: int) -> dict[str, Any]:
        return self._relabel(get_target(self.dataset, i))


def match_classes(dataset: Any, info: DatasetInfo, where: str, whose: str = "the train part's",
                  our_src: str = "") -> Any:
    """``dataset`` (a test or unlabeled part) with the class ids of the training part's ``info``, matched by class
    name, for class labels (classification) and instance labels (detection, keypoints) alike: the same classes
    under the same ids as it is, else a view renumbered by name (:class:`ClassesByName`; a subset is fine), so
    a model is scored against its own classes as ``ddkit eval`` scores it. A class the training part lacks (for
    instances: one they use; a category only listed is left out), or a name given twice, is a :class:`ConfigError`
    naming ``where``, ``our_src`` (the training part) and the class.
    Datasets without class labels are returned as they are."""
    theirs = get_info(dataset)
    instances = has_instance_labels(dataset)
    if not (instances or is_classification(dataset)) or _id_names(theirs) == _id_names(info):
        return dataset
    _check_names(info, our_src or whose, where)  # the training part's, then this part's
    _check_names(theirs, f"{where} ({_source(dataset)})", where)
    ours = {name: cid for cid, name in _id_names(info)}
    names = {name: cid for cid, name in _id_names(theirs)}
    extra = [(name, cid) for name, cid in names.items() if name not in ours]
    if extra and instances:  # a file that lists more categories than it annotates (e.g. COCO's 80): unused ones go
        used = _used_ids(dataset)
        extra = [(name, cid) for name, cid in extra if cid in used]
        names = {name: cid for name, cid in names.items() if name in ours}
    if extra:
        raise ConfigError(f"{where} ({_source(dataset)}): class(es) {', '.join(repr(n) for n, _ in extra[:6])} "
                          f"not among {whose} classes ({', '.join(list(ours)[:10])}{', ...' if len(ours) > 10 else ''})"
                          f"{f' of {our_src}' if our_src else ''} (the first, {extra[0][0]!r}, is its id "
                          f"{extra[0][1]}); class ids follow class names, so give it only classes the training data "
                          "has (a subset is fine)")
    # instances keep their own info (keypoint sigmas, source) under the training part's categories
    view_info = replace(theirs, categories=list(info.categories)) if instances else info
    return ClassesByName(dataset, view_info, {cid: ours[name] for name, cid in names.items()})


def match_keypoints(dataset: Any, info: DatasetInfo, where: str, our_src: str) -> None:
    """A keypoint test / unlabeled part must have the training part's (``info``) keypoints in its order: they are
    scored and labelled index by index, so another count or another named order is a :class:`ConfigError`
    (``where``: the part, ``our_src``: the training part). Unnamed keypoints (a YOLO pose folder) are checked by
    count. Only parts that both have keypoints are compared: boxes alone are scored by class."""
    theirs = get_info(dataset)
    k, ours_k = theirs.num_keypoints, info.num_keypoints
    if not k or not ours_k or not has_instance_labels(dataset):
        return
    fix = "export it with the train file's keypoints, in its order"
    if k != ours_k:
        raise ConfigError(f"{where} ({_source(dataset)}): {k} keypoints per instance, {our_src} has {ours_k}; "
                          f"keypoints are compared by index, so {fix}")
    diff = first_keypoint_difference(info, theirs)
    if diff:
        i, ours, name = diff
        raise ConfigError(f"{where} ({_source(dataset)}): keypoint {i} is {name!r}, in {our_src} it is {ours!r}; "
                          f"keypoints are compared by index, not by name, so {fix}")


def _used_ids(dataset: Any) -> set[int]:
    """The class ids that a detection / keypoint part's instances use."""
    return {int(c) for i in range(len(dataset)) for c in torch.as_tensor(get_target(dataset, i)["labels"]).reshape(-1)}


def has_instance_labels(dataset: Any) -> bool:
    """Whether the dataset's targets carry instance class ids (``labels``: detection, keypoints)."""
    return len(dataset) > 0 and "labels" in get_target(dataset, 0)


def has_labels(dataset: Any) -> bool:
    """Whether the dataset's targets carry labels: a class label, or instances (``labels``, even none)."""
    return is_classification(dataset) or has_instance_labels(dataset)


def labeled_anywhere(dataset: Any) -> bool:
    """Whether some item is labeled: a class label, or at least one instance (stops at the first)."""
    if not has_labels(dataset):
        return False
    return not has_instance_labels(dataset) or any(len(get_target(dataset, i)["labels"]) for i in range(len(dataset)))


def check_labeled(dataset: Any, where: str) -> None:
    """A part that trains or scores needs labels (:func:`has_labels`)."""
    if len(dataset) and not has_labels(dataset):
        raise ConfigError(f"{where} ({_source(dataset)}): its images have no labels (a folder without class "
                          f"sub-folders?); give it labeled data, or make it the unlabeled part (data.unlabeled)")


def _source(dataset: Any) -> str:
    return str((get_info(dataset).extra or {}).get("source") or type(dataset).__name__)


def _check_names(info: DatasetInfo, what: str, where: str) -> None:
    """Classes matched by name need each name once."""
    seen: dict[str, int] = {}
    for cid, name in _id_names(info):
        if name in seen:
            raise ConfigError(f"{where}: {what} names class {name!r} twice (ids {seen[name]} and {cid}), so its "
                              "classes cannot be matched by name; give each class its own name")
        seen[name] = cid


class AtImageShape(Dataset):
    """A fixed-size dataset's items converted to another input shape ``[C, H, W]`` (:func:`adapt_image`), for a
    dataset whose plugin cannot read at a given shape (no ``DatasetSpec.read_at``); ``.info`` declares the shape."""

    def __init__(self, dataset: Any, shape: Sequence[int]):
        self.dataset = dataset
        self.shape = [int(v) for v in shape]
        info = get_info(dataset)
        self.info = replace(info, extra={**(info.extra or {}), "image_shape": self.shape})

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, target = self.dataset[i]
        return adapt_image(image, self.shape), target

    def get_target(self, i: int) -> dict[str, Any]:
        return get_target(self.dataset, i)


def image_shape(dataset: Any) -> list[int] | None:
    """A fixed-size dataset's input shape ``[C, H, W]`` (``info.extra["image_shape"]``), else ``None``."""
    shape = (get_info(dataset).extra or {}).get("image_shape")
    return [int(v) for v in shape] if shape else None


def fit_shape(dataset: Any, shape: Sequence[int] | None) -> Any:
    """``dataset`` with its items at ``shape`` (a view converting them when its own shape differs)."""
    own = image_shape(dataset)
    if not shape or not own or own == [int(v) for v in shape]:
        return dataset
    return AtImageShape(dataset, shape)


def build_at_shape(registry: Any, block: Any, shape: Sequence[int] | None, where: str,
                   whose: str = "the train part's") -> tuple[Any, str | None]:
    """``(dataset, warning)``: the dataset ``block`` names, its images read at ``shape`` (``[C, H, W]``; None:
    its own). The keys its plugin's ``DatasetSpec.read_at`` gives go into the block, so each file is resized once
    (other plugins' items are converted); a key the block sets otherwise is overridden, and ``warning`` says so:
    a model is scored on images as it sees them in training (``whose``: the shape's owner)."""
    block = {"name": block} if isinstance(block, str) else dict(block)
    note = None
    read_at = getattr(registry.params("datasets", block, where=where)[0].spec, "read_at", None) if shape else None
    if read_at is not None:
        wanted = read_at([int(v) for v in shape])
        given = {k: block[k] for k, v in wanted.items() if k in block and block[k] != v}
        if given:
            said = ", ".join(f"{k}: {json.dumps(v)}" for k, v in given.items())
            note = (f"{where}: {said} ignored; its images are read at {whose} image shape {list(shape)} (C, H, W), "
                    f"as the model sees them in training; remove {', '.join(given)} there to silence this")
            log.warning("%s", note)
        block.update(wanted)
    return fit_shape(build_dataset(registry, block, where), shape), note


def _id_names(info: DatasetInfo) -> list[tuple[int, str]]:
    return [(int(c["id"]), str(c.get("name", c["id"]))) for c in info.categories]


@dataclass
class Splits:
    """The parts of a dataset a recipe trains, labels and evaluates on (``unlabeled`` hides its labels)."""

    labeled: Any
    unlabeled: HiddenLabels | None
    test: Any | None
    info: DatasetInfo
    warnings: list[str] = field(default_factory=list)


def is_classification(dataset: Any) -> bool:
    return len(dataset) > 0 and "label" in get_target(dataset, 0)


def split_indices(dataset: Any, fractions: Sequence[float], seed: int = 0,
                  stratify: bool | None = None) -> list[list[int]]:
    """Disjoint index lists, one per fraction (their sum must be <= 1), chosen at random with ``seed``.

    With ``stratify`` (default: for classification datasets) each class is split by the same fractions, so every
    part keeps the class balance; otherwise the whole index range is permuted once.
    """
    if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ConfigError(f"split fractions must be >= 0 and sum to at most 1, got {list(fractions)}")
    n = len(dataset)
    stratify = is_classification(dataset) if stratify is None else stratify
    gen = torch.Generator().manual_seed(int(seed))
    if stratify:
        groups: dict[int, list[int]] = {}
        for i in range(n):
            groups.setdefault(int(get_target(dataset, i)["label"]), []).append(i)
    else:
        groups = {0: list(range(n))}
    parts: list[list[int]] = [[] for _ in fractions]
    for key in sorted(groups):
        members = groups[key]
        perm = torch.randperm(len(members), generator=gen).tolist()
        counts = _allocate(len(members), fractions)
        start = 0
        for p, count in enumerate(counts):
            parts[p].extend(members[j] for j in perm[start:start + count])
            start += count
    return [sorted(p) for p in parts]


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Round ``n * f`` per fraction (largest remainder) without exceeding ``n * sum(f)``."""
    raw = [n * f for f in fractions]
    counts = [int(r) for r in raw]
    target = min(n, round(sum(raw)))
    order = sorted(range(len(raw)), key=lambda k: raw[k] - counts[k], reverse=True)
    for k in order:
        if sum(counts) >= target:
            break
        if raw[k] > counts[k]:
            counts[k] += 1
    return counts


def split_dataset(dataset: Any, labeled: float, unlabeled: float = 0.0, test: float = 0.0, seed: int = 0,
                  stratify: bool | None = None) -> Splits:
    """Split ``dataset`` into labeled / unlabeled (labels hidden) / test parts by fraction and seed."""
    lab, unl, tst = split_indices(dataset, [labeled, unlabeled, test], seed=seed, stratify=stratify)
    if not lab:
        raise ConfigError(f"data.split.labeled = {labeled}: the labeled part of the {len(dataset)} items is empty; "
                          f"raise it (a fraction in (0, 1])")
    return Splits(labeled=Subset(dataset, lab), unlabeled=HiddenLabels(Subset(dataset, unl)) if unl else None,
                  test=Subset(dataset, tst) if tst else None, info=get_info(dataset))


@dataclass
class SplitParams:
    labeled: float = 1.0
    unlabeled: float = 0.0
    test: float = 0.0
    seed: int = 0
    stratify: bool | None = None

    def __post_init__(self) -> None:
        parts = {"labeled": self.labeled, "unlabeled": self.unlabeled, "test": self.test}
        for key, value in parts.items():
            if not 0 <= value <= 1:
                raise ValueError(f"{key} = {value} must be a fraction in [0, 1]")
        if sum(parts.values()) > 1 + 1e-9:
            shown = " + ".join(f"{k} {v:g}" for k, v in parts.items() if v)
            raise ValueError(f"fractions must sum to at most 1: {shown} = {sum(parts.values()):g}; lower one of them")


def build_data(data_cfg: Mapping[str, Any], registry: Any = None, where: str = "data") -> Splits:
    """Build the datasets a recipe's ``data`` section names (see the module docstring)."""
    from ddkit.registry import _to_plain, parse_section

    if registry is None:
        from ddkit.plugin_manager import get_registry

        registry = get_registry()
    cfg = _to_plain(data_cfg) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where} must be a mapping, got {cfg!r}")
    if "dataset" in cfg:
        unknown = set(cfg) - {"dataset", "split"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} next to 'dataset'. Valid keys: dataset, "
                              "split (or use the layout train/unlabeled/test: {dataset: ...})")
        p = parse_section(SplitParams, cfg.get("split") or {}, f"{where}.split")  # before reading any data
        dataset = build_dataset(registry, cfg["dataset"], f"{where}.dataset")
        _check_not_empty(dataset, f"{where}.dataset")
        check_labeled(dataset, f"{where}.dataset")
        splits = split_dataset(dataset, p.labeled, p.unlabeled, p.test, p.seed, p.stratify)
        splits.warnings += skipped_warning(dataset, f"{where}.dataset")
        return splits
    blocks = _part_blocks(cfg, where)
    parts = {"train": build_dataset(registry, blocks["train"], f"{where}.train.dataset")}
    _check_not_empty(parts["train"], f"{where}.train.dataset")
    check_labeled(parts["train"], f"{where}.train.dataset")
    info, notes = get_info(parts["train"]), skipped_warning(parts["train"], f"{where}.train.dataset")
    for key in ("unlabeled", "test"):  # read as the train images are: the model's input shape, its class ids
        if key in blocks:
            part, note = build_at_shape(registry, blocks[key], image_shape(parts["train"]), f"{where}.{key}.dataset")
            _check_not_empty(part, f"{where}.{key}.dataset")
            if key == "test":
                check_labeled(part, f"{where}.test.dataset")
            notes += skipped_warning(part, f"{where}.{key}.dataset")  # before a class view takes the train info
            train_src = f"{where}.train.dataset ({_source(parts['train'])})"
            match_keypoints(part, info, f"{where}.{key}.dataset", train_src)
            parts[key] = match_classes(part, info, f"{where}.{key}.dataset", our_src=train_src)
            notes += [note] if note else []
    unl = parts.get("unlabeled")
    return Splits(labeled=parts["train"], unlabeled=HiddenLabels(unl) if unl is not None else None,
                  test=parts.get("test"), info=info, warnings=notes + _shared_files(parts, where))


def _part_blocks(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The dataset block of each part of the layout ``train / unlabeled / test: {dataset: ...}``, checked."""
    blocks = {}
    for key in cfg:
        if key not in ("train", "unlabeled", "test"):
            raise ConfigError(f"{where}: unknown key {key!r}. Valid keys: dataset, split, or train, unlabeled, test")
        block = cfg[key]
        if not isinstance(block, dict) or "dataset" not in block:
            raise ConfigError(f"{where}.{key} must be {{dataset: {{name: ...}}}}")
        blocks[key] = block["dataset"]
    if "train" not in blocks:
        raise ConfigError(f"{where}: needs either 'dataset' (with 'split') or 'train: {{dataset: ...}}'")
    return blocks


def build_dataset(registry: Any, block: Any, where: str) -> Any:
    """The dataset a recipe's block names; a :class:`DataError` of the dataset (a missing or empty folder, a bad
    file) is prefixed with the recipe field ``where`` (``data.train.dataset: root /x: no class sub-folders``)."""
    try:
        return registry.build("datasets", block, where=where)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None


def item_file(dataset: Any, i: int, depth: int = 0) -> str | None:
    """The image file of item ``i`` through Subset / HiddenLabels / ConcatDataset views (absolute path), if any."""
    if depth > 8:
        return None
    files = getattr(dataset, "files", None)
    if isinstance(files, (list, tuple)) and 0 <= i < len(files):
        return str(Path(files[i]).resolve())
    if hasattr(dataset, "ground_truth"):
        return item_file(dataset.ground_truth, i, depth + 1)
    if hasattr(dataset, "indices") and hasattr(dataset, "dataset"):
        return item_file(dataset.dataset, int(dataset.indices[i]), depth + 1)
    if hasattr(dataset, "dataset"):  # a view of the same items (ClassesByName)
        return item_file(dataset.dataset, i, depth + 1)
    if hasattr(dataset, "_locate"):
        ds, j = dataset._locate(i)
        return item_file(ds, j, depth + 1)
    return None


def _files(dataset: Any) -> set[str]:
    """The resolved image files of a dataset's items (none for items without files)."""
    return {f for i in range(len(dataset)) if (f := item_file(dataset, i))}


def _overlap(a: set[str], b: set[str], what: str, consequence: str) -> list[str]:
    """Warnings when two sets of image files (resolved paths) share files, or hold copies of one picture under one
    file name in other folders (COCO-derived sets such as coco8 and coco8-pose name images by their COCO id, and
    re-encode them); ``what``: "X and Y"."""
    out = []
    same = sorted(a & b)
    if same:
        out.append(f"{what} share {len(same)} image file(s) (e.g. {same[0]}): {consequence}")
    by_name = {Path(f).name: f for f in b - a}
    copies = [(f, by_name[Path(f).name]) for f in sorted(a - b) if Path(f).name in by_name][:MAX_COPY_CHECKS]
    copies = [pair for pair in copies if _same_picture(*pair)]
    if copies:
        out.append(f"{what} hold {len(copies)}{'+' if len(copies) == MAX_COPY_CHECKS else ''} copies of one picture "
                   f"under one file name (e.g. {copies[0][0]} and {copies[0][1]}): {consequence}")
    for msg in out:
        log.warning(msg)
    return out


MAX_COPY_CHECKS = 100  # same-named files compared by content (two decodes each)


def _same_picture(a: str, b: str) -> bool:
    """Whether two image files hold one picture up to re-encoding and resizing: their 32 x 32 grey thumbnails
    differ by less than 2 % on average."""
    try:
        x, y = (torch.nn.functional.interpolate(read_image(p).mean(0)[None, None], size=(32, 32), mode="area")
                for p in (a, b))
    except DataError:
        return False
    return float((x - y).abs().mean()) < 0.02


def _shared_files(parts: Mapping[str, Any], where: str) -> list[str]:
    """A warning for each pair of parts that share image files (test images among the unlabeled ones would be
    pseudo-labelled, trained on and then scored: a result that looks better than it is)."""
    files = {k: _files(d) for k, d in parts.items()}
    section = where.rpartition(": ")[2]
    out = []
    for a, b in (("unlabeled", "test"), ("train", "test"), ("train", "unlabeled")):
        out += _overlap(files.get(a, set()), files.get(b, set()), f"{where}.{a} and {section}.{b}",
                        f"results on {b} are not measured on unseen images")
    return out


def label_overlap_warnings(files: Iterable[str], splits: Splits, field: str, source: str) -> list[str]:
    """A warning when the images a label section reads (``files``: resolved paths; ``field`` names them, e.g.
    ``label.images``, in the recipe ``source``) are image files of the test part (the student trains on
    pseudo-labels of the images it is scored on) or of the labeled part (labelled twice, by hand and by the
    teacher)."""
    label_files = set(files)
    out = []
    for part, key, consequence in (
            (splits.test, "test", "the student trains on pseudo-labels of test images, so results on test are not "
                                  "measured on unseen images"),
            (splits.labeled, "train", "those images are both labeled and pseudo-labelled")):
        if part is not None and label_files:
            out += _overlap(label_files, _files(part), f"{source}: {field} and data.{key}",
                            f"{consequence}; remove them from {field}")
    return out


def _check_not_empty(dataset: Any, where: str) -> None:
    """An empty dataset (an empty folder, a file without images, every image unreadable) names the field and path."""
    if len(dataset) == 0:
        info = getattr(dataset, "info", None)
        source = (info.extra.get("source") if isinstance(info, DatasetInfo) else None) or type(dataset).__name__
        hint = ("add 'images: DIR' to the dataset block (the folder its file_name values are relative to)"
                if str(source).lower().endswith(".json") else "point it at a folder or file with images")
        raise DataError(f"{where}: {source} has no (readable) images; {hint}")


# ---------------------------------------------------------------------------------------------- image reading
def check_image(path: str | Path) -> str | None:
    """``None`` if the file decodes as an image, else the reason it does not."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() misses truncated pixel data; a full decode finds it
            im.load()
        return None
    except Exception as err:  # noqa: BLE001 - any decoder failure means unreadable
        return f"{type(err).__name__}: {err}"


NO_PROGRESS_ENV = "DDKIT_NO_PROGRESS"  # set by the commands' --no-progress


def check_images(paths: Iterable[str | Path], progress: bool = False) -> list[tuple[str, str]]:
    """``[(path, reason), ...]`` for every file in ``paths`` that cannot be read as an image. The bar is left out
    off a terminal and under ``--no-progress`` (``DDKIT_NO_PROGRESS``: datasets are built deep below the command)."""
    paths = list(paths)
    if progress and not os.environ.get(NO_PROGRESS_ENV):
        from tqdm.auto import tqdm

        paths = tqdm(paths, desc="checking images", unit="img", leave=False, disable=None)
    bad = []
    for p in paths:
        reason = check_image(p)
        if reason is not None:
            bad.append((str(p), reason))
    return bad


# The one list of image file extensions (image folders to label, YOLO image folders).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


# Grey modes wider than 8 bits: PIL's convert("RGB") clips them at 255 (a white image), so they are scaled here.
# 16-bit data by 65535; 32-bit integers ("I", how older Pillow opened 16-bit PNGs) as 16-bit data, clipped.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _wide_grey(im: Any) -> torch.Tensor:
    """A 16- or 32-bit integer grey PIL image as float ``[3, H, W]`` in ``[0, 1]`` (full scale 65535)."""
    import numpy as np

    grey = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).clamp_(0, 65535).div_(65535.0)
    return grey[None].expand(3, -1, -1).contiguous()


# EXIF orientations that rotate by 90 degrees (PIL's exif_transpose: TRANSPOSE, ROTATE_270, TRANSVERSE, ROTATE_90)
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file in its displayed frame (EXIF orientation applied, as by
    :func:`read_image`), read from the header: what width / height of a COCO file and YOLO labels refer to.
    (A PNG whose eXIf chunk follows the pixels is decoded: PIL finds that chunk only then.)"""
    from PIL import ExifTags, Image

    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(ExifTags.Base.Orientation, 1) in _SWAPPED_ORIENTATIONS:
            w, h = h, w
    return w, h


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as float ``[3, H, W]`` in ``[0, 1]`` (RGB); :class:`DataError` naming the file if unreadable.
    8-bit images are scaled by 255, 16-bit grey ones (``I;16``) by 65535: the same picture as an 8-bit copy.
    The EXIF orientation is applied (``ImageOps.exif_transpose``): the frame that Ultralytics, detectron2 and
    annotation tools show and label, not the stored pixels. Every image ddkit reads comes through here."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            ImageOps.exif_transpose(im, in_place=True)
            if im.mode in _WIDE_GREY_MODES:
                return _wide_grey(im)
            arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            w, h = im.size
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: cannot read image: {type(err).__name__}: {err}") from None
    return arr.view(h, w, 3).permute(2, 0, 1).float().div_(255.0)


def adapt_image(image: torch.Tensor, shape: Sequence[int] | None) -> torch.Tensor:
    """An image read as RGB, made to fit a fixed-size dataset's input ``[C, H, W]`` (``DatasetInfo.extra
    ["image_shape"]``): grey or RGB channels, then a bilinear resize; ``shape`` None: unchanged.

    The one conversion of every image such a dataset reads, its own (``image_folder``) and the unlabeled ones
    (label sources, pseudo-labels, ``ddkit predict``), so that all of them give the model the same tensors."""
    if not shape:
        return image
    c, h, w = (int(v) for v in shape)
    if image.shape[0] != c:
        if c == 1:
            image = (image[:3] * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
        elif image.shape[0] == 1:
            image = image.expand(c, -1, -1)
    if tuple(image.shape[-2:]) != (h, w):
        image = torch.nn.functional.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False,
                                                antialias=True)[0].clamp_(0, 1)
    return image.contiguous()


# info.extra key: {"count", "first", "reason"} of the images a dataset left out as unreadable (only the first is
# kept: the info travels into checkpoints); a recipe's results repeat it, a warning in the log scrolls by
SKIPPED_IMAGES = "skipped_images"


def skipped_extra(skipped: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The ``info.extra`` entry (:data:`SKIPPED_IMAGES`) of a dataset's skipped ``(file, reason)`` pairs."""
    if not skipped:
        return {}
    return {SKIPPED_IMAGES: {"count": len(skipped), "first": str(skipped[0][0]), "reason": str(skipped[0][1])}}


def skipped_warning(dataset: Any, where: str) -> list[str]:
    """A results warning for a recipe part ``where`` whose dataset skipped unreadable images (a typo'd image root
    on part of the data shrinks it silently otherwise)."""
    note = (get_info(dataset).extra or {}).get(SKIPPED_IMAGES)
    if not note:
        return []
    return [f"{where} ({_source(dataset)}): {note['count']} image(s) could not be read and were skipped (the first: "
            f"{note['first']}: {note['reason']}); fix the image root or the files, or remove them"]


def report_skipped(skipped: Sequence[tuple[str, str]], source: str) -> None:
    if skipped:
        log.warning("%s: skipped %d unreadable image(s): %s", source, len(skipped),
                    "; ".join(f"{p} ({r})" for p, r in skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
