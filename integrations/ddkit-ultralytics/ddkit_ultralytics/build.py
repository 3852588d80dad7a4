"""``model: {name: yolo, cfg: yolov8n.yaml}``: build an Ultralytics network for a ddkit dataset.

The number of classes comes from the dataset; a pose cfg (one with ``kpt_shape``) takes the dataset's keypoint count.
Weights:

* ``pretrained: true`` follows Ultralytics: the weights named after the cfg (``yolov8n.yaml`` -> ``yolov8n.pt``),
  looked up in the working folder and Ultralytics' weights folder (``yolo settings weights_dir``) and downloaded
  there by Ultralytics when missing and online. ``pretrained: <path>`` takes a file.
* An Ultralytics ``.pt`` is a pickle that runs code when loaded: it is read only with ``trust_checkpoint: true``.
  Otherwise the file must be a plain state dict (``torch.load(weights_only=True)``), e.g. ddkit's own checkpoints.
  :func:`open_file` makes the block (and dataset info) of a trusted ``.pt`` itself, for ``ddkit eval`` / ``ddkit
  predict --trust-checkpoint``.
* The class head follows the class names: when an Ultralytics checkpoint names every class of the dataset (COCO's
  ``yolov8n.pt`` for ``person`` and ``dog``), the rows of those classes are taken from it, in the dataset's order.
  Otherwise a class head for another number of classes is skipped with a warning (it starts random). Any other
  difference (another task, keypoint shape, scale or architecture than ``cfg`` builds) is refused, naming both sides.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddkit.engine.keypoint_meta import resolve_keypoint_meta
from ddkit.engine.task import warn_renamed_classes
from ddkit.errors import ConfigError, DataError
from ddkit.types import DatasetInfo

SCALES = ("n", "s", "m", "l", "x")
log = logging.getLogger("ddkit.models")
LOSS_GAINS = ("box", "cls", "dfl", "pose", "kobj")
TASKS = {"detect": "detection", "pose": "keypoints"}  # Ultralytics' task -> the ddkit task of its yolo model


@dataclass
class YoloParams:
    """``cfg``: an Ultralytics model yaml with a Detect or Pose head (``yolov8n.yaml``, ``yolo11s-pose.yaml``,
    ``yolo26n.yaml`` or a path);
    ``imgsz``: training canvas and evaluation size; ``width``/``depth``/``max_channels``: override the scale's
    multipliers (tiny test models); ``pretrained``: ``true`` (Ultralytics' weights for the cfg) or a file;
    ``trust_checkpoint``: allow unpickling an Ultralytics ``.pt``; ``conf``/``iou``/``max_det``/``multi_label``:
    inference NMS; ``train_scale``: random resize range ``[lo, hi]`` (fractions <= 1) for training;
    ``loss_gains``: Ultralytics' ``box``/``cls``/``dfl``/``pose``/``kobj`` gains (defaults: Ultralytics')."""

    cfg: str = "yolov8n.yaml"
    imgsz: int = 640
    width: float | None = None
    depth: float | None = None
    max_channels: int | None = None
    pretrained: Any = None
    trust_checkpoint: bool = False
    conf: float = 0.001
    iou: float = 0.7
    max_det: int = 300
    multi_label: bool = False
    train_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    loss_gains: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.imgsz < 32 or self.imgsz % 32:
            raise ValueError(f"imgsz must be a multiple of 32 (>= 32), got {self.imgsz}")
        for key in ("width", "depth"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ValueError(f"{key} must be > 0, got {v}")
        for key in ("conf", "iou"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if self.max_det < 1:
            raise ValueError(f"max_det must be >= 1, got {self.max_det}")
        lo_hi = list(self.train_scale)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise ValueError(f"train_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {self.train_scale}")
        unknown = sorted(set(self.loss_gains) - set(LOSS_GAINS))
        if unknown:
            raise ValueError(f"loss_gains: unknown gain {unknown[0]!r}; valid: {', '.join(LOSS_GAINS)}")
        if not (self.pretrained is None or isinstance(self.pretrained, (bool, str))):
            raise ValueError(f"pretrained must be true, false, null or a file path, got {self.pretrained!r}")


def _model_dict(cfg: str, width: float | None, depth: float | None, max_channels: int | None) -> dict[str, Any]:
    from ultralytics.nn.tasks import yaml_model_load

    if Path(cfg).suffix == ".pt":
        yaml = Path(cfg).with_suffix(".yaml").name
        raise ConfigError(f"model.cfg: {cfg!r} is a weights file, cfg takes a model yaml: set cfg: {yaml} with "
                          f"pretrained: true (Ultralytics' {Path(cfg).name}), or pretrained: <your .pt> with "
                          "trust_checkpoint: true")
    try:
        d = yaml_model_load(cfg)
    except (FileNotFoundError, OSError, AssertionError) as err:  # AssertionError: Ultralytics' suffix check
        raise ConfigError(f"model.cfg: {cfg!r} is not an Ultralytics model yaml ({str(err).splitlines()[0]}); "
                          "try yolov8n.yaml, yolo11n.yaml, yolo26n.yaml or their -pose variants") from None
    if width is not None or depth is not None or max_channels is not None:
        scales = d.get("scales") or {}
        base = scales.get(d.get("scale") or "", next(iter(scales.values()), None)) if scales else None
        bd, bw, bm = base if base else (d.get("depth_multiple", 1.0), d.get("width_multiple", 1.0), 1024)
        d["scales"] = {"custom": [depth or bd, width or bw, max_channels or bm]}
        d["scale"] = "custom"
    return d


def _head_task(d: dict[str, Any]) -> str:
    """``'detect'`` or ``'pose'`` from the exact class of the cfg's output module (Segment, OBB, YOLOE and World
    heads subclass Detect in Ultralytics but predict other things: refused, as are Classify and others)."""
    from ultralytics.nn import modules, tasks

    name = str(d["head"][-1][2])
    head = getattr(tasks, name, None)
    kinds = {"detect": ("Detect", "v10Detect"), "pose": ("Pose", "Pose26")}
    for task, names in kinds.items():
        if head is not None and any(head is getattr(modules, n, None) for n in names):
            return task
    raise ConfigError(f"model.cfg {d.get('yaml_file')!r}: its head is {name}; the yolo model takes Detect heads "
                      "(task detection, e.g. yolov8n.yaml) and Pose heads (task keypoints, e.g. yolov8n-pose.yaml) "
                      "only, not -seg, -obb, -cls or other heads")


def _net(d: dict[str, Any], info: DatasetInfo) -> nn.Module:
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel, PoseModel

    nc = info.num_classes
    task = _head_task(d)
    if task == "pose":
        if not info.num_keypoints:
            raise ConfigError(f"model.cfg {d.get('yaml_file')!r} is a pose model, but the dataset has no keypoints; "
                              "use a detection cfg (e.g. yolov8n.yaml)")
    # the dataset's classes and keypoints written into the yaml dict, so Ultralytics logs no "Overriding" line
    d["nc"] = nc
    if task == "pose":
        d["kpt_shape"] = [int(info.num_keypoints), int((d.get("kpt_shape") or (0, 3))[1])]
        net = PoseModel(d, ch=3, nc=nc, data_kpt_shape=tuple(d["kpt_shape"]), verbose=False)
    else:
        net = DetectionModel(d, ch=3, nc=nc, verbose=False)
    net.names = {i: str(c.get("name", c["id"])) for i, c in enumerate(info.categories)}
    net.args = get_cfg(overrides={"task": task})  # Ultralytics reads the task of a loaded .pt from its args
    if info.keypoint_sigmas and d.get("kpt_shape"):
        net.kpt_oks_sigmas = torch.tensor(info.keypoint_sigmas, dtype=torch.float32)
    return net


def build_yolo(cfg: str = "yolov8n.yaml", imgsz: int = 640, width: float | None = None, depth: float | None = None,
               max_channels: int | None = None, pretrained: Any = None, trust_checkpoint: bool = False,
               conf: float = 0.001, iou: float = 0.7, max_det: int = 300, multi_label: bool = False,
               train_scale: Any = (1.0, 1.0), loss_gains: dict[str, float] | None = None, *,
               info: DatasetInfo) -> nn.Module:
    """An Ultralytics network for ``info`` (classes, keypoints, OKS sigmas) behind :class:`YoloAdapter`."""
    from ddkit_ultralytics.adapter import YoloAdapter

    net = _net(_model_dict(cfg, width, depth, max_channels), info)
    for key, value in dict(loss_gains or {}).items():
        setattr(net.args, key, float(value))
    if pretrained:
        load_weights(net, weights_file(cfg, pretrained), trust_checkpoint)
    return YoloAdapter(net, imgsz, conf, iou, max_det, multi_label, train_scale)


# ------------------------------------------------------------------------------------------------ weights
def weights_file(cfg: str, pretrained: Any) -> Path:
    """The local file of ``pretrained`` (``true``: Ultralytics' weights named after ``cfg``), downloading through
    Ultralytics when it is missing and this machine is online."""
    if isinstance(pretrained, str):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.pretrained: {path} is not a file (pretrained: true takes Ultralytics' weights "
                              f"named after the cfg, {Path(cfg).stem}.pt)")
        return path
    from ultralytics.utils import SETTINGS

    name = Path(cfg).stem + ".pt"
    for path in (Path(name), Path(SETTINGS["weights_dir"]) / name):
        if path.is_file():
            return path
    if _offline():
        raise ConfigError(f"model.pretrained: {name} is not in Ultralytics' weights folder {SETTINGS['weights_dir']} "
                          "and this machine is offline; copy the file there or set pretrained to a local path")
    from ultralytics.utils.downloads import attempt_download_asset

    return Path(attempt_download_asset(name))


def _offline() -> bool:
    if os.environ.get("YOLO_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    from ultralytics.utils import ONLINE

    return not ONLINE


def _short(text: str, limit: int = 100) -> str:
    """``text`` on one line, cut at a word boundary with an ellipsis when longer than ``limit``."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _why_unloadable(err: Exception) -> tuple[bool, str]:
    """``(holds Python objects, detail)`` for a ``torch.load(weights_only=True)`` failure: a pickle naming a class
    (an Ultralytics .pt) or a file torch cannot read at all (corrupt, truncated, another format)."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return True, found.group(1)
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return False, _short(found.group(1) if found else f"{type(err).__name__}: {text}")


def _unreadable(path: Path, detail: str) -> DataError:
    return DataError(f"model.pretrained: {path} cannot be read as a torch file ({detail}): it is corrupt, truncated "
                     "or not a checkpoint; copy or download it again")


def _trusted_checkpoint(path: Path) -> tuple[dict[str, Any], nn.Module]:
    """A pickled Ultralytics checkpoint (runs the file's code) and its ``ema`` or ``model`` module."""
    from ultralytics.nn.tasks import torch_safe_load

    try:
        ckpt, _ = torch_safe_load(str(path))
    except Exception as err:  # noqa: BLE001 - any failure of a damaged file: one line, not a traceback
        raise _unreadable(path, _short(f"{type(err).__name__}: {err}")) from None
    module = None
    if isinstance(ckpt, dict):
        module = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
    if not isinstance(module, nn.Module):
        raise DataError(f"{path}: an Ultralytics checkpoint needs a 'model' or 'ema' module") from None
    return ckpt, module


def read_state_dict(path: Path, trust_checkpoint: bool) -> dict[str, torch.Tensor]:
    """Tensors of a state dict / ddkit checkpoint (weights only) or, with ``trust_checkpoint``, of a pickled
    Ultralytics checkpoint (its ``ema`` or ``model``)."""
    return read_weights(path, trust_checkpoint)[0]


def _arch(net: nn.Module) -> dict[str, Any]:
    """What an Ultralytics network records of its architecture: yaml file, task, keypoint shape and scale."""
    from ultralytics.nn.tasks import guess_model_task

    d = getattr(net, "yaml", None) or {}
    scales = d.get("scales") or {}
    name = d.get("scale") or (next(iter(scales), None) if scales else None)
    dwm = scales.get(name) if scales else (d.get("depth_multiple"), d.get("width_multiple"), None)
    kpt = getattr(net.model[-1], "kpt_shape", None) if hasattr(net, "model") else None
    dwm = [float(v) if v is not None else None for v in dwm] if dwm else None
    if name == "custom" and dwm:  # width/depth set in ddkit: the cfg family's scale of the same values, if any
        name = next((k for k, v in _family_scales(d.get("yaml_file")).items() if list(map(float, v)) == dwm), None)
    return {"yaml": d.get("yaml_file"), "task": guess_model_task(d or net), "kpt_shape": list(kpt) if kpt else None,
            "scale": name if name and name != "custom" else None, "dwm": dwm}


def _family_scales(yaml: str | None) -> dict[str, Any]:
    from ultralytics.nn.tasks import yaml_model_load

    try:
        return dict(yaml_model_load(yaml).get("scales") or {}) if yaml else {}
    except Exception:  # noqa: BLE001 - a yaml no longer found: no scale name, the values are said
        return {}


def _describe(arch: dict[str, Any]) -> str:
    """``'pose model with kpt_shape [17, 3], scale n'`` (width and depth where the scale has no name)."""
    text = f"{arch['task']} model" + (f" with kpt_shape {arch['kpt_shape']}" if arch["kpt_shape"] else "")
    if arch["scale"]:
        return f"{text}, scale {arch['scale']}"
    return text + (f", depth {arch['dwm'][0]:g}, width {arch['dwm'][1]:g}" if arch["dwm"] else "")


def read_weights(path: Path, trust_checkpoint: bool) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """:func:`read_state_dict` and the class names an Ultralytics checkpoint holds (``None`` for a state dict)."""
    state, names, _ = read_weights_arch(path, trust_checkpoint)
    return state, names


def read_weights_arch(path: Path, trust_checkpoint: bool
                      ) -> tuple[dict[str, torch.Tensor], list[str] | None, dict[str, Any] | None]:
    """:func:`read_weights` and the architecture an Ultralytics checkpoint records (:func:`_arch`; ``None`` for a
    state dict)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with code in it: only when the user trusts the file
        pickled, detail = _why_unloadable(err)
        if not pickled:
            raise _unreadable(path, detail) from None
        if not trust_checkpoint:
            raise ConfigError(f"model.pretrained: {path} is a pickled checkpoint holding Python objects ({detail}), "
                              "and an Ultralytics .pt runs code when loaded; set model.trust_checkpoint: true if you "
                              "trust it, or give a state dict") from None
        module = _trusted_checkpoint(path)[1]
        names = getattr(module, "names", None)
        names = [str(names[k]) for k in sorted(names)] if isinstance(names, dict) else None
        state = {k: v.float() if v.is_floating_point() else v for k, v in module.state_dict().items()}
        return state, names, _arch(module)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{path}: not a state dict of tensors")
    return obj, None, None


def _pickle_strings(path: Path) -> list[str]:
    """The strings of a torch zip file's pickle, read opcode by opcode (``pickletools``: nothing is executed)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"), None)
            data = archive.read(name) if name else b""
        return [arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)]
    except (OSError, EOFError, ValueError, zipfile.BadZipFile):
        return []


def _pickled_model(strings: list[str]) -> str | None:
    """The Ultralytics model class a checkpoint's pickle strings name (``DetectionModel``), else ``None``."""
    model = next((s.split()[-1] for s in strings if s.startswith("ultralytics.nn.tasks ")), None)
    if model is None and "ultralytics.nn.tasks" in strings:  # pickle protocol 4: module and name apart
        model = strings[strings.index("ultralytics.nn.tasks") + 1]
    return model


def explain_file(path: Any) -> str | None:
    """For an Ultralytics checkpoint (e.g. ``runs/detect/train/weights/best.pt``, found without unpickling it):
    the yolo model block that loads it as weights; ``None`` for any other file."""
    strings = _pickle_strings(Path(path))
    model = _pickled_model(strings)
    if model is None:
        return None
    at = strings.index("yaml_file") + 1 if "yaml_file" in strings else len(strings)
    yaml = strings[at] if at < len(strings) else "<its model yaml>"
    return (f"it is an Ultralytics checkpoint ({model}): use it as a yolo model's weights, e.g. teacher.model: "
            f"{{name: yolo, cfg: {yaml}, pretrained: {path}, trust_checkpoint: true}} (trained further from them, or "
            "used as they are with teacher.train.iterations: 0)")


def _scale_block(path: Path, d: dict[str, Any]) -> dict[str, Any]:
    """The ``cfg`` (and the scale's ``depth``/``width``/``max_channels``) of a yolo block that builds the network
    an Ultralytics checkpoint records in its model yaml dict ``d``, at the same scale."""
    if not d.get("yaml_file"):
        raise ConfigError(f"{path}: its model records no yaml file; evaluate it with a recipe whose teacher.model is "
                          f"{{name: yolo, cfg: <its model yaml>, pretrained: {path}, trust_checkpoint: true}}")
    block: dict[str, Any] = {"cfg": str(d["yaml_file"])}
    dwm = (d.get("scales") or {}).get(d.get("scale") or "")
    if dwm:  # the scale's values themselves: a file of ddkit's width/depth ('custom') or of a yaml without a scale
        block.update(depth=float(dwm[0]), width=float(dwm[1]), max_channels=int(dwm[2]))
    return block


def _train_imgsz(ckpt: dict[str, Any]) -> int | None:
    """The image size the checkpoint was trained at (its ``train_args``), as a multiple of 32 (Ultralytics rounds it
    up to the stride); ``None`` when it records none."""
    imgsz = (ckpt.get("train_args") or {}).get("imgsz")
    imgsz = max(imgsz) if isinstance(imgsz, (list, tuple)) and imgsz else imgsz
    return max(32, math.ceil(imgsz / 32) * 32) if isinstance(imgsz, (int, float)) and imgsz > 0 else None


def _file_info(path: Path, names: Any, kpt_shape: list[int] | None) -> DatasetInfo:
    """The dataset info of an Ultralytics checkpoint's classes (ids its class indices) and keypoints, as the yolo
    dataset makes it of a data yaml without ``flip_idx`` (Ultralytics' OKS sigmas: COCO's for 17, else 1/K)."""
    names = names if isinstance(names, dict) else dict(enumerate(names or []))
    categories = [{"id": int(i), "name": str(n)} for i, n in sorted(names.items())]
    if not kpt_shape:
        return DatasetInfo(categories, extra={"source": str(path)})
    k = int(kpt_shape[0])
    meta = resolve_keypoint_meta(k, str(path), default_sigma=(1.0 / k, " (Ultralytics' 1/K, as yolo val scores it)"))
    return DatasetInfo(categories, num_keypoints=k, flip_indices=meta.flip_indices, keypoint_sigmas=meta.sigmas,
                       extra={"source": str(path), **meta.extra})


def open_file(path: Any) -> tuple[str, dict[str, Any], DatasetInfo] | None:
    """For a trusted Ultralytics checkpoint (recognised without unpickling it, then read: this runs its code):
    ``(ddkit task, yolo block, dataset info)`` that build its network with its weights, classes and keypoints; the
    block loads the file as ``pretrained``, so its class rows and architecture are checked as for any weights.
    ``None`` for any other file."""
    path = Path(path)
    if _pickled_model(_pickle_strings(path)) is None:
        return None
    ckpt, module = _trusted_checkpoint(path)
    arch = _arch(module)
    if arch["task"] not in TASKS:
        raise ConfigError(f"{path}: an Ultralytics {arch['task']} model; the yolo model takes detect and pose models "
                          "only")
    block = {"name": "yolo", **_scale_block(path, getattr(module, "yaml", None) or {}), "pretrained": str(path),
             "trust_checkpoint": True}
    imgsz = _train_imgsz(ckpt)
    if imgsz:
        block["imgsz"] = imgsz
    return TASKS[arch["task"]], block, _file_info(path, getattr(module, "names", None), arch["kpt_shape"])


def _other_arch(path: Path, file: dict[str, Any] | None, net: nn.Module, shapes: list[str]) -> str | None:
    """Why the weights in ``path`` do not fit ``net`` beyond its class head (another task, keypoint shape or scale;
    ``shapes``: tensors outside the class head of another shape), or ``None`` when they fit."""
    own = _arch(net)
    differ = file is not None and (file["task"] != own["task"] or file["kpt_shape"] != own["kpt_shape"] or (
        file["dwm"] is not None and own["dwm"] is not None
        and any(a is not None and b is not None and abs(a - b) > 1e-6 for a, b in zip(file["dwm"], own["dwm"]))))
    if not differ and not shapes:
        return None
    detail = f" ({len(shapes)} tensors outside the class head have other shapes, e.g. {shapes[0]!r})" if shapes else ""
    theirs = f"is a {_describe(file)}" + (f" ({file['yaml']})" if file["yaml"] else "") if file else \
        "holds another architecture"
    return (f"model.pretrained: {path} {theirs}; cfg {own['yaml']} builds a {_describe(own)}{detail}; use the cfg "
            "the weights were trained with")


def _class_head_keys(net: nn.Module) -> list[str]:
    """The class-dependent tensors of ``net``'s head: weight and bias of the last conv of each ``cv3`` branch (and of
    ``one2one_cv3``, the end-to-end heads' second class branch), one row per class."""
    head, at = net.model[-1], f"model.{len(net.model) - 1}."
    keys = []
    for attr in ("cv3", "one2one_cv3"):
        for i, branch in enumerate(getattr(head, attr, None) or []):
            last = f"{at}{attr}.{i}.{len(branch) - 1}."
            keys += [last + "weight", last + "bias"]
    return keys


def _rows_by_name(theirs: list[str] | None, ours: list[str]) -> list[int] | None:
    """The file's class rows for the model's classes, in the model's order, when the file names every one of them and
    the two lists differ (a subset, or another order); ``None`` otherwise (loaded by index, or skipped)."""
    if theirs is None or list(theirs) == list(ours) or len(set(ours)) != len(ours) or not set(ours) <= set(theirs):
        return None
    return [theirs.index(name) for name in ours]


def class_width(net: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> int | None:
    """The hidden width of the class branches in ``state`` (keys ``prefix`` + ``net``'s) where it differs from
    ``net``'s, else ``None``: Ultralytics sizes them ``max(channels, min(classes, 100))``, so yolov8n's 80-class
    branches are wider than those of a 2-class yolov8n."""
    own = net.state_dict()
    for key in _class_head_keys(net)[::2]:  # the last convs' weights: [classes, width, 1, 1]
        value = state.get(prefix + key)
        if value is not None and value.dim() == 4 and value.shape[1] != own[key].shape[1]:
            return int(value.shape[1])
    return None


def widen_class_branches(net: nn.Module, width: int) -> bool:
    """Rebuild ``net``'s class branches (``cv3``, ``one2one_cv3``) at ``width`` hidden channels, for its own class
    count: the branches of a head built for ``width`` classes with a last conv of ``net``'s. ``False`` when
    Ultralytics builds no such width for this cfg (nothing changed)."""
    head = net.model[-1]
    d = copy.deepcopy(net.yaml)
    d["nc"] = width
    kwargs = {"data_kpt_shape": tuple(d["kpt_shape"])} if d.get("kpt_shape") else {}
    wide = type(net)(d, ch=3, nc=width, verbose=False, **kwargs).model[-1]
    attrs = [a for a in ("cv3", "one2one_cv3") if getattr(head, a, None) is not None]
    if any(branch[-1].in_channels != width for a in attrs for branch in getattr(wide, a)):
        return False
    device = next(head.parameters()).device
    for attr in attrs:
        branches = getattr(wide, attr)
        for branch in branches:
            branch[-1] = nn.Conv2d(width, head.nc, 1)
        setattr(head, attr, branches.to(device))
    return True


def _pick_class_rows(net: nn.Module, matched: dict[str, torch.Tensor], rows: list[int],
                     count: int) -> dict[str, torch.Tensor]:
    """The class head's tensors made of the file's ``rows`` (all of them, or ``{}`` when one does not fit)."""
    own = net.state_dict()
    picked = {}
    for key in _class_head_keys(net):
        value = matched.get(key)
        if value is None or value.shape[0] != count or value.shape[1:] != own[key].shape[1:]:
            return {}
        picked[key] = value[rows].clone()
    return picked


def load_weights(net: nn.Module, path: Path, trust_checkpoint: bool) -> None:
    """Copy the tensors of ``path`` whose names (with or without ``net.``/``model.`` prefixes) match. The class head
    takes the file's rows of the model's classes by name when the file names them all (:func:`_rows_by_name`);
    otherwise a class head of another class count is skipped with a warning. Any other difference from ``net`` is a
    :class:`ConfigError`."""
    state, names, arch = read_weights_arch(path, trust_checkpoint)
    ours = [net.names[i] for i in sorted(net.names)]
    rows = _rows_by_name(names, ours)
    width = class_width(net, state) if rows is not None else None
    if width is not None:  # the file's classes made its class branches wider: the model takes the file's width
        widen_class_branches(net, width)
    own = net.state_dict()
    head = f"model.{len(net.model) - 1}."
    matched, loaded, skipped, other = {}, {}, [], []
    for key, value in state.items():
        name = next((key[len(p):] for p in ("", "net.", "module.net.") if key.startswith(p) and key[len(p):] in own),
                    None)
        if name is None:
            continue
        matched[name] = value
        if own[name].shape == value.shape:
            loaded[name] = value
        elif name.startswith(head) and "cv3" in name.split(".")[2]:  # the class branch (cv3, one2one_cv3)
            skipped.append(name)
        else:
            other.append(name)
    why = _other_arch(path, arch, net, other)
    if why:
        raise ConfigError(why)
    if not loaded:
        raise DataError(f"{path}: no tensor matches the YOLO network (first file keys: {list(state)[:3]})")
    picked = _pick_class_rows(net, matched, rows, len(names)) if rows is not None and names else {}
    if picked:
        loaded.update(picked)
        skipped = [k for k in skipped if k not in picked]
        log.info("%s: class head of the dataset's %d classes taken by name from its %d (%s)", path, len(ours),
                 len(names), ", ".join(ours[:8]) + (" ..." if len(ours) > 8 else ""))
    if skipped:
        count = f" ({len(names)} classes there, {len(net.names)} here)" if names else ""
        warnings.warn(f"{path}: its class head was skipped{count}: it starts from random weights", stacklevel=2)
    net.load_state_dict(loaded, strict=False)
    if not picked:
        warn_renamed_classes(path, names, ours)
