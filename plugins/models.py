"""Builtin model architectures.

Every factory takes its config parameters plus the runtime keyword ``info`` (the dataset's
:class:`~ddkit.types.DatasetInfo`), from which it reads the number of classes, the number of keypoints and, for
classification, the image shape (``info.extra["image_shape"] = [C, H, W]``). Nothing is downloaded: ``pretrained``
is a path to a local checkpoint (a ddkit checkpoint, a plain state dict, or a dict with ``state_dict``/``model``).

Detectors are torchvision's (Faster R-CNN, RetinaNet, FCOS, Keypoint R-CNN) on a ResNet or MobileNetV3 FPN backbone
built with ``weights=None``; their labels are contiguous ``1..C`` (0 is background), mapped from the dataset's
category ids by the task.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ddkit import ConfigError, DataError, DatasetInfo, hookimpl
from ddkit.types import ModelSpec


# ---------------------------------------------------------------------------------------------- weights from disk
def _state_dict_from_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"pretrained: {path} is not a local file. ddkit never downloads weights; pass the path of "
                          "a checkpoint on disk (a ddkit .pt, a state dict, or a dict with 'state_dict'/'model')")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"{path}: cannot load weights: {str(err).splitlines()[0]}") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{path}: not a state dict of tensors")
    return obj


def load_pretrained(module: nn.Module, path: str | Path, prefixes: tuple[str, ...] = ("module.",)) -> nn.Module:
    """Load matching weights from a local file; tensors whose shape differs (e.g. a new class head) are skipped
    with a warning. Raises :class:`DataError` when nothing matches."""
    state = _state_dict_from_file(path)
    own = module.state_dict()
    loaded, skipped = {}, []
    for key, value in state.items():
        for prefix in ("",) + prefixes:
            if key.startswith(prefix) and key[len(prefix):] in own:
                name = key[len(prefix):]
                if own[name].shape == value.shape:
                    loaded[name] = value
                else:
                    skipped.append(name)
                break
    if not loaded:
        raise DataError(f"{path}: no tensor matches the model's parameters (first model keys: "
                        f"{list(own)[:3]}, first file keys: {list(state)[:3]})")
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} tensors of a different shape: {skipped[:4]}", stacklevel=2)
    module.load_state_dict(loaded, strict=False)
    return module


def _image_shape(info: DatasetInfo) -> tuple[int, int, int]:
    shape = info.extra.get("image_shape")
    if not shape or len(shape) != 3:
        raise ConfigError("this model needs the dataset's image shape [C, H, W] (DatasetInfo.extra['image_shape']); "
                          "give the dataset a fixed image size")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ classification
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
            load_pretrained(self, pretrained)


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
            load_pretrained(self, pretrained)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


@dataclass
class TimmParams:
    model_name: str = "resnet18"
    pretrained: str | None = None
    drop_rate: float = 0.0
    kwargs: dict = field(default_factory=dict)


def build_timm(model_name="resnet18", pretrained=None, drop_rate=0.0, kwargs=None, *, info: DatasetInfo) -> nn.Module:
    """Any timm architecture by name, randomly initialised; ``pretrained`` is a local checkpoint path (timm's
    ``pretrained=True`` would download, so it is never used)."""
    import timm

    if model_name not in timm.list_models():
        import difflib

        hint = difflib.get_close_matches(model_name, timm.list_models(), n=1)
        raise ConfigError(f"unknown timm model {model_name!r}." + (f" Did you mean {hint[0]!r}?" if hint else ""))
    chans = int(info.extra.get("image_shape", [3])[0])
    model = timm.create_model(model_name, pretrained=False, num_classes=info.num_classes, in_chans=chans,
                              drop_rate=drop_rate, **dict(kwargs or {}))
    if pretrained:
        load_pretrained(model, pretrained)
    return model


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
    pretrained: str | None = None
    pretrained_backbone: str | None = None

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


def _build_backbone(backbone: str, norm: str, trainable_layers: int | None, pretrained_backbone: str | None,
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
    if pretrained_backbone:
        load_pretrained(net.body, pretrained_backbone, prefixes=("features.", "backbone.body.", "body.", "module."))
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


def _finish(model: nn.Module, pretrained: str | None) -> nn.Module:
    if pretrained:
        load_pretrained(model, pretrained)
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
    return _finish(model, pretrained)


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
    return _finish(model, pretrained)


def build_retinanet(backbone="resnet18", norm="bn", trainable_layers=None, min_size=800, max_size=1333,
                    anchor_sizes=None, detections_per_img=100, score_thresh=0.05, pretrained=None,
                    pretrained_backbone=None, *, info: DatasetInfo) -> nn.Module:
    from torchvision.models.detection import RetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if backbone == "tiny":
        body = _build_backbone(backbone, norm, trainable_layers, pretrained_backbone,
                               extra_blocks=LastLevelP6P7(128, 64), returned_layers=[2, 3, 4])
    elif backbone.startswith("resnet"):
        out = 512 if backbone in ("resnet18", "resnet34") else 2048
        body = _build_backbone(backbone, norm, trainable_layers, pretrained_backbone,
                               extra_blocks=LastLevelP6P7(out, 256), returned_layers=[2, 3, 4])
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
    return _finish(model, pretrained)


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
    return _finish(model, pretrained)


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
                    summary="any timm architecture by name; pretrained only from a local checkpoint")
    yield ModelSpec(name="fasterrcnn", factory=build_fasterrcnn, params=RCNNParams, task="detection",
                    summary="torchvision Faster R-CNN, ResNet/MobileNetV3 FPN backbone", examples=_RCNN_EXAMPLE)
    yield ModelSpec(name="retinanet", factory=build_retinanet, params=DetectorParams, task="detection",
                    summary="torchvision RetinaNet, ResNet/MobileNetV3 FPN backbone", examples=_DET_EXAMPLE)
    yield ModelSpec(name="fcos", factory=build_fcos, params=DetectorParams, task="detection",
                    summary="torchvision FCOS, ResNet/MobileNetV3 FPN backbone", examples=_DET_EXAMPLE)
    yield ModelSpec(name="keypointrcnn", factory=build_keypointrcnn, params=KeypointRCNNParams, task="keypoints",
                    summary="torchvision Keypoint R-CNN, ResNet/MobileNetV3 FPN backbone", examples=_KP_EXAMPLE)
