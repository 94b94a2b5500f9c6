"""ImageDataModule: one data pipeline for every experiment (see DESIGN.md, data flow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info
from torch.utils.data import DataLoader

from lit_imgcls.data.datasets import (
    TORCHVISION_DATASETS,
    ensure_fashion_mnist,
    load_dataset,
    load_torchvision,
    load_unlabeled_folder,
)
from lit_imgcls.data.pipeline import BatchPipeline, PipelineOptions, normalization_stats
from lit_imgcls.data.protocol import DataRequest, data_request
from lit_imgcls.data.semi import LabeledUnlabeledMixin, check_split_options, class_balanced_split, train_val_split
from lit_imgcls.data.tensors import ImageTensors, TensorImageDataset, collate_batch
from lit_imgcls.errors import ConfigError
from lit_imgcls.resume import train_sampler


def _agrees(given: Any, stored: Any) -> bool:
    """A data option equals a checkpoint's value (lists of floats within 1e-6)."""
    if isinstance(stored, list):
        return len(given) == len(stored) and all(abs(a - b) <= 1e-6 for a, b in zip(given, stored, strict=True))
    return given == stored


class ImageDataModule(LabeledUnlabeledMixin, pl.LightningDataModule):
    """Loads a dataset once as uint8 tensors, splits it and serves loaders; its `pipeline` transforms the batches.

    Args:
        dataset: `fashion_mnist`, `mnist`, `cifar10`, `cifar100`, or `image_folder` (`data_dir/<class>/<image>`).
        data_dir: download/cache folder for the built-in datasets; the training folder for `image_folder`.
        test_dir: `image_folder` only: a folder of the same classes used by `test` (and `predict` by default).
        predict_dir: a folder of images (any layout, no labels needed) for `predict`; default: the test split.
        image_size: resize folder images to this square size (built-in datasets keep their size unless set).
        channels: 1 (grayscale) or 3 (RGB); default: the dataset's own (3 for image folders).
        val_fraction: share of the training set held out for validation, split with `split_seed`.
        val_size: number of validation images; overrides `val_fraction`.
        train_subset: train on a seeded random subset of this many images of the training split.
        test_subset: evaluate `test` on the first N test images (quick checks).
        classes: keep only these class indices (train, val and test), relabelled 0..len-1 in this order.
        batch_size: training batch size per device.
        eval_batch_size: validation/test/predict batch size; default: `batch_size`.
        num_workers: DataLoader workers; 0 is fastest for in-memory tensors.
        download: fetch a missing built-in dataset with torchvision (needs internet).
        skip_corrupt: skip undecodable image files with a warning instead of stopping.
        split_seed: seed of the train/val split, of `train_subset` and of the labeled/unlabeled split.
        labels_per_class: keep this many labeled images per class of the training split (after the val split and
            `train_subset`); the rest becomes the unlabeled set (labels hidden).
        labeled_fraction: like `labels_per_class`, with a class-balanced fraction of each class.
        unlabeled_dir: a folder of images (any layout) used as, or added to, the unlabeled set.
        unlabeled_batch_ratio: unlabeled batch size = round(unlabeled_batch_ratio * batch_size).
        **pipeline: the augmentation, mix and normalisation options (`augment`, `augment_ops`, `crop_padding`,
            `hflip`, `cutmix_alpha`, `mean`, ...): see `lit_imgcls.data.pipeline.PipelineOptions`.

    Without `labels_per_class`, `labeled_fraction` and `unlabeled_dir`, the unlabeled set is the training split with
    its labels dropped. The training loader and the views of training batches are the task's `DataRequest`, and a
    task uses only the members of `TaskData` (both in `lit_imgcls.data.protocol`).
    """

    def __init__(
        self,
        dataset: Literal["fashion_mnist", "mnist", "cifar10", "cifar100", "image_folder"] = "fashion_mnist",
        data_dir: str = "data",
        test_dir: str | None = None,
        predict_dir: str | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        val_fraction: float = 0.1,
        val_size: int | None = None,
        train_subset: int | None = None,
        test_subset: int | None = None,
        classes: list[int] | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        download: bool = True,
        skip_corrupt: bool = False,
        split_seed: int = 42,
        labels_per_class: int | None = None,
        labeled_fraction: float | None = None,
        unlabeled_dir: str | None = None,
        unlabeled_batch_ratio: float = 1.0,
        **pipeline: Any,
    ) -> None:
        super().__init__()
        PipelineOptions.check_names(pipeline)
        self.options = PipelineOptions(**pipeline)
        self.save_hyperparameters(ignore=["augment_ops"])
        self.save_hyperparameters({**self.options.hparams(), **self.hparams})  # the options left at their defaults too
        if channels not in (None, 1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {channels}")
        for name, value in (("train_subset", train_subset), ("test_subset", test_subset)):
            if value is not None and value < 1:
                raise ConfigError(f"data.{name} must be a positive number of images, got {value}")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be positive, got {batch_size}")
        self.train_set: ImageTensors | None = None
        self.test_set: ImageTensors | None = None
        self.predict_set: ImageTensors | None = None
        self.train_indices = self.val_indices = torch.empty(0, dtype=torch.long)
        check_split_options(val_fraction, labels_per_class, labeled_fraction, unlabeled_batch_ratio)
        self.unlabeled_indices: torch.Tensor | None = None
        self._unlabeled_set: ImageTensors | None = None
        self.unlabeled_true_targets: torch.Tensor | None = None
        self.unlabeled_selection: torch.Tensor | None = None
        self.mean: list[float] | None = None
        self.std: list[float] | None = None
        self._pipeline: BatchPipeline | None = None

    def _load(self, train: bool) -> ImageTensors:
        hp = self.hparams
        options = ("test_dir", "channels", "image_size", "classes", "download", "skip_corrupt")
        return load_dataset(hp.dataset, hp.data_dir, train, **{name: hp[name] for name in options})

    def prepare_data(self) -> None:
        """Fetch a missing built-in dataset once per node, before `setup` runs on every rank."""
        hp = self.hparams
        for train in (True, False):
            if hp.dataset == "fashion_mnist":
                ensure_fashion_mnist(hp.data_dir, train, hp.download)
            elif hp.dataset in TORCHVISION_DATASETS:
                load_torchvision(hp.dataset, hp.data_dir, train, hp.download)

    def setup(self, stage: str) -> None:
        if self.train_set is None:
            self.train_set = self._load(train=True)
            self._split()
            self.mean, self.std = normalization_stats(self.options, self.train_set.images)
            self._pipeline = BatchPipeline(self.options, self.image_shape, self.num_classes, self.mean, self.std)
            rank_zero_info(self.describe())
        if stage in ("test", "predict") and self.test_set is None and self._has_test_split():
            self.test_set = self._load(train=False)
            self._check_same_classes(self.test_set)
        if stage == "predict" and self.predict_set is None:
            hp = self.hparams
            if hp.predict_dir is not None:
                channels, size, _ = self.image_shape
                folder = load_unlabeled_folder(hp.predict_dir, channels, size, hp.skip_corrupt)
                self.predict_set = ImageTensors(folder.images, None, self.classes, folder.sources)
            else:
                self.predict_set = self.test_set

    def _has_test_split(self) -> bool:
        return self.hparams.dataset != "image_folder" or self.hparams.test_dir is not None

    def _check_same_classes(self, data: ImageTensors) -> None:
        if data.classes != self.classes:
            raise ConfigError(
                f"the test folder's classes {list(data.classes)} differ from the training classes {list(self.classes)}"
            )
        if data.images.shape[1:] != self.train_set.images.shape[1:]:
            raise ConfigError(
                f"test images are {tuple(data.images.shape[1:])} but training images {self.image_shape}: "
                "set data.image_size so both are resized alike"
            )

    def _split(self) -> None:
        hp = self.hparams
        self.train_indices, self.val_indices = train_val_split(
            len(self.train_set), hp.val_size, hp.val_fraction, hp.train_subset, hp.split_seed
        )
        self.unlabeled_indices = None if hp.unlabeled_dir is not None else self.train_indices
        if hp.labels_per_class is not None or hp.labeled_fraction is not None:
            self.train_indices, self.unlabeled_indices = class_balanced_split(
                self.train_set.targets, self.train_indices, hp.labels_per_class, hp.labeled_fraction, hp.split_seed
            )

    def use_checkpoint_data(
        self, classes: list[str], mean: list[float], std: list[float], image_shape: list[int]
    ) -> None:
        """test/predict from a checkpoint: its class names, normalisation and image shape (C, H, W) stand in for the
        training data, which is then never read; a data option that contradicts them is a ConfigError naming both."""
        hp = self.hparams
        stored = {"channels": image_shape[0], "image_size": image_shape[-1], "mean": list(mean), "std": list(std)}
        for name, value in stored.items():
            given = hp[name]
            if given is not None and not _agrees(given, value):
                raise ConfigError(
                    f"data.{name}={given} but the checkpoint was trained with {name}={value}: "
                    f"drop data.{name} (the checkpoint's value is used) or give the checkpoint trained with it"
                )
        hp.channels, hp.image_size = image_shape[0], image_shape[-1]
        self.mean, self.std = list(mean), list(std)
        empty = torch.empty((0, *image_shape), dtype=torch.uint8)
        self.train_set = ImageTensors(empty, torch.empty(0, dtype=torch.long), tuple(classes))
        self._pipeline = BatchPipeline(self.options, self.image_shape, self.num_classes, self.mean, self.std)

    @property
    def classes(self) -> tuple[str, ...]:
        return self._require_setup().classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model receives."""
        return tuple(self._require_setup().images.shape[1:])

    @property
    def pipeline(self) -> BatchPipeline:
        """The batch pipeline, built by `setup` from `options` and the training set's shape and statistics."""
        self._require_setup()
        return self._pipeline

    @property
    def mix_label_smoothing(self) -> float:
        """Label smoothing the mix stage folds into the training targets."""
        return self.options.mix_label_smoothing

    def _require_setup(self) -> ImageTensors:
        if self.train_set is None:
            raise RuntimeError("call datamodule.setup(stage) first")
        return self.train_set

    def _loader(self, dataset: TensorImageDataset, train: bool, batch_size: int | None = None) -> DataLoader:
        hp = self.hparams
        batch_size = batch_size or (hp.batch_size if train else hp.eval_batch_size or hp.batch_size)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=train_sampler(dataset, self.trainer) if train else None,  # exact mid-epoch resume
            generator=torch.Generator() if train else None,  # its iterators leave the global RNG alone
            drop_last=train and len(dataset) > batch_size,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            collate_fn=collate_batch,
        )

    def request(self) -> DataRequest:
        """The running task's `DataRequest` (labeled batches without a trainer or a request)."""
        return data_request(self.trainer.lightning_module if self.trainer is not None else None)

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        """The loader the task's `DataRequest.train_data` asks for."""
        request = self.request()
        self.pipeline.check(request)
        train_data = request.train_data
        if train_data == "unlabeled":
            return self.unlabeled_dataloader(train=True)
        labeled = self._loader(TensorImageDataset(self.train_set, self.train_indices), train=True)
        if train_data == "labeled":
            return labeled
        return CombinedLoader({"labeled": labeled, "unlabeled": self.unlabeled_dataloader(True)}, "max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        if len(self.val_indices) == 0:
            return []
        return self._loader(TensorImageDataset(self.train_set, self.val_indices), train=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise ConfigError("dataset image_folder has no test split: set data.test_dir to a folder of images")
        n = min(self.hparams.test_subset or len(self.test_set), len(self.test_set))
        return self._loader(TensorImageDataset(self.test_set, torch.arange(n)), train=False)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_set is None:
            raise ConfigError("nothing to predict on: set data.predict_dir (or data.test_dir for image_folder)")
        n = len(self.predict_set)
        if self.predict_set is self.test_set and self.hparams.test_subset is not None:
            n = min(n, self.hparams.test_subset)
        return self._loader(TensorImageDataset(self.predict_set, torch.arange(n)), train=False)

    def source(self, index: int, stage: str = "predict") -> str:
        """The file path (or dataset index) of image `index` of the predict or test split."""
        data = self.predict_set if stage == "predict" else self.test_set
        return data.source(index)

    def transform_batch(self, batch: dict[str, Any], train: bool) -> dict[str, Any]:
        """A raw batch as the model sees it, on the batch's device: `pipeline.labeled_batch` when `train` (augmented,
        mixed), else `pipeline.eval_batch` (float and normalised only)."""
        return self.pipeline.labeled_batch(batch) if train else self.pipeline.eval_batch(batch)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Training batches (not the sanity check) through the task's views, every other batch evaluation-only.

        The float images are made here, after Lightning's precision plugin saw the uint8 batch, so they go through
        its `convert_input` once more: a `64-true` or `bf16-true` model gets float64 / bf16 images.
        """
        trainer = self.trainer
        if trainer is None:
            return self.pipeline.eval_batch(batch)
        if not trainer.training or trainer.sanity_checking:
            return trainer.precision_plugin.convert_input(self.pipeline.eval_batch(batch))
        return trainer.precision_plugin.convert_input(self.pipeline.train_batch(batch, self.request()))

    def describe(self) -> str:
        """One line for logs: dataset, split sizes, image shape."""
        hp = self.hparams
        split = hp.labels_per_class is not None or hp.labeled_fraction is not None
        unlabeled = f" (+{len(self.unlabeled_indices)} unlabeled)" if split else ""
        return (
            f"{hp.dataset} ({Path(hp.data_dir)}): {len(self.train_indices)} train{unlabeled} / "
            f"{len(self.val_indices)} val images of shape {self.image_shape}, {self.num_classes} classes"
        )
