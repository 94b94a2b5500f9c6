"""timm's classifier interface for the project's own networks, written once."""

from __future__ import annotations

import torch
from torch import nn


class FeaturesDropFC(nn.Module):
    """A network made of `features` (images -> `num_features`-vector), `drop` (dropout) and `fc` (the classifier).

    Subclasses build the three modules and set `num_features` and `num_classes`; this class gives them timm's
    `forward_features` / `forward_head(pre_logits=...)` / `get_classifier` / `reset_classifier`, which every task
    relies on (k-NN features, transfer-learning heads).
    """

    num_features: int
    num_classes: int
    features: nn.Module
    drop: nn.Module
    fc: nn.Linear

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
