"""The `lit-imgcls` command: LightningCLI with `fit`, `validate`, `test` and `predict` over any task, and the
`export` and `report` commands of `lit_imgcls.commands`."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple
from unittest import mock

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_imgcls.callbacks import PredictionWriter
from lit_imgcls.checkpoint_io import read_checkpoint
from lit_imgcls.checks import InputSizeCheck, check_learning_rates, check_writable, compare_with_checkpoint
from lit_imgcls.commands import COMMANDS, run_command
from lit_imgcls.data import ImageDataModule
from lit_imgcls.data.preview import preview_rows, save_grid
from lit_imgcls.errors import ConfigError, UserError
from lit_imgcls.models.weights import CLASSES_KEY, DATA_KEY
from lit_imgcls.preemption import (
    AtomicCheckpointIO,
    Preempted,
    PreemptionCheckpoint,
    keep_metrics,
    metrics_before,
    resume_latest_run,
)
from lit_imgcls.report import TestReport
from lit_imgcls.resume import ExactResume

ROOT_DIR = "{default_root_dir}"  # in a config's trainer options: the run's trainer.default_root_dir
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")  # --ckpt_path values Lightning resolves itself


class LitImgClsCLI(LightningCLI):
    """Adds `--test_after_fit` (test the best checkpoint when `fit` ends), a configurable prediction writer, the
    test report (`--report.*`, written by every `test`), preemption-safe fits (`--preemption.*`, `--resume=auto`),
    atomic checkpoint writes, and checks that answer the usual mistakes with one ConfigError."""

    checkpoint_data: dict[str, Any] | None = None  # what the --ckpt_path checkpoint says about its data
    resumed_metrics: tuple[Path, list[dict[str, str]]] | None = None  # --resume=auto: the run's metrics so far

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="After fit, run test on the best checkpoint."
        )
        parser.add_argument(
            "--resume",
            type=Literal["never", "auto"],
            default="never",
            help="fit: auto continues the newest run folder of this config from its last.ckpt (same folder, "
            "same metrics.csv), or starts a fresh run when there is none.",
        )
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(TestReport, "report")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")

    def _parse_ckpt_path(self) -> None:
        """Expand `{default_root_dir}`, resolve `--resume=auto`, refuse a missing or unreadable checkpoint and one
        of another model (naming both), then let LightningCLI take the checkpoint's remaining model options."""
        subcommand = self.config.get("subcommand")
        expand_root_dir(self.config[subcommand] if subcommand else self.config)
        if subcommand:
            config = self.config[subcommand]
            resumed = self._resume_run(config) if subcommand == "fit" and config.get("resume") == "auto" else None
            path = config.get("ckpt_path")
            if path and path not in LIGHTNING_CKPT_NAMES and not str(path).startswith("registry"):
                self._check_checkpoint(config, str(path), resumed)
        super()._parse_ckpt_path()

    def _resume_run(self, config: Any) -> Path | None:
        """`--resume=auto`: point the fit at the newest run folder's last.ckpt (None: a fresh run)."""
        if config.get("ckpt_path"):
            raise ConfigError("give either --ckpt_path or --resume=auto, not both")
        last = resume_latest_run(config)
        if last is not None:
            config.ckpt_path = str(last)
        return last

    def _check_checkpoint(self, config: Any, path: str, resumed: Path | None) -> None:
        """Read the checkpoint once: refuse another model, keep what it says about its data (test/predict) and,
        when resuming, the run's metrics logged before its step."""
        checkpoint = read_checkpoint(path)
        model = config.get("model")
        model = model.as_dict() if hasattr(model, "as_dict") else model
        compare_with_checkpoint(model, checkpoint.get("hyper_parameters", {}), path)
        data, classes = checkpoint.get(DATA_KEY), checkpoint.get(CLASSES_KEY)
        if data is not None and classes is not None:
            self.checkpoint_data = {**data, "classes": classes}
        if resumed is not None:
            step, run_dir = int(checkpoint.get("global_step", 0)), resumed.parent.parent
            self.resumed_metrics = (run_dir, metrics_before(run_dir / "metrics.csv", step))
            rank_zero_info(f"resuming {run_dir} from step {step} ({resumed})")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_learning_rates(config.as_dict())

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The Trainer, with the input-size check, exact resume and atomic checkpoint writes."""
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.extend([InputSizeCheck(), ExactResume()])
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def after_instantiate_classes(self) -> None:
        """Refuse an output folder that cannot be written before any work starts; a resumed run keeps its metrics."""
        if self.subcommand is None:
            return
        check_writable(self.trainer.default_root_dir, "--trainer.default_root_dir")
        for logger in self.trainer.loggers:
            if logger.save_dir is not None:
                check_writable(logger.save_dir, f"the save_dir of trainer.logger {type(logger).__name__}")
        if self.resumed_metrics is not None:
            run_dir, rows = self.resumed_metrics
            for logger in self.trainer.loggers:
                if isinstance(logger, CSVLogger) and Path(logger.log_dir).resolve() == run_dir.resolve():
                    keep_metrics(logger, rows)

    def take_checkpoint_data(self) -> None:
        """test/predict: class names, channels, image size and normalisation come from the checkpoint."""
        if self.checkpoint_data is not None and hasattr(self.datamodule, "use_checkpoint_data"):
            self.datamodule.use_checkpoint_data(**self.checkpoint_data)

    def before_test(self) -> None:
        self.take_checkpoint_data()

    def before_predict(self) -> None:
        self.take_checkpoint_data()

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            evaluate_best_checkpoint(self.trainer, self.model, self.datamodule)


def expand_root_dir(config: Any) -> None:
    """Replace `{default_root_dir}` in every string option under `trainer` (the loggers' `save_dir`, a checkpoint
    `dirpath`) by `trainer.default_root_dir`, so that one option decides where a run writes."""
    trainer = config.get("trainer") if hasattr(config, "get") else None
    if trainer is None:
        return
    _expand(trainer, str(trainer.get("default_root_dir") or "."))


def _expand(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value.replace(ROOT_DIR, root)
    if isinstance(value, list):
        return [_expand(item, root) for item in value]
    if isinstance(value, dict):
        return {key: _expand(item, root) for key, item in value.items()}
    if isinstance(value, Namespace):
        for key, item in vars(value).items():
            setattr(value, key, _expand(item, root))
    return value


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


class DataOnlyCLI(LitImgClsCLI):
    """Parses exactly as `lit-imgcls` does, but builds only the datamodule: no network (no weights to fetch), no
    Trainer, no run folder."""

    def instantiate_classes(self) -> None:
        config = self.config.clone()
        config.model = None
        self.config_init = self.parser.instantiate_classes(config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self.trainer = None


def build_cli(
    args: Sequence[str] | None, run: bool = False, cli_class: type[LitImgClsCLI] = LitImgClsCLI, **kwargs: Any
) -> LitImgClsCLI:
    """The one route from a config to objects: the `lit-imgcls` CLI for `args` (a subcommand first when `run`;
    None: the process's command line).

    `lit-imgcls`, `instantiate_from_config`, the noisy-student runner and the tests all build through here, so they
    share the parser, its defaults and its checks. Without `run`, the process's own `sys.argv` (pytest's, a Jupyter
    kernel's, a runner's options) is hidden while it parses; with `run` (the command line) it stays, because DDP's
    launcher re-runs the command from it. `cli_class`: `DataOnlyCLI` builds the datamodule alone. `kwargs` go to
    `LightningCLI` (e.g. `parser_kwargs`).
    """
    args = None if args is None else list(args)
    if run:
        return cli_class(**CLI_OPTIONS, run=True, args=args, **kwargs)
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        return cli_class(**CLI_OPTIONS, run=False, args=args, **kwargs)


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
    try:
        cli = build_cli(["--config", str(config), *overrides], parser_kwargs={"exit_on_error": False})
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None or user_error is err:
            raise
        raise user_error from None
    return Experiment(cli.model, cli.datamodule, cli.trainer)


def preview(args: Sequence[str]) -> Path:
    """`lit-imgcls preview --config CONFIG [--out PNG] [--n N] [--seed S] [--scale K] [data options]`: the config's
    training augmentation as a PNG grid (lit_imgcls.data.preview), its data built by the same parser as `fit`."""
    parser = argparse.ArgumentParser(prog="lit-imgcls preview", description=preview.__doc__)
    parser.add_argument("--out", default="augment_preview.png", help="PNG to write")
    parser.add_argument("--n", type=int, default=8, help="images per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=3, help="enlargement factor")
    options, config_args = parser.parse_known_args(list(args))
    cli = build_cli(config_args, cli_class=DataOnlyCLI, parser_kwargs={"exit_on_error": False})
    pl.seed_everything(options.seed, verbose=False)
    out = Path(options.out)
    save_grid(preview_rows(cli.datamodule, options.n), options.n, out, options.scale)
    print(f"wrote {out}: rows = original, augmented, CutMix, MixUp")
    return out


def _user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`, if any (jsonargparse wraps errors raised while instantiating)."""
    while err is not None:
        if isinstance(err, UserError):
            return err
        err = err.__cause__ or err.__context__
    return None


def exit_on_user_error(run: Callable[[], object]) -> None:
    """Call `run`; a mistake the tool recognises (a UserError) prints `lit-imgcls: error: ...` and exits 2,
    without a traceback; a fit stopped by a signal exits 128 + signal. Every command line goes through here."""
    try:
        run()
    except Preempted as stop:
        print(f"lit-imgcls: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except SIGTERMException:  # Lightning's own handler: SIGTERM before training started, nothing to save yet
        print("lit-imgcls: stopped by SIGTERM before training started (no checkpoint to write)", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
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
    elif argv and argv[0] == "preview":
        exit_on_user_error(lambda: preview(argv[1:]))
    elif args is None or isinstance(args, list | tuple):
        exit_on_user_error(lambda: build_cli(args, run=True))
    else:  # a dict or Namespace of options, as LightningCLI takes them
        exit_on_user_error(lambda: LitImgClsCLI(**CLI_OPTIONS, args=args))
