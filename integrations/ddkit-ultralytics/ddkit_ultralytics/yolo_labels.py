"""ddkit's COCO pseudo-labels as an Ultralytics YOLO dataset, so that ``yolo train data=<out>/data.yaml`` (or ddkit's
own ``yolo`` dataset) trains on them.

    ddkit-yolo-labels runs/yolo_det_dd/label/pseudo_labels.json runs/yolo_det_dd/yolo_pseudo

Layout: ``<out>/images/<split>/<name>`` (symbolic links to the unlabeled images), ``<out>/labels/<split>/<stem>.txt``
with one row per pseudo-label, ``class cx cy w h [x y v]*K`` normalised by the image size (class = the category's
position in the file's ``categories``; keypoints ``v = 2`` selected, ``0`` not), and ``<out>/data.yaml`` (names,
``kpt_shape`` and ``flip_idx`` for keypoints). Images without pseudo-labels get an empty label file (background).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ddkit.errors import DataError
from ddkit.io import atomic_write_text


def _row(ann: dict[str, Any], cls: int, w: float, h: float) -> str:
    x, y, bw, bh = (float(v) for v in ann["bbox"])
    vals = [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]
    kps = ann.get("keypoints") or []
    for i in range(0, len(kps), 3):
        v = int(kps[i + 2])
        vals += [kps[i] / w if v else 0.0, kps[i + 1] / h if v else 0.0, v]
    return " ".join([str(cls)] + [f"{v:.6f}" if isinstance(v, float) else str(v) for v in vals])


def write_yolo_labels(pseudo_json: str | Path, out_dir: str | Path, split: str = "pseudo",
                      image_root: str | Path | None = None) -> Path:
    """Write the YOLO dataset of ``pseudo_json`` (a ddkit ``pseudo_labels.json``) under ``out_dir``; return its
    ``data.yaml``. ``image_root`` resolves relative ``file_name`` entries (default: the file's ``image_root``)."""
    import yaml

    coco = json.loads(Path(pseudo_json).read_text())
    if "images" not in coco or "categories" not in coco:
        raise DataError(f"{pseudo_json}: not a ddkit COCO pseudo-label file (no images/categories)")
    out = Path(out_dir)
    img_dir, lab_dir = out / "images" / split, out / "labels" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    cls_of = {int(c["id"]): i for i, c in enumerate(coco["categories"])}
    root = Path(image_root or (coco.get("info") or {}).get("image_root") or ".")
    rows: dict[int, list[str]] = {int(im["id"]): [] for im in coco["images"]}
    sizes = {int(im["id"]): (float(im["width"]), float(im["height"])) for im in coco["images"]}
    for ann in coco.get("annotations", []):
        w, h = sizes[int(ann["image_id"])]
        rows[int(ann["image_id"])].append(_row(ann, cls_of[int(ann["category_id"])], w, h))
    for im in coco["images"]:
        src = Path(im["file_name"])
        src = src if src.is_absolute() else root / src
        link = img_dir / src.name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(src.resolve(), link)
        atomic_write_text(lab_dir / (link.stem + ".txt"), "".join(r + "\n" for r in rows[int(im["id"])]))
    meta: dict[str, Any] = {"path": str(out.resolve()), "train": f"images/{split}", "val": f"images/{split}",
                            "names": {i: str(c.get("name", c["id"])) for i, c in enumerate(coco["categories"])}}
    info = ((coco.get("info") or {}).get("dataset_info") or {})
    if info.get("num_keypoints"):
        meta["kpt_shape"] = [int(info["num_keypoints"]), 3]
        meta["flip_idx"] = list(info.get("flip_indices") or range(int(info["num_keypoints"])))
    data_yaml = out / "data.yaml"
    atomic_write_text(data_yaml, yaml.safe_dump(meta, sort_keys=False))
    return data_yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddkit-yolo-labels", description=__doc__.splitlines()[0])
    parser.add_argument("pseudo_json", help="a ddkit pseudo_labels.json")
    parser.add_argument("output", help="the folder of the YOLO dataset to write")
    parser.add_argument("--split", default="pseudo")
    parser.add_argument("--image-root", help="folder of relative file_name entries")
    args = parser.parse_args(argv)
    try:
        data_yaml = write_yolo_labels(args.pseudo_json, args.output, args.split, args.image_root)
    except DataError as err:
        parser.exit(2, f"ddkit-yolo-labels: {err}\n")
    print(f"wrote {data_yaml} (yolo train data={data_yaml})")
    return 0
