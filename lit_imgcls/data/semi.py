"""Splits of the training file: validation, training subset, and labeled / unlabeled for semi-supervised tasks.

The training split (after the validation split and `train_subset`) can be divided class-balanced into a labeled
part and an unlabeled part whose labels are hidden; an unlabeled image folder can be added. Which training loader
a fit uses is the task's `DataRequest` (`lit_imgcls.data.protocol`).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from lit_imgcls.data.datasets import load_unlabeled_folder
from lit_imgcls.data.tensors import ImageTensors, TensorImageDataset
from lit_imgcls.errors import ConfigError

UNKNOWN_TARGET = -1  # `unlabeled_true_targets` of images whose label nobody knows (an unlabeled folder)


def train_val_split(
    n: int, val_size: int | None, val_fraction: float, train_subset: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (train, val) indices of `n` images: `val_size` (or `val_fraction` of n) validation images drawn with
    `seed`, the training part cut to its first `train_subset` of the same permutation."""
    n_val = val_size if val_size is not None else round(n * val_fraction)
    if not 0 <= n_val < n:
        option = f"data.val_size={val_size}" if val_size is not None else f"data.val_fraction={val_fraction}"
        raise ConfigError(f"{option} gives {n_val} validation images: it must be in 0..{n - 1} ({n} training images)")
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train = permutation[n_val:]
    if train_subset is not None:
        if not 0 < train_subset <= len(train):
            raise ConfigError(f"data.train_subset={train_subset} must be in 1..{len(train)}")
        train = train[:train_subset]
    return train.sort().values, permutation[:n_val].sort().values


def check_split_options(
    val_fraction: float, labels_per_class: int | None, labeled_fraction: float | None, unlabeled_batch_ratio: float
) -> None:
    """ConfigError for contradictory or out-of-range validation and labeled/unlabeled options."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if labels_per_class is not None and labeled_fraction is not None:
        raise ConfigError("data.labels_per_class and data.labeled_fraction both set: keep one of them")
    if labels_per_class is not None and labels_per_class < 1:
        raise ConfigError(f"data.labels_per_class must be a positive number of images, got {labels_per_class}")
    if labeled_fraction is not None and not 0.0 < labeled_fraction < 1.0:
        raise ConfigError(f"data.labeled_fraction must be in (0, 1), got {labeled_fraction}")
    if unlabeled_batch_ratio <= 0:
        raise ConfigError(f"data.unlabeled_batch_ratio must be positive, got {unlabeled_batch_ratio}")


def class_balanced_split(
    targets: torch.Tensor,
    pool: torch.Tensor,
    labels_per_class: int | None = None,
    labeled_fraction: float | None = None,
    seed: int = 42,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the dataset indices `pool` into (labeled, unlabeled), both sorted.

    Each class keeps `labels_per_class` images, or `round(labeled_fraction * its count)` (at least one), drawn
    at random with `seed`; everything else is unlabeled.
    """
    generator = torch.Generator().manual_seed(seed)
    pool_targets = targets[pool]
    labeled = []
    for label in pool_targets.unique().tolist():
        members = pool[pool_targets == label]
        members = members[torch.randperm(len(members), generator=generator)]
        if labels_per_class is not None:
            if labels_per_class > len(members):
                raise ConfigError(
                    f"data.labels_per_class={labels_per_class} but class {label} has only {len(members)} training "
                    "images: lower it or enlarge data.train_subset"
                )
            count = labels_per_class
        else:
            count = max(1, round(labeled_fraction * len(members)))
        labeled.append(members[:count])
    labeled_indices = torch.cat(labeled).sort().values
    keep = torch.ones(len(targets), dtype=torch.bool)
    keep[labeled_indices] = False
    in_pool = torch.zeros(len(targets), dtype=torch.bool)
    in_pool[pool] = True
    return labeled_indices, (keep & in_pool).nonzero().flatten()


def build_unlabeled_set(
    train_set: ImageTensors, indices: torch.Tensor | None, folder: ImageTensors | None
) -> tuple[ImageTensors, torch.Tensor]:
    """The unlabeled set (images of `train_set` at `indices`, then the `folder` images) and its hidden targets.

    Hidden targets are the true labels of the training images and `UNKNOWN_TARGET` for folder images.
    """
    parts, targets, sources = [], [], []
    if indices is not None:
        parts.append(train_set.images[indices])
        targets.append(train_set.targets[indices])
        sources += [train_set.source(i) for i in indices.tolist()]
    if folder is not None:
        if folder.images.shape[1:] != train_set.images.shape[1:]:
            raise ConfigError(
                f"unlabeled images are {tuple(folder.images.shape[1:])} but training images "
                f"{tuple(train_set.images.shape[1:])}: set data.image_size so both are resized alike"
            )
        parts.append(folder.images)
        targets.append(torch.full((len(folder),), UNKNOWN_TARGET, dtype=torch.int64))
        sources += folder.sources or [f"{i}" for i in range(len(folder))]
    if not parts or sum(len(p) for p in parts) == 0:
        raise ConfigError("the unlabeled set is empty: lower data.labels_per_class or set data.unlabeled_dir")
    return ImageTensors(torch.cat(parts), None, train_set.classes, sources), torch.cat(targets)


class LabeledUnlabeledMixin:
    """The unlabeled side of `ImageDataModule`: the unlabeled set and its loaders."""

    @property
    def unlabeled_set(self) -> ImageTensors:
        """The unlabeled images (no targets), built on first use; `unlabeled_true_targets` keeps hidden labels."""
        if self._unlabeled_set is None:
            self._require_setup()
            folder = None
            if self.hparams.unlabeled_dir is not None:
                channels, height, width = self.image_shape
                size = height if height == width else None
                folder = load_unlabeled_folder(self.hparams.unlabeled_dir, channels, size, self.hparams.skip_corrupt)
            self._unlabeled_set, self.unlabeled_true_targets = build_unlabeled_set(
                self.train_set, self.unlabeled_indices, folder
            )
        return self._unlabeled_set

    def unlabeled_dataloader(self, train: bool) -> DataLoader:
        """Unlabeled batches: shuffled and restricted by `select_unlabeled` (train), or all in order (labeling)."""
        if not train:
            return self._loader(TensorImageDataset(self.unlabeled_set), train=False)
        batch_size = max(1, round(self.hparams.unlabeled_batch_ratio * self.hparams.batch_size))
        return self._loader(TensorImageDataset(self.unlabeled_set, self.unlabeled_selection), True, batch_size)

    def select_unlabeled(self, indices: torch.Tensor | None) -> None:
        """Train on these indices of the unlabeled set only (repeats allowed); None: the whole set again."""
        if indices is not None:
            indices = torch.as_tensor(indices, dtype=torch.long).flatten()
            if len(indices) == 0 or int(indices.min()) < 0 or int(indices.max()) >= len(self.unlabeled_set):
                raise ValueError(f"unlabeled indices must be a non-empty selection of 0..{len(self.unlabeled_set) - 1}")
        self.unlabeled_selection = indices
