"""``ddkit predict CHECKPOINT IMAGES [--tta] [--format coco|yolo] -o OUT``: predictions for a folder of images.

``CHECKPOINT`` is a model file, a stage folder or a `ddkit run` folder (its final student). With ``--tta`` the
views and aggregator are the labelling engine's (``--transforms`` / ``--aggregator``, default: the image and its
mirror). Output in ``OUT``:

* ``coco`` (default): ``predictions.json``, COCO results (``image_id, category_id, bbox [x, y, w, h], score``,
  ``keypoints``), and ``images.json`` (``images`` with ids and file names, ``categories``); a classifier writes
  ``image_id, file_name, category_id, score`` per image;
* ``yolo``: ``labels/<image>.txt`` as Ultralytics' ``save_txt`` with ``save_conf``: ``class cx cy w h`` normalised,
  for pose then ``x y conf`` per keypoint, then the score; ``data.yaml`` gives the class names (and ``kpt_shape``).

Unreadable images are skipped and named.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ddkit.errors import ConfigError

HELP = "predict on a folder of images (plain or multi-transform) as COCO results or YOLO txt files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a model file, a stage folder, or a `ddkit run` folder (final student)")
    parser.add_argument("images", help="a folder of images (searched recursively)")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--format", choices=("coco", "yolo"), default="coco")
    parser.add_argument("--tta", action="store_true", help="multi-transform inference, as labelling does")
    parser.add_argument("--transforms", help="TTA views as YAML, e.g. '[{name: identity}, {name: hflip}]'")
    parser.add_argument("--aggregator", help="TTA aggregator as YAML, e.g. '{name: wbf}'")
    parser.add_argument("--min-score", type=float, default=0.0, help="drop instances scored below this")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: auto)")


def _model(arg: str) -> tuple[Any, str]:
    from ddkit.engine.checkpoint import resolve_checkpoint
    from ddkit.engine.run_folder import describe_stage, final_student, is_run_folder

    if is_run_folder(arg):
        path, stage, _ = final_student(arg)
        return path, f"{describe_stage(stage)} of {arg}"
    path = resolve_checkpoint(arg)
    return path, str(path)


def _yolo_line(inst: Any, j: int, cls: int, h: int, w: int) -> str:
    """One Ultralytics ``save_txt`` line (normalised ``cx cy w h``, keypoints ``x y conf``, then the score)."""
    x1, y1, x2, y2 = (float(v) for v in inst.boxes[j])
    vals = [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]
    if inst.keypoints is not None:
        for x, y, c in inst.keypoints[j].tolist():
            vals += [x / w, y / h, c]
    vals.append(float(inst.scores[j]))
    return " ".join([str(cls)] + [f"{v:.6g}" for v in vals])


class _Writer:
    """Collects one image's predictions at a time and writes the chosen format at the end."""

    def __init__(self, out: Path, fmt: str, info: Any, is_classifier: bool):
        if fmt == "yolo" and is_classifier:  # the command's own choices, not a plugin name
            raise ConfigError("--format yolo writes boxes (and keypoints); a classifier's predictions are COCO-style "
                              "image labels: use --format coco")
        self.out, self.fmt, self.info = out, fmt, info
        self.index = {int(c["id"]): k for k, c in enumerate(info.categories)}
        self.images: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []

    def add_label(self, image_id: int, file_name: str, category_id: int, score: float) -> None:
        self.images.append({"id": image_id, "file_name": file_name})
        self.results.append({"image_id": image_id, "file_name": file_name, "category_id": category_id,
                             "score": score})

    def add_instances(self, image_id: int, file_name: str, inst: Any, h: int, w: int) -> None:
        from ddkit.engine.coco_results import keypoint_results
        from ddkit.io import atomic_write_text

        self.images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        if self.fmt == "coco":
            self.results += keypoint_results(image_id, inst)
            return
        lines = [_yolo_line(inst, j, self.index[int(inst.labels[j])], h, w) for j in range(len(inst))]
        atomic_write_text(self.out / "labels" / Path(file_name).with_suffix(".txt"), "".join(f"{s}\n" for s in lines))

    def finish(self) -> list[Path]:
        import yaml

        from ddkit.io import atomic_write_json, atomic_write_text

        if self.fmt == "coco":
            return [atomic_write_json(self.out / "predictions.json", self.results),
                    atomic_write_json(self.out / "images.json",
                                      {"images": self.images, "categories": self.info.categories})]
        data: dict[str, Any] = {"names": {k: str(c.get("name")) for k, c in enumerate(self.info.categories)}}
        if self.info.num_keypoints:
            data["kpt_shape"] = [int(self.info.num_keypoints), 3]
            if self.info.flip_indices:
                data["flip_idx"] = list(self.info.flip_indices)
        return [atomic_write_text(self.out / "data.yaml", yaml.safe_dump(data, sort_keys=False)), self.out / "labels"]


def _predict_all(predictor: Any, source: Any, writer: _Writer, batch_size: int, min_score: float) -> list[str]:
    """Predict every image of ``source`` in batches; returns the unreadable files with why."""
    skipped: list[str] = []
    n = len(source)
    for start in range(0, n, batch_size):
        items = [source.load(i) for i in range(start, min(n, start + batch_size))]
        skipped += [f"{it.file_name} ({it.reason})" for it in items if it.image is None]
        items = [it for it in items if it.image is not None]
        if not items:
            continue
        images = [it.image for it in items]
        if predictor.gives_probs:
            for it, (cat, score) in zip(items, predictor.labels(images)):
                writer.add_label(it.image_id, it.file_name, cat, score)
            continue
        for it, inst in zip(items, predictor.predict(images)):
            inst = inst[inst.scores >= min_score] if min_score > 0 else inst
            writer.add_instances(it.image_id, it.file_name, inst, int(it.image.shape[-2]), int(it.image.shape[-1]))
    return skipped


def _strategies(args: argparse.Namespace, task: Any, info: Any) -> Any:
    if not args.tta:
        return None
    import yaml

    from ddkit.engine.evaluate import tta_block, tta_strategies

    transforms = yaml.safe_load(args.transforms) if args.transforms else None
    aggregator = yaml.safe_load(args.aggregator) if args.aggregator else None
    return tta_strategies(task, info, tta_block(transforms, aggregator))


def run(args: argparse.Namespace) -> int:
    from ddkit.engine.checkpoint import load_model
    from ddkit.engine.evaluate import Predictor
    from ddkit.engine.label import FolderSource
    from ddkit.runtime import resolve_device

    if not Path(args.images).is_dir():
        raise ConfigError(f"{args.images}: not a folder of images")
    path, what = _model(args.checkpoint)
    device = resolve_device(args.device)
    task, model, info = load_model(path, device=device)
    source = FolderSource(args.images, image_shape=info.extra.get("image_shape"))
    if not len(source):
        raise ConfigError(f"{args.images}: no image files in this folder")
    strategies = _strategies(args, task, info)
    predictor = Predictor(task, model, info, strategies, device)
    out = Path(args.output)
    writer = _Writer(out, args.format, info, predictor.gives_probs)
    views = f"{len(strategies.views)} views ({', '.join(strategies.view_names)})" if strategies else "1 view"
    print(f"predicting {len(source)} images of {args.images} with {what}, {views}")
    skipped = _predict_all(predictor, source, writer, args.batch_size, args.min_score)
    written = writer.finish()
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s): {', '.join(skipped[:5])}")
    print(f"wrote {', '.join(str(p) for p in written)} ({len(writer.images)} images)")
    return 0
