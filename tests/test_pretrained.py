"""Pretrained weights through each library's own API and cache, never the network.

The "downloaded" files are models built with random weights and saved under the exact name the library's cache
uses (``$TORCH_HOME/hub/checkpoints/<file of the weights url>``, the Hugging Face cache layout for timm); a test
then checks, tensor by tensor, that those weights arrived in the model ddkit built.
"""
from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

import ddkit
from ddkit import ConfigError, DataError
from ddkit.engine.checkpoint import load_model, save_model
from ddkit.testing.models import info_for_task
from ddkit_plugins import models as builtin_models
from ddkit_plugins.pretrained import class_mapping, is_local, take_class_slots, torch_hub_cache_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache; any download attempt fails as it does offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known (test: offline)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch"


def _distinct(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Every float tensor replaced by positive random values, so a buffer left at its init (BN: 0 / 1) cannot pass
    for a loaded one; FrozenBatchNorm-style files carry no ``num_batches_tracked``."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v
            for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _cache(weights, state: dict[str, torch.Tensor]) -> Path:
    path = torch_hub_cache_file(weights.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _build(task: str, cfg: dict, **info_kw):
    return ddkit.build("tasks", task).build_model(cfg, info_for_task(task, **info_kw))


# ------------------------------------------------------------------------------------------------ classifiers
def test_torchvision_classifier_loads_the_cached_imagenet_weights_with_a_new_head(torch_home):
    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    file = _distinct(torchvision.models.mobilenet_v3_small(weights=None).state_dict())
    _cache(weights, file)
    for value in (True, "IMAGENET1K_V1", "MobileNet_V3_Small_Weights.IMAGENET1K_V1"):
        model = _build("classification", {"name": "torchvision", "arch": "mobilenet_v3_small", "pretrained": value},
                       num_classes=5, image_shape=(3, 32, 32))
        own = model.state_dict()
        for k, v in file.items():
            if not k.startswith("classifier.3."):
                assert torch.equal(own[k], v), k
        assert own["classifier.3.weight"].shape == (5, 1024)  # a fresh 5-way head
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 5)


def test_torchvision_classifier_on_grey_images_sums_the_rgb_filters(torch_home):
    weights = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT
    file = _distinct(torchvision.models.mobilenet_v3_small(weights=None).state_dict())
    _cache(weights, file)
    model = _build("classification", {"name": "torchvision", "arch": "mobilenet_v3_small", "pretrained": True},
                   image_shape=(1, 16, 16))
    assert torch.allclose(model.state_dict()["features.0.0.weight"], file["features.0.0.weight"].sum(1, keepdim=True))


@pytest.mark.parametrize("cfg", [{"name": "torchvision", "arch": "resnet18"},
                                 {"name": "timm", "model_name": "resnet18"}])
def test_a_local_rgb_weights_file_on_grey_images_sums_the_rgb_filters(tmp_path, cfg):
    """A local file of ImageNet-style (3-channel) weights gives a grey model the summed RGB filters, as library
    weights do (it used to skip the first conv with a warning and keep a random one)."""
    file = _distinct(torchvision.models.resnet18(weights=None).state_dict())
    torch.save(file, tmp_path / "rgb.pth")
    model = _build("classification", {**cfg, "pretrained": str(tmp_path / "rgb.pth")}, image_shape=(1, 16, 16))
    assert torch.allclose(model.state_dict()["conv1.weight"], file["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], file["layer1.0.conv1.weight"])


def test_timm_loads_through_its_hugging_face_cache(tmp_path, monkeypatch):
    import safetensors.torch as safetensors_torch
    import timm
    from huggingface_hub import constants

    hub = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # cache only: the test never touches the network
    name = "mobilenetv3_small_050.lamb_in1k"
    file = _distinct(timm.create_model(name, pretrained=False).state_dict())
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = hub / f"models--timm--{name}" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (hub / f"models--timm--{name}" / "refs").mkdir()
    (hub / f"models--timm--{name}" / "refs" / "main").write_text(commit)
    safetensors_torch.save_file({k: v.contiguous() for k, v in file.items()}, snapshot / "model.safetensors")
    for cfg in ({"model_name": "mobilenetv3_small_050", "pretrained": True},
                {"model_name": "mobilenetv3_small_050", "pretrained": "lamb_in1k"},
                {"model_name": name, "pretrained": True}):
        model = _build("classification", {"name": "timm", **cfg}, num_classes=4, image_shape=(3, 32, 32))
        own = model.state_dict()
        for k, v in file.items():
            if not k.startswith("classifier."):
                assert torch.equal(own[k], v), k
        assert own["classifier.weight"].shape[0] == 4


def test_timm_offline_without_the_file_is_one_line_naming_the_hub_and_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        _build("classification", {"name": "timm", "model_name": "mobilenetv3_small_050", "pretrained": True},
               image_shape=(3, 32, 32))
    msg = str(err.value)
    assert "\n" not in msg and "huggingface.co/timm/mobilenetv3_small_050.lamb_in1k" in msg
    assert str(tmp_path / "hf" / "models--timm--mobilenetv3_small_050.lamb_in1k") in msg and "local weights file" in msg
    # the cache is a snapshot folder: the message says how to fill it and how to skip the hub's retries
    assert "snapshots/<commit>/model.safetensors" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "huggingface-cli download timm/mobilenetv3_small_050.lamb_in1k" in msg
    with pytest.raises(ConfigError, match="tags of mobilenetv3_small_050: .*lamb_in1k"):
        _build("classification", {"name": "timm", "model_name": "mobilenetv3_small_050", "pretrained": "nope"},
               image_shape=(3, 32, 32))


# -------------------------------------------------------------------------------------------------- detectors
def test_detector_backbone_loads_the_cached_imagenet_weights(torch_home):
    weights = torchvision.models.MobileNet_V3_Large_Weights.DEFAULT
    file = _distinct(torchvision.models.mobilenet_v3_large(weights=None).state_dict())
    _cache(weights, file)
    model = _build("detection", {"name": "fasterrcnn", "backbone": "mobilenet_v3_large", "pretrained_backbone": True,
                                 "min_size": 64, "max_size": 64})
    body = model.backbone.body.state_dict()
    used = [k for k in file if k.startswith("features.") and k[len("features."):] in body]
    assert len(used) == len([k for k in body if not k.endswith("num_batches_tracked")])  # all came from the file
    for k in used:
        assert torch.equal(body[k[len("features."):]], file[k]), k


def test_whole_coco_detector_loads_all_but_the_class_head(torch_home):
    weights = torchvision.models.detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1
    source = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None,
                                                                             num_classes=91)
    file = _distinct(source.state_dict())
    _cache(weights, file)
    model = _build("detection", {"name": "fasterrcnn", "backbone": "mobilenet_v3_large", "pretrained": "COCO_V1",
                                 "min_size": 64, "max_size": 64}, num_classes=3)
    own = model.state_dict()
    head = "roi_heads.box_predictor."
    assert {k for k in own if not k.startswith(head) and not k.endswith("num_batches_tracked")} == \
        {k for k in file if not k.startswith(head)}
    for k, v in file.items():
        if not k.startswith(head):
            assert torch.equal(own[k], v), k
    assert own[head + "cls_score.weight"].shape == (4, 1024) and own[head + "bbox_pred.weight"].shape == (16, 1024)
    assert not torch.equal(own[head + "cls_score.weight"], file[head + "cls_score.weight"][:4])
    preds = ddkit.build("tasks", "detection").predict(model, [torch.rand(3, 64, 80)])
    assert preds[0].boxes.shape[1] == 4
    # classes COCO knows by name take their rows of the class head; the others start fresh
    info = info_for_task("detection", num_classes=3)
    for c, name in zip(info.categories, ("dog", "unicorn", "Person")):
        c["name"] = name
    own = ddkit.build("tasks", "detection").build_model(
        {"name": "fasterrcnn", "backbone": "mobilenet_v3_large", "pretrained": True, "min_size": 64, "max_size": 64},
        info).state_dict()
    coco = weights.meta["categories"]
    cls, box = file[head + "cls_score.weight"], file[head + "bbox_pred.weight"]
    for ours, theirs in ((0, 0), (1, coco.index("dog")), (3, coco.index("person"))):
        assert torch.equal(own[head + "cls_score.weight"][ours], cls[theirs])
        assert torch.equal(own[head + "bbox_pred.weight"][4 * ours:4 * ours + 4], box[4 * theirs:4 * theirs + 4])
    assert not any(torch.equal(own[head + "cls_score.weight"][2], row) for row in cls)


@pytest.mark.parametrize("pair", sorted(builtin_models.COCO_BUILDERS), ids=lambda p: "-".join(p))
def test_ddkit_detector_layout_is_torchvisions_for_every_coco_pair(pair):
    """Same tensor names and shapes as torchvision's COCO builder (a COCO-sized head), so its weights load whole."""
    detector, backbone = pair
    kw = {"weights": None, "weights_backbone": None}
    theirs = torchvision.models.get_model(builtin_models.COCO_BUILDERS[pair], num_classes=91 if detector !=
                                          "keypointrcnn" else 2, **kw).state_dict()
    task = "keypoints" if detector == "keypointrcnn" else "detection"
    info = dict(num_classes=90 if task == "detection" else 1) | ({"num_keypoints": 17} if task == "keypoints" else {})
    ours = _build(task, {"name": detector, "backbone": backbone}, **info).state_dict()
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # noqa
    assert shapes(ours) == shapes(theirs)


def test_keypoint_head_is_kept_only_for_the_weights_own_keypoints():
    kp = torchvision.models.detection.KeypointRCNN_ResNet50_FPN_Weights.COCO_V1
    box_head = tuple(builtin_models.CLASS_HEADS["keypointrcnn"])
    person = info_for_task("keypoints", num_classes=1, num_keypoints=17)
    person.categories[0]["name"] = "person"
    assert builtin_models._head_to_skip("keypointrcnn", kp, person) == box_head
    assert class_mapping(kp, person.categories) == {0: 0, 1: 1}  # the box head's person row is COCO's
    person.extra["keypoint_names"] = ["x"] * 17  # other keypoints: a fresh keypoint head
    assert builtin_models._head_to_skip("keypointrcnn", kp, person) == box_head + ("roi_heads.keypoint_predictor.",)
    other = info_for_task("keypoints", num_classes=1, num_keypoints=14)
    assert builtin_models._head_to_skip("keypointrcnn", kp, other) == box_head + ("roi_heads.keypoint_predictor.",)


def _slow_take(theirs, ours, mapping, k_theirs, k_ours, per_class):
    """Reference: walk dim 0 slot by slot."""
    out = ours.clone()
    groups = theirs.shape[0] // (k_theirs * per_class)
    for g in range(groups):
        for new, old in mapping.items():
            for r in range(per_class):
                out[(g * k_ours + new) * per_class + r] = theirs[(g * k_theirs + old) * per_class + r]
    return out


@pytest.mark.parametrize("groups,per_class,rest", [(1, 1, (16,)), (1, 4, (16,)), (1, 4, ()), (9, 1, (8, 3, 3))])
def test_class_slots_by_name_match_a_slow_reference(groups, per_class, rest):
    weights = torchvision.models.detection.RetinaNet_ResNet50_FPN_Weights.COCO_V1
    names = weights.meta["categories"]
    cats = [{"id": 1, "name": "Dog"}, {"id": 2, "name": "unicorn"}, {"id": 3, "name": "person"}]
    mapping = class_mapping(weights, cats)
    assert mapping == {0: 0, 1: names.index("dog"), 3: names.index("person")}
    theirs = torch.randn(groups * len(names) * per_class, *rest)
    ours = torch.randn(groups * 4 * per_class, *rest)
    got = take_class_slots(theirs, ours, mapping, len(names), 4, per_class)
    assert torch.equal(got, _slow_take(theirs, ours, mapping, len(names), 4, per_class))
    assert not torch.equal(got, ours)


# ------------------------------------------------------------------------------------------------ user errors
def test_a_long_offline_reason_is_cut_at_a_word():
    from ddkit_plugins.pretrained import offline_error

    reason = "Cannot reach the hub because " + "the connection was refused " * 10 + "please check your connection"
    msg = str(offline_error("pretrained x", "https://h/x", "/cache/x", OSError(reason)))
    cut = msg.split("(", 1)[1].split(" ...)", 1)[0]
    assert reason.startswith(cut) and reason[len(cut)] == " " and len(cut) <= 160


def test_offline_download_is_one_line_naming_the_url_the_cache_and_the_local_path(torch_home):
    weights = torchvision.models.MobileNet_V3_Large_Weights.DEFAULT
    with pytest.raises(DataError) as err:
        _build("detection", {"name": "fcos", "backbone": "mobilenet_v3_large", "pretrained_backbone": True})
    msg = str(err.value)
    assert "\n" not in msg and weights.url in msg and str(torch_hub_cache_file(weights.url)) in msg
    assert str(torch_home) in msg and "local weights file" in msg
    assert not torch_hub_cache_file(weights.url).exists()


def test_wrong_names_and_pairs_are_config_errors(torch_home, tmp_path):
    with pytest.raises(ConfigError, match="valid: true, IMAGENET1K_V1, DEFAULT"):
        _build("classification", {"name": "torchvision", "arch": "mobilenet_v3_small", "pretrained": "IMAGENET"},
               image_shape=(3, 32, 32))
    with pytest.raises(ConfigError, match="COCO weights for fasterrcnn with backbone resnet50, mobilenet_v3_large"):
        _build("detection", {"name": "fasterrcnn", "backbone": "resnet18", "pretrained": True})
    with pytest.raises(ConfigError, match="'tiny' backbone has no library weights"):
        _build("detection", {"name": "fcos", "backbone": "tiny", "pretrained_backbone": True})
    with pytest.raises(ConfigError, match="never downloads a path"):
        _build("detection", {"name": "fcos", "backbone": "tiny", "pretrained": str(tmp_path / "missing.pth")})
    with pytest.raises(ConfigError, match="Did you mean 'mobilenet_v3_small'"):
        _build("classification", {"name": "torchvision", "arch": "mobilenet_v3_smal"})


def test_is_local_tells_paths_from_weights_names(tmp_path):
    (tmp_path / "w").write_bytes(b"")
    assert is_local(str(tmp_path / "w")) and is_local("weights/r18") and is_local("r18.pth")
    assert not is_local("IMAGENET1K_V1") and not is_local("a1_in1k") and not is_local(True)


def test_a_saved_model_rebuilds_without_its_library_weights(torch_home, tmp_path):
    """The weights are in the checkpoint: rebuilding it (eval, predict, another machine) reads no cache."""
    weights = torchvision.models.MobileNet_V3_Large_Weights.DEFAULT
    _cache(weights, _distinct(torchvision.models.mobilenet_v3_large(weights=None).state_dict()))
    model = _build("detection", {"name": "fasterrcnn", "backbone": "mobilenet_v3_large", "pretrained_backbone": True,
                                 "min_size": 64, "max_size": 64, "representation_size": 32})
    save_model(model, tmp_path / "model.pt")
    torch_hub_cache_file(weights.url).unlink()
    _, again, _ = load_model(tmp_path / "model.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_a_coco_detector_is_usable_untrained_only_when_coco_names_every_class(torch_home):
    """``train.iterations: 0`` (a teacher labelling with torchvision's COCO weights as they are) needs every class
    head row from the weights: classes COCO names pass, one it does not is refused, naming the class head."""
    from ddkit.engine.as_built import check_as_built

    weights = torchvision.models.detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1
    _cache(weights, _distinct(torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=91).state_dict()))
    task = ddkit.build("tasks", "detection")
    cfg = {"name": "fasterrcnn", "backbone": "mobilenet_v3_large", "pretrained": True, "min_size": 64, "max_size": 64}
    for names, ok in ((("dog", "Person"), True), (("dog", "unicorn"), False)):
        info = info_for_task("detection", num_classes=2)
        for c, name in zip(info.categories, names):
            c["name"] = name
        if ok:
            check_as_built(lambda: task.build_model(cfg, info), "r.yaml: teacher")
        else:
            with pytest.raises(ConfigError, match=r"random.*roi_heads\.box_predictor\.cls_score\.weight"):
                check_as_built(lambda: task.build_model(cfg, info), "r.yaml: teacher")


def test_a_ddkit_weights_file_of_other_class_names_warns_that_its_head_loaded_by_index(tmp_path):
    """``pretrained: model.pt`` (a ddkit checkpoint) on data of as many classes under other names: loaded by
    index, as an Ultralytics .pt is, and said (a giraffe teacher silently became an okapi one)."""
    import dataclasses
    import warnings

    from ddkit.engine.checkpoint import save_model

    info = info_for_task("classification", num_classes=3)
    path = save_model(_build("classification", {"name": "mlp", "hidden": [8]}, num_classes=3), tmp_path / "m.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ddkit.build("tasks", "classification").build_model({"name": "mlp", "hidden": [8], "pretrained": str(path)},
                                                           info)  # the same names: silent
    renamed = dataclasses.replace(info, categories=[{**c, "name": f"other{k}"} for k, c in enumerate(info.categories)])
    with pytest.warns(UserWarning, match=r"3 of its 3 class names differ from the dataset's \(class 0 is .* there, "
                                         r"'other0' here\); its class head was loaded by index"):
        ddkit.build("tasks", "classification").build_model({"name": "mlp", "hidden": [8], "pretrained": str(path)},
                                                           renamed)
