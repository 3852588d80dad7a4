"""``ddkit predict CHECKPOINT IMAGES [--coco FILE.json] [--tta] [--format coco|yolo] -o OUT``: predictions for an
image or a folder of images.

``CHECKPOINT`` is a model file, a stage folder or a `ddkit run` folder (its final student); with
``--trust-checkpoint`` also another library's pickled checkpoint that a model plugin opens (an Ultralytics
``best.pt``), as it is. ``IMAGES`` is one image file (image id 0) or a folder searched recursively (ids ``0..N-1`` in
path order); with ``--coco FILE.json`` the images are that COCO file's, its ``file_name`` values relative to the
folder ``IMAGES``, and the results carry its image ids (to evaluate against, or ``ddkit fuse --images FILE.json``
with, that file). With ``--tta`` the views and aggregator are the labelling engine's: ``--transforms`` /
``--aggregator``, else, for a run folder or one of its stage folders, the run's recipe (``evaluate`` then ``label``
section) as ``ddkit eval RUN --tta`` uses, else the image and its mirror. Output in ``OUT``:

* ``coco`` (default): ``predictions.json``, COCO results (``image_id, category_id, bbox [x, y, w, h], score``,
  ``keypoints`` as ``x, y, 1``, as torchvision writes them: pycocotools ignores the third value), and ``images.json``
  (``images`` with ids and file names, ``categories``: the ids the results carry, ``--coco``'s when they were
  matched by name); a classifier writes ``image_id, file_name, category_id, score`` per image;
* ``yolo``: ``labels/<image>.txt`` (``<image>_<id>.txt`` for a second image of that name, as the pseudo-label
  YOLO export names them) as Ultralytics' ``save_txt`` with ``save_conf``: ``class cx cy w h`` normalised,
  for pose then ``x y conf`` per keypoint (conf a probability in [0, 1]: a Keypoint R-CNN's heatmap logit through
  a sigmoid, a YOLO pose model's as it is), then the score; ``data.yaml`` gives the class names, ``kpt_shape``
  and ``ddkit_category_ids`` (class index -> category id), as the pseudo-label YOLO export writes them.

Files in ``labels/`` or ``images/`` that an earlier prediction into ``OUT`` wrote for other images are named in a
warning, not deleted. Unreadable images, and images of the COCO file missing under ``IMAGES``, are skipped and
named.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ddkit.commands.eval import TRUST_HELP, TRUST_HINT
from ddkit.errors import ConfigError, DataError

log = logging.getLogger("ddkit.predict")

HELP = "predict on an image, a folder or a COCO file's images (plain or multi-transform) as COCO results or YOLO txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a model file, a stage folder, or a `ddkit run` folder (final student)")
    parser.add_argument("images", help="an image file, or a folder of images (searched recursively; with --coco, "
                                        "the folder its file_name values are relative to)")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--coco", metavar="FILE.json", help="predict the images of this COCO file, with its image "
                                                             "ids (to evaluate or fuse the results against it)")
    parser.add_argument("--format", choices=("coco", "yolo"), default="coco")
    parser.add_argument("--tta", action="store_true", help="multi-transform inference, as labelling does (views: "
                                                           "--transforms, else a run folder's recipe, else "
                                                           "identity + hflip)")
    parser.add_argument("--transforms", help="TTA views as YAML, e.g. '[{name: identity}, {name: hflip}]'")
    parser.add_argument("--aggregator", help="TTA aggregator as YAML, e.g. '{name: wbf}'")
    parser.add_argument("--min-score", type=float, default=0.0, help="drop instances scored below this")
    parser.add_argument("--save-images", action="store_true", help="also write each image with its predictions "
                                                                   "drawn, as OUT/images/<name>.jpg")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: auto)")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)


def _model(arg: str) -> tuple[Any, str]:
    from ddkit.engine.checkpoint import resolve_checkpoint
    from ddkit.engine.run_folder import describe_stage, final_student, is_run_folder

    if is_run_folder(arg):
        path, stage, _ = final_student(arg)
        return path, f"{describe_stage(stage)} of {arg}"
    path = resolve_checkpoint(arg)
    return path, str(path)


def _yolo_line(inst: Any, j: int, cls: int, h: int, w: int, kpt_logits: bool = False) -> str:
    """One Ultralytics ``save_txt`` line (normalised ``cx cy w h``, keypoints ``x y conf``, then the score);
    ``kpt_logits``: the keypoint scores are logits, written as their sigmoid (Ultralytics' conf is a probability)."""
    x1, y1, x2, y2 = (float(v) for v in inst.boxes[j])
    vals = [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]
    if inst.keypoints is not None:
        kps = inst.keypoints[j].float()
        conf = kps[:, 2].sigmoid() if kpt_logits else kps[:, 2]
        for (x, y), c in zip(kps[:, :2].tolist(), conf.tolist()):
            vals += [x / w, y / h, c]
    vals.append(float(inst.scores[j]))
    return " ".join([str(cls)] + [f"{v:.6g}" for v in vals])


class _Writer:
    """Collects one image's predictions at a time and writes the chosen format at the end (with ``draw``, each image
    with its predictions drawn at once)."""

    def __init__(self, out: Path, fmt: str, info: Any, is_classifier: bool, root: str | None = None,
                 draw: bool = False, kpt_logits: bool = False,
                 categories: list[dict[str, Any]] | None = None):
        """``categories``: those of the ids the results carry when they are not the model's (``--coco``'s,
        matched by name); ``kpt_logits``: the model's keypoint scores are logits (:func:`_yolo_line`)."""
        import dataclasses

        from ddkit.engine.draw import category_colors

        if fmt == "yolo" and is_classifier:  # the command's own choices, not a plugin name
            raise ConfigError("--format yolo writes boxes (and keypoints); a classifier's predictions are COCO-style "
                              "image labels: use --format coco")
        self.out, self.fmt, self.info, self.root, self.draw = out, fmt, info, root, draw
        self.kpt_logits = kpt_logits
        self.index = {int(c["id"]): k for k, c in enumerate(info.categories)}
        # the results' own categories, so that images.json names the ids predictions.json carries
        self.written_info = dataclasses.replace(info, categories=list(categories)) if categories else info
        self.names = {int(c["id"]): str(c.get("name")) for c in self.written_info.categories}
        self.colors = category_colors(sorted(self.names))
        self.images: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []
        self.stems: set[str] = set()  # output names (paths below OUT without suffix), kept unique
        self.stem_of: dict[int, str] = {}
        self.renamed: list[tuple[str, str]] = []  # (file name, output name) of images named after their id

    def add_label(self, image_id: int, file_name: str, image: Any, category_id: int, score: float) -> None:
        self.images.append({"id": image_id, "file_name": file_name})
        # the class name beside its id: a classifier's ids follow the sorted folder names ("10" before "2")
        self.results.append({"image_id": image_id, "file_name": file_name, "category_id": category_id,
                             "category_name": self.names[category_id], "score": score})
        h, w = image.shape[-2:]  # the label on a frame around the whole image, as Ultralytics' classify plots it
        # a small image (a 28 px digit) is enlarged first, or the label would cover half of it
        self._draw(image_id, file_name, image, [{"bbox": [0, 0, w, h], "category_id": category_id, "score": score}],
                   upscale=True)

    def add_instances(self, image_id: int, file_name: str, image: Any, inst: Any) -> None:
        from ddkit.engine.coco_results import keypoint_results
        from ddkit.io import atomic_write_text

        h, w = (int(v) for v in image.shape[-2:])
        self.images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        rows = keypoint_results(image_id, inst)
        self._draw(image_id, file_name, image, rows)
        if self.fmt == "coco":
            self.results += rows
            return
        lines = [_yolo_line(inst, j, self.index[int(inst.labels[j])], h, w, self.kpt_logits)
                 for j in range(len(inst))]
        atomic_write_text(self.out / "labels" / f"{self._stem(image_id, file_name)}.txt",
                          "".join(f"{s}\n" for s in lines))

    def _stem(self, image_id: int, file_name: str) -> str:
        """The image's output name without suffix: its path below IMAGES (``<name>_<id>`` for a second image of
        that name, as the pseudo-label YOLO export names them); the same for its label file and drawn image."""
        from ddkit.engine.yolo_export import unique_name

        if image_id not in self.stem_of:
            name = Path(file_name)
            if name.is_absolute():  # a COCO file_name may be absolute (inside IMAGES): its path below IMAGES
                resolved = name.resolve()
                name = resolved.relative_to(self.root) if self.root and resolved.is_relative_to(self.root) else \
                    Path(*name.parts[1:])
            stem = unique_name(str(name.with_suffix("")), self.stems, image_id)
            if stem != str(name.with_suffix("")):
                self.renamed.append((file_name, stem))
            self.stem_of[image_id] = stem
        return self.stem_of[image_id]

    def _draw(self, image_id: int, file_name: str, image: Any, rows: list[dict[str, Any]],
              upscale: bool = False) -> None:
        if not self.draw:
            return
        import io

        from PIL import Image

        from ddkit.engine.draw import draw_instances
        from ddkit.io import atomic_write_bytes

        skeleton = [tuple(e) for e in self.info.extra.get("skeleton") or []]
        drawn = draw_instances(image, rows, self.names, self.colors, skeleton, upscale=upscale)
        buf = io.BytesIO()
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=90)
        atomic_write_bytes(self.out / "images" / f"{self._stem(image_id, file_name)}.jpg", buf.getvalue())

    def _warn_stale(self) -> None:
        """Files in ``labels/`` or ``images/`` that this prediction did not write are an earlier one's: a YOLO
        training on the folder would take them as labels. They are said, not deleted (they may be the user's)."""
        written = {"labels": ".txt" if self.fmt == "yolo" else None, "images": ".jpg" if self.draw else None}
        for sub, suffix in written.items():
            folder = self.out / sub
            ours = {f"{stem}{suffix}" for stem in self.stem_of.values()} if suffix else set()
            stale = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                           if p.is_file() and str(p.relative_to(folder)) not in ours) if folder.is_dir() else []
            if stale:
                print(f"warning: {folder} holds {len(stale)} file(s) of an earlier prediction (e.g. {stale[0]}), "
                      "not of these images; delete them or predict into a new -o folder")

    def finish(self) -> list[Path]:
        import yaml

        from ddkit.engine.pseudo import coco_categories
        from ddkit.engine.yolo_export import class_keys
        from ddkit.io import atomic_write_json, atomic_write_text

        if self.renamed:  # Ultralytics finds a label by the image's name: say which ones differ
            kind, where = ("label file(s)", "labels/{}.txt") if self.fmt == "yolo" else \
                ("drawn image(s)", "images/{}.jpg")
            log.warning("%d %s named after the image id: another image has the same name (e.g. %s -> %s)",
                        len(self.renamed), kind, self.renamed[0][0], where.format(self.renamed[0][1]))
        drawn = [self.out / "images"] if self.draw else []
        self._warn_stale()
        if self.fmt == "coco":
            return [atomic_write_json(self.out / "predictions.json", self.results),
                    atomic_write_json(self.out / "images.json", {"info": {}, "images": self.images,
                                                                 "categories": coco_categories(self.written_info)})
                    ] + drawn
        data = class_keys(self.info)  # the label export's keys: YOLO class index -> name and COCO category id
        return [atomic_write_text(self.out / "data.yaml", yaml.safe_dump(data, sort_keys=False)),
                self.out / "labels"] + drawn


