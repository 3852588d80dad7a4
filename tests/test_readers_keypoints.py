"""Keypoint metadata (ddkit.engine.keypoint_meta): flip pairs from names in the common schemes or YOLO flip_idx or an
explicit flip_indices option; unknown pairs recorded, never guessed; OKS sigmas known for COCO-17, else explicit or a
warned default."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

import ddkit
from ddkit.engine import keypoint_meta
from ddkit.engine.keypoint_meta import (COCO_KEYPOINTS, COCO_SIGMAS, FLIP_UNKNOWN, SIGMAS_DEFAULT,
                                        flip_indices_from_names, resolve_keypoint_meta)
from ddkit.errors import ConfigError
from ddkit.ops.geometry import COCO_FLIP_INDICES

DATA = Path(__file__).parents[1].parent / "shared" / "data"
COCO_JSON = DATA / "coco-val2017-mini" / "test_coco.json"
needs_data = pytest.mark.skipif(not COCO_JSON.is_file(), reason="shared/data fixtures are not beside the repository")


def _slow_flip(names):
    """Reference: spell every name as (side, body part) by hand-written patterns, then pair."""
    import re

    def parse(n):
        for pat in (r"^(left|right|l|r)[\s_\-]*(.+)$", r"^(.+?)[\s_\-]*(left|right|l|r)$"):
            m = re.match(pat, n, re.IGNORECASE)
            if m:
                side, part = (m.group(1), m.group(2)) if pat.startswith("^(left") else (m.group(2), m.group(1))
                if len(part) > 1:
                    return side.lower()[0], part.lower().replace(" ", "").replace("_", "").replace("-", "")
        return None, n

    keys = [parse(n) for n in names]
    return [next((j for j, k in enumerate(keys) if k == ({"l": "r", "r": "l"}[s], p)), i) if s else i
            for i, (s, p) in enumerate(keys)]


@pytest.mark.parametrize("names", [
    list(COCO_KEYPOINTS),
    ["nose", "l_eye", "r_eye", "l_shoulder", "r_shoulder"],
    ["Nose", "LShoulder", "RShoulder", "LElbow", "RElbow", "MidHip"],          # OpenPose
    ["head", "shoulder_left", "shoulder_right", "knee_left", "knee_right"],
    ["Head", "Left Shoulder", "Right Shoulder", "Left Knee", "Right Knee"],
    ["r ankle", "r knee", "r hip", "l hip", "l knee", "l ankle", "pelvis"],      # MPII
    ["left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "head", "neck"],  # CrowdPose
    ["Knee-L", "Knee-R", "Spine"],
])
def test_flip_pairs_from_common_naming_schemes(names):
    flip = flip_indices_from_names(names)
    assert flip == _slow_flip(names)
    assert flip != list(range(len(names)))
    assert all(flip[flip[i]] == i for i in range(len(names)))


def test_coco_names_give_coco_flip_indices():
    assert flip_indices_from_names(COCO_KEYPOINTS) == list(COCO_FLIP_INDICES)
    assert flip_indices_from_names(["leftHand", "rightHand", "LeftFoot", "RightFoot"]) == [1, 0, 3, 2]


@pytest.mark.parametrize("names", [
    ["a", "b", "c"],                              # no side at all
    ["left_hand", "right_hand", "left_foot"],     # a side without its mirror
    ["lsho", "rsho", "lelb", "relb"],             # an unknown abbreviation scheme
    ["left_hand", "l_hand", "right_hand"],        # two names claim one mirror
])
def test_unknown_pairs_are_none_not_a_guess(names):
    assert flip_indices_from_names(names) is None


def test_resolve_records_unknown_pairs_and_default_sigmas(caplog):
    keypoint_meta._warned.clear()
    with caplog.at_level(logging.WARNING):
        meta = resolve_keypoint_meta(3, "x.json", names=["p0", "p1", "p2"])
        again = resolve_keypoint_meta(3, "x.json", names=["p0", "p1", "p2"])
    assert meta.flip_indices is None and "flip_indices" in meta.extra[FLIP_UNKNOWN]
    assert meta.sigmas == [0.05] * 3 and "set the dataset option sigmas" in meta.extra[SIGMAS_DEFAULT]
    assert again.extra == meta.extra
    assert caplog.text.count("no left/right pairs") == 1 and caplog.text.count("OKS sigmas unknown") == 1


def test_resolve_prefers_explicit_options_and_checks_them():
    meta = resolve_keypoint_meta(3, "x", names=["p0", "p1", "p2"], flip_indices=[0, 2, 1], sigmas=[0.1, 0.2, 0.3])
    assert meta.flip_indices == [0, 2, 1] and meta.sigmas == [0.1, 0.2, 0.3] and meta.extra == {}
    coco = resolve_keypoint_meta(17, "x", names=list(COCO_KEYPOINTS))
    assert coco.sigmas == list(COCO_SIGMAS) and coco.extra == {}
    assert resolve_keypoint_meta(3, "x", dataset_flip=[1, 0, 2]).flip_indices == [1, 0, 2]
    for bad in ({"flip_indices": [0, 1]}, {"flip_indices": [1, 2, 0]}, {"flip_indices": [0, 0, 1]},
                {"dataset_flip": [0, 1, 5]}, {"sigmas": [0.1, 0.1]}, {"sigmas": [0.1, -1, 0.1]}):
        with pytest.raises(ConfigError, match="x: "):
            resolve_keypoint_meta(3, "x", **bad)


def test_coco_keypoints_in_another_order_keep_cocos_sigmas_by_name():
    """COCO's 17 names reversed (and in OpenPose spelling): each keypoint keeps its own COCO sigma, as its flip
    pair is found by name; 17 names of which one is not COCO's fall back to the default, with the note."""
    order = list(reversed(range(17)))
    meta = resolve_keypoint_meta(17, "x", names=[COCO_KEYPOINTS[i] for i in order])
    assert meta.sigmas == [COCO_SIGMAS[i] for i in order] and SIGMAS_DEFAULT not in meta.extra
    assert meta.flip_indices == [order.index(COCO_FLIP_INDICES[i]) for i in order]
    openpose = resolve_keypoint_meta(17, "x", names=["RAnkle", "Nose", *COCO_KEYPOINTS[1:16]])
    assert openpose.sigmas == [COCO_SIGMAS[16], *COCO_SIGMAS[:16]]
    other = resolve_keypoint_meta(17, "x", names=["tail", *COCO_KEYPOINTS[1:]])
    assert other.sigmas == [keypoint_meta.DEFAULT_SIGMA] * 17 and SIGMAS_DEFAULT in other.extra


