"""Preemption-safe fits: a signal (SIGTERM, SIGUSR1) writes `last.ckpt` at the end of the current step and stops
with exit status 128 + signal; periodic step or time checkpoints bound what a SIGKILL loses; every checkpoint file
is written atomically (temporary file, fsync, rename), so a kill during a write leaves the previous one intact."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info

from lit_imgcls.errors import ConfigError

LAST = "last.ckpt"


class Preempted(Exception):
    """A fit stopped by a signal after writing its checkpoint; the CLI exits with status 128 + `signum`."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        self.signum, self.step, self.path = signum, step, path
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint written to {path}. "
            "Run the same command with --resume=auto to continue this run"
        )


def atomic_save(checkpoint: dict[str, Any], path: str | Path) -> None:
    """`torch.save` into a temporary file beside `path`, fsync it, then rename it over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with `atomic_save` for local paths (remote URLs keep Lightning's own)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """Where the fit keeps `last.ckpt`: the ModelCheckpoint's folder, else `<log_dir>/checkpoints`."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
        return Path(callback.dirpath) / LAST
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / LAST


def requeue_slurm_job() -> None:
    """`scontrol requeue` this SLURM job (its array task when in an array), so the scheduler starts it again."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    rank_zero_info(f"requeue of SLURM job {job}: {'done' if result.returncode == 0 else result.stderr.strip()}")


class PreemptionCheckpoint(Callback):
    """Writes `last.ckpt` (into the ModelCheckpoint's folder) at the end of a training step when a signal came, or
    every `every_n_train_steps` steps / `every_n_minutes` minutes, so `--resume=auto` continues from that step.

    A signal stops the fit after the write with `Preempted` (exit status 128 + signal: 143 for SIGTERM, 138 for
    SIGUSR1). Under SLURM (SLURM_JOB_ID set), SIGUSR1 also requeues the job (`#SBATCH --signal=USR1@120`, see
    scripts/slurm/). Under DDP the ranks agree on the step (one all-reduce of a flag per step).

    Args:
        every_n_train_steps: also write `last.ckpt` every this many optimizer steps; None: only on a signal.
        every_n_minutes: also write `last.ckpt` when this much time passed since the last write; None: never.
        signals: the signal names that stop the fit with a checkpoint.
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        every_n_minutes: float | None = None,
        signals: list[str] | None = None,
    ) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ConfigError(f"preemption.every_n_train_steps must be >= 1, got {every_n_train_steps}")
        if every_n_minutes is not None and every_n_minutes <= 0:
            raise ConfigError(f"preemption.every_n_minutes must be > 0, got {every_n_minutes}")
        names = ["SIGTERM", "SIGUSR1"] if signals is None else signals
        unknown = [name for name in names if name not in signal.Signals.__members__]
        if unknown:
            raise ConfigError(f"preemption.signals: unknown signal(s) {unknown}, e.g. SIGTERM, SIGUSR1")
        self.every_n_train_steps = every_n_train_steps
        self.every_n_minutes = every_n_minutes
        self.signals = [signal.Signals[name] for name in names]
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._last_write = time.monotonic()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take over the signals from Lightning (which would finish with exit 0 and no checkpoint)."""
        self._last_write = time.monotonic()
        if trainer.received_sigterm:  # came during setup or the sanity check, to Lightning's handler
            self.received = signal.SIGTERM
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handler)
            except ValueError:  # not the main thread: leave the signals to Lightning
                return

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        due = self.received is not None or self._periodic_due(trainer)
        if trainer.world_size > 1:
            due = trainer.strategy.reduce_boolean_decision(due, all=False)
        if not due:
            return
        path = last_checkpoint_path(trainer)
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.save_last:
            callback.last_model_path = str(path)  # its next `last` overwrites this file instead of adding last-v1
        trainer.save_checkpoint(path)
        self._last_write = time.monotonic()
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            signum = self.received or signal.SIGTERM
            if signum == signal.SIGUSR1 and trainer.is_global_zero:
                requeue_slurm_job()
            raise Preempted(signum, step, path)

    def _periodic_due(self, trainer: pl.Trainer) -> bool:
        """A step or time checkpoint is due (never at an epoch's last batch: the epoch's own checkpoint follows)."""
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return False
        steps = self.every_n_train_steps is not None and trainer.global_step % self.every_n_train_steps == 0
        minutes = self.every_n_minutes is not None and time.monotonic() - self._last_write >= 60 * self.every_n_minutes
        return steps or minutes

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def resume_latest_run(fit_config: Any) -> Path | None:
    """`--resume=auto`: the `last.ckpt` of the newest run folder (`version_N` of the first logger) and every logger
    pointed at that folder, so the resumed fit appends to the same metrics.csv and TensorBoard run; None (a fresh
    run) when that folder has no `last.ckpt` yet."""
    loggers = fit_config.trainer.logger
    loggers = [lg for lg in (loggers if isinstance(loggers, list) else [loggers]) if hasattr(lg, "init_args")]
    if not loggers or getattr(loggers[0].init_args, "save_dir", None) is None:
        raise ConfigError("--resume=auto needs trainer.logger with a save_dir, as every config in configs/ has")
    first = loggers[0].init_args
    root = Path(first.save_dir) / (getattr(first, "name", None) or "")
    versions = [(int(d.name[8:]), d) for d in root.glob("version_*") if d.name[8:].isdigit() and d.is_dir()]
    if not versions:
        return None
    folder = max(versions)[1]
    dirpaths = [
        cb.init_args.dirpath
        for cb in fit_config.trainer.callbacks or []
        if getattr(cb, "class_path", "").endswith("ModelCheckpoint") and getattr(cb.init_args, "dirpath", None)
    ]
    last = Path(dirpaths[0] if dirpaths else folder / "checkpoints") / LAST
    if not last.is_file():
        return None
    for logger in loggers:
        if hasattr(logger.init_args, "version"):
            logger.init_args.version = folder.name
    return last


def metrics_before(metrics_csv: Path, step: int) -> list[dict[str, str]]:
    """The rows of a CSVLogger's metrics.csv logged before `step` (a resumed fit logs the later ones again)."""
    if not metrics_csv.is_file():
        return []
    with metrics_csv.open(newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("step", "").isdigit() and int(row["step"]) < step]


def keep_metrics(logger: CSVLogger, rows: list[dict[str, str]]) -> None:
    """Write `rows` back into `logger`'s metrics.csv, which Lightning empties when a logger reopens a run folder,
    so a resumed run keeps one continuous file."""
    if rows and logger.experiment is not None:
        writer = logger.experiment
        writer.metrics = [dict(row) for row in rows]
        writer.save()
