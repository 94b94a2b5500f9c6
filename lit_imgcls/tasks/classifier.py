"""ImageClassifier: supervised training of any architecture from `create_model`."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lit_imgcls.errors import ConfigError
from lit_imgcls.losses import soft_target_cross_entropy
from lit_imgcls.models import create_model
from lit_imgcls.models.weights import (
    CLASSES_KEY,
    DATA_KEY,
    head_names,
    head_parameter_names,
    load_weights,
    read_weights,
)

STAGES = ("train", "val", "test")
FINETUNE_MODES = ("none", "linear_probe", "full", "gradual")


def strip_compile_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """`state_dict` without the `_orig_mod.` that a network wrapped by `torch.compile` adds to its names."""
    return {key.replace("_orig_mod.", ""): value for key, value in state_dict.items()}


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
        small_input: adapt ImageNet stems to 28-32 px images (see `lit_imgcls.models.small_input`).
        drop_rate: dropout before the classifier; None keeps the architecture's default.
        drop_path_rate: stochastic depth rate (ResNet, EfficientNet, ... in timm); None keeps the default.
        model_kwargs: extra constructor arguments of the architecture, e.g. `{aux_logits: false}` for GoogLeNet.
        aux_loss_weight: weight of each auxiliary classifier's loss while training (GoogLeNet: 0.3, as in the
            paper); auxiliary outputs are ignored in evaluation and prediction.
        label_smoothing: smoothing of the training targets (hard or soft). Smoothing is applied in one place only:
            when the data's mix stage folds it into CutMix/MixUp targets (`data.mix_label_smoothing` > 0), this must
            stay 0, and setting both is a ConfigError.
        optimizer: an `OptimizerCallable`; default `default_optimizer` (SGD, Nesterov momentum).
        lr_scheduler: an `LRSchedulerCallable` stepped per epoch; default: cosine annealing per step
            over the whole fit.
        pretrained_checkpoint: a local file to start from: a timm/torchvision state dict (`.pth`, `.safetensors`),
            a timm training checkpoint, or any checkpoint of this project's tasks (its `net`). Loaded when `fit`
            starts (so a fine-tuned checkpoint loads without this file); the backbone must match `model`; the head
            is re-initialised (one log line) when the class count or the class names differ; a 3-channel stem is
            adapted to 1-channel data and back as timm's `in_chans` does.
        finetune: which parameters train. `none`: all, at the optimizer's lr, in one group (plain training).
            `linear_probe`: only the head (see `head`); the backbone's parameters and BatchNorm statistics stay
            exactly as loaded. `full`: all, the head at lr and the backbone at lr * `backbone_lr_scale` (two
            parameter groups, `head` and `backbone`, as LearningRateMonitor logs them). `gradual`: like
            `linear_probe` until epoch `unfreeze_epoch`, then like `full`.
        head: the modules (qualified names in the network) that form the head: re-initialised together when the
            classes differ, the only ones `linear_probe` trains, at the full lr in `full`/`gradual`. Default: the
            final classifier (timm's `get_classifier()`). LeNet-5's fully connected block is
            `[features.10, features.13, fc]` (its conv features transfer better than its last layers).
        backbone_lr_scale: the backbone's learning rate as a fraction of the head's (`full`, `gradual`).
        unfreeze_epoch: `gradual`: the epoch (0-based) at which the backbone starts training.
        channels_last: keep the network's weights in channels-last memory format: convolutions run faster on
            CPUs (oneDNN) and on GPUs with mixed precision (see benchmarks/compile_channels_last.py).
        compile: compile the network with `torch.compile` (in place, `nn.Module.compile`) when a fit, validate,
            test or predict starts; the first steps pay the compilation. Checkpoints are the same with and
            without it (a `_orig_mod.` prefix from a network wrapped by `torch.compile` is accepted on load).
    """

    def __init__(
        self,
        model: str = "lenet5",
        num_classes: int = 10,
        in_chans: int = 1,
        pretrained: bool = False,
        small_input: bool = False,
        drop_rate: float | None = None,
        drop_path_rate: float | None = None,
        model_kwargs: dict[str, Any] | None = None,
        aux_loss_weight: float = 0.3,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        pretrained_checkpoint: str | None = None,
        finetune: Literal["none", "linear_probe", "full", "gradual"] = "none",
        head: list[str] | None = None,
        backbone_lr_scale: float = 0.1,
        unfreeze_epoch: int = 1,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory = optimizer or default_optimizer
        self.scheduler_factory = lr_scheduler
        options = dict(model_kwargs or {})
        for name, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
            if value is not None:
                if name in options:
                    raise ConfigError(f"{name} is set twice (model.{name} and model.model_kwargs): keep one")
                options[name] = value
        self.net = create_model(model, num_classes, in_chans, pretrained, small_input, **options)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self._check_finetune_options()
        self.pretrained_loaded = False
        self.compiled = False
        self.backbone_frozen = finetune in ("linear_probe", "gradual") and unfreeze_epoch > 0
        self.set_backbone_requires_grad(not self.backbone_frozen)
        metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro")})
        if num_classes > 5:
            metrics.add_metrics({"acc_top5": MulticlassAccuracy(num_classes, top_k=5, average="micro")})
        self.train_metrics, self.val_metrics, self.test_metrics = (metrics.clone(prefix=f"{s}/") for s in STAGES)
        self.train_loss, self.val_loss, self.test_loss = (MeanMetric() for _ in STAGES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (auxiliary outputs, if any, are dropped)."""
        logits, _ = self.forward_with_aux(images)
        return logits

    def forward_with_aux(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the auxiliary classifiers' logits: GoogLeNet returns `(logits, aux2, aux1)` while training."""
        out = self.net(images)
        if isinstance(out, tuple):
            return out[0], [aux for aux in out[1:] if aux is not None]
        return out, []

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.check_data_matches(datamodule)
        if self.hparams.compile and not self.compiled:
            self.net.compile()  # in place: parameter names (and so checkpoints) stay those of the plain network
            self.compiled = True
        if stage == "fit":
            self.load_pretrained(getattr(datamodule, "classes", None))
            if self.backbone_frozen and self.hparams.finetune == "gradual" and self.trainer.world_size > 1:
                # DDP registers only the parameters that require grad when it wraps the model, so a backbone
                # unfrozen later would train unsynchronised (Lightning issue 20340): keep it registered and
                # drop its gradients until `unfreeze_epoch` instead.
                self.set_backbone_requires_grad(True)

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
        data_smoothing = getattr(datamodule, "mix_label_smoothing", 0.0)
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

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss and logits, accumulated into the stage's metrics."""
        logits, aux_logits = self.forward_with_aux(batch["image"])
        target = batch["target"]
        loss = self.compute_loss(logits, target)
        for aux in aux_logits:
            loss = loss + self.hparams.aux_loss_weight * self.compute_loss(aux, target)
        self.update_metrics(stage, logits, target, loss)
        return loss, logits

    def update_metrics(self, stage: str, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> None:
        """Accumulate a batch's accuracy (hard or soft targets) and loss into the stage's epoch metrics."""
        self.stage_metrics(stage).update(logits, target if target.ndim == 1 else target.argmax(dim=-1))
        self.stage_loss(stage).update(loss.detach(), weight=len(target))

    def log_step_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        """Log `train/loss_step` every `log_every_n_steps` (see the note on logging cost below)."""
        if self.trainer.global_step % self.trainer.log_every_n_steps == 0:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._shared_step(batch, "train")
        self.log_step_loss(loss, len(batch["image"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Logits and targets, for callbacks such as the test report (`lit_imgcls.report.TestReport`)."""
        _, logits = self._shared_step(batch, "test")
        return {"logits": logits.detach(), "target": batch["target"]}

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
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.hparams.finetune in ("full", "gradual"):
            optimizer.param_groups[1]["lr"] *= self.hparams.backbone_lr_scale  # before a scheduler reads it
        if self.scheduler_factory is not None:
            return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # Transfer learning: which parameters form the backbone, which train, and when.
    def _check_finetune_options(self) -> None:
        hp = self.hparams
        if hp.finetune not in FINETUNE_MODES:
            raise ConfigError(f"unknown model.finetune {hp.finetune!r}: choose one of {', '.join(FINETUNE_MODES)}")
        if hp.backbone_lr_scale <= 0:
            raise ConfigError(f"model.backbone_lr_scale must be > 0, got {hp.backbone_lr_scale}: use linear_probe")
        if hp.unfreeze_epoch < 0:
            raise ConfigError(f"model.unfreeze_epoch must be >= 0, got {hp.unfreeze_epoch}")
        if hp.finetune != "none" and not (hp.pretrained or hp.pretrained_checkpoint):
            rank_zero_warn(f"finetune={hp.finetune} from random weights: set model.pretrained_checkpoint")

    def load_pretrained(self, classes: list[str] | tuple[str, ...] | None = None) -> None:
        """Load `pretrained_checkpoint` into the network once (`setup("fit")` calls it; call it to evaluate
        the loaded weights without fitting). `classes`: the data's class names, compared with the file's."""
        if self.hparams.pretrained_checkpoint is None or self.pretrained_loaded:
            return
        weights = read_weights(self.hparams.pretrained_checkpoint)
        load_weights(self.net, weights, self.hparams.model, classes, self.hparams.head)
        self.pretrained_loaded = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the data's class names (a transfer from this checkpoint knows whether its head fits) and its
        normalisation and image shape (what `lit-imgcls export` puts into the deployed model)."""
        datamodule = getattr(self._trainer, "datamodule", None)
        classes = getattr(datamodule, "classes", None)
        if classes is not None:
            checkpoint[CLASSES_KEY] = list(classes)
        if getattr(datamodule, "mean", None) is not None and hasattr(datamodule, "image_shape"):
            shape = list(datamodule.image_shape)
            checkpoint[DATA_KEY] = {"mean": list(datamodule.mean), "std": list(datamodule.std), "image_shape": shape}
        checkpoint["state_dict"] = strip_compile_prefix(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The checkpoint's weights supersede `pretrained_checkpoint`: a later `fit` must not reload it."""
        self.pretrained_loaded = True
        checkpoint["state_dict"] = strip_compile_prefix(checkpoint["state_dict"])

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the network except the head's (see `head`)."""
        head = head_parameter_names(self.net, self.hparams.head)
        return [p for name, p in self.net.named_parameters() if name not in head]

    def parameter_groups(self) -> list[nn.Parameter] | list[dict[str, Any]]:
        """What the optimizer gets: `trainable_parameters()`, split into `head` and `backbone` groups for
        `full` and `gradual` (the backbone group's lr is scaled in `configure_optimizers`)."""
        if self.hparams.finetune not in ("full", "gradual"):
            return self.trainable_parameters()
        backbone = self.backbone_parameters()
        ids = {id(p) for p in backbone}
        head = [p for p in self.trainable_parameters() if id(p) not in ids]
        return [{"params": head, "name": "head"}, {"params": backbone, "name": "backbone"}]

    def set_backbone_requires_grad(self, flag: bool) -> None:
        for p in self.backbone_parameters():
            p.requires_grad_(flag)

    def train(self, mode: bool = True) -> ImageClassifier:
        """Lightning sets every submodule to train mode; a frozen backbone keeps its BatchNorm statistics."""
        super().train(mode)
        if getattr(self, "backbone_frozen", False):
            self._set_backbone_norm_mode()
        return self

    def _set_backbone_norm_mode(self) -> None:
        """Backbone layers with running statistics: eval while the backbone is frozen, else the module's mode."""
        names = head_names(self.net, self.hparams.head)
        head = {id(m) for name in names for m in self.net.get_submodule(name).modules()}
        for module in self.net.modules():
            if getattr(module, "track_running_stats", False) and id(module) not in head:
                module.train(self.training and not self.backbone_frozen)

    def on_train_epoch_start(self) -> None:
        hp = self.hparams
        if hp.finetune == "none":
            return
        if hp.finetune == "gradual" and self.backbone_frozen and self.current_epoch >= hp.unfreeze_epoch:
            self.backbone_frozen = False
            self.set_backbone_requires_grad(True)
            rank_zero_info(f"epoch {self.current_epoch}: backbone unfrozen (lr scale {hp.backbone_lr_scale})")
        self._set_backbone_norm_mode()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """`gradual` under DDP: the frozen backbone's gradients are dropped, so the optimizer skips it."""
        if self.backbone_frozen:
            for p in self.backbone_parameters():
                p.grad = None
