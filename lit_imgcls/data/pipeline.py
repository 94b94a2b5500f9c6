"""The batch pipeline: every augmentation, mix and normalisation option, and what happens to a batch on the device.

`PipelineOptions` declares the options once, with their defaults, documentation and validation; in YAML they are
the flat `data.*` keys of the same names (`ImageDataModule` passes them through). `BatchPipeline` applies them to
a batch that Lightning has already moved to the device (DESIGN.md, data flow):

    training, labeled:   uint8 -> float [0, 1] -> preset + `augment_ops` -> CutMix/MixUp (soft targets) -> normalise
    training, unlabeled: uint8 -> float -> `weak_augment` view (`image`) and `strong_augment` view (`image_strong`)
    evaluation:          uint8 -> float -> normalise

Which views a training batch carries is the task's `DataRequest` (`lit_imgcls.data.protocol`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import kornia.augmentation as K
import torch
from torch import nn

from lit_imgcls.data.augment import (
    MAX_MAGNITUDE,
    Augmentation,
    check_ops,
    normalize,
    rand_augment,
    to_float,
    trivial_augment,
)
from lit_imgcls.data.mix import BatchMix, check_mix_options
from lit_imgcls.data.protocol import DataRequest
from lit_imgcls.errors import ConfigError

AUGMENT_PRESETS = ("none", "basic", "standard", "randaugment", "trivialaugment", "strong")


@dataclass(frozen=True)
class PipelineOptions:
    """Augmentation, mixing and normalisation of batches; in YAML the flat `data.*` keys of the same names.

    Args:
        augment: training augmentation preset: `none`, `basic` (padded crop + flip), `standard` (affine, flip,
            brightness/contrast, perspective), `randaugment`, `trivialaugment`, `strong` (flip, RandAugment,
            random erasing). See `build_train_augmentation`.
        augment_ops: extra Kornia ops applied after the preset, e.g.
            `[{class_path: kornia.augmentation.RandomRotation, init_args: {degrees: 15, p: 0.5}}]`.
        crop_padding: `basic` preset: zero padding before the random crop.
        hflip: `basic`, `standard`, `strong` presets: random horizontal flip.
        randaugment_n: RandAugment layers (ops per image) for `randaugment` and `strong`.
        randaugment_m: RandAugment maximum magnitude, 0..10 (timm's scale).
        same_on_batch: presets draw one set of random parameters for the whole batch instead of per image.
        cutmix_alpha: CutMix Beta(alpha, alpha) parameter; 0 turns CutMix off.
        mixup_alpha: MixUp Beta(alpha, alpha) parameter; 0 turns MixUp off.
        mix_prob: probability that a training image is mixed (CutMix or MixUp) with another of its batch.
        switch_prob: when both are on, probability that a mixed image uses CutMix rather than MixUp.
        mix_label_smoothing: smoothing folded into the soft training targets of the mix stage; with it set, leave
            the model's `label_smoothing` at 0 (ImageClassifier refuses both).
        weak_augment: preset of the weak view (`image`) of unlabeled training batches.
        strong_augment: preset of the strong view (`image_strong`) of unlabeled training batches.
        mean: per-channel normalization mean (0-1 scale); default: computed from the whole training set.
        std: per-channel normalization std; default: computed from the whole training set.
    """

    augment: str = "basic"
    augment_ops: list[nn.Module] | None = None
    crop_padding: int = 4
    hflip: bool = True
    randaugment_n: int = 2
    randaugment_m: int = 9
    same_on_batch: bool = False
    cutmix_alpha: float = 0.0
    mixup_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    mix_label_smoothing: float = 0.0
    weak_augment: str = "basic"
    strong_augment: str = "strong"
    mean: list[float] | None = None
    std: list[float] | None = None

    def __post_init__(self) -> None:
        for name in ("augment", "weak_augment", "strong_augment"):
            if getattr(self, name) not in AUGMENT_PRESETS:
                raise ConfigError(
                    f"unknown data.{name} {getattr(self, name)!r}: choose one of {', '.join(AUGMENT_PRESETS)}"
                )
        check_ops(self.augment_ops or [])
        if self.crop_padding < 0:
            raise ConfigError(f"data.crop_padding must be >= 0 (0 turns the crop off), got {self.crop_padding}")
        if self.randaugment_n < 1 or not 0 <= self.randaugment_m <= MAX_MAGNITUDE:
            raise ConfigError(
                f"RandAugment needs data.randaugment_n >= 1 and 0 <= data.randaugment_m <= {MAX_MAGNITUDE}, "
                f"got n={self.randaugment_n}, m={self.randaugment_m}"
            )
        check_mix_options(*self._mix_args())
        if self.std is not None and min(self.std, default=1.0) <= 0:
            raise ConfigError(f"data.std must be positive, one value per channel, got {self.std}")

    @classmethod
    def check_names(cls, options: dict[str, Any]) -> None:
        """ConfigError for a keyword that is no data option (a typo), listing the pipeline's options."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            known = ", ".join(f.name for f in fields(cls))
            raise ConfigError(
                f"unknown data option(s) {', '.join(unknown)}: neither an ImageDataModule argument nor one of {known}"
            )

    @property
    def mixes(self) -> bool:
        """Whether CutMix or MixUp mixes training images."""
        return self.cutmix_alpha > 0 or self.mixup_alpha > 0

    def _mix_args(self) -> tuple[float, float, float, float, float]:
        return self.cutmix_alpha, self.mixup_alpha, self.mix_prob, self.switch_prob, self.mix_label_smoothing

    def batch_mix(self, num_classes: int) -> BatchMix | None:
        """The mix stage (CutMix/MixUp, label smoothing folded into soft targets); None when all are off."""
        return BatchMix(num_classes, *self._mix_args()) if self.mixes or self.mix_label_smoothing > 0 else None

    def hparams(self) -> dict[str, Any]:
        """The options as hyperparameters: every one but `augment_ops` (Kornia modules, not plain values)."""
        return {k: v for k, v in asdict(self).items() if k != "augment_ops"}


def preset_ops(preset: str, image_size: Sequence[int], options: PipelineOptions) -> list[nn.Module]:
    """The Kornia ops of a preset with `options`' parameters (crop padding, flip, RandAugment n and m)."""
    s = dict(same_on_batch=options.same_on_batch)
    flip = [K.RandomHorizontalFlip(**s)] if options.hflip else []
    pad = options.crop_padding
    crop = [K.RandomCrop(tuple(image_size), padding=pad, **s)] if pad > 0 else []
    n, m = options.randaugment_n, options.randaugment_m
    presets: dict[str, Callable[[], list[nn.Module]]] = {
        "none": list,
        "basic": lambda: crop + flip,
        "standard": lambda: [
            K.RandomAffine(10.0, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=8.0, p=0.5, **s),
            *flip,
            K.RandomBrightness((0.8, 1.2), p=0.5, **s),
            K.RandomContrast((0.8, 1.2), p=0.5, **s),
            K.RandomPerspective(0.2, p=0.3, **s),
        ],
        "randaugment": lambda: [rand_augment(n, m, options.same_on_batch)],
        "trivialaugment": lambda: [trivial_augment(options.same_on_batch)],
        "strong": lambda: [*flip, rand_augment(n, m, options.same_on_batch), K.RandomErasing(p=0.25, **s)],
    }
    if preset not in presets:
        raise ConfigError(f"unknown augmentation preset {preset!r}: choose one of {', '.join(AUGMENT_PRESETS)}")
    return presets[preset]()


def build_train_augmentation(
    preset: str,
    image_size: Sequence[int],
    options: PipelineOptions | None = None,
    ops: Sequence[nn.Module] | None = None,
) -> nn.Module:
    """The training pipeline: the preset's ops (parameters from `options`), then the extra Kornia `ops`.

    `basic`: random crop of the original size from the image zero-padded by `crop_padding`, then a horizontal flip.
    `standard`: affine (rotation, translation, scale, shear), flip, brightness and contrast jitter, perspective.
    `randaugment`: RandAugment(n, m) drawn per image. `trivialaugment`: TrivialAugment drawn per image.
    `strong`: flip, RandAugment(n, m), random erasing (p=0.25). `none` without ops is the identity.
    """
    extra = list(ops or [])
    check_ops(extra)
    pipeline = preset_ops(preset, image_size, options or PipelineOptions()) + extra
    return Augmentation(*pipeline) if pipeline else nn.Identity()


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0-1 scale) of uint8 images (N, C, H, W), in float64 chunks."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].to(torch.float64).div_(255)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-6).sqrt()
    return mean.tolist(), std.tolist()


