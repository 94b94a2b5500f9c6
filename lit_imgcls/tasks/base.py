"""ClassificationTask: what every task of this project shares (network, loss, metrics, optimizer, checkpoints).

A task adds only its own options and holds components (a frozen teacher, a fine-tuner) for the rest; the options
declared here reach a subclass through `**kwargs`, which LightningCLI and `--print_config` resolve and document.
"""

from __future__ import annotations

import inspect
from copy import deepcopy
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
from lit_imgcls.models.weights import CLASSES_KEY, DATA_KEY

STAGES = ("train", "val", "test")
SHARED_ON_COPY = ("optimizer_factory", "scheduler_factory", "teacher")


def strip_compile_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """`state_dict` without the `_orig_mod.` that a network wrapped by `torch.compile` adds to its names."""
    return {key.replace("_orig_mod.", ""): value for key, value in state_dict.items()}


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum 0.9, lr 0.05, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


def task_options(task: type[pl.LightningModule]) -> set[str]:
    """Every option `task` takes: its own `__init__` arguments and, through `**kwargs`, its base classes'."""
    names: set[str] = set()
    for cls in task.__mro__:
        if cls is pl.LightningModule or "__init__" not in vars(cls):
            continue
        parameters = inspect.signature(cls.__init__).parameters.values()
        names |= {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names


class ClassificationTask(pl.LightningModule):
    """The network `net` and everything around it that every task shares; tasks subclass it.

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
        optimizer: an `OptimizerCallable`; default `default_optimizer` (SGD, Nesterov momentum). It gets the
            trainable parameters only (`parameter_groups`), never a frozen teacher's.
        lr_scheduler: an `LRSchedulerCallable` stepped per epoch; default: cosine annealing per step
            over the whole fit.
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
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory = optimizer or default_optimizer
        self.scheduler_factory = lr_scheduler
        self.num_classes, self.in_chans = num_classes, in_chans
        self.label_smoothing, self.aux_loss_weight = label_smoothing, aux_loss_weight
        self.channels_last, self.compile_net = channels_last, compile
        options = dict(model_kwargs or {})
        for name, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
            if value is not None:
                if name in options:
                    raise ConfigError(f"{name} is set twice (model.{name} and model.model_kwargs): keep one")
                options[name] = value
        self.net = create_model(model, num_classes, in_chans, pretrained, small_input, **options)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.compiled = False
        metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro")})
        if num_classes > 5:
            metrics.add_metrics({"acc_top5": MulticlassAccuracy(num_classes, top_k=5, average="micro")})
        self.train_metrics, self.val_metrics, self.test_metrics = (metrics.clone(prefix=f"{s}/") for s in STAGES)
        self.train_loss, self.val_loss, self.test_loss = (MeanMetric() for _ in STAGES)
        self.loss_terms = nn.ModuleDict()

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
        self.check_data_matches(getattr(self.trainer, "datamodule", None))
        if self.compile_net and not self.compiled:
            self.net.compile()  # in place: parameter names (and so checkpoints) stay those of the plain network
            self.compiled = True

    def check_data_matches(self, datamodule: pl.LightningDataModule | None) -> None:
        """Stop early, with the fix, when the data's class count or channels disagree with the model."""
        if datamodule is None or not hasattr(datamodule, "num_classes"):
            return
        if datamodule.num_classes != self.num_classes:
            raise ConfigError(
                f"model.num_classes={self.num_classes} but the dataset has {datamodule.num_classes} classes "
                f"({', '.join(datamodule.classes[:10])}{', ...' if datamodule.num_classes > 10 else ''}): "
                f"set --model.init_args.num_classes={datamodule.num_classes}"
            )
        data_smoothing = getattr(datamodule, "mix_label_smoothing", 0.0)
        if data_smoothing > 0 and self.label_smoothing > 0:
            raise ConfigError(
                f"label smoothing is set twice (data.mix_label_smoothing={data_smoothing}, "
                f"model.label_smoothing={self.label_smoothing}): set --model.init_args.label_smoothing=0"
            )
        channels = datamodule.image_shape[0]
        if channels != self.in_chans:
            raise ConfigError(
                f"model.in_chans={self.in_chans} but the images have {channels} channel(s): "
                f"set --model.init_args.in_chans={channels} or --data.channels={self.in_chans}"
            )

    def compute_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on hard or soft targets; label smoothing only while training."""
        return soft_target_cross_entropy(logits, target, self.label_smoothing if self.training else 0.0)

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss and logits, accumulated into the stage's metrics."""
        logits, aux_logits = self.forward_with_aux(batch["image"])
        target = batch["target"]
        loss = self.compute_loss(logits, target)
        for aux in aux_logits:
            loss = loss + self.aux_loss_weight * self.compute_loss(aux, target)
        self.update_metrics(stage, logits, target, loss)
        return loss, logits

    def update_metrics(self, stage: str, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> None:
        """Accumulate a batch's accuracy (hard or soft targets) and loss into the stage's epoch metrics."""
        self.stage_metrics(stage).update(logits, target if target.ndim == 1 else target.argmax(dim=-1))
        self.stage_loss(stage).update(loss.detach(), weight=len(target))

    def track_loss_terms(self, *names: str) -> None:
        """Declare the terms of the training loss that `update_loss_terms` accumulates, logged as `train/<name>`."""
        self.loss_terms.update({name: MeanMetric() for name in names})

    def update_loss_terms(self, batch_size: int, **terms: torch.Tensor) -> None:
        """Accumulate loss terms (unweighted, as computed) into their epoch means, weighted by `batch_size`."""
        for name, value in terms.items():
            self.loss_terms[name].update(value.detach(), weight=batch_size)

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

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Class probabilities per image, with the dataset index (and target when known) for the writer."""
        out = {"probs": self(batch["image"]).softmax(dim=-1), "index": batch["index"]}
        if "target" in batch:
            out["target"] = batch["target"]
        return out

    # Loss means and accuracies are torchmetrics states, synced across ranks and logged once per epoch.
    # Lightning's self.log costs ~1 ms a call on this CPU (5% of a LeNet-5 step), so the training step logs
    # its loss only every `log_every_n_steps`, when a logger would record it anyway.
    def stage_metrics(self, stage: str) -> MetricCollection:
        return getattr(self, f"{stage}_metrics")

    def stage_loss(self, stage: str) -> MeanMetric:
        return getattr(self, f"{stage}_loss")

    def _log_epoch(self, stage: str) -> None:
        """Log the stage's loss, its accuracies when some labeled batch updated them, and (train) the loss terms."""
        self.log(f"{stage}/loss", self.stage_loss(stage), prog_bar=stage != "train")
        if self.stage_metrics(stage)["acc"].update_called:
            self.log_dict(self.stage_metrics(stage), prog_bar=stage != "train")
        if stage == "train":
            for name, term in self.loss_terms.items():
                if term.update_called:
                    self.log(f"train/{name}", term)

    def on_fit_start(self) -> None:
        """Fresh metric states: after a `validate` or `test` they are inference tensors that `fit` cannot update."""
        for stage in STAGES:
            self.stage_metrics(stage).reset()
            self.stage_loss(stage).reset()
        for term in self.loss_terms.values():
            term.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates: those of `net` (and any other submodule) that require grad."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[nn.Parameter] | list[dict[str, Any]]:
        """What the optimizer gets: `trainable_parameters()`, or groups; a group's `lr_scale` multiplies its lr."""
        return self.trainable_parameters()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.parameter_groups())
        for group in optimizer.param_groups:  # before a scheduler records the initial lr
            group["lr"] *= group.pop("lr_scale", 1.0)
        if self.scheduler_factory is not None:
            return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def __deepcopy__(self, memo: dict[int, Any]) -> ClassificationTask:
        """A copy that shares, not copies, the optimizer/scheduler factories and a frozen teacher.

        Weight averaging (`EMAWeightAveraging`) deep-copies the whole task. The factories LightningCLI builds can hold
        locks in the process that launched DDP (`cannot pickle '_thread.lock' object`), and a teacher is frozen, so
        a second copy of it would only cost memory.
        """
        for name in SHARED_ON_COPY:
            value = self.__dict__.get(name)
            if value is not None:
                memo[id(value)] = value
        copy = type(self).__new__(type(self))
        memo[id(self)] = copy
        copy.__setstate__(deepcopy(self.__getstate__(), memo))
        return copy

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
        checkpoint["state_dict"] = strip_compile_prefix(checkpoint["state_dict"])
