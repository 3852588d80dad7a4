"""Pseudo-labels as a YOLO dataset an Ultralytics user trains on directly (``label.format: yolo | both``).

:func:`write_yolo_dataset` turns the COCO pseudo-label dict that ``ddkit label`` writes (``label/pseudo_labels.json``)
into::

    OUT/images/pseudo/<name>.jpg     links to (or copies of) the unlabeled images
    OUT/labels/pseudo/<name>.txt     one row per instance: ``cls cx cy w h`` normalised to [0, 1]; pose rows add
                                     ``x y v`` per keypoint (normalised, ``v`` 0 = not labelled, 2 = labelled)
    OUT/images/labeled, labels/labeled   the labeled images and their ground truth (optional merge)
    OUT/data.yaml                    ``path``, ``train``, ``val``, ``names``, ``kpt_shape``, ``flip_idx``; comments
                                     state the counts and the labeled : pseudo ratio

Class indices are positions in ``info.categories`` (YOLO classes are ``0..C-1``); the original category ids are kept
in ``data.yaml`` as ``ddkit_category_ids``. The folder is built beside ``OUT`` and renamed into place, so a kill
leaves either the old dataset or the complete new one; an existing ``OUT`` is replaced only if ddkit wrote it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from ddkit.engine.coco_file import CocoFile, validate_coco
from ddkit.errors import ConfigError, DataError
from ddkit.io import _umask, atomic_write_text
from ddkit.types import DatasetInfo

IMAGE_MODES = ("symlink", "copy", "hardlink")
MARKER = "# written by ddkit (ddkit.engine.yolo_export)"


def yolo_rows(anns: Sequence[Mapping[str, Any]], size: tuple[int, int], class_index: Mapping[int, int],
              num_keypoints: int | None) -> list[str]:
    """YOLO label rows of one image's COCO annotations (``bbox`` ``[x, y, w, h]`` pixels, ``keypoints``
    ``[x, y, v] * K``); ``size`` is ``(H, W)``. Pure."""
    h, w = size
    rows = []
    for a in anns:
        x, y, bw, bh = (float(v) for v in a["bbox"])
        vals = [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]
        row = [str(class_index[int(a["category_id"])])] + [f"{v:.6f}" for v in vals]
        if num_keypoints:
            kp = a.get("keypoints") or [0] * (3 * num_keypoints)
            for k in range(num_keypoints):
                kx, ky, v = kp[3 * k: 3 * k + 3]
                row += ["0", "0", "0"] if v <= 0 else [f"{kx / w:.6f}", f"{ky / h:.6f}", str(int(round(v)))]
        rows.append(" ".join(row))
    return rows


def pseudo_image_paths(pseudo: Mapping[str, Any], image_root: str | Path | None = None) -> dict[int, Path]:
    """``{image id: file}`` of a pseudo-label dict: absolute ``file_name`` values as they are, relative ones under
    ``image_root`` (default: the file's ``info.image_root``, the labelled source's folder)."""
    root = image_root if image_root is not None else (pseudo.get("info") or {}).get("image_root")
    out = {}
    for im in pseudo.get("images") or []:
        name = Path(str(im["file_name"]))
        if not name.is_absolute():
            if root is None:
                raise DataError(f"pseudo labels: image {im['id']} has file_name {str(name)!r} and the file names no "
                                f"image_root; pass image_paths (a YOLO dataset needs image files)")
            name = Path(root) / name
        out[int(im["id"])] = name
    return out


def _place_image(src: Path, dst: Path, mode: str) -> None:
    if not src.is_file():
        raise DataError(f"{src}: image not found (needed for the YOLO dataset)")
    if mode == "symlink":
        os.symlink(src.resolve(), dst)
    elif mode == "hardlink":
        try:
            os.link(src, dst)
        except OSError:  # another file system: copy instead
            shutil.copy2(src, dst)
    else:
        shutil.copy2(src, dst)


def unique_name(name: str, used: set[str], image_id: int) -> str:
    """``name``, or ``name_<image id>`` when an earlier image took it (``x.jpg`` and ``x.png``, or two folders'
    ``frame_1.jpg``, would share one label file); the result is added to ``used``."""
    out = name if name not in used else f"{name}_{image_id}"
    used.add(out)
    return out


def _write_part(coco: CocoFile, paths: Mapping[int, str | Path], root: Path, part: str, class_index: Mapping[int, int],
                k: int | None, mode: str, skip_empty: bool) -> tuple[int, int]:
    """Images and label files of one part (``pseudo`` or ``labeled``); returns ``(images, instances)``."""
    img_dir, lab_dir = root / "images" / part, root / "labels" / part
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    by_image = coco.annotations_by_image()
    used: set[str] = set()
    n_images = n_inst = 0
    for im in sorted(coco.images, key=lambda r: r["id"]):
        # crowd regions are not objects to detect: left out, as Ultralytics' own COCO conversion does
        anns = [a for a in by_image[int(im["id"])] if not a.get("iscrowd")]
        if skip_empty and not anns:
            continue
        if int(im["id"]) not in paths:
            raise ConfigError(f"{coco.path}: image id {im['id']} has no image file (image_paths lacks it)")
        src = Path(paths[int(im["id"])])
        name = unique_name(src.stem, used, int(im["id"]))
        _place_image(src, img_dir / f"{name}{src.suffix.lower() or '.jpg'}", mode)
        rows = yolo_rows(anns, (int(im["height"]), int(im["width"])), class_index, k)
        (lab_dir / f"{name}.txt").write_text("".join(r + "\n" for r in rows))
        n_images += 1
        n_inst += len(rows)
    return n_images, n_inst


def class_keys(info: DatasetInfo) -> dict[str, Any]:
    """The ``data.yaml`` keys of ``info``'s classes: ``names`` (class index = position in ``info.categories``),
    ``kpt_shape`` and ``flip_idx`` for keypoints, and ``ddkit_category_ids`` (index -> category id, for mapping
    YOLO classes back to COCO ids)."""
    doc: dict[str, Any] = {"names": {i: str(c.get("name", c["id"])) for i, c in enumerate(info.categories)}}
    if info.num_keypoints:
        doc["kpt_shape"] = [int(info.num_keypoints), 3]
        if info.flip_indices is not None:
            doc["flip_idx"] = [int(i) for i in info.flip_indices]
    doc["ddkit_category_ids"] = [int(c["id"]) for c in info.categories]
    return doc


def _data_yaml(root_final: Path, info: DatasetInfo, parts: Mapping[str, tuple[int, int]],
               mix_ratio: float | None) -> str:
    import yaml

    train = [f"images/{p}" for p in ("labeled", "pseudo") if p in parts]
    val = "images/labeled" if "labeled" in parts else "images/pseudo"
    doc: dict[str, Any] = {"path": str(root_final.resolve()), "train": train[0] if len(train) == 1 else train,
                           "val": val, "nc": info.num_classes, **class_keys(info)}
    lines = [MARKER]
    for part, (n_img, n_inst) in parts.items():
        lines.append(f"# {part}: {n_img} images, {n_inst} instances")
    if "labeled" in parts and parts["pseudo"][0]:
        lab, pse = parts["labeled"][0], parts["pseudo"][0]
        lines.append(f"# labeled : pseudo-labeled = {lab / (lab + pse):.2f} : {pse / (lab + pse):.2f} by image count "
                     f"(every image once per epoch)")
    if mix_ratio is not None:
        lines.append(f"# ddkit's own student mixed labeled : pseudo = {mix_ratio:g} : {1 - mix_ratio:g} per batch")
    lines.append(f"# val is {val}: point it at a held-out set for a real validation score")
    if info.num_keypoints and info.flip_indices is None:
        lines.append("# flip_idx unknown (no left/right pairs in the keypoint names): set it before flip augmentation")
    return "\n".join(lines) + "\n" + yaml.safe_dump(doc, sort_keys=False)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` goes only if ddkit wrote it."""
    if out.exists():
        marker = out / "data.yaml"
        if not (marker.is_file() and marker.read_text().startswith(MARKER)):
            raise ConfigError(f"{out}: exists and is not a YOLO dataset written by ddkit; choose another folder")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_yolo_dataset(pseudo: Mapping[str, Any], image_paths: Mapping[int, str | Path] | None,
                       out_dir: str | Path, *, info: DatasetInfo, images: str = "symlink",
                       labeled: Mapping[str, Any] | None = None,
                       labeled_paths: Mapping[int, str | Path] | None = None, skip_empty: bool = False,
                       mix_ratio: float | None = None) -> Path:
    """Write pseudo-labels (and optionally the labeled set) as a YOLO dataset (see the module docstring).

    Args:
        pseudo: the COCO pseudo-label dict (``label/pseudo_labels.json``); validated like every COCO input.
        image_paths: ``{image id: image file}`` of the pseudo-labelled images (``None``:
            :func:`pseudo_image_paths`).
        out_dir: the dataset folder to write (replaced atomically when ddkit wrote it before).
        info: the dataset info (categories give the class order; ``num_keypoints``, ``flip_indices``).
        images: ``symlink`` (default), ``hardlink`` (falls back to a copy) or ``copy``.
        labeled: the labeled ground truth as a COCO dict, merged as the ``labeled`` part; ``labeled_paths`` its files.
        skip_empty: leave out images without any instance (default: kept as background images).
        mix_ratio: the labeled fraction of ddkit's own minibatches, stated in ``data.yaml``.

    Returns:
        the path of ``data.yaml``.
    """
    if images not in IMAGE_MODES:
        raise ConfigError(f"label.yolo images: {images!r} is not one of {', '.join(IMAGE_MODES)}")
    if (labeled is None) != (labeled_paths is None):
        raise ConfigError("write_yolo_dataset: pass labeled and labeled_paths together")
    class_index = {int(c["id"]): i for i, c in enumerate(info.categories)}
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    sources = {"pseudo": (pseudo, image_paths if image_paths is not None else pseudo_image_paths(pseudo))}
    if labeled is not None:
        sources = {"labeled": (labeled, labeled_paths), **sources}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the dataset is an ordinary folder
        parts = {}
        for part, (data, paths) in sources.items():
            coco = validate_coco(dict(data), Path(f"{part} labels"), allow_outside_root=True, need_annotations=False)
            unknown = {int(a["category_id"]) for a in coco.annotations} - set(class_index)
            if unknown:
                raise DataError(f"{part} labels: category ids {sorted(unknown)} are not in the dataset's categories")
            parts[part] = _write_part(coco, paths, tmp, part, class_index, info.num_keypoints, images, skip_empty)
        atomic_write_text(tmp / "data.yaml", _data_yaml(out, info, parts, mix_ratio))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "data.yaml"
