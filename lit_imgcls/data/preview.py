"""Preview a config's training augmentation as a PNG grid: what the model will see (`lit-imgcls preview`).

Rows: N training images as loaded, the same images through the training pipeline, then CutMix and MixUp of the
augmented images (the config's alphas, or 1.0 where the config leaves them off).

    lit-imgcls preview --config configs/fashion_mnist/strong.yaml --out grid.png [--n 8] [--data.cutmix_alpha=0.5]
"""

from __future__ import annotations

from pathlib import Path

import cv2
import torch
from torchvision.utils import make_grid

from lit_imgcls.data.augment import to_float
from lit_imgcls.data.datamodule import ImageDataModule
from lit_imgcls.data.mix import BatchMix


def preview_rows(dm: ImageDataModule, n: int) -> torch.Tensor:
    """(4 * n, C, H, W) in [0, 1]: originals, augmented, CutMix, MixUp."""
    dm.setup("fit")
    options = dm.options
    images = to_float(dm.train_set.images[dm.train_indices[:n]])
    labels = dm.train_set.targets[dm.train_indices[:n]]
    augmented = dm.pipeline.train_augmentation(images)
    cutmix = BatchMix(dm.num_classes, cutmix_alpha=options.cutmix_alpha or 1.0)(augmented, labels)[0]
    mixup = BatchMix(dm.num_classes, mixup_alpha=options.mixup_alpha or 1.0)(augmented, labels)[0]
    return torch.cat([images, augmented, cutmix, mixup])


def save_grid(rows: torch.Tensor, n: int, out: Path, scale: int = 3) -> None:
    """Write the images as a grid of `n` columns, enlarged `scale` times (nearest neighbour), as a PNG."""
    grid = make_grid(rows.expand(-1, 3, -1, -1), nrow=n, padding=2, pad_value=1.0)
    pixels = grid.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    pixels = cv2.resize(pixels, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {out}")