def _source(args: argparse.Namespace) -> Any:
    """The images to predict: ``--coco``'s (under the folder ``IMAGES``), one image file, or a folder's (the paths
    were checked by :func:`_check_paths`), as read; the predictor fits them to a fixed-size model's input."""
    from ddkit.engine.label import IMAGE_EXTENSIONS, CocoSource, FolderSource

    images = Path(args.images)
    if args.coco:
        source = CocoSource(args.coco, images)
        if not len(source):
            raise ConfigError(f"--coco {args.coco}: its 'images' list is empty")
        return source
    if images.is_file():
        if images.suffix.lower() not in IMAGE_EXTENSIONS:
            hint = "; a COCO file's images: IMAGES_FOLDER --coco FILE.json" if images.suffix.lower() == ".json" else ""
            raise ConfigError(f"{images}: neither an image file ({' '.join(IMAGE_EXTENSIONS)}) nor a folder{hint}")
        return FolderSource(images.parent, files=[images.name])
    source = FolderSource(images)
    if not len(source):
        raise ConfigError(f"{images}: no image files in this folder")
    return source


def _check_paths(args: argparse.Namespace) -> None:
    """``IMAGES`` and ``--coco`` exist and fit together, before the model is read."""
    if args.coco and not Path(args.coco).is_file():
        raise ConfigError(f"--coco {args.coco}: no such file")
    if not Path(args.images).exists():
        raise ConfigError(f"{args.images}: no such image file or folder")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise ConfigError(f"-o {args.output}: an existing file; -o names the folder to write the predictions into")
    if args.coco and not Path(args.images).is_dir():
        raise ConfigError(f"{args.images}: with --coco, IMAGES is the folder that the COCO file's file_name values "
                          "are relative to")


