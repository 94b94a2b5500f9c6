"""create_model: one name space for the project's own architectures and timm's."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import timm
from torch import nn

from lit_imgcls.errors import ConfigError
from lit_imgcls.models.cnn import CNN4
from lit_imgcls.models.lenet import LeNet5

LOCAL_MODELS: dict[str, Callable[..., nn.Module]] = {"lenet5": LeNet5, "cnn4": CNN4}


def available_models() -> list[str]:
    """Every name `create_model` accepts."""
    return sorted(LOCAL_MODELS) + timm.list_models()


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    small_input: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build `name` (`lenet5` or any timm model name) for `num_classes` classes and `in_chans` input channels.

    `small_input=True` adapts ImageNet stems to 28-32 px images (ResNet family: 3x3 stride-1 stem, no max-pool,
    as CIFAR ResNets do). Extra keyword arguments (`drop_rate`, `drop_path_rate`, ...) go to the constructor.
    """
    if name in LOCAL_MODELS:
        if pretrained:
            raise ConfigError(f"{name} has no pretrained weights: set pretrained=false")
        if small_input:
            raise ConfigError(f"{name} is built for small images already: drop small_input")
        return LOCAL_MODELS[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, available_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model {name!r}.{hint} See lit_imgcls.models.available_models() for all names.")
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if small_input:
        adapt_to_small_input(model, name)
    return model


def adapt_to_small_input(model: nn.Module, name: str) -> None:
    """Replace a ResNet-style stem (7x7/2 conv + max-pool) by a 3x3/1 conv without pooling, in place."""
    stem = getattr(model, "conv1", None)
    if not isinstance(stem, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ConfigError(
            f"small_input is supported for ResNet-style models (conv1 + maxpool stem); {name} has none: "
            "resize the images instead (data.image_size)"
        )
    model.conv1 = nn.Conv2d(stem.in_channels, stem.out_channels, 3, stride=1, padding=1, bias=stem.bias is not None)
    model.maxpool = nn.Identity()
