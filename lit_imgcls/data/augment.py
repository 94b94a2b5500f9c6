"""Building blocks of batched augmentation with Kornia: per-image RandAugment/TrivialAugment, 1-channel support.

The ops take and return float image batches (N, C, H, W) in [0, 1] on any device; `to_float` and `normalize` are
the conversions around them. The presets and the options that choose among these blocks live in
`lit_imgcls.data.pipeline`; batch mixing (CutMix/MixUp) in `lit_imgcls.data.mix`.
"""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
from kornia.augmentation.base import _BasicAugmentationBase
from kornia.augmentation.container.base import BasicSequentialBase
from torch import nn

from lit_imgcls.errors import ConfigError

MAX_MAGNITUDE = 10  # RandAugment's m runs 0..10, as in timm (`rand-m9-n2`)
MIX_OPS = (K.RandomCutMixV2, K.RandomMixUpV2, K.RandomMosaic)
# Kornia ops that refuse (or make no sense on) 1-channel input; `Augmentation` runs them on a 3-channel copy.
RGB_ONLY = (
    K.auto.RandAugment,
    K.auto.TrivialAugment,
    K.auto.AutoAugment,
    K.ColorJiggle,
    K.ColorJitter,
    K.RandomSaturation,
    K.RandomHue,
    K.RandomGrayscale,
    K.RandomChannelShuffle,
    K.RandomRGBShift,
    K.RandomPlanckianJitter,
)


class RandomChoicePerImage(nn.Module):
    """Applies one op, drawn per image (or once for the batch when `same_on_batch`), from `ops` to each image."""

    def __init__(self, ops: Sequence[nn.Module], same_on_batch: bool = False) -> None:
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.same_on_batch = same_on_batch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = 1 if self.same_on_batch else len(images)
        choice = torch.randint(len(self.ops), (n,), device=images.device).expand(len(images))
        out = images.clone()
        for k, op in enumerate(self.ops):
            rows = (choice == k).nonzero().flatten()
            if len(rows):
                out[rows] = apply_op(op, images[rows])
        return out


class Augmentation(nn.Sequential):
    """A sequence of Kornia ops, clipped to [0, 1] at the end (rounding in resampling can overshoot by 1e-7).

    Ops in `RGB_ONLY` see 1-channel images as 3 equal channels and return their mean.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        for op in self:
            images = apply_op(op, images)
        return images.clamp(0.0, 1.0)


def needs_rgb(op: nn.Module) -> bool:
    """Whether `op` (or an op inside a Kornia container) needs 3-channel input."""
    if isinstance(op, BasicSequentialBase):
        return any(isinstance(m, RGB_ONLY) for m in op.modules())
    return isinstance(op, RGB_ONLY)


def apply_op(op: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """`op(images)`, with 1-channel images shown to RGB-only ops as 3 equal channels and averaged back."""
    if images.shape[1] == 1 and needs_rgb(op):
        return op(images.expand(-1, 3, -1, -1)).mean(dim=1, keepdim=True)
    return op(images)


def policy_ops(level: float, same_on_batch: bool = False) -> list[nn.Module]:
    """RandAugment's op set (timm's `_RAND_TRANSFORMS`) with magnitudes up to `level` in [0, 1], each with p=1."""
    s = dict(p=1.0, same_on_batch=same_on_batch)
    factor = (max(0.05, 1 - 0.9 * level), 1 + 0.9 * level)
    shear = 16.7 * level  # timm: 0.3 rad
    return [
        nn.Identity(),
        K.RandomAutoContrast(**s),
        K.RandomEqualize(**s),
        K.RandomInvert(**s),
        K.RandomRotation(30.0 * level, **s),
        K.RandomPosterize(bits=max(1.0, 8.0 - 4.0 * level), **s),
        K.RandomSolarize(thresholds=0.5 * level, additions=0.0, **s),
        K.RandomSolarize(thresholds=0.0, additions=0.4 * level, **s),
        K.RandomSaturation(factor, **s),
        K.RandomContrast(factor, **s),
        K.RandomBrightness(factor, **s),
        K.RandomSharpness(0.9 * level, **s),
        K.RandomShear((-shear, shear, 0.0, 0.0), **s),
        K.RandomShear((0.0, 0.0, -shear, shear), **s),
        K.RandomAffine(0.0, translate=(0.45 * level, 0.0), **s),
        K.RandomAffine(0.0, translate=(0.0, 0.45 * level), **s),
    ]


def rand_augment(n: int, m: int, same_on_batch: bool = False) -> nn.Module:
    """RandAugment applied per image: `n` >= 1 layers, each one op drawn per image, magnitudes drawn up to `m`
    (0..MAX_MAGNITUDE; `PipelineOptions` checks both)."""
    return Augmentation(
        *(RandomChoicePerImage(policy_ops(m / MAX_MAGNITUDE, same_on_batch), same_on_batch) for _ in range(n))
    )


def trivial_augment(same_on_batch: bool = False) -> nn.Module:
    """TrivialAugment per image: one op drawn per image, its magnitude drawn uniformly up to the maximum."""
    return Augmentation(RandomChoicePerImage(policy_ops(1.0, same_on_batch), same_on_batch))


def check_ops(ops: Sequence[nn.Module]) -> None:
    """Raise a ConfigError for an extra op that is not a Kornia augmentation, or that mixes images."""
    for op in ops:
        if isinstance(op, MIX_OPS):
            raise ConfigError(
                f"{type(op).__name__} mixes images and labels: use data.cutmix_alpha / data.mixup_alpha instead"
            )
        if not isinstance(op, _BasicAugmentationBase | BasicSequentialBase):
            raise ConfigError(
                f"data.augment_ops: {type(op).__name__} is not a Kornia augmentation: name a class of "
                "kornia.augmentation, e.g. {class_path: kornia.augmentation.RandomRotation, init_args: {degrees: 15}}"
            )


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is returned as it is."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel (x - mean) / std, with the statistics placed on the images' device."""
    shape = (1, -1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return (images - mean_t) / std_t