def _coco_categories(source: Any, info: Any, coco: str) -> dict[int, int] | None:
    """``--coco``'s category ids for the model's, matched by name (:func:`ddkit.engine.evaluate.category_map`), so
    that the results score against that file; ``None`` (the model's ids kept, with a note) when they do not match."""
    import dataclasses

    from ddkit.engine.evaluate import category_map

    theirs = list(getattr(source, "categories", None) or [])
    if not theirs:
        return None
    try:
        categories = category_map(info, dataclasses.replace(info, categories=theirs), "the model", f"--coco {coco}",
                                  by_name=True)
    except ConfigError:
        pairs = [(int(c["id"]), str(c.get("name"))) for c in theirs]
        print(f"note: --coco {coco}: its categories {pairs[:4]}{'...' if len(pairs) > 4 else ''} are not all among "
              f"the model's class names; the results' category_id are the model's")
        return None
    if categories is not None:
        print(f"--coco {coco}: the results carry its category ids, matched by name ({len(categories)} of the model's "
              f"{len(info.categories)} classes; the others are not written)")
    return categories


def _why(source: Any, item: Any) -> str:
    root = getattr(source, "image_root", None)
    if root is not None and not (Path(root) / item.file_name).is_file():
        return f"{item.file_name} (not found under {root})"
    return f"{item.file_name} ({item.reason})"