def _renamed_coco(tmp_path: Path, names) -> Path:
    data = json.loads(COCO_JSON.read_text())
    data["categories"][0]["keypoints"] = names
    for im in data["images"]:
        shutil.copy(COCO_JSON.parent / im["file_name"], tmp_path / im["file_name"])
    path = tmp_path / "kp.json"
    path.write_text(json.dumps(data))
    return path


@needs_data
def test_coco_dataset_flip_pairs_and_sigmas(tmp_path):
    openpose = ["Nose", "LEye", "REye", "LEar", "REar", "LShoulder", "RShoulder", "LElbow", "RElbow", "LWrist",
                "RWrist", "LHip", "RHip", "LKnee", "RKnee", "LAnkle", "RAnkle"]
    ds = ddkit.build("datasets", {"name": "coco", "annotations": str(_renamed_coco(tmp_path, openpose))})
    assert ds.info.flip_indices == list(COCO_FLIP_INDICES)
    assert ds.info.keypoint_sigmas == list(COCO_SIGMAS)  # the same 17 points under other names

    unknown = _renamed_coco(tmp_path, [f"kp{i}" for i in range(17)])
    ds = ddkit.build("datasets", {"name": "coco", "annotations": str(unknown)})
    assert ds.info.flip_indices is None and FLIP_UNKNOWN in ds.info.extra and SIGMAS_DEFAULT in ds.info.extra
    given = ddkit.build("datasets", {"name": "coco", "annotations": str(unknown),
                                     "flip_indices": list(COCO_FLIP_INDICES), "sigmas": [0.07] * 17})
    assert given.info.flip_indices == list(COCO_FLIP_INDICES) and given.info.keypoint_sigmas == [0.07] * 17
    assert FLIP_UNKNOWN not in given.info.extra and SIGMAS_DEFAULT not in given.info.extra
    with pytest.raises(ConfigError, match="sigmas or keypoint_sigmas"):
        ddkit.build("datasets", {"name": "coco", "annotations": str(unknown), "sigmas": [0.07] * 17,
                                 "keypoint_sigmas": [0.07] * 17})
    with pytest.raises(ConfigError, match="flip_indices"):
        ddkit.build("datasets", {"name": "coco", "annotations": str(unknown), "flip_indices": [0, 1]})


