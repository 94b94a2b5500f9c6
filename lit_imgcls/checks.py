"""Checks that turn the usual mistakes into one clear ConfigError before any work starts: images too small for
the network, negative learning rates, an output folder that cannot be written, a checkpoint of another model."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lit_imgcls.errors import ConfigError

# what PyTorch says when a network cannot take an image size (pooling, convolution, flatten into a Linear)
SIZE_ERRORS = ("too small", "kernel size can't be greater", "cannot be multiplied", "must match the size")
LR_KEYS = ("lr", "max_lr", "base_lr", "eta_min", "min_lr")
# model options that decide the network's weights: a checkpoint that disagrees on them is another model
ARCHITECTURE_KEYS = ("model",)


def check_input_size(net: torch.nn.Module, image_shape: tuple[int, int, int], small_input: bool | None) -> None:
    """Run `net` on two blank images of `image_shape` (C, H, W) on its device and dtype: a network that cannot take
    them is a ConfigError naming the fix, instead of a RuntimeError in the sanity check. Leaves the network's mode
    and the RNGs alone."""
    parameter = next(net.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(2, *image_shape, device=device, dtype=dtype))
    except RuntimeError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if not any(pattern in message.lower() for pattern in SIZE_ERRORS):
            return  # not about the size: the run itself reports it
        fix = (
            "set --model.init_args.small_input=true (a stem for 28-32 px images) or a larger --data.image_size"
            if small_input is False
            else "set --data.image_size to a size the network takes"
        )
        shape = "x".join(map(str, image_shape))
        raise ConfigError(f"the network cannot take {shape} images ({message}): {fix}") from None
    finally:
        net.train(was_training)


class InputSizeCheck(Callback):
    """Checks, when any stage sets up, that the task's `net` takes the data's image size (see `check_input_size`)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        net = getattr(pl_module, "net", None)
        shape = getattr(trainer.datamodule, "image_shape", None) if trainer.datamodule is not None else None
        if isinstance(net, torch.nn.Module) and shape is not None:
            small_input = getattr(pl_module, "hparams", {}).get("small_input")
            check_input_size(net, tuple(shape), small_input)


def walk(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted option name, value) of a nested config of mappings and lists."""
    if isinstance(config, Mapping):
        for key, value in config.items():
            yield from walk(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(config, list | tuple):
        for i, value in enumerate(config):
            yield from walk(value, f"{prefix}.{i}")
    else:
        yield prefix, config


def check_learning_rates(config: Mapping[str, Any]) -> None:
    """A negative learning rate anywhere in the config (optimizer, scheduler) is a ConfigError naming the option."""
    for name, value in walk(config):
        if name.rsplit(".", 1)[-1] in LR_KEYS and isinstance(value, int | float) and value < 0:
            raise ConfigError(f"{name}={value} is negative: a learning rate must be > 0")


def check_writable(folder: str | Path, option: str) -> None:
    """Create `folder` and write a probe file there; failing, a ConfigError names the folder and `option`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(
            f"cannot write to the output folder {folder} ({reason}): set {option} to a writable folder"
        ) from None


def compare_with_checkpoint(config_model: Mapping[str, Any] | None, hparams: Mapping[str, Any], path: str) -> None:
    """Refuse a config whose model contradicts the checkpoint's (another task class or architecture), naming both;
    other differing options are taken from the checkpoint, on purpose, with one logged line."""
    if not config_model or not hparams:
        return
    init_args = dict(config_model.get("init_args") or {})
    config_class, ckpt_class = config_model.get("class_path"), hparams.get("_class_path")
    if config_class and ckpt_class and config_class != ckpt_class:
        raise ConfigError(
            f"checkpoint {path} holds a {ckpt_class} but the config asks for {config_class}: "
            "use the config the checkpoint was trained with (config.yaml in its run folder)"
        )
    for key in ARCHITECTURE_KEYS:
        if key in init_args and key in hparams and init_args[key] != hparams[key]:
            raise ConfigError(
                f"checkpoint {path} holds model.init_args.{key}={hparams[key]} but the config asks for "
                f"{key}={init_args[key]}: use the config the checkpoint was trained with (config.yaml in its run "
                f"folder) or set --model.init_args.{key}={hparams[key]}"
            )
    differing = [
        f"{key}={hparams[key]!r} (config: {init_args[key]!r})"
        for key in init_args
        if key in hparams and not key.startswith("_") and _plain(init_args[key]) != _plain(hparams[key])
    ]
    if differing:
        rank_zero_info(f"model options taken from the checkpoint {path}: {', '.join(differing)}")


def _plain(value: Any) -> Any:
    """Lists and tuples compare alike (YAML gives lists, checkpoints may hold tuples)."""
    return list(value) if isinstance(value, tuple) else value
