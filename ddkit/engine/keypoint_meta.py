"""Keypoint metadata that never goes silently wrong: flip pairs from names, OKS sigmas.

* :func:`flip_indices_from_names` pairs left/right keypoints in the common naming schemes (``left_shoulder`` /
  ``right_shoulder``, ``l_knee``, ``LShoulder``, ``shoulder_left``, ``Left Shoulder``, ``knee-L``, ...). When names
  have a side but their mirror is missing, or no name has a side at all, it returns ``None``: the pairs are unknown
  and must come from an explicit ``flip_indices`` option (a flip would otherwise swap the wrong points).
* :func:`require_flip_indices` is what a flip (a labelling view, a training augmentation) calls: the pairs, or one
  error asking for ``flip_indices``.
* :func:`resolve_keypoint_meta` is what every keypoint dataset calls: explicit options first, then the dataset's
  own metadata (names, YOLO ``flip_idx``), then known defaults (COCO's 17 sigmas), with one warning per process and
  a note in ``DatasetInfo.extra`` when a default is used or the pairs are unknown.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from ddkit.errors import ConfigError
from ddkit.ops.geometry import check_flip_indices
from ddkit.types import DatasetInfo

log = logging.getLogger("ddkit.data")

COCO_KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                  "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                  "right_knee", "left_ankle", "right_ankle")
COCO_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087,
               0.087, 0.089, 0.089)
DEFAULT_SIGMA = 0.05  # one sigma for every keypoint of a set ddkit does not know (OKS is then only indicative)
#: ``DatasetInfo.extra`` keys: why the flip pairs are unknown / which default sigmas were assumed.
FLIP_UNKNOWN = "flip_indices_unknown"
SIGMAS_DEFAULT = "keypoint_sigmas_default"

_SIDES = {"left": "L", "l": "L", "right": "R", "r": "R"}
_SPLIT = re.compile(r"[\s_\-.:/]+|(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_warned: set[str] = set()


def _side_and_stem(name: str) -> tuple[str | None, str]:
    """``("L" | "R" | None, stem)``: the side token (first or last word) removed, the rest lower-cased."""
    words = [w.lower() for w in _SPLIT.split(name.strip()) if w]
    for pos in (0, -1):
        if len(words) > 1 and words[pos] in _SIDES:
            side = _SIDES[words[pos]]
            rest = words[1:] if pos == 0 else words[:-1]
            return side, " ".join(rest)
    # leftshoulder / rightknee written as one lower-case word
    low = name.strip().lower()
    for prefix in ("left", "right"):
        if low.startswith(prefix) and len(low) > len(prefix) and low[len(prefix)].isalpha():
            return _SIDES[prefix], low[len(prefix):]
    return None, " ".join(words)


def flip_indices_from_names(names: Sequence[str]) -> list[int] | None:
    """Each keypoint's mirror index from its name; ``None`` when the pairs cannot be found (a sided name without
    its mirror, two names claiming one mirror, or no sided name at all among ``K > 1`` keypoints).

    Example: ``["nose", "LEye", "REye"] -> [0, 2, 1]``; ``["a", "b"] -> None``.
    """
    parsed = [_side_and_stem(str(n)) for n in names]
    index: dict[tuple[str, str], int] = {}
    for i, key in enumerate(parsed):
        if key[0] is not None:
            if key in index:
                return None
            index[key] = i
    if not index:
        return [0] if len(parsed) == 1 else None
    out = []
    for i, (side, stem) in enumerate(parsed):
        if side is None:
            out.append(i)
            continue
        mirror = index.get(("R" if side == "L" else "L", stem))
        if mirror is None:
            return None
        out.append(mirror)
    return out


def _coco17_sigmas(names: Sequence[str] | None, k: int) -> list[float] | None:
    """COCO's OKS sigmas in the order of ``names`` when they are COCO's 17 keypoints in any order (looked up by
    name, as the flip pairs are), else ``None``."""
    if k != 17:
        return None
    if names is None:
        return list(COCO_SIGMAS)  # Ultralytics' convention for an unnamed 17-point set (coco8-pose, COCO-pose)
    coco = {_side_and_stem(n): s for n, s in zip(COCO_KEYPOINTS, COCO_SIGMAS)}
    keys = [_side_and_stem(n) for n in names]
    if len(set(keys)) != k or not all(key in coco for key in keys):
        return None
    return [coco[key] for key in keys]


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


@dataclass
class KeypointMeta:
    """Resolved keypoint metadata of a dataset (what goes into :class:`~ddkit.types.DatasetInfo`)."""

    flip_indices: list[int] | None
    sigmas: list[float]
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_keypoint_meta(k: int, where: str, *, names: Sequence[str] | None = None,
                          dataset_flip: Sequence[int] | None = None, flip_indices: Sequence[int] | None = None,
                          sigmas: Sequence[float] | None = None,
                          default_sigma: tuple[float, str] | None = None) -> KeypointMeta:
    """Flip pairs and OKS sigmas of a ``K``-keypoint dataset.

    Args:
        k: number of keypoints.
        where: the dataset (file or folder) named in messages.
        names: keypoint names from the dataset (COCO ``categories[].keypoints``), if any.
        dataset_flip: pairs the dataset declares itself (YOLO ``flip_idx``).
        flip_indices, sigmas: the explicit dataset options (they win).
        default_sigma: the sigma of every keypoint when none is known, and whose convention it is (a format's own,
            e.g. Ultralytics' 1/K for YOLO pose folders, so that keypoint AP agrees with ``yolo val``);
            default: :data:`DEFAULT_SIGMA`.

    Raises:
        ConfigError: an explicit or declared value of the wrong length / not a pairing.
    """
    extra: dict[str, Any] = {}
    flip: list[int] | None
    for key, value in (("flip_indices", flip_indices), ("flip_idx", dataset_flip), ("sigmas", sigmas)):
        if value is not None and not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
    try:
        if flip_indices is not None:
            flip = check_flip_indices(list(flip_indices), k, name=f"{where}: flip_indices")
        elif dataset_flip is not None:
            flip = check_flip_indices(list(dataset_flip), k, name=f"{where}: flip_idx")
        elif names is not None:
            flip = flip_indices_from_names(names)
            if flip is None:
                extra[FLIP_UNKNOWN] = (f"{where}: no left/right pairs found in the keypoint names {list(names)[:6]}"
                                       f"{'...' if k > 6 else ''}; set the dataset option flip_indices")
        else:
            flip = None
            extra[FLIP_UNKNOWN] = f"{where}: the {k} keypoints have no names and no flip_idx; set flip_indices"
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if sigmas is not None:
        if len(sigmas) != k or not all(isinstance(s, (int, float)) and s > 0 for s in sigmas):
            raise ConfigError(f"{where}: sigmas must be {k} positive numbers (one per keypoint), got {list(sigmas)}")
        out_sigmas = [float(s) for s in sigmas]
    elif (coco_sigmas := _coco17_sigmas(names, k)) is not None:
        out_sigmas = coco_sigmas
        if names is None:
            extra[SIGMAS_DEFAULT] = f"{where}: 17 unnamed keypoints: COCO's OKS sigmas assumed (set sigmas if not)"
    else:
        value, whose = default_sigma or (DEFAULT_SIGMA, "")
        out_sigmas = [float(value)] * k
        extra[SIGMAS_DEFAULT] = (f"{where}: OKS sigmas unknown for these {k} keypoints: {value:.4g} used for "
                                 f"each{whose}, so keypoint AP is only indicative; set the dataset option sigmas")
    for key in (FLIP_UNKNOWN, SIGMAS_DEFAULT):
        if key in extra:
            warn_once(extra[key])
    return KeypointMeta(flip, out_sigmas, extra)


def require_flip_indices(info: DatasetInfo, what: str) -> list[int]:
    """The dataset's flip pairs for ``what`` (e.g. ``"label.transforms: hflip"``, ``"train.hflip"``); a
    :class:`ConfigError` asking for the ``flip_indices`` dataset option when the pairs are unknown."""
    if info.flip_indices is not None:
        return list(info.flip_indices)
    why = info.extra.get(FLIP_UNKNOWN) or f"the dataset's {info.num_keypoints} keypoints have no known left/right pairs"
    raise ConfigError(f"{what} flips keypoints, but {why}. Give each keypoint's mirror index (e.g. [0, 2, 1] for "
                      f"nose, left_eye, right_eye) as flip_idx: in a YOLO data.yaml, or as the dataset option "
                      f"flip_indices in the recipe (any dataset), or drop the flip")


def check_train_flip(info: DatasetInfo, hflip: float, where: str) -> None:
    """A training block ``where`` (``teacher.train``) whose ``hflip > 0`` flips keypoints: their pairs must be known
    before anything trains, not at the first flipped image (:func:`require_flip_indices`)."""
    if hflip > 0 and info.num_keypoints:
        require_flip_indices(info, f"{where}.hflip")


def keypoint_names(info: DatasetInfo) -> list[str] | None:
    """The keypoint names a dataset declares (``info.extra["keypoint_names"]``), ``None`` if it only has a count."""
    names = (info.extra or {}).get("keypoint_names")
    return [str(n) for n in names] if names else None


def first_keypoint_difference(ours: DatasetInfo, theirs: DatasetInfo) -> tuple[int, str, str] | None:
    """``(index, our name, their name)`` of the first keypoint the two datasets name differently, ``None`` when the
    names agree or either side has none (keypoints are compared by index, so only the order tells them apart)."""
    a, b = keypoint_names(ours), keypoint_names(theirs)
    if a is None or b is None:
        return None
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i, x, y
    return None
