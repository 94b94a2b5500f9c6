"""Cost of `KNNMonitor` on a LeNet-5 fit on Fashion-MNIST: the same epochs with and without the monitor, in the
same run. The issue's target is a ratio under 1.05 (the monitor costs < 5% of a training epoch).

Prints one JSON line with epoch_s (without monitor), monitored_epoch_s, ratio and knn_acc.

    python benchmarks/knn_monitor.py [--epochs 1] [--train-subset N] [--val-size 5000] [--bank-size 10000]
"""

from __future__ import annotations

import argparse
import json
import time

import lightning.pytorch as pl
import torch

from lit_imgcls.data import ImageDataModule
from lit_imgcls.tasks import ImageClassifier, KNNMonitor


def timed_fit(args: argparse.Namespace, monitor: KNNMonitor | None) -> tuple[float, float | None]:
    """Seconds per epoch of a fit (validation included) and the last val/knn_acc."""
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
    start = time.perf_counter()
    trainer.fit(ImageClassifier("lenet5"), dm)
    seconds = (time.perf_counter() - start) / args.epochs
    acc = trainer.callback_metrics.get("val/knn_acc")
    return seconds, None if acc is None else acc.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--bank-size", type=int, default=10000)
    parser.add_argument("--strategy", choices=["auto", "brute", "pruned"], default="auto")
    args = parser.parse_args()
    plain_s, _ = timed_fit(args, None)
    monitored_s, knn_acc = timed_fit(args, KNNMonitor(bank_size=args.bank_size, strategy=args.strategy))
    result = {
        "benchmark": "knn_monitor",
        "epochs": args.epochs,
        "train_subset": args.train_subset,
        "val_size": args.val_size,
        "bank_size": args.bank_size,
        "strategy": args.strategy,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "epoch_s": round(plain_s, 3),
        "monitored_epoch_s": round(monitored_s, 3),
        "ratio": round(monitored_s / plain_s, 4),
        "knn_acc": None if knn_acc is None else round(knn_acc, 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
