"""Builtin model architectures.

Every factory takes its config parameters plus the runtime keyword ``info`` (the dataset's
:class:`~ddkit.types.DatasetInfo`), from which it reads the number of classes, the number of keypoints and, for
classification, the image shape (``info.extra["image_shape"] = [C, H, W]``).

``pretrained`` (see :mod:`ddkit_plugins.pretrained`): ``true`` or a weights name loads the model library's own
weights through its own API and cache (torchvision weights enums and the torch hub cache, timm's
``create_model(pretrained=True)``); a path loads a local file. Detectors take ImageNet weights for their backbone
(``pretrained_backbone``) and, for the (detector, backbone) pairs torchvision trained on COCO, whole-detector
weights (``pretrained``) whose class head is kept only when the dataset's classes are COCO's. torchvision itself
pairs pretrained detectors with ``norm: frozen_bn``.

Detectors are torchvision's (Faster R-CNN, RetinaNet, FCOS, Keypoint R-CNN) on a ResNet or MobileNetV3 FPN backbone
laid out as torchvision's own builders lay them out; their labels are contiguous ``1..C`` (0 is background), mapped
from the dataset's category ids by the task.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ddkit import ConfigError, DataError, DatasetInfo, hookimpl
from ddkit.types import ModelSpec

from .pretrained import (call_torchvision_builder, class_mapping, load_matching, load_pretrained, take_class_slots,
                         timm_create, torchvision_state_dict, torchvision_weights, wants_library_weights)


def _image_shape(info: DatasetInfo) -> tuple[int, int, int]:
    shape = info.extra.get("image_shape")
    if not shape or len(shape) != 3:
        raise ConfigError("this model needs the dataset's image shape [C, H, W] (DatasetInfo.extra['image_shape']); "
                          "give the dataset a fixed image size")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ classification
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # every torchvision classifier's weights.transforms()
IMAGENET_STD = (0.229, 0.224, 0.225)


def _standardise(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: ``x [B, C, H, W]`` in [0, 1] -> ``(x - input_mean) / input_std``."""
    return ((args[0] - module.input_mean) / module.input_std, *args[1:])


def normalize_input(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], chans: int) -> nn.Module:
    """Make ``model`` standardise its [0, 1] input by the mean / std its library's weights were trained with.

    torchvision and timm leave this to their data transforms; ddkit's datasets give [0, 1] pixels, so the model
    does it itself, in a forward pre-hook with non-persistent buffers: the state dict stays the library's own (an
    exported file loads into the plain model, which then wants the library's usual transforms). Channels beyond
    the weights' map as the adapted input conv maps them: grey takes the mean over RGB, more channels repeat it.
    """
    def per_channel(values: tuple[float, ...]) -> torch.Tensor:
        v = [sum(values) / len(values)] if chans == 1 else [values[i % len(values)] for i in range(chans)]
        return torch.tensor(v, dtype=torch.float32).view(1, chans, 1, 1)

    model.register_buffer("input_mean", per_channel(mean), persistent=False)
    model.register_buffer("input_std", per_channel(std), persistent=False)
    model.register_forward_pre_hook(_standardise)
    return model


@dataclass
class MLPParams:
    hidden: list[int] = field(default_factory=lambda: [800, 800])
    dropout: float = 0.0
    input_dropout: float = 0.0
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if not all(h > 0 for h in self.hidden):
            raise ValueError(f"hidden sizes must be > 0, got {self.hidden}")
        for key in ("dropout", "input_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")


class MLP(nn.Sequential):
    """Flatten -> [Linear -> ReLU -> Dropout] * len(hidden) -> Linear. Hinton et al. 2015 MNIST: teacher
    ``hidden=[1200, 1200], dropout=0.5, input_dropout=0.2``, student ``hidden=[800, 800]``."""

    def __init__(self, hidden=(800, 800), dropout=0.0, input_dropout=0.0, pretrained=None, *, info: DatasetInfo):
        c, h, w = _image_shape(info)
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout:
            layers.append(nn.Dropout(input_dropout))
        width = c * h * w
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, info.num_classes))
        super().__init__(*layers)
        if pretrained:
            load_pretrained(self, pretrained, info=info)


