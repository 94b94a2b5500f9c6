"""Pretrained weights from a local file: backbone taken, head kept or re-initialised, input channels adapted."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from timm.models import adapt_input_conv, clean_state_dict
from torch import nn

from lit_imgcls.checkpoint_io import read_checkpoint
from lit_imgcls.errors import ConfigError

CLASSES_KEY = "lit_imgcls_classes"  # class names a task of this project stores in its checkpoints
DATA_KEY = "lit_imgcls_data"  # the data's normalisation {mean, std} and image_shape [C, H, W], for export


@dataclass
class Weights:
    """A state dict read from a file, with what the file says about its architecture and classes."""

    state_dict: dict[str, torch.Tensor]
    path: str
    architecture: str | None = None
    classes: tuple[str, ...] | None = None


def read_weights(path: str | Path) -> Weights:
    """Read a timm/torchvision state dict (`.pth`, `.bin`, `.safetensors`), a timm training checkpoint, or any
    checkpoint of this project (its `net.` weights)."""
    path = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"pretrained weights {path} not found: fix the path in model.pretrained_checkpoint")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return Weights(load_file(path), path)
    raw = read_checkpoint(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} holds a {type(raw).__name__}, not a state dict or checkpoint")
    if "pytorch-lightning_version" in raw:  # a checkpoint written by one of this project's tasks
        hparams = raw.get("hyper_parameters", {})
        net = {k.removeprefix("net."): v for k, v in raw["state_dict"].items() if k.startswith("net.")}
        if not net:
            raise ConfigError(f"checkpoint {path} has no `net.` weights: it was not written by a lit_imgcls task")
        classes = raw.get(CLASSES_KEY)
        return Weights(clean_state_dict(net), path, hparams.get("model"), tuple(classes) if classes else None)
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # timm's train.py checkpoints
        if isinstance(raw.get(key), dict):
            return Weights(clean_state_dict(raw[key]), path, raw.get("arch"))
    return Weights(clean_state_dict(raw), path)


def classifier_name(net: nn.Module) -> str:
    """Qualified name of `net`'s final classifier (timm's `get_classifier()`, else `fc`/`classifier`/`head`)."""
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if head is None:
        head = next((getattr(net, a) for a in ("fc", "classifier", "head") if hasattr(net, a)), None)
    for name, module in net.named_modules():
        if head is not None and module is head and name:
            return name
    raise ConfigError(f"cannot find the classifier of {type(net).__name__}: it needs timm's get_classifier()")


def head_names(net: nn.Module, head: Sequence[str] | None = None) -> list[str]:
    """Qualified names of the modules that form the head: `head`, else the final classifier."""
    names = list(head) if head else [classifier_name(net)]
    modules = dict(net.named_modules())
    unknown = [name for name in names if not name or name not in modules]
    if unknown:
        shown = ", ".join(name for name in list(modules)[1:16])
        raise ConfigError(f"model.head {unknown} names no module of {type(net).__name__}; its modules: {shown}, ...")
    return names


def head_parameter_names(net: nn.Module, head: Sequence[str] | None = None) -> set[str]:
    """Names (in `net.state_dict()`) of the head's parameters and buffers."""
    prefixes = tuple(f"{name}." for name in head_names(net, head))
    return {k for k in net.state_dict() if k.startswith(prefixes)}


def first_conv_name(net: nn.Module) -> str | None:
    """The input convolution's weight name: timm's `pretrained_cfg['first_conv']`, else the first 4-D weight."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    if isinstance(first, str) and f"{first}.weight" in net.state_dict():
        return f"{first}.weight"
    return next((k for k, v in net.state_dict().items() if v.ndim == 4), None)


def load_weights(
    net: nn.Module,
    weights: Weights,
    architecture: str,
    classes: Sequence[str] | None = None,
    head: Sequence[str] | None = None,
) -> bool:
    """Copy `weights` into `net` (an `architecture` built for the target classes and channels), in place.

    The backbone must match; a different class count, or different class names when both sides know them,
    re-initialises the head (the `head` modules, default the classifier: they keep `net`'s fresh initialisation).
    A 3-channel stem on 1-channel data (or the reverse) is adapted with timm's `adapt_input_conv`.
    Returns whether the head was re-initialised.
    """
    if weights.architecture and weights.architecture != architecture:
        raise ConfigError(
            f"{weights.path} holds a {weights.architecture} network but the model is {architecture}: "
            f"set model: {weights.architecture}, or choose a {architecture} checkpoint"
        )
    target = net.state_dict()
    head_keys = head_parameter_names(net, head)
    source = dict(weights.state_dict)
    stem = first_conv_name(net)
    if stem in source and source[stem].ndim == 4 and source[stem].shape[1] != target[stem].shape[1]:
        source[stem] = adapt_input_conv(target[stem].shape[1], source[stem], base_chans=source[stem].shape[1])
    backbone_missing = sorted(k for k in target.keys() - source.keys() if k not in head_keys)
    unexpected = sorted(k for k in source.keys() - target.keys() if k not in head_keys)
    wrong_shape = sorted(k for k in target.keys() & source.keys() - head_keys if source[k].shape != target[k].shape)
    if backbone_missing or unexpected or wrong_shape:
        first = ", ".join(list(source)[:3])
        described = weights.architecture or f"a state dict of {len(source)} tensors: {first}, ..."
        details = "; ".join(
            f"{label}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''} ({len(keys)})"
            for label, keys in (("missing", backbone_missing), ("unexpected", unexpected), ("shape", wrong_shape))
            if keys
        )
        raise ConfigError(
            f"{weights.path} ({described}) does not fit the model {architecture}: {details}. "
            "Set the model to the architecture that wrote the weights"
        )
    head_fits = all(k in source and source[k].shape == target[k].shape for k in head_keys)
    same_names = classes is None or weights.classes is None or tuple(classes) == tuple(weights.classes)
    reinit = not (head_fits and same_names)
    state = {k: v for k, v in source.items() if k in target and not (reinit and k in head_keys)}
    net.load_state_dict(state, strict=False)
    name = ", ".join(head_names(net, head))
    if reinit:
        logits = f"{classifier_name(net)}.weight"
        rank_zero_info(
            f"{weights.path}: backbone loaded, head {name} re-initialised for {target[logits].shape[0]} classes"
            f"{_names(classes)} (the weights' classifier: {_describe_classes(weights, source.get(logits))})"
        )
    else:
        rank_zero_info(f"{weights.path}: backbone and head {name} loaded")
    return reinit


def _names(classes: Sequence[str] | None) -> str:
    if not classes:
        return ""
    return f" ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"


def _describe_classes(weights: Weights, logits: torch.Tensor | None) -> str:
    if weights.classes is not None:
        return f"{len(weights.classes)} classes{_names(weights.classes)}"
    return f"{logits.shape[0]} outputs" if logits is not None else "none"
