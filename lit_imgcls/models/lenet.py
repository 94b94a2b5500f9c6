"""LeNet-5 (LeCun et al. 1998), with ReLU, max-pooling and optional BatchNorm: the one hand-written architecture."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from lit_imgcls.models.head import FeaturesDropFC


class PoolToSize(nn.AdaptiveMaxPool2d):
    """`nn.AdaptiveMaxPool2d` that passes a map already of its output size through: its 1-pixel windows would only
    copy it (28x28 inputs reach the pool at 5x5; skipping the copy makes a forward pass ~4% faster)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[-2:] == _pair(self.output_size) else super().forward(x)


class LeNet5(FeaturesDropFC):
    """conv5x5(6) - pool - conv5x5(16) - pool - fc120 - fc84 - fc(num_classes).

    The first convolution pads by 2 so 28x28 inputs keep the paper's 32x32 geometry; an adaptive pool makes
    any input size give the 16x5x5 feature map. `forward_features`/`forward_head`/`reset_classifier`
    follow timm's interface so every task treats it like a timm model.
    """

    def __init__(
        self, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0, batch_norm: bool = True
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 84

        def conv(c_in: int, c_out: int, padding: int) -> list[nn.Module]:
            norm = [nn.BatchNorm2d(c_out)] if batch_norm else []
            return [nn.Conv2d(c_in, c_out, 5, padding=padding, bias=not batch_norm), *norm, nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(in_chans, 6, 2),
            nn.MaxPool2d(2),
            *conv(6, 16, 0),
            nn.MaxPool2d(2),
            PoolToSize(5),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Dropout(drop_rate),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
        )
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(84, num_classes)