@dataclass
class LeNetParams:
    channels: list[int] = field(default_factory=lambda: [16, 32])
    hidden: int = 128
    dropout: float = 0.0
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if len(self.channels) < 1 or not all(c > 0 for c in self.channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {self.channels}")


class LeNet(nn.Module):
    """A small conv net: [conv3x3 -> BN -> ReLU -> maxpool] per channel entry, global 4x4 pooling, two FC layers.
    Works for any input size >= 8 px (MNIST 28x28, digits 8x8, CIFAR 32x32)."""

    def __init__(self, channels=(16, 32), hidden=128, dropout=0.0, pretrained=None, *, info: DatasetInfo):
        super().__init__()
        c, h, w = _image_shape(info)
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            if min(h, w) >= 4:
                blocks.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * 4, hidden), nn.ReLU(inplace=True),
                                        nn.Dropout(dropout), nn.Linear(hidden, info.num_classes))
        if pretrained:
            load_pretrained(self, pretrained, info=info)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


@dataclass
class TimmParams:
    model_name: str = "resnet18"
    pretrained: bool | str | None = None
    drop_rate: float = 0.0
    normalize: bool = True
    kwargs: dict = field(default_factory=dict)


def build_timm(model_name="resnet18", pretrained=None, drop_rate=0.0, normalize=True, kwargs=None, *,
               info: DatasetInfo) -> nn.Module:
    """Any timm architecture by name (``resnet18`` or ``resnet18.a1_in1k``). ``pretrained: true`` or a tag loads
    timm's weights with ``timm.create_model(pretrained=True)`` (its cache; timm resizes the classifier to the
    dataset's classes and the input conv to its channels); a path loads a local file. ``normalize`` standardises
    the input by the mean / std of the model's timm config (:func:`normalize_input`)."""
    import timm

    arch = model_name.partition(".")[0]
    if arch not in timm.list_models():
        import difflib

        hint = difflib.get_close_matches(arch, timm.list_models(), n=1)
        raise ConfigError(f"unknown timm model {model_name!r}." + (f" Did you mean {hint[0]!r}?" if hint else ""))
    chans = int(info.extra.get("image_shape", [3])[0])
    kw = dict(num_classes=info.num_classes, in_chans=chans, drop_rate=drop_rate, **dict(kwargs or {}))
    if wants_library_weights(pretrained):
        model = timm_create(model_name, pretrained, **kw)
    else:
        model = timm.create_model(arch, pretrained=False, **kw)
        if pretrained:
            load_pretrained(model, pretrained, info=info)
    if normalize:
        cfg = model.pretrained_cfg
        normalize_input(model, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)), chans)
    return model


@dataclass
class TorchvisionParams:
    arch: str = "resnet18"
    pretrained: bool | str | None = None
    normalize: bool = True
    kwargs: dict = field(default_factory=dict)