def normalization_stats(options: PipelineOptions, images: torch.Tensor) -> tuple[list[float], list[float]]:
    """`options.mean` and `options.std`, each computed from the training `images` where left unset."""
    mean, std = channel_stats(images) if options.mean is None or options.std is None else (None, None)
    return list(mean if options.mean is None else options.mean), list(std if options.std is None else options.std)


class BatchPipeline(nn.Module):
    """The device side of the data: training views, the mix stage and normalisation (see the module docstring).

    An `nn.Module` so one `.to()` moves every op; it follows the batch's device by itself, because Lightning never
    moves a DataModule's modules (Lightning issue 19662). Output stays on the input's device.
    """

    def __init__(
        self,
        options: PipelineOptions,
        image_shape: Sequence[int],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        channels, *size = image_shape
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(f"data.mean/std need {channels} values, one per channel; got {list(mean)}, {list(std)}")
        self.options = options
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.train_augmentation = build_train_augmentation(options.augment, size, options, options.augment_ops)
        self.weak_augmentation = build_train_augmentation(options.weak_augment, size, options)
        self.strong_augmentation = build_train_augmentation(options.strong_augment, size, options)
        self.mix = options.batch_mix(num_classes)

    def check(self, request: DataRequest) -> None:
        """ConfigError when a task's request cannot be served with these options."""
        if request.clean_view and self.options.mixes:
            raise ConfigError(
                "the task asks for a clean view of labeled batches (e.g. model.teacher_view=clean), but "
                "data.cutmix_alpha/mixup_alpha mix the training images and the clean view is not mixed: "
                "turn mixing off or use teacher_view=same"
            )

    def _float_on_device(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> float [0, 1], with every op moved to the images' device first (cheap when already there)."""
        if self.mean.device != images.device:
            self.to(images.device)
        return to_float(images)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std)

    def eval_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Validation/test/predict (and a task's labeling passes): float and normalised, nothing random."""
        return {**batch, "image": self._normalize(self._float_on_device(batch["image"]))}

    def labeled_batch(self, batch: dict[str, Any], clean_view: bool = False) -> dict[str, Any]:
        """A labeled training batch: augmented, mixed (targets (N, K)) when the options say so, normalised.

        With `clean_view`, `image_clean` holds the normalised images before augmentation.
        """
        images = self._float_on_device(batch["image"])
        out = dict(batch)
        if clean_view:
            out["image_clean"] = self._normalize(images)
        images = self.train_augmentation(images)
        if self.mix is not None and "target" in batch:
            images, out["target"] = self.mix(images, batch["target"])
        out["image"] = self._normalize(images)
        return out

    def unlabeled_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """An unlabeled training batch: `image` (weak view) and `image_strong` (strong view), both normalised."""
        images = self._float_on_device(batch["image"])
        weak = self.weak_augmentation(images)
        strong = self.strong_augmentation(images)
        return {**batch, "image": self._normalize(weak), "image_strong": self._normalize(strong)}

    def train_batch(self, batch: dict[str, Any], request: DataRequest) -> dict[str, Any]:
        """A training batch of the loader `request.train_data` chose, with the views the request asks for."""
        if request.train_data == "labeled":
            return self.labeled_batch(batch, request.clean_view)
        if request.train_data == "unlabeled":
            return self.unlabeled_batch(batch)
        labeled = self.labeled_batch(batch["labeled"], request.clean_view)
        return {"labeled": labeled, "unlabeled": self.unlabeled_batch(batch["unlabeled"])}
