"""The `lit-imgcls` command: LightningCLI with `fit`, `validate`, `test` and `predict` over any task, and the
`export` and `report` commands of `lit_imgcls.commands`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from unittest import mock

import lightning.pytorch as pl
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lit_imgcls.callbacks import PredictionWriter
from lit_imgcls.commands import COMMANDS, run_command
from lit_imgcls.data import ImageDataModule
from lit_imgcls.errors import UserError
from lit_imgcls.report import TestReport


class LitImgClsCLI(LightningCLI):
    """Adds `--test_after_fit` (test the best checkpoint when `fit` ends), a configurable prediction writer and
    the test report (`--report.*`, written by every `test`)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="After fit, run test on the best checkpoint."
        )
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(TestReport, "report")

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            evaluate_best_checkpoint(self.trainer, self.model, self.datamodule)


def evaluate_best_checkpoint(
    trainer: pl.Trainer, model: pl.LightningModule, datamodule: pl.LightningDataModule
) -> list[dict[str, float]]:
    """Test the best checkpoint of the fit that just ended (its last weights when no checkpoint was kept).

    Weight-averaging callbacks (EMAWeightAveraging) are dropped first: the checkpoint's `state_dict` holds the
    averaged weights, and Lightning's callback, still holding its average after the fit, would load the raw ones
    (`current_model_state`) over them.
    """
    checkpoint = trainer.checkpoint_callback
    ckpt_path = "best" if checkpoint is not None and getattr(checkpoint, "best_model_path", "") else None
    if ckpt_path is not None:
        print(f"testing the best checkpoint: {checkpoint.best_model_path}")
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, WeightAveraging)]
    return trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path)


CLI_OPTIONS: dict[str, Any] = dict(
    model_class=pl.LightningModule,
    datamodule_class=ImageDataModule,
    subclass_mode_model=True,
    auto_configure_optimizers=False,
    save_config_kwargs={"overwrite": True},
)


class Experiment(NamedTuple):
    """What a config file builds: the task, the data and the Trainer, ready for `trainer.fit(model, datamodule)`."""

    model: pl.LightningModule
    datamodule: ImageDataModule
    trainer: pl.Trainer


def instantiate_from_config(config: str | Path, overrides: Mapping[str, Any] | Sequence[str] = ()) -> Experiment:
    """Build the model, datamodule and Trainer of a `lit-imgcls fit` config in Python (notebooks, scripts).

    The same parser as the command line, so the same YAML and the same defaults; `seed_everything` is applied.
    `overrides` are command-line options (`["--trainer.max_epochs=2"]`) or a mapping of dotted keys to values
    (`{"trainer.max_epochs": 2, "data.train_subset": 1000}`). A mistake raises instead of exiting.
    """
    if isinstance(overrides, Mapping):
        overrides = [
            f"--{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in overrides.items()
        ]
    try:  # the process's own argv (pytest's, a Jupyter kernel's) is not for this parser
        with mock.patch.object(sys, "argv", sys.argv[:1]):
            cli = LitImgClsCLI(
                **CLI_OPTIONS,
                run=False,
                parser_kwargs={"exit_on_error": False},
                args=["--config", str(config), *overrides],
            )
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None or user_error is err:
            raise
        raise user_error from None
    return Experiment(cli.model, cli.datamodule, cli.trainer)


def _user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`, if any (jsonargparse wraps errors raised while instantiating)."""
    while err is not None:
        if isinstance(err, UserError):
            return err
        err = err.__cause__ or err.__context__
    return None


def exit_on_user_error(run: Callable[[], object]) -> None:
    """Call `run`; a mistake the tool recognises (a UserError) prints `lit-imgcls: error: ...` and exits 2,
    without a traceback. Every command line of the project goes through here."""
    try:
        run()
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"lit-imgcls: error: {user_error}", file=sys.stderr)
        sys.exit(2)


def main(args: ArgsType = None) -> None:
    """Entry point of `lit-imgcls` and `python -m lit_imgcls`."""
    argv = sys.argv[1:] if args is None else list(args) if isinstance(args, list | tuple) else []
    if argv and argv[0] in COMMANDS:
        exit_on_user_error(lambda: run_command(argv))
    else:
        exit_on_user_error(lambda: LitImgClsCLI(**CLI_OPTIONS, args=args))
