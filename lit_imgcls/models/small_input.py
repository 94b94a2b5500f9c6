"""Adapt ImageNet stems to 28-32 px images, as CIFAR versions of these architectures do.

ImageNet stems downsample by 4 before the first stage (a strided 7x7 or 11x11 convolution and a max-pool), which
leaves a 28 px image at 7x7 pixels, or breaks the network outright (AlexNet, VGG). Each adapter below swaps the
stem for a freshly initialised 3x3 stride-1 convolution and removes the early pooling, so the last stage works on
a 2x2 to 4x4 map, the scale it sees on ImageNet relative to its receptive field.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lit_imgcls.errors import ConfigError


def small_stem(conv: nn.Conv2d) -> nn.Conv2d:
    """A 3x3 stride-1 convolution with the channels of `conv`."""
    return nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)


def adapt_resnet(model: nn.Module) -> None:
    """ResNet, SE-ResNet, ResNeXt (timm `ResNet`): 3x3/1 `conv1`, no `maxpool`; the output stride becomes 8."""
    model.conv1 = small_stem(model.conv1)
    model.maxpool = nn.Identity()


def adapt_legacy_senet(model: nn.Module) -> None:
    """timm's `legacy_seresnet*` (`SENet`): the same change to `layer0.conv1` and `pool0`."""
    model.layer0.conv1 = small_stem(model.layer0.conv1)
    model.pool0 = nn.Identity()


def adapt_densenet(model: nn.Module) -> None:
    """DenseNet: 3x3/1 `conv0`, no `pool0`, as CIFAR DenseNets; dense blocks run at 28, 14, 7 and 3 px."""
    model.features.conv0 = small_stem(model.features.conv0)
    model.features.pool0 = nn.Identity()


def adapt_efficientnet(model: nn.Module) -> None:
    """EfficientNet / MobileNet (timm `conv_stem`): the stem convolution's stride goes from 2 to 1."""
    model.conv_stem.stride = (1, 1)


def adapt_vgg(model: nn.Module) -> None:
    """VGG: drop the last max-pool (28 px would reach 0 px) and use a 1x1 MLP head on the small map.

    timm's head is a 7x7 convolution over a 7x7 map (100M parameters for VGG-16); at 28-32 px the map is 1-2 px,
    so the head becomes the same MLP as 1x1 convolutions, like CIFAR VGGs' fully connected head.
    """
    from timm.models.vgg import ConvMlp

    pools = [i for i, layer in enumerate(model.features) if isinstance(layer, nn.MaxPool2d)]
    model.features[pools[-1]] = nn.Identity()
    old = model.pre_logits
    model.pre_logits = ConvMlp(
        old.fc1.in_channels,
        old.fc2.out_channels,
        kernel_size=1,
        mlp_ratio=old.fc1.out_channels / old.fc2.out_channels,
        drop_rate=old.drop.p,
        act_layer=type(old.act1),
    )


def adapt_alexnet(model: nn.Module) -> None:
    """AlexNet: 3x3/1 first convolution instead of 11x11/4; the three max-pools then give 13, 6 and 2 px."""
    model.features[0] = small_stem(model.features[0])


def adapt_googlenet(model: nn.Module) -> None:
    """GoogLeNet: 3x3/1 `conv1` and no `maxpool1`; inception blocks run at 14, 7 and 4 px."""
    model.conv1.conv = small_stem(model.conv1.conv)
    model.maxpool1 = nn.Identity()


ADAPTERS: dict[str, Callable[[nn.Module], None]] = {
    "ResNet": adapt_resnet,
    "SENet": adapt_legacy_senet,
    "DenseNet": adapt_densenet,
    "EfficientNet": adapt_efficientnet,
    "MobileNetV3": adapt_efficientnet,
    "VGG": adapt_vgg,
    "AlexNet": adapt_alexnet,
    "GoogLeNet": adapt_googlenet,
}


def adapt_to_small_input(model: nn.Module, name: str) -> None:
    """Adapt `model` (built as `name`) to 28-32 px input in place; ConfigError for families without an adapter."""
    family = type(model).__name__
    if family not in ADAPTERS:
        raise ConfigError(
            f"small_input is not available for {name} ({family}); it covers {', '.join(sorted(ADAPTERS))}: "
            "resize the images instead (data.image_size)"
        )
    ADAPTERS[family](model)
