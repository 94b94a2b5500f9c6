"""ImageClassifier: supervised training of any architecture from `create_model`, from scratch or by fine-tuning."""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torch import nn

from lit_imgcls.errors import ConfigError
from lit_imgcls.tasks.base import STAGES, ClassificationTask, default_optimizer, strip_compile_prefix
from lit_imgcls.tasks.finetune import FINETUNE_MODES, FineTuner

__all__ = [
    "FINETUNE_MODES",
    "FINETUNE_OPTIONS",
    "STAGES",
    "ImageClassifier",
    "default_optimizer",
    "drop_finetune_options",
    "strip_compile_prefix",
]
FINETUNE_OPTIONS = ("pretrained_checkpoint", "finetune", "head", "backbone_lr_scale", "unfreeze_epoch")


class ImageClassifier(ClassificationTask):
    """Supervised image classification, optionally fine-tuning pretrained weights (`FineTuner`).

    Args:
        model: `lenet5` or any timm model name (see `lit_imgcls.models.create_model`).
        num_classes: number of classes; checked against the data at the start of every run.
        in_chans: input channels (1 for Fashion-MNIST); checked against the data.
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
        **kwargs: the network and training options every task shares (`ClassificationTask`): pretrained,
            small_input, drop_rate, drop_path_rate, model_kwargs, aux_loss_weight, label_smoothing, optimizer,
            lr_scheduler, channels_last, compile.
    """

    def __init__(
        self,
        model: str = "lenet5",
        num_classes: int = 10,
        in_chans: int = 1,
        pretrained_checkpoint: str | None = None,
        finetune: Literal["none", "linear_probe", "full", "gradual"] = "none",
        head: list[str] | None = None,
        backbone_lr_scale: float = 0.1,
        unfreeze_epoch: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, num_classes=num_classes, in_chans=in_chans, **kwargs)
        self.finetuner = FineTuner(
            self.net,
            model,
            mode=finetune,
            head=head,
            backbone_lr_scale=backbone_lr_scale,
            unfreeze_epoch=unfreeze_epoch,
            pretrained_checkpoint=pretrained_checkpoint,
            pretrained=kwargs.get("pretrained", False),
        )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.load_pretrained(getattr(getattr(self.trainer, "datamodule", None), "classes", None))
            self.finetuner.setup_fit(self.trainer.world_size)

    def load_pretrained(self, classes: list[str] | tuple[str, ...] | None = None) -> None:
        """Load `pretrained_checkpoint` into the network once (`setup("fit")` calls it; call it to evaluate
        the loaded weights without fitting). `classes`: the data's class names, compared with the file's."""
        self.finetuner.load_pretrained(classes)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The checkpoint's weights supersede `pretrained_checkpoint`: a later `fit` must not reload it."""
        super().on_load_checkpoint(checkpoint)
        self.finetuner.pretrained_loaded = True

    def parameter_groups(self) -> list[nn.Parameter] | list[dict[str, Any]]:
        """`head` and `backbone` groups for `full` and `gradual` (the backbone's lr scaled), else one."""
        return self.finetuner.parameter_groups(self.trainable_parameters())

    def train(self, mode: bool = True) -> ImageClassifier:
        """Lightning sets every submodule to train mode; a frozen backbone keeps its BatchNorm statistics."""
        super().train(mode)
        if getattr(self, "finetuner", None) is not None and self.finetuner.backbone_frozen:
            self.finetuner.set_norm_mode(self.training)
        return self

    def on_train_epoch_start(self) -> None:
        self.finetuner.on_train_epoch_start(self.current_epoch, self.training)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.finetuner.drop_frozen_gradients()


def drop_finetune_options(options: dict[str, Any], task: str) -> None:
    """Remove ImageClassifier's fine-tuning options from `options` (a task's `**kwargs`): checkpoints of `task`
    written while it inherited them carry them at their defaults, which had no effect; another value is an error."""
    signature = inspect.signature(ImageClassifier.__init__).parameters
    for name in FINETUNE_OPTIONS:
        value = options.pop(name, signature[name].default)
        if value != signature[name].default:
            raise ConfigError(
                f"{task} takes no {name} (got {value!r}): only ImageClassifier fine-tunes. Remove it, or fine-tune "
                "the trained student as an ImageClassifier (`python -m lit_imgcls.tasks.distill` exports it)"
            )
