"""An Ultralytics YOLO network behind torchvision's detection API, so that ddkit's builtin ``detection`` and
``keypoints`` tasks train, label and evaluate it unchanged.

* train mode: ``model(images, targets) -> {loss name: scalar}``: the images (``[C, H, W]`` in ``[0, 1]``) are
  letterboxed to a square ``imgsz`` canvas and the losses are Ultralytics' own criterion
  (``model.init_criterion()``: ``v8DetectionLoss`` / ``v8PoseLoss`` / the end-to-end losses of YOLO26), divided by
  the batch size (Ultralytics multiplies by it for its nominal-batch accumulation; ddkit's optimiser sees means).
  Targets are torchvision's: ``boxes [N, 4]`` xyxy pixels, ``labels [N]`` in ``1..C``, ``keypoints [N, K, 3]``.
* eval mode: ``model(images) -> [{boxes, scores, labels, keypoints}]`` in input pixels, after YOLO's own NMS per
  image with a low confidence threshold (``conf``), labels ``1..C``, keypoints ``[N, K, 3]`` with YOLO's keypoint
  confidence as the third channel. The longer side is resized to ``imgsz`` unless :meth:`at_size` says to keep
  the input's size (multi-scale labelling: each view runs at its own size).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ddkit.errors import DataError
from ddkit_ultralytics.letterbox import (boxes_from_canvas, boxes_to_canvas, fitted_size, keypoints_from_canvas,
                                         keypoints_to_canvas, letterbox, own_canvas)


class YoloAdapter(nn.Module):
    """Wraps an Ultralytics ``DetectionModel`` / ``PoseModel`` (``self.net``; hooks address ``net.model.<i>``).

    Args:
        net: the Ultralytics network (its ``args`` carry the loss gains).
        imgsz: the training canvas side and the evaluation longer side.
        conf, iou, max_det, multi_label: YOLO's NMS at inference.
        train_scale: ``(lo, hi)`` with ``0 < lo <= hi <= 1``: each training image is resized to a random fraction
            of the fitted size (scale augmentation; the canvas stays ``imgsz``).
    """

    # the pose head's keypoint confidences are sigmoids, as Ultralytics' save_conf writes them (the keypoints task
    # asks for this; a torchvision heatmap head gives logits)
    keypoint_score_kind = "probability"

    def __init__(self, net: nn.Module, imgsz: int = 640, conf: float = 0.001, iou: float = 0.7,
                 max_det: int = 300, multi_label: bool = False, train_scale: Sequence[float] = (1.0, 1.0)):
        super().__init__()
        self.net = net
        self.imgsz, self.conf, self.iou, self.max_det = int(imgsz), float(conf), float(iou), int(max_det)
        self.multi_label = bool(multi_label)
        self.train_scale = (float(train_scale[0]), float(train_scale[1]))
        kpt = getattr(net, "kpt_shape", None)
        self.kpt_shape: tuple[int, int] | None = None if kpt is None else (int(kpt[0]), int(kpt[1]))
        self.__dict__["_criterion"] = None  # not a submodule: rebuilt per device, never in the state dict
        self.__dict__["_keep_size"] = False

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, the class branches first widened to ``state_dict``'s: a model whose class
        head came by name from weights of more classes (:func:`ddkit_ultralytics.build.load_weights`) is rebuilt
        from its checkpoint without the weights file."""
        from ddkit_ultralytics.build import class_width, widen_class_branches

        width = class_width(self.net, state_dict, "net.")
        if width is not None:
            widen_class_branches(self.net, width)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def stride(self) -> int:
        return int(self.net.stride.max())

    @property
    def num_classes(self) -> int:
        return int(self.net.model[-1].nc)

    # ----------------------------------------------------------------------------------------- capabilities
    @contextmanager
    def at_size(self, size: tuple[int, int] | None) -> Iterator[None]:
        """Inside: inputs run at their own size (padded to the stride), not resized to ``imgsz`` (``None``: no
        change). The builtin detection task asks a model for this method before torchvision's transform."""
        old = self._keep_size
        self.__dict__["_keep_size"] = size is not None or old
        try:
            yield
        finally:
            self.__dict__["_keep_size"] = old

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """``(H, W)`` an image of ``size`` is resized to before letterboxing (the longer side to ``imgsz``)."""
        return fitted_size(tuple(size), self.imgsz)

    def feature_forward(self, images: Sequence[Tensor]) -> None:
        """One forward of the network on the training canvas (what hint losses hook: a teacher's maps then line
        up with a student's, both centred on a square canvas); returns nothing."""
        sizes = [fitted_size(tuple(im.shape[-2:]), self.imgsz) for im in images]
        batch, _, _ = letterbox(images, sizes, self.stride, canvas=(self.imgsz, self.imgsz))
        self.net(batch)

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("YoloAdapter in train mode needs targets")
            return self._losses(list(images), list(targets))
        return self._predict(list(images))

    def _criterion_for(self, device: torch.device) -> Any:
        crit = self._criterion
        if crit is None or getattr(crit, "device", None) != device:
            crit = self.net.init_criterion()
            self.__dict__["_criterion"] = crit
        return crit

    def _losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        lo, hi = self.train_scale
        factors = (torch.rand(len(images)) * (hi - lo) + lo).tolist() if hi > lo else [lo] * len(images)
        sizes = [fitted_size(tuple(im.shape[-2:]), self.imgsz, f) for im, f in zip(images, factors)]
        batch, ratios, offsets = letterbox(images, sizes, self.stride, canvas=(self.imgsz, self.imgsz))
        h, w = batch.shape[-2:]
        labels = self._ultralytics_targets(targets, ratios, offsets, (h, w), batch.device)
        preds = self.net(batch)
        vec, items = self._criterion_for(batch.device)(preds, labels)
        vec = vec / len(images)
        names = list(items) if isinstance(items, dict) and len(items) == len(vec) else []
        if not names:
            return {"yolo_loss": vec.sum()}
        return {name: vec[i] for i, name in enumerate(names)}

    def _ultralytics_targets(self, targets: list[dict[str, Tensor]], ratios: Tensor, offsets: Tensor,
                             canvas: tuple[int, int], device: torch.device) -> dict[str, Tensor]:
        """torchvision targets -> Ultralytics' batch dict: ``batch_idx [M]``, ``cls [M, 1]`` (0-based),
        ``bboxes [M, 4]`` normalised ``cxcywh`` and ``keypoints [M, K, 3]`` normalised ``(x, y, v)``."""
        h, w = canvas
        norm = torch.tensor([w, h, w, h], dtype=torch.float32, device=device)
        idx, cls, boxes, kps = [], [], [], []
        for i, t in enumerate(targets):
            b = boxes_to_canvas(t["boxes"].float().reshape(-1, 4), ratios[i], offsets[i]) / norm
            boxes.append(torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1))
            cls.append(t["labels"].reshape(-1, 1).float() - 1)
            idx.append(torch.full((len(b),), float(i), device=device))
            if self.kpt_shape is not None:
                if "keypoints" not in t:
                    raise DataError(f"image {t.get('image_id')}: a YOLO pose model needs keypoint targets (task "
                                    "keypoints); for boxes only use a detection cfg such as yolov8n.yaml")
                kps.append(self._keypoint_targets(t, len(b), ratios[i], offsets[i], canvas))
        out = {"batch_idx": torch.cat(idx), "cls": torch.cat(cls), "bboxes": torch.cat(boxes)}
        if self.kpt_shape is not None:
            out["keypoints"] = torch.cat(kps)
        return out

    def _keypoint_targets(self, t: dict[str, Tensor], n: int, ratio: Tensor, offset: Tensor,
                          canvas: tuple[int, int]) -> Tensor:
        """One image's ``keypoints [n, K, 3]`` (input pixels) -> ``[n, K, d]`` normalised to the canvas, with ``(K,
        d)`` the network's ``kpt_shape``. The shape is the model's, not inferred from the tensor: an image without
        instances (a background image, or an unlabeled one that got no pseudo-labels) has ``0`` keypoint values,
        and Ultralytics' criterion then takes ``[0, K, d]``."""
        h, w = canvas
        nk, dims = self.kpt_shape
        kp = t["keypoints"].float()
        if kp.numel() != n * nk * 3:
            raise DataError(f"image {t.get('image_id')}: keypoints of shape {tuple(kp.shape)} for {n} instances; "
                            f"the YOLO pose model expects [{n}, {nk}, 3] (x, y, visibility)")
        k = keypoints_to_canvas(kp.reshape(n, nk, 3), ratio, offset)
        k[..., 0] /= w
        k[..., 1] /= h
        return k[..., :dims]

    # ----------------------------------------------------------------------------------------- inference
    def _predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Each image on its own smallest stride-multiple canvas, as Ultralytics' predictor letterboxes one image:
        the images of one canvas shape share a forward, so an image's boxes do not depend on the others in the
        batch (a shared canvas sized to the largest padded the smaller ones more, and moved their scores)."""
        imgsz = None if self._keep_size else self.imgsz
        sizes = [fitted_size(tuple(im.shape[-2:]), imgsz) for im in images]
        canvases = [own_canvas(size, self.stride) for size in sizes]
        out: list[dict[str, Tensor]] = [{}] * len(images)
        for canvas in dict.fromkeys(canvases):  # one forward per canvas shape, in order of first appearance
            group = [i for i, c in enumerate(canvases) if c == canvas]
            batch, ratios, offsets = letterbox([images[i] for i in group], [sizes[i] for i in group], self.stride,
                                               canvas=canvas)
            for j, det in enumerate(self._nms(self.net(batch))):
                out[group[j]] = self._to_torchvision(det, ratios[j], offsets[j], tuple(images[group[j]].shape[-2:]))
        return out

    def _nms(self, raw: Any) -> list[Tensor]:
        from ultralytics.utils.nms import non_max_suppression

        return non_max_suppression(raw, self.conf, self.iou, multi_label=self.multi_label, max_det=self.max_det,
                                   nc=self.num_classes, end2end=bool(getattr(self.net, "end2end", False)),
                                   max_time_img=1e6)  # no wall-clock cut-off: results must not depend on speed

    def _to_torchvision(self, det: Tensor, ratio: Tensor, offset: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
        """One image's NMS rows ``[n, 6 + K * d]`` (xyxy, conf, cls, keypoints) -> torchvision's output dict."""
        det = det.float()
        out = {"boxes": boxes_from_canvas(det[:, :4], ratio, offset, size), "scores": det[:, 4],
               "labels": det[:, 5].long() + 1}
        if self.kpt_shape is not None:
            k, d = self.kpt_shape
            kp = det[:, 6:6 + k * d].reshape(len(det), k, d)  # [0, K, d] when nothing is detected
            if d == 2:
                kp = torch.cat([kp, torch.ones_like(kp[..., :1])], -1)
            out["keypoints"] = keypoints_from_canvas(kp, ratio, offset, size)
        return out
