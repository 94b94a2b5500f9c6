"""Noisy Student generations in one command: teacher, then N students, each the next one's teacher.

    python -m lit_imgcls.noisy_student_run --config configs/noisy_student/fashion_mnist_100.yaml \\
        --teacher_config configs/noisy_student/teacher_fashion_mnist_100.yaml --generations 2

Generation 0 is the teacher: trained with `--teacher_config` (an `ImageClassifier` config) or taken from
`--teacher` (a checkpoint). Generation n >= 1 fits `--config` (a `NoisyStudent` config) with the best checkpoint
(by the config's ModelCheckpoint, `val/acc`) of generation n - 1 as its teacher. Every generation's best checkpoint
is copied to `<out>/generation_<n>.ckpt`; the summary (generation, architecture, pseudo-labels kept, val and test
accuracy of that checkpoint) is printed and written to `<out>/summary.csv`. Other arguments (`--data.*`,
`--trainer.*`) go to every generation; `--teacher_args=...` / `--student_args=...` (one quoted string each, joined
with `=` because they start with dashes) to one side, e.g. `"--student_args=--model.init_args.hard_labels=false"`.
Generations run one after another in this process, on one device; for DDP run each generation alone:
`lit-imgcls fit --config <student config> --model.init_args.teacher=<checkpoint> --trainer.devices=2 ...`.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lit_imgcls.cli import LitImgClsCLI, build_cli, exit_on_user_error
from lit_imgcls.data import ImageDataModule
from lit_imgcls.errors import ConfigError
from lit_imgcls.tasks.checkpoints import load_task

SUMMARY_FIELDS = ("generation", "architecture", "pseudo_labels_kept", "val_acc", "test_acc", "checkpoint")


def evaluate(checkpoint: Path, datamodule: ImageDataModule) -> tuple[float, float]:
    """Validation and test accuracy of a checkpoint of any task, on one device, without logging."""
    model = load_task(checkpoint)
    trainer = pl.Trainer(
        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    (val,) = trainer.validate(model, datamodule=datamodule, verbose=False)
    (test,) = trainer.test(model, datamodule=datamodule, verbose=False)
    return val["val/acc"], test["test/acc"]


def fit_generation(args: list[str], destination: Path) -> tuple[Path, LitImgClsCLI]:
    """Fit one generation; copy its best (else last) checkpoint to `destination`."""
    cli = build_cli(args)
    if cli.trainer.world_size > 1:
        raise ConfigError(
            "the generations runner uses one device: run a multi-device generation alone with `lit-imgcls fit`"
        )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    destination.parent.mkdir(parents=True, exist_ok=True)
    callback = cli.trainer.checkpoint_callback
    best = getattr(callback, "best_model_path", "")
    if best:
        shutil.copyfile(best, destination)
    else:
        cli.trainer.save_checkpoint(destination)
    return destination, cli


def summary_row(generation: int, checkpoint: Path, datamodule: ImageDataModule, kept: int | None) -> dict[str, Any]:
    val, test = evaluate(checkpoint, datamodule)
    architecture = load_task(checkpoint).hparams.get("model", "?")
    return {
        "generation": generation,
        "architecture": architecture,
        "pseudo_labels_kept": "" if kept is None else kept,
        "val_acc": round(val, 4),
        "test_acc": round(test, 4),
        "checkpoint": str(checkpoint),
    }


def run_generations(
    config: str,
    generations: int,
    out: Path,
    teacher: str | None = None,
    teacher_config: str | None = None,
    shared_args: list[str] | None = None,
    teacher_args: list[str] | None = None,
    student_args: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run the teacher (or take it) and `generations` students; return the summary rows (also in out/summary.csv)."""
    if (teacher is None) == (teacher_config is None):
        raise ConfigError("give exactly one of --teacher (a checkpoint) or --teacher_config (a config to train it)")
    if generations < 1:
        raise ConfigError(f"--generations must be at least 1, got {generations}")
    shared = list(shared_args or [])
    rows = []
    current = out / "generation_0.ckpt"
    if teacher_config is not None:
        current, cli = fit_generation(["--config", teacher_config, *shared, *(teacher_args or [])], current)
        rows.append(summary_row(0, current, cli.datamodule, None))
    for generation in range(1, generations + 1):
        args = ["--config", config, *shared, *(student_args or []), f"--model.init_args.teacher={teacher or current}"]
        current, cli = fit_generation(args, out / f"generation_{generation}.ckpt")
        if teacher is not None:
            rows.append(summary_row(0, Path(teacher), cli.datamodule, None))
            teacher = None
        rows.append(summary_row(generation, current, cli.datamodule, cli.model.pseudo_labels.kept))
    write_summary(rows, out / "summary.csv")
    return rows


def write_summary(rows: list[dict[str, Any]], path: Path) -> None:
    """Print the summary table and save it as CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in SUMMARY_FIELDS[:-1]}
    print("  ".join(k.ljust(w) for k, w in widths.items()))
    for row in rows:
        print("  ".join(str(row[k]).ljust(w) for k, w in widths.items()))
    print(f"summary: {path}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m lit_imgcls.noisy_student_run` (and `lit-imgcls-noisy-student`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="NoisyStudent config of every student generation")
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--teacher", help="checkpoint of the generation-0 teacher")
    parser.add_argument("--teacher_config", help="config that trains the generation-0 teacher")
    parser.add_argument("--out", type=Path, default=Path("checkpoints/noisy_student"))
    parser.add_argument("--teacher_args", default="", help='teacher-only CLI arguments: "--teacher_args=--a=1 --b=2"')
    parser.add_argument("--student_args", default="", help='student-only CLI arguments: "--student_args=--a=1 --b=2"')
    options, shared = parser.parse_known_args(argv)
    exit_on_user_error(
        lambda: run_generations(
            options.config,
            options.generations,
            options.out,
            options.teacher,
            options.teacher_config,
            shared,
            shlex.split(options.teacher_args),
            shlex.split(options.student_args),
        )
    )


if __name__ == "__main__":
    main()