def _last_layer(model: nn.Module, width: int) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, layer) of the last Linear (or 1x1 Conv2d, SqueezeNet) with ``width`` outputs."""
    found = None
    for parent in model.modules():
        for attr, child in parent.named_children():
            if (isinstance(child, nn.Linear) and child.out_features == width) or \
                    (isinstance(child, nn.Conv2d) and child.out_channels == width and child.kernel_size == (1, 1)):
                found = (parent, attr, child)
    if found is None:
        raise ConfigError(f"cannot find the {width}-way classifier layer of {type(model).__name__} to resize")
    return found


def _resize_classifier(model: nn.Module, old: int, new: int) -> None:
    """Replace the ``old``-way output layer by a freshly initialised ``new``-way one (the ImageNet head does not fit
    the dataset's classes)."""
    parent, attr, layer = _last_layer(model, old)
    if isinstance(layer, nn.Linear):
        fresh: nn.Module = nn.Linear(layer.in_features, new, bias=layer.bias is not None)
    else:
        fresh = nn.Conv2d(layer.in_channels, new, 1)
    setattr(parent, attr, fresh)


def _adapt_input_channels(model: nn.Module, chans: int) -> None:
    """Make the first 3-channel conv take ``chans`` channels as timm's ``adapt_input_conv`` does: grey images sum
    the RGB filters; more channels repeat them, scaled by 3 / chans."""
    for parent in model.modules():
        for attr, conv in parent.named_children():
            if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
                new = nn.Conv2d(chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                                conv.groups, conv.bias is not None)
                with torch.no_grad():
                    w = conv.weight
                    if chans == 1:
                        new.weight.copy_(w.sum(1, keepdim=True))
                    else:
                        new.weight.copy_(w.repeat(1, (chans + 2) // 3, 1, 1)[:, :chans] * (3 / chans))
                    if conv.bias is not None:
                        new.bias.copy_(conv.bias)
                setattr(parent, attr, new)
                return
    raise ConfigError(f"{type(model).__name__}: no 3-channel input conv to adapt to {chans} channels")


def build_torchvision(arch="resnet18", pretrained=None, normalize=True, kwargs=None, *,
                      info: DatasetInfo) -> nn.Module:
    """A torchvision classifier by builder name (``resnet18``, ``mobilenet_v3_small``, ``efficientnet_b0``, ...).

    ``pretrained: true`` or a weights name (``IMAGENET1K_V1``) builds it with ``get_model(arch, weights=...)``
    (torch hub cache), then gives it a fresh head for the dataset's classes; a path loads a local file. Images with
    other than 3 channels get the first conv adapted (grey: summed RGB filters). ``normalize`` standardises the
    input by ImageNet's mean / std, as torchvision's weights' transforms do (:func:`normalize_input`).
    """
    from torchvision import models

    names = models.list_models(module=models)
    if arch not in names:
        import difflib

        hint = difflib.get_close_matches(arch, names, n=1)
        raise ConfigError(f"unknown torchvision classifier {arch!r}." + (f" Did you mean {hint[0]!r}?" if hint else ""))
    if wants_library_weights(pretrained):
        weights = torchvision_weights(arch, pretrained)
        model = call_torchvision_builder(arch, weights, **dict(kwargs or {}))
        width = len(weights.meta["categories"])
        if width != info.num_classes:
            _resize_classifier(model, width, info.num_classes)
    else:
        model = models.get_model(arch, weights=None, num_classes=info.num_classes, **dict(kwargs or {}))
    chans = int(info.extra.get("image_shape", [3])[0])
    if chans != 3:
        _adapt_input_channels(model, chans)
    if pretrained and not wants_library_weights(pretrained):
        load_pretrained(model, pretrained, info=info)
    return normalize_input(model, IMAGENET_MEAN, IMAGENET_STD, chans) if normalize else model


# ----------------------------------------------------------------------------------------------------- detection
Backbone = Literal["tiny", "resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "mobilenet_v3_small"]
Norm = Literal["bn", "frozen_bn", "gn"]


@dataclass
class DetectorParams:
    backbone: Backbone = "resnet18"
    norm: Norm = "bn"
    trainable_layers: int | None = None
    min_size: int = 800
    max_size: int = 1333
    anchor_sizes: list[int] | None = None
    detections_per_img: int = 100
    score_thresh: float = 0.05
    pretrained: bool | str | None = None
    pretrained_backbone: bool | str | None = None

    def __post_init__(self) -> None:
        if self.min_size <= 0 or self.max_size < self.min_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")


@dataclass
class RCNNParams(DetectorParams):
    representation_size: int = 1024
    box_batch_size_per_image: int = 512
    rpn_batch_size_per_image: int = 256
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("representation_size", "box_batch_size_per_image", "rpn_batch_size_per_image",
                    "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class KeypointRCNNParams(RCNNParams):
    keypoint_head: list[int] = field(default_factory=lambda: [512] * 8)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.keypoint_head or min(self.keypoint_head) < 1:
            raise ValueError(f"keypoint_head must be a non-empty list of conv widths, got {self.keypoint_head}")


def _norm_layer(norm: str):
    from torchvision.ops.misc import FrozenBatchNorm2d

    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "gn":
        return lambda c, **_: nn.GroupNorm(math.gcd(32, c), c)
    return nn.BatchNorm2d


def _build_backbone(backbone: str, norm: str, trainable_layers: int | None, pretrained_backbone: bool | str | None,
                    extra_blocks: Any = None, returned_layers: list[int] | None = None) -> nn.Module:
    from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone

    norm_layer = _norm_layer(norm)
    if backbone == "tiny":
        net = _tiny_fpn_backbone(norm_layer, extra_blocks, returned_layers)
    elif backbone.startswith("resnet"):
        net = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=norm_layer,
                                  trainable_layers=5 if trainable_layers is None else trainable_layers,
                                  returned_layers=returned_layers, extra_blocks=extra_blocks)
    elif backbone.startswith("mobilenet"):
        net = mobilenet_backbone(backbone_name=backbone, weights=None, fpn=True, norm_layer=norm_layer,
                                 trainable_layers=0 if trainable_layers is None else trainable_layers,
                                 extra_blocks=extra_blocks)
        if trainable_layers is None:
            for p in net.parameters():
                p.requires_grad_(True)
    else:  # pragma: no cover - the Literal type already rejects it
        raise ConfigError(f"unknown backbone {backbone!r}")
    prefixes = ("features.", "backbone.body.", "body.", "module.")
    if wants_library_weights(pretrained_backbone):
        if backbone == "tiny":
            raise ConfigError("pretrained_backbone: the 'tiny' backbone has no library weights; use a resnet or "
                              "mobilenet_v3 backbone, or a local weights file")
        weights = torchvision_weights(backbone, pretrained_backbone, what="pretrained_backbone")
        load_matching(net.body, torchvision_state_dict(weights, "pretrained_backbone"), str(weights), prefixes)
    elif pretrained_backbone:
        load_pretrained(net.body, pretrained_backbone, prefixes=prefixes)
    return net


class _TinyBody(nn.Module):
    """Four stride-2 stages of two 3x3 convs (16, 32, 64, 128 channels): strides 4, 8, 16, 32 like a ResNet's
    layer1..layer4 (named so), at a fraction of the cost; for tests and toy data."""

    def __init__(self, norm_layer, widths=(16, 32, 64, 128)):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm_layer(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, 1, 1, bias=False), norm_layer(cout), nn.ReLU(inplace=True))

        self.stem = block(3, widths[0], 2)
        self.layer1 = block(widths[0], widths[0], 2)
        self.layer2 = block(widths[0], widths[1], 2)
        self.layer3 = block(widths[1], widths[2], 2)
        self.layer4 = block(widths[2], widths[3], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def _tiny_fpn_backbone(norm_layer, extra_blocks=None, returned_layers=None) -> nn.Module:
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    widths = (16, 32, 64, 128)
    layers = returned_layers or [1, 2, 3, 4]
    return BackboneWithFPN(_TinyBody(norm_layer, widths), {f"layer{k}": str(i) for i, k in enumerate(layers)},
                           [widths[k - 1] for k in layers], 64, extra_blocks=extra_blocks or LastLevelMaxPool())


def _anchor_generator(backbone: nn.Module, anchor_sizes: list[int] | None, per_level_default: bool):
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    with torch.no_grad():
        was = backbone.training
        backbone.eval()
        levels = len(backbone(torch.zeros(1, 3, 64, 64)))
        backbone.train(was)
    sizes = list(anchor_sizes or [32, 64, 128, 256, 512])
    if len(sizes) == levels and (per_level_default or anchor_sizes):
        per_level = tuple((s,) for s in sizes)
    else:
        per_level = (tuple(sizes),) * levels
    return AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * levels)


# (detector, backbone) -> the torchvision builder whose COCO weights fit ddkit's layout of that pair (a test checks
# the layouts tensor by tensor), and per detector the class-dependent tensors.
COCO_BUILDERS = {
    ("fasterrcnn", "resnet50"): "fasterrcnn_resnet50_fpn",
    ("fasterrcnn", "mobilenet_v3_large"): "fasterrcnn_mobilenet_v3_large_fpn",
    ("retinanet", "resnet50"): "retinanet_resnet50_fpn",
    ("fcos", "resnet50"): "fcos_resnet50_fpn",
    ("keypointrcnn", "resnet50"): "keypointrcnn_resnet50_fpn",
}
_BOX_PREDICTOR = {"roi_heads.box_predictor.cls_score.weight": 1, "roi_heads.box_predictor.cls_score.bias": 1,
                  "roi_heads.box_predictor.bbox_pred.weight": 4, "roi_heads.box_predictor.bbox_pred.bias": 4}
_CLS_LOGITS = {"head.classification_head.cls_logits.weight": 1, "head.classification_head.cls_logits.bias": 1}
# per detector: its class-dependent tensors -> values per class (rows of a class in dim 0)
CLASS_HEADS = {"fasterrcnn": _BOX_PREDICTOR, "keypointrcnn": _BOX_PREDICTOR, "retinanet": _CLS_LOGITS,
               "fcos": _CLS_LOGITS}
KEYPOINT_HEAD = "roi_heads.keypoint_predictor."
log = logging.getLogger("ddkit.models")


def _head_to_skip(detector: str, weights: Any, info: DatasetInfo) -> tuple[str, ...]:
    """The head tensors not loaded as they are: the class head (its rows are picked by class name instead, see
    :func:`_load_class_rows`), and the keypoint head unless the keypoints are the weights' (count, and names
    where the dataset has them)."""
    skip = tuple(CLASS_HEADS[detector])
    theirs = weights.meta.get("keypoint_names")
    if theirs is not None:
        ours = info.extra.get("keypoint_names")
        if info.num_keypoints != len(theirs) or (ours is not None and list(ours) != list(theirs)):
            skip += (KEYPOINT_HEAD,)
    return skip


def _load_class_rows(model: nn.Module, state: dict[str, torch.Tensor], detector: str, weights: Any,
                     info: DatasetInfo) -> set[str]:
    """The class head's rows of the dataset's classes that the weights know by name (``person`` of COCO) come
    from the weights; the other classes keep their fresh init. Returns the tensors written."""
    mapping = class_mapping(weights, info.categories)
    known = [str(info.categories[j - 1].get("name")) for j in mapping if j > 0]
    if not known:
        return set()
    own = model.state_dict()
    heads = CLASS_HEADS[detector]
    if any(state[key].shape[1:] != own[key].shape[1:] for key in heads):  # e.g. another representation_size
        log.warning("%s: the class head has another input size than the weights'; it starts fresh", weights)
        return set()
    k_theirs, k_ours = len(weights.meta["categories"]), info.num_classes + 1
    new = {key: take_class_slots(state[key], own[key], mapping, k_theirs, k_ours, per) for key, per in heads.items()}
    model.load_state_dict(new, strict=False)
    fresh = info.num_classes - len(known)
    log.info("%s: class head of %d of %d classes from the weights (%s)%s", weights, len(known), info.num_classes,
             ", ".join(known[:8]) + ("..." if len(known) > 8 else ""), f"; {fresh} start fresh" if fresh else "")
    return set(new) if fresh == 0 else set()


def load_coco_detector(model: nn.Module, detector: str, backbone: str, value: bool | str,
                       info: DatasetInfo) -> nn.Module:
    """Load torchvision's COCO weights for ``detector`` on ``backbone`` into ``model``: everything but the heads
    sized for other classes / keypoints; the class head keeps the rows of the classes the weights know by name."""
    builder = COCO_BUILDERS.get((detector, backbone))
    if builder is None:
        pairs = ", ".join(b for d, b in COCO_BUILDERS if d == detector)
        raise ConfigError(f"pretrained: torchvision has COCO weights for {detector} with backbone {pairs}, not "
                          f"{backbone!r}; use pretrained_backbone: true (ImageNet backbone) or a local weights file")
    weights = torchvision_weights(builder, value)
    skip = _head_to_skip(detector, weights, info)
    state = torchvision_state_dict(weights)
    loaded = load_matching(model, state, str(weights), skip=skip)
    loaded |= _load_class_rows(model, state, detector, weights, info)
    missed = [k for k in model.state_dict() if k not in loaded and not k.startswith(skip)
              and not k.endswith("num_batches_tracked")]
    if missed:
        warnings.warn(f"{weights}: {len(missed)} tensors of the model were not in the weights: {missed[:4]}",
                      stacklevel=2)
    return model


def _finish(model: nn.Module, pretrained: bool | str | None, detector: str, backbone: str,
            info: DatasetInfo) -> nn.Module:
    if wants_library_weights(pretrained):
        load_coco_detector(model, detector, backbone, pretrained, info)
    elif pretrained:
        load_pretrained(model, pretrained, info=info)
    return model


def _rcnn_kwargs(body: nn.Module, backbone: str, anchor_sizes, info: DatasetInfo, min_size, max_size,
                 detections_per_img, score_thresh, representation_size, box_batch_size_per_image,
                 rpn_batch_size_per_image, rpn_post_nms_top_n_train, rpn_post_nms_top_n_test) -> dict[str, Any]:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    resolution = 7
    return dict(
        num_classes=None, min_size=min_size, max_size=max_size,
        rpn_anchor_generator=_anchor_generator(body, anchor_sizes, per_level_default=not backbone.startswith("mobilenet")),
        box_head=TwoMLPHead(body.out_channels * resolution ** 2, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, info.num_classes + 1),
        box_detections_per_img=detections_per_img, box_score_thresh=score_thresh,
        box_batch_size_per_image=box_batch_size_per_image, rpn_batch_size_per_image=rpn_batch_size_per_image,
        rpn_pre_nms_top_n_train=rpn_post_nms_top_n_train, rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_post_nms_top_n_test, rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
    )


def build_fasterrcnn(backbone="resnet18", norm="bn", trainable_layers=None, min_size=800, max_size=1333,
                     anchor_sizes=None, detections_per_img=100, score_thresh=0.05, pretrained=None,
                     pretrained_backbone=None, representation_size=1024, box_batch_size_per_image=512,
                     rpn_batch_size_per_image=256, rpn_post_nms_top_n_train=2000, rpn_post_nms_top_n_test=1000,
                     *, info: DatasetInfo) -> nn.Module:
    """Faster R-CNN with an FPN; the box head's width is ``representation_size`` (1024 in the paper's R50-FPN)."""
    from torchvision.models.detection import FasterRCNN

    body = _build_backbone(backbone, norm, trainable_layers, pretrained_backbone)
    model = FasterRCNN(body, **_rcnn_kwargs(body, backbone, anchor_sizes, info, min_size, max_size,
                                            detections_per_img, score_thresh, representation_size,
                                            box_batch_size_per_image, rpn_batch_size_per_image,
                                            rpn_post_nms_top_n_train, rpn_post_nms_top_n_test))
    return _finish(model, pretrained, "fasterrcnn", backbone, info)


def build_keypointrcnn(backbone="resnet18", norm="bn", trainable_layers=None, min_size=800, max_size=1333,
                       anchor_sizes=None, detections_per_img=100, score_thresh=0.05, pretrained=None,
                       pretrained_backbone=None, representation_size=1024, box_batch_size_per_image=512,
                       rpn_batch_size_per_image=256, rpn_post_nms_top_n_train=2000, rpn_post_nms_top_n_test=1000,
                       keypoint_head=(512,) * 8, *, info: DatasetInfo) -> nn.Module:
    """Keypoint R-CNN; ``keypoint_head`` lists the widths of its 3x3 conv layers (8 x 512 in Mask R-CNN)."""
    from torchvision.models.detection import KeypointRCNN
    from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor

    if not info.num_keypoints:
        raise ConfigError("keypointrcnn needs a keypoint dataset (DatasetInfo.num_keypoints is not set)")
    body = _build_backbone(backbone, norm, trainable_layers, pretrained_backbone)
    kwargs = _rcnn_kwargs(body, backbone, anchor_sizes, info, min_size, max_size, detections_per_img, score_thresh,
                          representation_size, box_batch_size_per_image, rpn_batch_size_per_image,
                          rpn_post_nms_top_n_train, rpn_post_nms_top_n_test)
    model = KeypointRCNN(body, keypoint_head=KeypointRCNNHeads(body.out_channels, list(keypoint_head)),
                         keypoint_predictor=KeypointRCNNPredictor(list(keypoint_head)[-1], info.num_keypoints),
                         **kwargs)
    return _finish(model, pretrained, "keypointrcnn", backbone, info)


def build_retinanet(backbone="resnet18", norm="bn", trainable_layers=None, min_size=800, max_size=1333,
                    anchor_sizes=None, detections_per_img=100, score_thresh=0.05, pretrained=None,
                    pretrained_backbone=None, *, info: DatasetInfo) -> nn.Module:
    from torchvision.models.detection import RetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if backbone == "tiny":
        body = _build_backbone(backbone, norm, trainable_layers, pretrained_backbone,
                               extra_blocks=LastLevelP6P7(128, 64), returned_layers=[2, 3, 4])
    elif backbone.startswith("resnet"):
        # P6 from P5 as torchvision's retinanet_resnet50_fpn, so its COCO weights load whole
        body = _build_backbone(backbone, norm, trainable_layers, pretrained_backbone,
                               extra_blocks=LastLevelP6P7(256, 256), returned_layers=[2, 3, 4])
    else:
        body = _build_backbone(backbone, norm, trainable_layers, pretrained_backbone)
    sizes = anchor_sizes or [32, 64, 128, 256, 512]
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    with torch.no_grad():
        body.eval()
        levels = len(body(torch.zeros(1, 3, 64, 64)))
        body.train()
    if len(sizes) == levels:
        per_level = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes)
    else:
        per_level = (tuple(sizes),) * levels
    anchors = AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * levels)
    model = RetinaNet(body, num_classes=info.num_classes + 1, min_size=min_size, max_size=max_size,
                      anchor_generator=anchors, detections_per_img=detections_per_img, score_thresh=score_thresh)
    return _finish(model, pretrained, "retinanet", backbone, info)


def build_fcos(backbone="resnet18", norm="bn", trainable_layers=None, min_size=800, max_size=1333,
               anchor_sizes=None, detections_per_img=100, score_thresh=0.05, pretrained=None,
               pretrained_backbone=None, *, info: DatasetInfo) -> nn.Module:
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if backbone == "tiny":
        body = _build_backbone(backbone, norm, trainable_layers, pretrained_backbone,
                               extra_blocks=LastLevelP6P7(64, 64), returned_layers=[2, 3, 4])
    elif backbone.startswith("resnet"):
        body = _build_backbone(backbone, norm, trainable_layers, pretrained_backbone,
                               extra_blocks=LastLevelP6P7(256, 256), returned_layers=[2, 3, 4])
    else:
        body = _build_backbone(backbone, norm, trainable_layers, pretrained_backbone)
    with torch.no_grad():
        body.eval()
        levels = len(body(torch.zeros(1, 3, 64, 64)))
        body.train()
    sizes = anchor_sizes or [8, 16, 32, 64, 128]
    per_level = tuple((s,) for s in sizes) if len(sizes) == levels else tuple((sizes[0] * 2 ** i,) for i in range(levels))
    anchors = AnchorGenerator(per_level, ((1.0,),) * levels)
    model = FCOS(body, num_classes=info.num_classes + 1, min_size=min_size, max_size=max_size,
                 anchor_generator=anchors, detections_per_img=detections_per_img, score_thresh=score_thresh)
    return _finish(model, pretrained, "fcos", backbone, info)


# ------------------------------------------------------------------------------------------------------ register
_DET_EXAMPLE = ({"backbone": "tiny", "min_size": 64, "max_size": 96},)
_RCNN_EXAMPLE = ({"backbone": "tiny", "min_size": 64, "max_size": 96, "representation_size": 64,
                  "box_batch_size_per_image": 32},)
_KP_EXAMPLE = ({**_RCNN_EXAMPLE[0], "keypoint_head": [32, 32]},)


@hookimpl
def ddkit_models():
    yield ModelSpec(name="mlp", factory=MLP, params=MLPParams, task="classification",
                    summary="fully connected net (Hinton's MNIST teacher 1200-1200 / student 800-800)")
    yield ModelSpec(name="lenet", factory=LeNet, params=LeNetParams, task="classification",
                    summary="small conv net for small images (MNIST, digits)")
    yield ModelSpec(name="timm", factory=build_timm, params=TimmParams, task="classification",
                    summary="any timm architecture by name; pretrained: true / a tag (timm's weights) or a file")
    yield ModelSpec(name="torchvision", factory=build_torchvision, params=TorchvisionParams, task="classification",
                    summary="a torchvision classifier by builder name; pretrained: true / IMAGENET1K_V1 or a file",
                    examples=({"arch": "mobilenet_v3_small"},))
    yield ModelSpec(name="fasterrcnn", factory=build_fasterrcnn, params=RCNNParams, task="detection",
                    summary="torchvision Faster R-CNN, ResNet/MobileNetV3 FPN; COCO weights (resnet50, mobilenet_v3_large)",
                    examples=_RCNN_EXAMPLE)
    yield ModelSpec(name="retinanet", factory=build_retinanet, params=DetectorParams, task="detection",
                    summary="torchvision RetinaNet, ResNet/MobileNetV3 FPN; COCO weights (resnet50)",
                    examples=_DET_EXAMPLE)
    yield ModelSpec(name="fcos", factory=build_fcos, params=DetectorParams, task="detection",
                    summary="torchvision FCOS, ResNet/MobileNetV3 FPN; COCO weights (resnet50)",
                    examples=_DET_EXAMPLE)
    yield ModelSpec(name="keypointrcnn", factory=build_keypointrcnn, params=KeypointRCNNParams, task="keypoints",
                    summary="torchvision Keypoint R-CNN, ResNet/MobileNetV3 FPN; COCO weights (resnet50)",
                    examples=_KP_EXAMPLE)
