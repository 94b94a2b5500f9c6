"""CNN4: a small VGG-style network, a cheap but clearly stronger teacher than LeNet-5 on 28-32 px images."""

from __future__ import annotations

import torch
from torch import nn


class CNN4(nn.Module):
    """conv3x3(w) - pool - conv3x3(2w) - pool - conv3x3(4w) - conv3x3(4w) - pool - fc256 - fc(num_classes).

    Every convolution has BatchNorm and ReLU; an adaptive pool gives a 3x3 map for any input size. Follows timm's
    interface (`forward_features`, `forward_head`, `reset_classifier`) like `LeNet5`.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 256

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(in_chans, width),
            nn.MaxPool2d(2),
            *conv(width, 2 * width),
            nn.MaxPool2d(2),
            *conv(2 * width, 4 * width),
            *conv(4 * width, 4 * width),
            nn.AdaptiveMaxPool2d(3),
            nn.Flatten(),
            nn.Linear(4 * width * 9, self.num_features),
            nn.ReLU(inplace=True),
        )
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)
