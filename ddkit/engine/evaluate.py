"""Evaluation and prediction of a trained model, plain (one view) or multi-transform (TTA), for ``ddkit eval`` and
``ddkit predict``.

TTA uses the labelling engine itself (:func:`ddkit.engine.label.build_strategies` and
:class:`~ddkit.engine.label.Labeller`): the same views, inverse transforms and aggregators as pseudo-labelling, so
what ``ddkit eval --tta`` measures is what ``ddkit label`` would produce before selection.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ddkit.engine.classes import check_classes, pairs
from ddkit.engine.data import adapt_image
from ddkit.engine.keypoint_meta import first_keypoint_difference
from ddkit.engine.label import Labeller, Strategies, build_strategies, parse_label_config
from ddkit.engine.prediction_kinds import PROBS, prediction_kind
from ddkit.errors import ConfigError
from ddkit.types import DatasetInfo, Instances

# The views of ``--tta`` when neither the command line nor the recipe names any: the original and its mirror.
DEFAULT_TTA = ({"name": "identity"}, {"name": "hflip"})


def tta_block(transforms: Sequence[Any] | None = None, aggregator: Any = None,
              recipe: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``label``-section block that builds TTA: views and aggregator from the arguments, else the recipe's
    ``evaluate`` then ``label`` sections (as ``ddkit run``'s TTA stages), else :data:`DEFAULT_TTA`."""
    recipe = recipe or {}
    sections = [recipe.get("evaluate") or {}, recipe.get("label") or {}]
    if transforms is None:
        transforms = next((s["transforms"] for s in sections if s.get("transforms")), list(DEFAULT_TTA))
    if aggregator is None:
        aggregator = next((s["aggregator"] for s in sections if s.get("aggregator") is not None), None)
    block: dict[str, Any] = {"transforms": list(transforms),
                             "selector": {"name": "score_threshold", "threshold": 0.0}}
    if aggregator is not None:
        block["aggregator"] = aggregator
    keypoints = (recipe.get("label") or {}).get("keypoints")
    if keypoints:
        block["keypoints"] = keypoints
    batch = (recipe.get("label") or {}).get("batch_size")
    if batch:  # the run's TTA stages batch as its labelling does (a detector's AP depends on it)
        block["batch_size"] = batch
    return block


def tta_strategies(task: Any, info: DatasetInfo, block: Mapping[str, Any], registry: Any = None,
                   where: str = "--tta") -> Strategies:
    """Views and aggregators of a TTA block, built (and checked) before any image is read."""
    return build_strategies(parse_label_config(dict(block), where), task, info, registry, where=where)


def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


class Predictor:
    """Predictions of one model per image: ``task.predict`` (one view), or with ``strategies`` the labelling
    engine's multi-transform ensemble.

    ``predict(images)`` returns what ``task.evaluate_predictions`` scores: class probabilities ``[C]`` (TTA: the
    one-hot of the ensemble's class, since the aggregator returns a label and a score) or
    :class:`~ddkit.types.Instances` in the image's frame. ``labels(images)`` keeps a classifier's
    ``(category id, score)`` instead.
    """

    def __init__(self, task: Any, model: nn.Module, info: DatasetInfo, strategies: Strategies | None = None,
                 device: torch.device | str = "cpu"):
        self.task, self.model, self.info, self.s = task, model.eval(), info, strategies
        self.labeller = Labeller(task, model, info, strategies, device=device) if strategies is not None else None
        self.ids = [int(c["id"]) for c in info.categories]

    @property
    def gives_probs(self) -> bool:
        return prediction_kind(self.task) is PROBS

    def raw(self, images: Sequence[Tensor]) -> list[Any]:
        """One view: the task's own predictions; TTA: the labelling engine's aggregated ones. A fixed-size model's
        images are first made to fit its input (``adapt_image``: an RGB folder for a grey classifier)."""
        shape = (self.info.extra or {}).get("image_shape")
        images = [adapt_image(im, shape) for im in images]
        with torch.no_grad():
            if self.labeller is None:
                return list(self.task.predict(self.model, list(images)))
            return list(self.labeller.label(list(images)))

    def predict(self, images: Sequence[Tensor]) -> list[Any]:
        preds = self.raw(images)
        if self.labeller is None or not self.gives_probs:
            return preds
        out = []
        for labels, _scores in preds:
            onehot = torch.zeros(len(self.ids))
            onehot[self.ids.index(int(labels[0]))] = 1.0
            out.append(onehot)
        return out

    def labels(self, images: Sequence[Tensor]) -> list[tuple[int, float]]:
        """A classifier's ``(category id, score)`` per image."""
        preds = self.raw(images)
        if self.labeller is not None:
            return [(int(lab[0]), float(sc[0])) for lab, sc in preds]
        out = []
        for p in preds:
            j = int(torch.as_tensor(p).reshape(-1).argmax())
            out.append((self.ids[j], float(torch.as_tensor(p).reshape(-1)[j])))
        return out


def predict_dataset(predictor: Predictor, dataset: Any, batch_size: int = 8,
                    categories: Mapping[int, int] | None = None) -> list[Any]:
    """``predictor``'s predictions of every item of ``dataset``; ``categories`` (see :func:`category_map`) turns the
    model's category ids of instance predictions into the dataset's."""
    preds: list[Any] = []
    for idx in _batches(len(dataset), batch_size):
        preds.extend(predictor.predict([dataset[i][0] for i in idx]))
    if categories is not None:
        preds = [relabel(p, categories) for p in preds]
    return preds


