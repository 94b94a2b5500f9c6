"""Cost of `KNNMonitor` on a LeNet-5 fit on Fashion-MNIST. The issue's target: the monitor costs < 5% of a
training epoch.

`share` is the direct, paired measure: in each epoch of the monitored fits, the seconds of the evaluation (bank pass
+ search + vote) over the seconds of the rest of that same epoch (training and the ordinary validation pass); the
median over epochs and repeats. Being paired within an epoch, it does not move with the load of a shared machine
between fits. `ratio` is the cross-check between whole fits: plain and monitored fits alternate `--repeats` times
and each side keeps its fastest (also in process CPU time: `ratio_cpu`). Prints one JSON line with these,
`evaluation_s` / `evaluation_cpu_s` (the fastest evaluation) and knn_acc.

    python benchmarks/knn_monitor.py [--epochs 2] [--repeats 2] [--train-subset N] [--val-size 5000]
        [--bank-size 5000] [--every-n-epochs 1] [--strategy auto]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lightning.pytorch as pl
import torch

from lit_imgcls.data import ImageDataModule
from lit_imgcls.tasks import ImageClassifier, KNNMonitor

DEFAULTS = KNNMonitor()


class TimedMonitor(KNNMonitor):
    """KNNMonitor that records the wall and CPU seconds of each evaluation, and the wall seconds of each epoch."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.seconds: list[tuple[float, float]] = []
        self.epochs: list[float] = []
        self.epoch_start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append(time.perf_counter() - self.epoch_start)

    def shares(self) -> list[float]:
        """Per monitored epoch: evaluation seconds / the rest of the epoch's seconds."""
        evaluations = [s for s, _ in self.seconds]
        due = [e for i, e in enumerate(self.epochs) if (i + 1) % self.every_n_epochs == 0]
        return [ev / (epoch - ev) for ev, epoch in zip(evaluations, due, strict=True)]

    def evaluate(self, *args: object) -> float:
        start, start_cpu = time.perf_counter(), time.process_time()
        acc = super().evaluate(*args)
        self.seconds.append((time.perf_counter() - start, time.process_time() - start_cpu))
        return acc


def timed_fit(args: argparse.Namespace, monitor: KNNMonitor | None) -> tuple[float, float, float | None]:
    """Wall and CPU seconds per epoch of a fit (validation included) and the last val/knn_acc."""
    pl.seed_everything(0)
    dm = ImageDataModule(val_size=args.val_size, train_subset=args.train_subset, batch_size=256, augment="none")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[monitor] if monitor else [],
    )
    start, start_cpu = time.perf_counter(), time.process_time()
    trainer.fit(ImageClassifier("lenet5"), dm)
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    acc = trainer.callback_metrics.get("val/knn_acc")
    return seconds / args.epochs, cpu / args.epochs, None if acc is None else acc.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--bank-size", type=int, default=DEFAULTS.bank_size)
    parser.add_argument("--every-n-epochs", type=int, default=DEFAULTS.every_n_epochs)
    parser.add_argument("--strategy", choices=["auto", "brute", "pruned"], default="auto")
    args = parser.parse_args()
    if args.epochs % args.every_n_epochs:
        parser.error("--epochs must be a multiple of --every-n-epochs, or the monitor's cost is not all counted")
    plain, monitored, evaluations, shares, knn_acc = [], [], [], [], None
    for _ in range(args.repeats):
        plain.append(timed_fit(args, None)[:2])
        monitor = TimedMonitor(bank_size=args.bank_size, every_n_epochs=args.every_n_epochs, strategy=args.strategy)
        *seconds, knn_acc = timed_fit(args, monitor)
        monitored.append(seconds)
        evaluations += monitor.seconds
        shares += monitor.shares()
    (plain_s, plain_cpu), (monitored_s, monitored_cpu) = (
        map(min, zip(*runs, strict=True)) for runs in (plain, monitored)
    )
    result = {
        "benchmark": "knn_monitor",
        "epochs": args.epochs,
        "repeats": args.repeats,
        "train_subset": args.train_subset,
        "val_size": args.val_size,
        "bank_size": args.bank_size,
        "every_n_epochs": args.every_n_epochs,
        "strategy": args.strategy,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "share": round(statistics.median(shares), 4),
        "shares": [round(x, 4) for x in shares],
        "epoch_s": round(plain_s, 3),
        "monitored_epoch_s": round(monitored_s, 3),
        "ratio": round(monitored_s / plain_s, 4),
        "epoch_cpu_s": round(plain_cpu, 3),
        "monitored_epoch_cpu_s": round(monitored_cpu, 3),
        "ratio_cpu": round(monitored_cpu / plain_cpu, 4),
        "evaluation_s": round(min(s for s, _ in evaluations), 3) if evaluations else None,
        "evaluation_cpu_s": round(min(c for _, c in evaluations), 3) if evaluations else None,
        "knn_acc": None if knn_acc is None else round(knn_acc, 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
