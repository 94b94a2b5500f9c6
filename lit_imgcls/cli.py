"""The `lit-imgcls` command: LightningCLI with `fit`, `validate`, `test` and `predict` over any task."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lit_imgcls.callbacks import PredictionWriter
from lit_imgcls.data import ImageDataModule
from lit_imgcls.errors import UserError


class LitImgClsCLI(LightningCLI):
    """Adds `--test_after_fit` (test the best checkpoint when `fit` ends) and a configurable prediction writer."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="After fit, run test on the best checkpoint."
        )
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        checkpoint = self.trainer.checkpoint_callback
        ckpt_path = "best" if checkpoint is not None and getattr(checkpoint, "best_model_path", "") else None
        if ckpt_path is not None:
            print(f"testing the best checkpoint: {checkpoint.best_model_path}")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


def _user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`, if any (jsonargparse wraps errors raised while instantiating)."""
    while err is not None:
        if isinstance(err, UserError):
            return err
        err = err.__cause__ or err.__context__
    return None


def main(args: ArgsType = None) -> None:
    """Entry point of `lit-imgcls` and `python -m lit_imgcls`."""
    try:
        LitImgClsCLI(
            pl.LightningModule,
            ImageDataModule,
            subclass_mode_model=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"lit-imgcls: error: {user_error}", file=sys.stderr)
        sys.exit(2)