def evaluate_dataset(predictor: Predictor, dataset: Any, batch_size: int = 8,
                     categories: Mapping[int, int] | None = None) -> dict[str, float]:
    """The task's metrics of ``predictor`` on every item of ``dataset`` (which keeps its labels)."""
    return predictor.task.evaluate_predictions(predict_dataset(predictor, dataset, batch_size, categories), dataset)


def relabel(inst: Instances, categories: Mapping[int, int]) -> Instances:
    """``inst`` with each label ``l`` replaced by ``categories[l]``; instances of other labels are dropped."""
    keep = torch.tensor([int(label) in categories for label in inst.labels.tolist()], dtype=torch.bool)
    kept = inst[keep]
    labels = [categories[int(label)] for label in kept.labels.tolist()]
    return dataclasses.replace(kept, labels=torch.tensor(labels, dtype=torch.int64, device=kept.labels.device))


def category_map(model_info: DatasetInfo, data_info: DatasetInfo, model_src: str, data_src: str,
                 by_name: bool) -> dict[int, int] | None:
    """How the model's category ids become the dataset's: ``None`` when they are the same. With ``by_name``
    (instance predictions), a dataset whose category names are all among the model's, under other ids (a model
    trained on YOLO files, ids 1-80, scored on a COCO file, ids 1-90), maps by name: ``{model id: dataset id}``,
    and the model's other classes are dropped. Anything else is :func:`check_same_classes`'s one-line error."""
    ours = {str(c.get("name")): int(c["id"]) for c in model_info.categories}
    theirs = {str(c.get("name")): int(c["id"]) for c in data_info.categories}
    unique = len(ours) == len(model_info.categories) and len(theirs) == len(data_info.categories)
    same = pairs(model_info.categories) == pairs(data_info.categories)
    if not by_name or not unique or not set(theirs) <= set(ours) or same:
        check_same_classes(model_info, data_info, model_src, data_src)
        return None
    _check_keypoints(model_info, data_info, model_src, data_src)
    return {ours[name]: theirs[name] for name in theirs}


def check_same_classes(model_info: DatasetInfo, data_info: DatasetInfo, model_src: str, data_src: str,
                       fix: str = "evaluate on a dataset with the classes the model was trained on") -> None:
    """The model's categories (ids and names) must be the dataset's: labels are compared by id."""
    check_classes(model_info.categories, data_info.categories, model_src, data_src, fix)
    _check_keypoints(model_info, data_info, model_src, data_src)


def _check_keypoints(model_info: DatasetInfo, data_info: DatasetInfo, model_src: str, data_src: str) -> None:
    if (model_info.num_keypoints or 0) != (data_info.num_keypoints or 0):
        boxes_only = ""
        if data_info.num_keypoints and not model_info.num_keypoints:
            boxes_only = (" (to score its boxes alone, read the data without them: the dataset's keypoints: false, "
                          "as in --data \"{name: FORMAT, ..., keypoints: false}\")")
        raise ConfigError(f"{data_src}: {data_info.num_keypoints or 0} keypoints per instance, the model "
                          f"({model_src}) predicts {model_info.num_keypoints or 0}{boxes_only}")
    diff = first_keypoint_difference(model_info, data_info)
    if diff:  # scored index by index: another order would compare one body part's prediction with another's
        i, ours, theirs = diff
        raise ConfigError(f"{data_src}: keypoint {i} is {theirs!r}, the model's ({model_src}) is {ours!r}; "
                          "keypoints are compared by index, not by name, so export the data with the model's "
                          "keypoints, in its order")


def dataset_block(spec: str, split: str | None = None) -> dict[str, Any]:
    """A dataset block from the command line: a YAML mapping (``{name: coco, annotations: a.json}``), or a path:
    a ``.json`` file is COCO, a ``.yaml`` file is an Ultralytics data yaml and a folder with ``data.yaml`` or
    ``labels/`` is YOLO (``split``, default ``val``), any other folder is one sub-folder of images per class."""
    import yaml

    text = spec.strip()
    if text.startswith("{"):
        try:
            block = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--data: not a YAML mapping: {str(err).splitlines()[0]}") from None
        if not isinstance(block, dict) or "name" not in block:
            raise ConfigError(f"--data: a dataset block needs a 'name', e.g. {{name: coco, annotations: a.json}}; "
                              f"got {text!r}")
        return block
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".json":
        return {"name": "coco", "annotations": str(path)}
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return {"name": "yolo", "data_yaml": str(path), "split": split or "val"}
    if path.is_dir() and ((path / "data.yaml").is_file() or (path / "labels").is_dir()):
        return {"name": "yolo", "root": str(path), "split": split or "val"}
    if path.is_dir():
        return {"name": "image_folder", "root": str(path)}
    raise ConfigError(f"--data: {path} is neither a COCO .json file, a YOLO data .yaml nor a folder (YOLO or one "
                      "folder per class); "
                      "or pass a dataset block such as '{name: coco, annotations: a.json, images: imgs/}'")
