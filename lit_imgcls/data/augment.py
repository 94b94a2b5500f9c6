"""Batched augmentation on the accelerator with Kornia, and normalization.

Every function here takes and returns float image batches (N, C, H, W) in [0, 1] on any device.
The full augmentation suite (presets, YAML op lists, CutMix/MixUp) extends `build_train_augmentation`.
"""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import nn

from lit_imgcls.errors import ConfigError

AUGMENT_PRESETS = ("none", "basic")


def build_train_augmentation(
    preset: str, image_size: Sequence[int], crop_padding: int = 4, hflip: bool = True
) -> nn.Module:
    """Training-time augmentation for a preset name; `none` is the identity.

    `basic`: random crop of the original size from the image zero-padded by `crop_padding`, then a horizontal flip.
    """
    if preset == "none":
        return nn.Identity()
    if preset == "basic":
        ops: list[nn.Module] = []
        if crop_padding > 0:
            ops.append(K.RandomCrop(tuple(image_size), padding=crop_padding))
        if hflip:
            ops.append(K.RandomHorizontalFlip())
        return nn.Sequential(*ops) if ops else nn.Identity()
    raise ConfigError(f"unknown augmentation preset {preset!r}: choose one of {', '.join(AUGMENT_PRESETS)}")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is returned as it is."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel (x - mean) / std, with the statistics placed on the images' device."""
    shape = (1, -1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return (images - mean_t) / std_t
