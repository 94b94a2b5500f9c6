"""CNN4: a small VGG-style network, a cheap but clearly stronger teacher than LeNet-5 on 28-32 px images."""

from __future__ import annotations

from torch import nn

from lit_imgcls.models.head import FeaturesDropFC


class CNN4(FeaturesDropFC):
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
