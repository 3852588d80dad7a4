"""Pretrained weights the way each model library does it.

A model's ``pretrained`` (and a detector's ``pretrained_backbone``) key takes:

* ``true``: the library's default weights (torchvision's ``DEFAULT``, timm's default tag);
* a weights name: torchvision ``IMAGENET1K_V1`` / ``COCO_V1`` (or ``ResNet18_Weights.IMAGENET1K_V1``), a timm tag
  such as ``a1_in1k``;
* a path to a local file (a ddkit checkpoint, a state dict, or a dict with ``state_dict``/``model``).

Library weights come through the library's own API and cache: torchvision's weights enums and the torch hub cache
(``$TORCH_HOME/hub/checkpoints/<file name of the weights url>``), timm's ``create_model(pretrained=True)`` and the
Hugging Face cache. Offline, a weights file that is not in the cache is a one-line :class:`DataError` that names the
url, the cache path and the local-file alternative.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from ddkit import ConfigError, DataError, DatasetInfo
from ddkit.engine.task import warn_renamed_classes

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar")
_LOCAL_HINT = "or set pretrained to a local weights file (a state dict or a ddkit .pt)"


def is_local(value: Any) -> bool:
    """True when a ``pretrained`` value names a file rather than library weights: an existing path, or a string
    with a path separator or a weights-file suffix."""
    if not isinstance(value, (str, Path)) or isinstance(value, bool):
        return False
    text = str(value)
    return Path(text).expanduser().is_file() or "/" in text or "\\" in text or text.endswith(WEIGHT_SUFFIXES)


def wants_library_weights(value: Any) -> bool:
    """``true`` or a weights name (not a path, not false/None/empty)."""
    return value is True or (isinstance(value, str) and bool(value) and not is_local(value))


# ------------------------------------------------------------------------------------------------ local files
def state_dict_from_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file (``weights_only`` load; ``model``/``state_dict`` entries unwrapped)."""
    return _read_weights(path)[0]


def _read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """:func:`state_dict_from_file`'s tensors and, for a ddkit checkpoint, its class names (``info``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"pretrained: {path} is not a local file. ddkit never downloads a path; pass the path of "
                          "a checkpoint on disk (a ddkit .pt, a state dict, or a dict with 'state_dict'/'model'), "
                          "or pretrained: true / a weights name for the model library's own weights")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"{path}: cannot load weights: {str(err).splitlines()[0]}") from None
    info = obj.get("info") if isinstance(obj, dict) else None
    names = [str(c.get("name")) for c in info.get("categories") or []] if isinstance(info, dict) else None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{path}: not a state dict of tensors")
    return obj, names


def load_matching(module: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                  prefixes: tuple[str, ...] = ("module.",), skip: tuple[str, ...] = ()) -> set[str]:
    """Copy the tensors of ``state`` whose name (after stripping one of ``prefixes``) and shape match ``module``'s.

    Names starting with one of ``skip`` keep the module's own initialisation (a class head sized for other
    classes). 3-channel input filters for a model of other input channels are adapted (:func:`_rgb_filters_for`).
    Other tensors of a different shape are skipped with a warning. Returns the module's loaded names;
    raises :class:`DataError` when nothing matches.
    """
    own = module.state_dict()
    loaded, skipped = {}, []
    for key, value in state.items():
        for prefix in ("",) + prefixes:
            name = key[len(prefix):]
            if key.startswith(prefix) and name in own:
                if name.startswith(skip):
                    pass  # a head for other classes keeps its own init
                elif own[name].shape == value.shape:
                    loaded[name] = value
                elif _rgb_filters_for(own[name], value):  # the input conv of a grey (or N-channel) model
                    from timm.models import adapt_input_conv

                    loaded[name] = adapt_input_conv(own[name].shape[1], value)
                else:
                    skipped.append(name)
                break
    if not loaded:
        raise DataError(f"{source}: no tensor matches the model's parameters (first model keys: "
                        f"{list(own)[:3]}, first file keys: {list(state)[:3]})")
    if skipped:
        warnings.warn(f"{source}: skipped {len(skipped)} tensors of a different shape: {skipped[:4]}", stacklevel=3)
    module.load_state_dict(loaded, strict=False)
    return set(loaded)


def _rgb_filters_for(own: torch.Tensor, value: torch.Tensor) -> bool:
    """A file's 3-channel conv filters where the model's conv takes another channel count, all else equal: they are
    adapted as timm's ``adapt_input_conv`` does (grey: the RGB filters summed), as library weights are."""
    return (own.ndim == value.ndim == 4 and value.shape[1] == 3 and own.shape[1] != 3
            and own.shape[0] == value.shape[0] and own.shape[2:] == value.shape[2:])


