"""ImageClassifier: supervised training of any architecture from `create_model`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lit_imgcls.errors import ConfigError
from lit_imgcls.losses import soft_target_cross_entropy
from lit_imgcls.models import create_model

STAGES = ("train", "val", "test")


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum 0.9, lr 0.05, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


class ImageClassifier(pl.LightningModule):
    """Supervised image classification; the base every other task builds on.

    Args:
        model: `lenet5` or any timm model name (see `lit_imgcls.models.create_model`).
        num_classes: number of classes; checked against the data at the start of every run.
        in_chans: input channels (1 for Fashion-MNIST); checked against the data.
        pretrained: load timm's pretrained weights (needs internet or timm's cache).
        small_input: adapt ImageNet stems to 28-32 px images (ResNet family).
        model_kwargs: extra constructor arguments, e.g. `{drop_rate: 0.2, drop_path_rate: 0.1}`.
        label_smoothing: smoothing of the training targets (hard or soft). Smoothing is applied in one place only:
            when the data's mix stage folds it into CutMix/MixUp targets (`data.mix_label_smoothing` > 0), this must
            stay 0, and setting both is a ConfigError.
        optimizer: an `OptimizerCallable`; default `default_optimizer` (SGD, Nesterov momentum).
        lr_scheduler: an `LRSchedulerCallable` stepped per epoch; default: cosine annealing per step
            over the whole fit.
    """

    def __init__(
        self,
        model: str = "lenet5",
        num_classes: int = 10,
        in_chans: int = 1,
        pretrained: bool = False,
        small_input: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory = optimizer or default_optimizer
        self.scheduler_factory = lr_scheduler
        self.net = create_model(model, num_classes, in_chans, pretrained, small_input, **(model_kwargs or {}))
        metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro")})
        if num_classes > 5:
            metrics.add_metrics({"acc_top5": MulticlassAccuracy(num_classes, top_k=5, average="micro")})
        self.train_metrics, self.val_metrics, self.test_metrics = (metrics.clone(prefix=f"{s}/") for s in STAGES)
        self.train_loss, self.val_loss, self.test_loss = (MeanMetric() for _ in STAGES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def setup(self, stage: str) -> None:
        self.check_data_matches(getattr(self.trainer, "datamodule", None))

    def check_data_matches(self, datamodule: pl.LightningDataModule | None) -> None:
        """Stop early, with the fix, when the data's class count or channels disagree with the model."""
        if datamodule is None or not hasattr(datamodule, "num_classes"):
            return
        hp = self.hparams
        if datamodule.num_classes != hp.num_classes:
            raise ConfigError(
                f"model.num_classes={hp.num_classes} but the dataset has {datamodule.num_classes} classes "
                f"({', '.join(datamodule.classes[:10])}{', ...' if datamodule.num_classes > 10 else ''}): "
                f"set --model.init_args.num_classes={datamodule.num_classes}"
            )
        data_smoothing = getattr(datamodule, "hparams", {}).get("mix_label_smoothing", 0.0)
        if data_smoothing > 0 and hp.label_smoothing > 0:
            raise ConfigError(
                f"label smoothing is set twice (data.mix_label_smoothing={data_smoothing}, "
                f"model.label_smoothing={hp.label_smoothing}): set --model.init_args.label_smoothing=0"
            )
        channels = datamodule.image_shape[0]
        if channels != hp.in_chans:
            raise ConfigError(
                f"model.in_chans={hp.in_chans} but the images have {channels} channel(s): "
                f"set --model.init_args.in_chans={channels} or --data.channels={hp.in_chans}"
            )

    def compute_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on hard or soft targets; label smoothing only while training."""
        smoothing = self.hparams.label_smoothing if self.training else 0.0
        return soft_target_cross_entropy(logits, target, smoothing)

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        target = batch["target"]
        loss = self.compute_loss(logits, target)
        self.update_metrics(stage, logits, target, loss)
        return loss

    def update_metrics(self, stage: str, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> None:
        """Accumulate a batch's accuracy (hard or soft targets) and loss into the stage's epoch metrics."""
        self.stage_metrics(stage).update(logits, target if target.ndim == 1 else target.argmax(dim=-1))
        self.stage_loss(stage).update(loss.detach(), weight=len(target))

    def log_step_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        """Log `train/loss_step` every `log_every_n_steps` (see the note on logging cost below)."""
        if self.trainer.global_step % self.trainer.log_every_n_steps == 0:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        self.log_step_loss(loss, len(batch["image"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    # Loss means and accuracies are torchmetrics states, synced across ranks and logged once per epoch.
    # Lightning's self.log costs ~1 ms a call on this CPU (5% of a LeNet-5 step), so the training step logs
    # its loss only every `log_every_n_steps`, when a logger would record it anyway.
    def stage_metrics(self, stage: str) -> MetricCollection:
        return getattr(self, f"{stage}_metrics")

    def stage_loss(self, stage: str) -> MeanMetric:
        return getattr(self, f"{stage}_loss")

    def _log_epoch(self, stage: str) -> None:
        self.log(f"{stage}/loss", self.stage_loss(stage), prog_bar=stage != "train")
        self.log_dict(self.stage_metrics(stage), prog_bar=stage != "train")

    def on_fit_start(self) -> None:
        """Fresh metric states: after a `validate` or `test` they are inference tensors that `fit` cannot update."""
        for stage in STAGES:
            self.stage_metrics(stage).reset()
            self.stage_loss(stage).reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Class probabilities per image, with the dataset index (and target when known) for the writer."""
        out = {"probs": self(batch["image"]).softmax(dim=-1), "index": batch["index"]}
        if "target" in batch:
            out["target"] = batch["target"]
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates; tasks with frozen parts (a teacher) override this."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is not None:
            return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
