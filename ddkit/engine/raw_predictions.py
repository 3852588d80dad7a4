"""The raw multi-transform predictions that labelling keeps (``label.keep_raw``) and ``ddkit bench`` reads.

Raw predictions file (``.pt``, loadable with ``torch.load(weights_only=True)``), see :func:`save_raw`::

    {"format": "ddkit.raw_predictions", "version": 1,
     "prediction_type": "instances" | "probs",
     "categories": [{"id": 1, "name": "person"}, ...],
     "views": ["identity", "hflip", ...],             # optional names of the views
     "images": [{"image_id": int, "image_size": [H, W],
                 "views": [{"boxes": f32 [N, 4] xyxy pixels of the original frame, "scores": f32 [N],
                            "labels": i64 [N] category ids}, ...]           # instances
                 # or "probs": f32 [V, C] (one row per view, columns ordered like categories)  # probs
                 "target": {"boxes", "labels"} | {"label"}                  # optional ground truth
                 }, ...]}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ddkit.engine.prediction_kinds import KINDS
from ddkit.errors import DataError
from ddkit.types import Instances

RAW_FORMAT = "ddkit.raw_predictions"
RAW_VERSION = 1


@dataclass
class RawImage:
    """The raw per-view predictions of one image, mapped back to its original frame.

    Attributes:
        image_id: the dataset's image id.
        image_size: ``(H, W)`` of the original image.
        views: per view :class:`Instances` (``instances`` type), else ``None``.
        probs: ``[V, C]`` class probabilities (``probs`` type), else ``None``.
        target: optional ground truth: ``{"boxes" [M, 4], "labels" [M]}`` or ``{"label": int}``.
    """

    image_id: int
    image_size: tuple[int, int]
    views: list[Instances] | None = None
    probs: Tensor | None = None
    target: dict[str, Any] | None = None


@dataclass
class RawPredictions:
    prediction_type: str  # "instances" or "probs"
    images: list[RawImage]
    categories: list[dict[str, Any]] = field(default_factory=list)
    view_names: list[str] = field(default_factory=list)

    @property
    def kind(self) -> Any:
        """The :class:`~ddkit.engine.prediction_kinds.PredictionKind` of these predictions."""
        return KINDS[self.prediction_type]

    @property
    def num_views(self) -> int:
        if self.view_names:
            return len(self.view_names)
        first = self.images[0] if self.images else None
        if first is None:
            return 0
        return len(first.views) if first.views is not None else int(first.probs.shape[0])


def save_raw(raw: RawPredictions, path: str | Path) -> Path:
    """Write raw predictions in the documented format (atomically)."""
    from ddkit.io import atomic_torch_save

    images = []
    for img in raw.images:
        rec: dict[str, Any] = {"image_id": int(img.image_id), "image_size": [int(s) for s in img.image_size]}
        if img.views is not None:
            rec["views"] = [{"boxes": v.boxes.float().cpu(), "scores": v.scores.float().cpu(),
                             "labels": v.labels.long().cpu()} for v in img.views]
        else:
            rec["probs"] = img.probs.float().cpu()
        if img.target is not None:
            rec["target"] = {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in img.target.items()}
        images.append(rec)
    return atomic_torch_save({"format": RAW_FORMAT, "version": RAW_VERSION, "prediction_type": raw.prediction_type,
                              "categories": list(raw.categories), "views": list(raw.view_names),
                              "images": images}, path)


def _as_tensor(v: Any, dtype: torch.dtype, shape_tail: tuple[int, ...] = ()) -> Tensor:
    t = torch.as_tensor(v, dtype=dtype)
    if shape_tail and t.numel() == 0:
        t = t.reshape(0, *shape_tail)
    return t


def raw_from_dict(data: Mapping[str, Any], source: str = "raw predictions") -> RawPredictions:
    """Parse the documented raw format (see the module docstring)."""
    if not isinstance(data, Mapping) or "images" not in data:
        raise DataError(f"{source}: not a ddkit raw-predictions file (a mapping with 'images')")
    fmt = data.get("format", RAW_FORMAT)
    if fmt != RAW_FORMAT:
        raise DataError(f"{source}: format {fmt!r} is not {RAW_FORMAT!r}")
    images = []
    ptype = data.get("prediction_type")
    for i, rec in enumerate(data["images"]):
        try:
            size = tuple(int(s) for s in rec["image_size"])
            img = RawImage(image_id=int(rec["image_id"]), image_size=size, target=rec.get("target"))
            if "probs" in rec:
                img.probs = _as_tensor(rec["probs"], torch.float32)
                if img.probs.ndim != 2:
                    raise ValueError(f"probs must be [V, C], got {tuple(img.probs.shape)}")
                ptype = ptype or "probs"
            else:
                img.views = [Instances(_as_tensor(v["boxes"], torch.float32, (4,)),
                                       _as_tensor(v["scores"], torch.float32).reshape(-1),
                                       _as_tensor(v["labels"], torch.int64).reshape(-1), image_size=size)
                             for v in rec["views"]]
                ptype = ptype or "instances"
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{source}: images[{i}] is malformed ({type(err).__name__}: {err})") from None
        images.append(img)
    if ptype not in KINDS:
        raise DataError(f"{source}: prediction_type must be 'instances' or 'probs', got {ptype!r}")
    return RawPredictions(ptype, images, list(data.get("categories") or []), list(data.get("views") or []))


RAW_FILE = "raw_predictions.pt"


def raw_file(path: str | Path) -> Path:
    """The raw-predictions file a path names: the file itself, or ``raw_predictions.pt`` in the folder or its
    ``label/`` (a labelling run folder)."""
    path = Path(path)
    if path.is_dir():
        for cand in (path / RAW_FILE, path / "label" / RAW_FILE):
            if cand.is_file():
                return cand
        raise DataError(f"{path}: no {RAW_FILE} in it or in its label/ folder; label with label.keep_raw: true")
    return path


def load_raw(path: str | Path) -> RawPredictions:
    """Read raw predictions (``weights_only=True``): a ``.pt`` file in the documented format, or a folder holding
    ``raw_predictions.pt`` directly or in its ``label/`` (a labelling run folder: ``ddkit label`` with
    ``label.keep_raw: true`` writes ``<run.out_dir>/label/raw_predictions.pt``)."""
    path = raw_file(path)
    if not path.is_file():
        raise DataError(f"{path}: no such raw-predictions file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickle / zip errors; torch's own text would advise weights_only=False, which runs the file
        raise DataError(f"{path}: {_not_raw(path)}") from None
    return raw_from_dict(data, str(path))


def _not_raw(path: Path) -> str:
    """Why a file torch cannot load is no raw-predictions file, and what to pass instead (one line)."""
    what = ("not a ddkit raw-predictions file (a torch .pt written by ddkit label with label.keep_raw: true, or by "
            "a synthetic ddkit bench)")
    with open(path, "rb") as fh:
        head = fh.read(64).lstrip()
    if head[:1] in (b"[", b"{"):
        return f"{what}; this is JSON: a COCO results file is fused and scored with ddkit fuse ... --gt GT.json"
    return f"{what}; it is not a torch file, or it is truncated or holds Python objects"
