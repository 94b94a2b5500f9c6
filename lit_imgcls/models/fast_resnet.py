"""FastResNet: a small residual network for 28-32 px images that trains in minutes on a laptop CPU.

The layout follows the fast CIFAR-10 ResNets (Page's "How to train your ResNet", airbench): a 3x3 stem, then
three stages of `conv3x3 -> BatchNorm -> ReLU -> max-pool(2)`, the first and last followed by a residual block
of two 3x3 convolutions, then global max-pooling and a linear classifier. Pooling right after each stage's first
convolution keeps most of the FLOPs at 14x14 and below, where they buy the most accuracy per second on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import DropPath
from torch import nn

from lit_imgcls.models.head import FeaturesDropFC


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class Residual(nn.Module):
    """x + drop_path(relu(bn(conv(relu(bn(conv(x))))))): ResNet-9's residual block, with stochastic depth."""

    def __init__(self, channels: int, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.branch = nn.Sequential(*conv_bn_relu(channels, channels), *conv_bn_relu(channels, channels))
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.branch(x))


class Scale(nn.Module):
    """Multiplies by a constant: ResNet-9's 0.125 on the max-pooled features keeps the first logits small."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class FastResNet(FeaturesDropFC):
    """stem conv3x3(w0) - [conv3x3(w1) - pool - residual] - [conv3x3(w2) - pool] - [conv3x3(w3) - pool - residual]
    - global max-pool - x0.125 - fc(num_classes).

    Without the 0.125 the max-pooled features make the first logits so large that SGD at lr 0.1 stalls (train
    accuracy 0.31 against 0.90 after 150 steps of batch 256 on Fashion-MNIST).

    Args:
        num_classes: classifier outputs.
        in_chans: input channels (1 for Fashion-MNIST, 3 for CIFAR).
        widths: channels of the stem and of the three stages.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the two residual blocks (the second drops at this rate, the first at
            half of it, as timm scales it with depth).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        widths: Sequence[int] = (24, 32, 64, 128),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be 4 positive channel counts (stem and three stages), got {widths}")
        w0, w1, w2, w3 = widths
        self.num_classes = num_classes
        self.num_features = w3
        self.features = nn.Sequential(
            *conv_bn_relu(in_chans, w0),
            *conv_bn_relu(w0, w1),
            nn.MaxPool2d(2),
            Residual(w1, drop_path_rate / 2),
            *conv_bn_relu(w1, w2),
            nn.MaxPool2d(2),
            *conv_bn_relu(w2, w3),
            nn.MaxPool2d(2),
            Residual(w3, drop_path_rate),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            Scale(0.125),
        )
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(w3, num_classes)