def load_pretrained(module: nn.Module, path: str | Path, prefixes: tuple[str, ...] = ("module.",),
                    info: DatasetInfo | None = None) -> nn.Module:
    """Load matching weights from a local file; tensors whose shape differs (e.g. a new class head) are skipped
    with a warning. Raises :class:`DataError` when nothing matches. A ddkit checkpoint of as many classes as
    ``info`` under other names warns that its class head was loaded by index."""
    state, names = _read_weights(path)
    load_matching(module, state, str(path), prefixes)
    if info is not None:
        warn_renamed_classes(path, names, [str(c.get("name")) for c in info.categories])
    return module


# ------------------------------------------------------------------------------------------------- torchvision
def torchvision_weights(builder: str, value: bool | str, what: str = "pretrained") -> Any:
    """The torchvision weights enum member that ``value`` names for the model builder ``builder``.

    ``true`` is ``DEFAULT``; a member name (``IMAGENET1K_V1``) or a full name (``ResNet18_Weights.IMAGENET1K_V1``)
    picks one. An unknown name is a :class:`ConfigError` listing the valid ones.
    """
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(builder)
    except (ValueError, KeyError):
        raise ConfigError(f"{what}: torchvision has no pretrained weights for {builder!r}; {_LOCAL_HINT}") from None
    name = "DEFAULT" if value is True else str(value).split(".")[-1]
    prefix = str(value).rsplit(".", 1)[0] if "." in str(value) else enum.__name__
    if name not in enum.__members__ or prefix != enum.__name__:
        raise ConfigError(f"{what}: {value!r} is not a weights name of torchvision's {builder}; valid: true, "
                          f"{', '.join(enum.__members__)} (or {enum.__name__}.<name>), {_LOCAL_HINT}")
    return enum[name]


