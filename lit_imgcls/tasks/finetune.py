"""FineTuner: which parameters of a network train, and when (linear probe, full fine-tuning, gradual unfreezing)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lit_imgcls.errors import ConfigError
from lit_imgcls.models.weights import head_names, head_parameter_names, load_weights, read_weights

FINETUNE_MODES = ("none", "linear_probe", "full", "gradual")


class FineTuner:
    """Transfer learning for one network `net`: the pretrained weights it starts from, its head, and the parameters
    that train at each epoch (see `ImageClassifier` for the meaning of each option).

    It holds `net` without owning it (the task does): it sets `requires_grad`, the BatchNorm modes of the frozen
    backbone, the optimizer's parameter groups, and under DDP drops the gradients of a backbone still frozen.
    """

    def __init__(
        self,
        net: nn.Module,
        architecture: str,
        mode: str = "none",
        head: Sequence[str] | None = None,
        backbone_lr_scale: float = 0.1,
        unfreeze_epoch: int = 1,
        pretrained_checkpoint: str | None = None,
        pretrained: bool = False,
    ) -> None:
        if mode not in FINETUNE_MODES:
            raise ConfigError(f"unknown model.finetune {mode!r}: choose one of {', '.join(FINETUNE_MODES)}")
        if backbone_lr_scale <= 0:
            raise ConfigError(f"model.backbone_lr_scale must be > 0, got {backbone_lr_scale}: use linear_probe")
        if unfreeze_epoch < 0:
            raise ConfigError(f"model.unfreeze_epoch must be >= 0, got {unfreeze_epoch}")
        if mode != "none" and not (pretrained or pretrained_checkpoint):
            rank_zero_warn(f"finetune={mode} from random weights: set model.pretrained_checkpoint")
        self.net, self.architecture, self.mode, self.head = net, architecture, mode, list(head) if head else None
        self.backbone_lr_scale, self.unfreeze_epoch = backbone_lr_scale, unfreeze_epoch
        self.pretrained_checkpoint = pretrained_checkpoint
        self.pretrained_loaded = False
        self.backbone_frozen = mode in ("linear_probe", "gradual") and unfreeze_epoch > 0
        self.set_backbone_requires_grad(not self.backbone_frozen)  # a head naming no module: ConfigError here

    def load_pretrained(self, classes: Sequence[str] | None = None) -> None:
        """Load `pretrained_checkpoint` into the network once; `classes`: the data's names, compared with the file's."""
        if self.pretrained_checkpoint is None or self.pretrained_loaded:
            return
        load_weights(self.net, read_weights(self.pretrained_checkpoint), self.architecture, classes, self.head)
        self.pretrained_loaded = True

    def setup_fit(self, world_size: int) -> None:
        """Before DDP wraps the model: keep a backbone that `gradual` unfreezes later registered with DDP."""
        if self.backbone_frozen and self.mode == "gradual" and world_size > 1:
            # DDP registers only the parameters that require grad when it wraps the model, so a backbone
            # unfrozen later would train unsynchronised (Lightning issue 20340): keep it registered and
            # drop its gradients until `unfreeze_epoch` instead (`drop_frozen_gradients`).
            self.set_backbone_requires_grad(True)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the network except the head's."""
        head = head_parameter_names(self.net, self.head)
        return [p for name, p in self.net.named_parameters() if name not in head]

    def parameter_groups(self, trainable: list[nn.Parameter]) -> list[nn.Parameter] | list[dict[str, Any]]:
        """`trainable`, split into `head` and `backbone` groups (the backbone's lr scaled) for `full` and `gradual`."""
        if self.mode not in ("full", "gradual"):
            return trainable
        backbone = self.backbone_parameters()
        ids = {id(p) for p in backbone}
        head = [p for p in trainable if id(p) not in ids]
        return [
            {"params": head, "name": "head"},
            {"params": backbone, "name": "backbone", "lr_scale": self.backbone_lr_scale},
        ]

    def set_backbone_requires_grad(self, flag: bool) -> None:
        for p in self.backbone_parameters():
            p.requires_grad_(flag)

    def set_norm_mode(self, training: bool) -> None:
        """Backbone layers with running statistics: eval while the backbone is frozen, else `training`."""
        names = head_names(self.net, self.head)
        head = {id(m) for name in names for m in self.net.get_submodule(name).modules()}
        for module in self.net.modules():
            if getattr(module, "track_running_stats", False) and id(module) not in head:
                module.train(training and not self.backbone_frozen)

    def on_train_epoch_start(self, epoch: int, training: bool) -> None:
        """`gradual`: unfreeze the backbone at `unfreeze_epoch`; every mode but `none`: set the BatchNorm modes."""
        if self.mode == "none":
            return
        if self.mode == "gradual" and self.backbone_frozen and epoch >= self.unfreeze_epoch:
            self.backbone_frozen = False
            self.set_backbone_requires_grad(True)
            rank_zero_info(f"epoch {epoch}: backbone unfrozen (lr scale {self.backbone_lr_scale})")
        self.set_norm_mode(training)

    def drop_frozen_gradients(self) -> None:
        """`gradual` under DDP: the frozen backbone's gradients are dropped, so the optimizer skips it."""
        if self.backbone_frozen:
            for p in self.backbone_parameters():
                p.grad = None
