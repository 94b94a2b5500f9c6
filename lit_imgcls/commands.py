"""`lit-imgcls export` and `lit-imgcls report`: commands beside LightningCLI's fit/validate/test/predict."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import lightning.pytorch as pl
import torch

from lit_imgcls.checkpoint_io import read_checkpoint
from lit_imgcls.errors import UserError
from lit_imgcls.export import FORMATS, export_checkpoint
from lit_imgcls.report import PREDICTIONS_FILE, TestReport, write_report
from lit_imgcls.tasks.checkpoints import load_task

COMMANDS = ("export", "report")


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error line: `lit-imgcls: error: ...`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"lit-imgcls: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lit-imgcls")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    export = commands.add_parser(
        "export",
        help="write a checkpoint as ONNX or TorchScript taking uint8 images, normalisation and class names inside",
    )
    export.add_argument("--ckpt_path", required=True, help="a checkpoint written by lit-imgcls fit")
    export.add_argument("--format", choices=FORMATS, default="onnx")
    export.add_argument("--output", default=None, help="default: the checkpoint's path with .onnx / .torchscript.pt")
    report = commands.add_parser("report", help="write the test report of a run folder or a checkpoint")
    report.add_argument(
        "path",
        help="a run folder (its report/predictions.pt is drawn again) or a checkpoint (tested on its test split)",
    )
    report.add_argument("--output", default=None, help="report folder; default: <run folder>/report")
    report.add_argument("--accelerator", default="auto", help="for a checkpoint: cpu, gpu, auto")
    return parser


def run_command(argv: Sequence[str]) -> None:
    """Run `lit-imgcls export ...` or `lit-imgcls report ...` (argv starts with the command's name)."""
    args = build_parser().parse_args(list(argv))
    if args.command == "export":
        out = export_checkpoint(args.ckpt_path, args.format, args.output)
        print(f"{args.format} model written to {out}")
    else:
        out = report_from_path(args.path, args.output, args.accelerator)
        print(f"test report written to {out}")


def report_from_path(path: str | Path, output: str | Path | None = None, accelerator: str = "auto") -> Path:
    """Draw the report of a run folder again from its predictions, or test a checkpoint and write its report."""
    path = Path(path)
    if path.is_file():
        return report_checkpoint(path, output, accelerator)
    found = next((p for p in (path / "report" / PREDICTIONS_FILE, path / PREDICTIONS_FILE) if p.is_file()), None)
    if found is None:
        raise UserError(
            f"{path} is neither a checkpoint nor a run folder with report/{PREDICTIONS_FILE}: "
            "give a checkpoint, or run `lit-imgcls test --config ... --ckpt_path ...` first"
        )
    predictions = torch.load(found, map_location="cpu", weights_only=False)
    out = Path(output) if output is not None else found.parent
    metrics_csv = predictions.get("metrics_csv") or found.parent.parent / "metrics.csv"
    write_report(predictions, out, metrics_csv)
    return out


def report_checkpoint(checkpoint: Path, output: str | Path | None, accelerator: str) -> Path:
    """Test `checkpoint` on the test split of the data it was trained on and write the report."""
    hparams = read_checkpoint(checkpoint).get("datamodule_hyper_parameters")
    if hparams is None:
        raise UserError(
            f"checkpoint {checkpoint} does not record its data settings: "
            f"run `lit-imgcls test --config <config> --ckpt_path {checkpoint}` instead"
        )
    from lit_imgcls.data import ImageDataModule

    datamodule = ImageDataModule(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    out = Path(output) if output is not None else run_dir / "report"
    report = TestReport(output=str(out))
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[report],
    )
    trainer.test(load_task(checkpoint), datamodule=datamodule, ckpt_path=str(checkpoint), verbose=False)
    return out