def _predict_all(predictor: Any, source: Any, writer: _Writer, batch_size: int, min_score: float,
                 categories: dict[int, int] | None = None) -> list[str]:
    """Predict every image of ``source`` in batches (instances relabelled by ``categories``, the model's id -> the
    COCO file's); returns the unreadable or missing files with why."""
    from ddkit.engine.evaluate import relabel

    skipped: list[str] = []
    n = len(source)
    for start in range(0, n, batch_size):
        items = [source.load(i) for i in range(start, min(n, start + batch_size))]
        skipped += [_why(source, it) for it in items if it.image is None]
        items = [it for it in items if it.image is not None]
        if not items:
            continue
        images = [it.image for it in items]
        if predictor.gives_probs:
            for it, (cat, score) in zip(items, predictor.labels(images)):
                writer.add_label(it.image_id, it.file_name, it.image, cat, score)
            continue
        for it, inst in zip(items, predictor.predict(images)):
            inst = inst[inst.scores >= min_score] if min_score > 0 else inst
            inst = relabel(inst, categories) if categories is not None else inst
            writer.add_instances(it.image_id, it.file_name, it.image, inst)
    return skipped


def _strategies(args: argparse.Namespace, task: Any, info: Any) -> tuple[Any, str]:
    """``(strategies, where their views and aggregator came from)`` of ``--tta`` as ``ddkit eval`` builds them (the
    run recipe's, given, or the defaults); ``(None, "")`` without it."""
    if not args.tta:
        return None, ""
    from ddkit.commands.eval import saved_recipe, tta_from_args, tta_origin

    cfg, saved = saved_recipe(args.checkpoint)
    return tta_from_args(args, task, info, cfg)[0], tta_origin(args, cfg, saved)


def run(args: argparse.Namespace) -> int:
    from ddkit.engine.checkpoint import load_model
    from ddkit.engine.evaluate import Predictor
    from ddkit.runtime import resolve_device

    _check_paths(args)
    path, what = _model(args.checkpoint)
    device = resolve_device(args.device)
    task, model, info = load_model(path, device=device, trust_foreign=args.trust_checkpoint, trust_hint=TRUST_HINT)
    source = _source(args)
    strategies, origin = _strategies(args, task, info)
    predictor = Predictor(task, model, info, strategies, device)
    # COCO results of instances can carry the file's own category ids; YOLO txt and class labels keep the model's
    with_coco_ids = args.coco and args.format == "coco" and not predictor.gives_probs
    categories = _coco_categories(source, info, args.coco) if with_coco_ids else None
    out = Path(args.output)
    # the task says whether its keypoint scores are logits (no plugin named here); a task without keypoints or
    # without the method: written as they are
    kind = getattr(task, "keypoint_score_kind", None)
    kpt_logits = bool(info.num_keypoints) and callable(kind) and kind(model) == "logit"
    writer = _Writer(out, args.format, info, predictor.gives_probs, source.image_root, args.save_images, kpt_logits,
                     list(source.categories) if categories is not None else None)
    views = f"{len(strategies.views)} views ({', '.join(strategies.view_names)})" if strategies else "1 view"
    views += origin
    images = f"the {len(source)} image(s) of {args.coco} under {args.images}" if args.coco else \
        f"{len(source)} image(s) of {args.images}"
    print(f"predicting {images} with {what}, {views}")
    skipped = _predict_all(predictor, source, writer, args.batch_size, args.min_score, categories)
    if not writer.images:  # an empty result would read as "nothing detected"
        raise DataError(f"{args.images}: none of the {len(source)} image(s) could be read ({', '.join(skipped[:3])})")
    written = writer.finish()
    if skipped:
        more = " ..." if len(skipped) > 5 else ""
        print(f"skipped {len(skipped)} unreadable or missing image(s): {', '.join(skipped[:5])}{more}")
    n = len(writer.images)
    print(f"wrote {', '.join(str(p) for p in written)} ({n} image{'s' if n != 1 else ''})")
    return 0