def torch_hub_cache_file(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``url``: ``$TORCH_HOME/hub/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def offline_error(what: str, url: str, cache: Path | str, err: BaseException, where: str = "") -> DataError:
    """The one-line error for weights that could be neither downloaded nor found in the library's cache;
    ``where`` says how to fill the cache when it is more than one file at ``cache``."""
    reason = (str(err).splitlines() or [type(err).__name__])[0]
    if len(reason) > 160:  # whole words: the library's message may be long
        reason = reason[:160].rsplit(" ", 1)[0] + " ..."
    where = where or f"put the file at {cache} (the library's cache)"
    return DataError(f"{what}: cannot download {url} ({reason}); {where} {_LOCAL_HINT}")


def torchvision_state_dict(weights: Any, what: str = "pretrained") -> dict[str, torch.Tensor]:
    """``weights.get_state_dict`` (torch hub cache, downloaded once, hash-checked) with a one-line offline error."""
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as err:
        raise offline_error(f"{what} {weights}", weights.url, torch_hub_cache_file(weights.url), err) from None


def call_torchvision_builder(builder: str, weights: Any, what: str = "pretrained", **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(builder, weights=weights, **kwargs)`` with the one-line offline error."""
    from torchvision import models

    try:
        return models.get_model(builder, weights=weights, **kwargs)
    except (OSError, RuntimeError) as err:
        if weights is None:
            raise
        raise offline_error(f"{what} {weights}", weights.url, torch_hub_cache_file(weights.url), err) from None


def class_mapping(weights: Any, categories: Iterable[Mapping[str, Any]]) -> dict[int, int]:
    """``{our class slot: the weights' slot}`` by class name (case-insensitive): slot 0 (background) is 0, the
    dataset's class ``j`` is slot ``j + 1``. Classes the weights do not know are left out."""
    theirs = {str(c).lower(): i for i, c in enumerate(weights.meta.get("categories", [])) if i > 0}
    mapping = {0: 0}
    for j, c in enumerate(categories):
        name = str(c.get("name", "")).lower()
        if name in theirs:
            mapping[j + 1] = theirs[name]
    return mapping


def take_class_slots(theirs: torch.Tensor, ours: torch.Tensor, mapping: Mapping[int, int], k_theirs: int,
                     k_ours: int, per_class: int = 1) -> torch.Tensor:
    """A copy of ``ours`` whose class slots ``new`` hold ``theirs``' slots ``old`` for each ``new: old``.

    Dim 0 of both is laid out ``[groups, classes, per_class]`` as torchvision's heads are: a box predictor's
    ``cls_score`` (``per_class`` 1) and ``bbox_pred`` (4, class-major), RetinaNet / FCOS ``cls_logits`` (groups =
    anchors per location). ``theirs [G*k_theirs*P, ...]``, ``ours [G*k_ours*P, ...]`` -> ``[G*k_ours*P, ...]``.
    """
    groups = theirs.shape[0] // (k_theirs * per_class)
    if groups * k_theirs * per_class != theirs.shape[0] or groups * k_ours * per_class != ours.shape[0] \
            or theirs.shape[1:] != ours.shape[1:]:
        raise ValueError(f"class head shapes {tuple(theirs.shape)} / {tuple(ours.shape)} do not fit "
                         f"{k_theirs} / {k_ours} classes x {per_class}")
    t = theirs.reshape(groups, k_theirs, per_class, *theirs.shape[1:])
    out = ours.detach().clone().reshape(groups, k_ours, per_class, *ours.shape[1:])
    for new, old in mapping.items():
        out[:, new] = t[:, old]
    return out.reshape(ours.shape)


# ------------------------------------------------------------------------------------------------------- timm
def timm_create(model_name: str, value: bool | str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(<arch>.<tag>, pretrained=True, **kwargs)``: timm resizes the classifier and the input
    conv itself. ``value`` is ``true`` (the default tag, or the one in ``model_name``) or a tag (``a1_in1k``)."""
    import timm

    arch = model_name.partition(".")[0]
    full = f"{arch}.{value}" if isinstance(value, str) else model_name
    try:
        cfg = timm.models.get_pretrained_cfg(full, allow_unregistered=False)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise ConfigError(f"pretrained: timm has no weights {full!r}; tags of {arch}: "
                          f"{', '.join(tags) or 'none'}; {_LOCAL_HINT}")
    try:
        return timm.create_model(full, pretrained=True, **kwargs)
    except (OSError, RuntimeError) as err:
        if cfg.hf_hub_id:
            from huggingface_hub import constants

            # the folder huggingface_hub gives the repo: models--<org>--<name> (snapshots/<commit>/<file> inside)
            url = f"https://huggingface.co/{cfg.hf_hub_id}"
            cache = Path(constants.HF_HUB_CACHE) / ("models--" + cfg.hf_hub_id.replace("/", "--"))
            # a snapshot folder, not one file: say how to make it, and how to skip the hub's retries next time
            where = (f"copy the folder that `huggingface-cli download {cfg.hf_hub_id}` writes on a connected machine "
                     f"to {cache} (the library's cache: refs/main naming a commit, snapshots/<commit>/"
                     f"model.safetensors) and set HF_HUB_OFFLINE=1 to skip the download retries,")
            raise offline_error(f"pretrained timm {full}", url, cache, err, where) from None
        raise offline_error(f"pretrained timm {full}", cfg.url, torch_hub_cache_file(cfg.url), err) from None
