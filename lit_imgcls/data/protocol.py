"""The task <-> data protocol: the one place where a task and the DataModule meet.

A task states what it needs from the training data in one attribute, `data_request` (a `DataRequest`; a task
without one gets labeled batches). The DataModule reads nothing else from a task. In return, a task uses only the
members of `TaskData` on `trainer.datamodule`, never other DataModule attributes.

Training batches, by `DataRequest.train_data` (dicts, on the device, float and normalised):

- `labeled`: `{"image", "target", "index"}`; `target` holds class indices (N,), or distributions (N, K) when the
  data mixes images (CutMix/MixUp) or smooths their labels. With `clean_view`, also `image_clean`: the same images
  normalised but not augmented (what a teacher sees with `teacher_view: clean`).
- `unlabeled`: `{"image": weak view, "image_strong": strong view, "index"}` (`data.weak_augment` and
  `data.strong_augment`; the index points into `unlabeled_set`), never a target.
- `combined`: `{"labeled": <labeled batch>, "unlabeled": <unlabeled batch>}` from a CombinedLoader in
  max_size_cycle mode (the unlabeled loader sets the epoch length, labeled batches cycle).

Validation, test and predict batches are `{"image", "target", "index"}` (predict: no target), never augmented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import torch
from torch.utils.data import DataLoader

from lit_imgcls.data.tensors import ImageTensors
from lit_imgcls.errors import ConfigError

TrainData = Literal["labeled", "unlabeled", "combined"]
TRAIN_DATA: tuple[str, ...] = get_args(TrainData)


@dataclass(frozen=True)
class DataRequest:
    """What a task asks of the training data (see the module docstring for the batches it gets).

    Args:
        train_data: the training loader: `labeled`, `unlabeled` or `combined` (both in every step).
        clean_view: labeled training batches also carry `image_clean`, the un-augmented images.
    """

    train_data: TrainData = "labeled"
    clean_view: bool = False

    def __post_init__(self) -> None:
        if self.train_data not in TRAIN_DATA:
            raise ConfigError(f"train_data={self.train_data!r}: choose one of {', '.join(TRAIN_DATA)}")


def data_request(task: object) -> DataRequest:
    """The request of `task` (its `data_request` attribute); labeled batches for a task without one."""
    request = getattr(task, "data_request", None)
    if request is None:
        return DataRequest()
    if not isinstance(request, DataRequest):
        raise ConfigError(
            f"{type(task).__name__}.data_request must be a lit_imgcls.data.protocol.DataRequest, got {request!r}"
        )
    return request


class TaskData(Protocol):
    """What a task may use of `trainer.datamodule` (`ImageDataModule` implements it), available after `setup`."""

    classes: tuple[str, ...]
    """Class names; label k is `classes[k]`."""
    num_classes: int
    image_shape: tuple[int, int, int]
    """(C, H, W) of the images the model receives."""
    mean: list[float]
    """Per-channel normalisation mean that every batch went through (checkpoints carry it for export)."""
    std: list[float]
    mix_label_smoothing: float
    """Label smoothing already folded into the training targets (the model must not smooth again)."""
    train_set: ImageTensors
    """All images of the training file; `train_indices` (labeled) and `val_indices` select from it."""
    train_indices: torch.Tensor
    val_indices: torch.Tensor
    unlabeled_set: ImageTensors
    """The unlabeled images (no targets); `index` in unlabeled batches points into it."""
    unlabeled_true_targets: torch.Tensor | None
    """Hidden labels of the unlabeled set, for diagnostics only (-1: unknown)."""

    def transform_batch(self, batch: dict[str, Any], train: bool) -> dict[str, Any]:
        """A raw batch on its device as the model sees it; tasks pass `train=False` (evaluation: no augmentation)."""

    def unlabeled_dataloader(self, train: bool) -> DataLoader:
        """Unlabeled batches: `train=False` gives the whole set in order, for a labeling pass."""

    def select_unlabeled(self, indices: torch.Tensor | None) -> None:
        """Train on these indices of the unlabeled set only (repeats allowed); None: the whole set again."""
