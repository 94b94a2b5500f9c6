"""create_model: one name space for the project's own LeNet-5, torchvision's AlexNet/GoogLeNet and all of timm."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any

import timm
from torch import nn

from lit_imgcls.errors import ConfigError
from lit_imgcls.models.cnn import CNN4
from lit_imgcls.models.fast_resnet import FastResNet
from lit_imgcls.models.lenet import LeNet5
from lit_imgcls.models.small_input import adapt_to_small_input
from lit_imgcls.models.torchvision_models import TORCHVISION_MODELS, load_torchvision_pretrained

PROJECT_MODELS: dict[str, Callable[..., nn.Module]] = {"lenet5": LeNet5, "cnn4": CNN4, "fast_resnet": FastResNet}
LOCAL_MODELS: dict[str, Callable[..., nn.Module]] = {**PROJECT_MODELS, **TORCHVISION_MODELS}


def available_models() -> list[str]:
    """Every name `create_model` accepts."""
    return sorted(LOCAL_MODELS) + timm.list_models()


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    small_input: bool = False,
    drop_rate: float | None = None,
    drop_path_rate: float | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build `name` for `num_classes` classes and `in_chans` input channels.

    Names: `lenet5`, `cnn4` and `fast_resnet` (this project's), `alexnet` and `googlenet` (torchvision's), or any timm
    name (`vgg16_bn`, `resnet18`, `densenet121`, `seresnet18`, `efficientnet_b0`, ...). `pretrained=True` loads
    ImageNet weights (timm's hub or torchvision's, downloaded on first use), the stem adapted to `in_chans`.
    `small_input=True` adapts ImageNet stems to 28-32 px images (see `lit_imgcls.models.small_input`).
    `drop_rate` (dropout before the classifier) and `drop_path_rate` (stochastic depth) go to models that have
    them; None keeps the model's default, and a model without the option is a ConfigError. Other keyword
    arguments go to the constructor.
    """
    if name not in LOCAL_MODELS and not timm.is_model(name):
        close = difflib.get_close_matches(name, available_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model {name!r}.{hint} See lit_imgcls.models.available_models() for all names.")
    for option, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
        if value is not None:
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{option} must be in [0, 1), got {value}")
            kwargs[option] = value
    if pretrained and name in PROJECT_MODELS:
        raise ConfigError(f"{name} has no pretrained weights: set pretrained=false")
    try:
        model = build(name, num_classes, in_chans, pretrained, kwargs)
    except TypeError as error:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if unknown is None:
            raise
        raise ConfigError(f"{name} has no option {unknown.group(1)}: remove it from the model config") from error
    if small_input:
        if name in PROJECT_MODELS:
            raise ConfigError(f"{name} is built for small images already: drop small_input")
        adapt_to_small_input(model, name)
    return model


def build(name: str, num_classes: int, in_chans: int, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    if name not in LOCAL_MODELS:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    model = LOCAL_MODELS[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
    if pretrained:
        load_torchvision_pretrained(model, name)
    return model
