"""CutMix and MixUp as one batch stage after the augmentation pipeline, producing soft targets (N, K).

Written in plain torch rather than with Kornia's `RandomCutMixV2`/`RandomMixUpV2`, which return (index_a, index_b,
lambda) label triples, cannot sit in an `AugmentationSequential` with labels, and (in older versions) applied `p`
twice. Here every row decides on its own: it is mixed with probability `prob`, with a partner row of the same batch
(a random cyclic shift, never itself), by CutMix with probability `switch_prob` when both are enabled (as timm),
with its own lambda ~ Beta(alpha, alpha). A CutMix row's lambda is corrected to the pasted area after clipping the
box to the image, so the target's mass on the partner's label is exactly the share of pasted pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lit_imgcls.errors import ConfigError


class BatchMix(nn.Module):
    """CutMix/MixUp per row with label smoothing folded in: (images, labels (N,)) -> (images, targets (N, K)).

    Targets are `(1 - e) * (lam * onehot(y) + (1 - lam) * onehot(y_partner)) + e / K` with `e = label_smoothing`;
    unmixed rows have lam = 1. Every row sums to 1.
    """

    def __init__(
        self,
        num_classes: int,
        cutmix_alpha: float = 0.0,
        mixup_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        check_mix_options(cutmix_alpha, mixup_alpha, prob, switch_prob, label_smoothing)
        self.num_classes = num_classes
        self.cutmix_alpha, self.mixup_alpha = cutmix_alpha, mixup_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, device = len(images), images.device
        partner = (torch.arange(n, device=device) + torch.randint(1, max(n, 2), (1,), device=device)) % n
        mixed = torch.rand(n, device=device) < self.prob
        if n < 2 or not (self.cutmix_alpha > 0 or self.mixup_alpha > 0):
            mixed = torch.zeros_like(mixed)
        if self.cutmix_alpha > 0 and self.mixup_alpha > 0:
            cut = torch.rand(n, device=device) < self.switch_prob
        else:
            cut = torch.full_like(mixed, self.cutmix_alpha > 0)
        lam = torch.ones(n, device=device)
        if self.mixup_alpha > 0:
            lam = torch.where(mixed & ~cut, beta(self.mixup_alpha, n, device), lam)
        rows = (mixed & ~cut).view(-1, 1, 1, 1)
        w = lam.view(-1, 1, 1, 1).to(images.dtype)
        out = torch.where(rows, w * images + (1 - w) * images[partner], images)
        if self.cutmix_alpha > 0:
            box = cutmix_boxes(beta(self.cutmix_alpha, n, device), images.shape[-2:]) & (mixed & cut).view(-1, 1, 1)
            out = torch.where(box.unsqueeze(1), images[partner], out)
            lam = torch.where(mixed & cut, 1 - box.flatten(1).float().mean(dim=1), lam)
        return out, self.targets(labels, labels[partner], lam)

    def targets(self, labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Soft targets lam * onehot(labels) + (1 - lam) * onehot(partner_labels), then label smoothing."""
        k = self.num_classes
        lam = lam.unsqueeze(1)
        target = lam * F.one_hot(labels, k).float() + (1 - lam) * F.one_hot(partner_labels, k).float()
        return target * (1 - self.label_smoothing) + self.label_smoothing / k


def beta(alpha: float, n: int, device: torch.device) -> torch.Tensor:
    """`n` draws from Beta(alpha, alpha), from torch's global generator (so `seed_everything` reproduces them)."""
    concentration = torch.full((n,), float(alpha), device=device)
    return torch.distributions.Beta(concentration, concentration).sample()


def cutmix_boxes(lam: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Boolean masks (N, H, W) of boxes of area (1 - lam) * H * W centred uniformly, clipped to the image."""
    h, w = size
    ratio = (1 - lam).sqrt()
    half_h, half_w = (ratio * h / 2).round(), (ratio * w / 2).round()
    cy = torch.randint(h, lam.shape, device=lam.device)
    cx = torch.randint(w, lam.shape, device=lam.device)
    ys = torch.arange(h, device=lam.device).view(1, -1)
    xs = torch.arange(w, device=lam.device).view(1, -1)
    in_y = (ys >= (cy - half_h).unsqueeze(1)) & (ys < (cy + half_h).unsqueeze(1))
    in_x = (xs >= (cx - half_w).unsqueeze(1)) & (xs < (cx + half_w).unsqueeze(1))
    return in_y.unsqueeze(2) & in_x.unsqueeze(1)


def check_mix_options(
    cutmix_alpha: float, mixup_alpha: float, prob: float, switch_prob: float, label_smoothing: float
) -> None:
    """Raise a ConfigError naming the option to fix."""
    for name, value in (("cutmix_alpha", cutmix_alpha), ("mixup_alpha", mixup_alpha)):
        if value < 0:
            raise ConfigError(f"data.{name} must be >= 0 (0 turns it off; 1.0 is the usual value), got {value}")
    for name, value in (("mix_prob", prob), ("switch_prob", switch_prob)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"data.{name} is a probability: set it in [0, 1], got {value}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"data.mix_label_smoothing must be in [0, 1) (0.1 is usual), got {label_smoothing}")
