"""Load what a checkpoint of any task of this project holds: the task, or just its network."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from torch import nn

from lit_imgcls.checkpoint_io import read_checkpoint
from lit_imgcls.errors import ConfigError
from lit_imgcls.tasks.base import task_options
from lit_imgcls.tasks.classifier import ImageClassifier

__all__ = ["load_task", "load_task_network", "read_checkpoint"]


def load_task(checkpoint: str | Path) -> pl.LightningModule:
    """The LightningModule that wrote `checkpoint` (any task of this project), on the CPU.

    A checkpoint without `_class_path` (written from Python, not by `lit-imgcls fit`) loads as an ImageClassifier
    of the options it shares with ImageClassifier: its student network.
    """
    raw = read_checkpoint(checkpoint)
    hparams = raw.get("hyper_parameters", {})
    if "_class_path" in hparams:
        return pl.LightningModule.load_from_checkpoint(checkpoint, map_location="cpu")
    keep = task_options(ImageClassifier)
    module = ImageClassifier(**{key: value for key, value in hparams.items() if key in keep})
    module.on_load_checkpoint(raw)
    module.load_state_dict(raw["state_dict"])
    return module


def load_task_network(checkpoint: str | Path) -> nn.Module:
    """The `net` of any checkpoint written by this project's tasks."""
    module = load_task(checkpoint)
    net = getattr(module, "net", None)
    if net is None:
        raise ConfigError(f"checkpoint {checkpoint} ({type(module).__name__}) has no `net` network to take")
    return net
