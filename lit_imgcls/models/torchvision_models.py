"""torchvision's AlexNet and GoogLeNet (timm has neither), with timm's interface and any number of input channels.

Both keep torchvision's module names, so torchvision state dicts load into them unchanged. They add
`forward_features`/`forward_head(pre_logits=...)`/`get_classifier`/`reset_classifier`/`num_features`, which every
task of this project uses (k-NN features, transfer-learning heads). GoogLeNet returns `(logits, aux2, aux1)` while
training and logits alone in eval, as torchvision's does; `ImageClassifier` weights the auxiliary losses.
"""

from __future__ import annotations

import torch
import torchvision
from timm.models import adapt_input_conv
from torch import nn
from torchvision.models.googlenet import GoogLeNet as TorchvisionGoogLeNet


def set_input_channels(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    """A copy of `conv` for `in_chans` input channels; weights adapted as timm does (sum or repeat)."""
    if conv.in_channels == in_chans:
        return conv
    new = nn.Conv2d(
        in_chans,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_chans, conv.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


class AlexNet(torchvision.models.AlexNet):
    """Krizhevsky et al. 2012, as in torchvision (single-tower, no LRN); `drop_rate` is its classifier dropout."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.5) -> None:
        super().__init__(num_classes=num_classes, dropout=drop_rate)
        self.features[0] = set_input_channels(self.features[0], in_chans)
        self.num_classes = num_classes
        self.num_features = self.classifier[-1].in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier[:-1](x) if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier[-1]

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier[-1] = nn.Linear(self.num_features, num_classes)


class GoogLeNet(TorchvisionGoogLeNet):
    """Szegedy et al. 2015 (Inception v1, with BatchNorm as in torchvision) and its two auxiliary classifiers.

    `drop_rate` is the dropout before the main classifier; `aux_logits=False` drops the auxiliary classifiers.
    """

    def __init__(
        self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.2, aux_logits: bool = True
    ) -> None:
        super().__init__(num_classes=num_classes, aux_logits=aux_logits, init_weights=True, dropout=drop_rate)
        self.conv1.conv = set_input_channels(self.conv1.conv, in_chans)
        self.num_classes = num_classes
        self.num_features = self.fc.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The 1024-channel map before global pooling (auxiliary classifiers are not run)."""
        for name in ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3"):
            x = getattr(self, name)(x)
        for name in ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4"):
            x = getattr(self, name)(x)
        return self.inception5b(self.inception5a(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.avgpool(x), 1))
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """New main and auxiliary classifiers for `num_classes` classes."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)
        for aux in (self.aux1, self.aux2):
            if aux is not None:
                aux.fc2 = nn.Linear(aux.fc2.in_features, num_classes)


TORCHVISION_MODELS: dict[str, type[nn.Module]] = {"alexnet": AlexNet, "googlenet": GoogLeNet}
TORCHVISION_WEIGHTS = {"alexnet": "AlexNet_Weights", "googlenet": "GoogLeNet_Weights"}


def load_torchvision_pretrained(model: nn.Module, name: str) -> None:
    """torchvision's ImageNet weights (downloaded on first use), adapted to the model's channels and classes."""
    weights = getattr(torchvision.models, TORCHVISION_WEIGHTS[name]).DEFAULT
    state = weights.get_state_dict(progress=False)
    stem = "features.0.weight" if name == "alexnet" else "conv1.conv.weight"
    own = model.state_dict()
    state[stem] = adapt_input_conv(own[stem].shape[1], state[stem])
    state = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(state, strict=False)