@needs_data
def test_yolo_pose_flip_idx_and_options(tmp_path):
    root = tmp_path / "pose"
    shutil.copytree(DATA / "coco8-pose", root)
    ds = ddkit.build("datasets", {"name": "yolo", "root": str(root)})
    assert ds.info.flip_indices == list(COCO_FLIP_INDICES) and ds.info.keypoint_sigmas == list(COCO_SIGMAS)
    assert SIGMAS_DEFAULT in ds.info.extra  # 17 unnamed points: COCO's sigmas assumed, and said so
    yaml_path = root / "coco8-pose.yaml"
    text = yaml_path.read_text()
    yaml_path.write_text("\n".join(ln for ln in text.splitlines() if not ln.startswith("flip_idx")) + "\n")
    ds = ddkit.build("datasets", {"name": "yolo", "root": str(root)})
    assert ds.info.flip_indices is None and FLIP_UNKNOWN in ds.info.extra
    ds = ddkit.build("datasets", {"name": "yolo", "root": str(root), "flip_indices": list(COCO_FLIP_INDICES)})
    assert ds.info.flip_indices == list(COCO_FLIP_INDICES)
    yaml_path.write_text(text.replace("flip_idx: [0, 2, 1,", "flip_idx: [0, 1,"))
    with pytest.raises(ConfigError, match="flip_idx"):
        ddkit.build("datasets", {"name": "yolo", "root": str(root)})


def test_require_flip_indices_asks_for_the_option():
    from ddkit.engine.keypoint_meta import require_flip_indices
    from ddkit.types import DatasetInfo

    meta = resolve_keypoint_meta(3, "kp.json", names=["p0", "p1", "p2"])
    info = DatasetInfo([{"id": 1, "name": "a"}], num_keypoints=3, flip_indices=meta.flip_indices, extra=meta.extra)
    with pytest.raises(ConfigError, match=r"label.transforms: hflip flips keypoints, but kp.json: no left/right "
                                          r"pairs found .* flip_indices"):
        require_flip_indices(info, "label.transforms: hflip")
    bare = DatasetInfo([{"id": 1, "name": "a"}], num_keypoints=4)
    with pytest.raises(ConfigError, match="4 keypoints have no known left/right pairs"):
        require_flip_indices(bare, "train.hflip")
    known = DatasetInfo([{"id": 1, "name": "a"}], num_keypoints=3, flip_indices=[0, 2, 1])
    assert require_flip_indices(known, "x") == [0, 2, 1]


def test_every_keypoint_dataset_takes_flip_indices():
    figures = ddkit.build("datasets", {"name": "synthetic_figures", "num_images": 2})
    assert figures.info.flip_indices == [0, 1, 3, 2, 4, 6, 5] and figures.info.keypoint_sigmas == [0.05] * 7
    given = ddkit.build("datasets", {"name": "synthetic_figures", "num_images": 2,
                                     "flip_indices": list(range(7)), "sigmas": [0.1] * 7})
    assert given.info.flip_indices == list(range(7)) and given.info.keypoint_sigmas == [0.1] * 7
    with pytest.raises(ConfigError, match="flip_indices"):
        ddkit.build("datasets", {"name": "synthetic_figures", "flip_indices": [0, 1]})
