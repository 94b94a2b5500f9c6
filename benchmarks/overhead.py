"""One training epoch of ImageClassifier through Lightning vs a plain PyTorch loop doing the same work.

Same model (LeNet-5), data (Fashion-MNIST train split), augmentation (the DataModule's batch transform),
batch size, optimizer, per-step cosine schedule, loss, train loss/accuracy metrics, seed. Runs alternate in
pairs (plain, lightning), and the figures are medians: `ratio` is the median of the per-pair ratios, so
drift in the machine's speed between pairs cancels. Prints one JSON line:
{"lightning_s": ..., "plain_s": ..., "ratio": ..., ...}.

    python benchmarks/overhead.py [--repeats 2] [--batch-size 128] [--train-subset N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lightning.pytorch as pl
import torch

from lit_imgcls.data import ImageDataModule
from lit_imgcls.losses import soft_target_cross_entropy
from lit_imgcls.tasks import ImageClassifier
from lit_imgcls.tasks.classifier import default_optimizer


class EpochTimer(pl.Callback):
    """Wall time of the training epoch alone (no setup, no validation)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start


def lightning_epoch(datamodule: ImageDataModule, seed: int) -> float:
    pl.seed_everything(seed, verbose=False)
    model = ImageClassifier("lenet5")
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule)
    return timer.seconds


def plain_epoch(datamodule: ImageDataModule, seed: int) -> float:
    pl.seed_everything(seed, verbose=False)
    model = ImageClassifier("lenet5")
    loader = datamodule.train_dataloader()
    optimizer = default_optimizer(model.parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=len(loader))
    model.train()
    start = time.perf_counter()
    for raw in loader:
        batch = datamodule.transform_batch(raw, train=True)
        logits = model(batch["image"])
        loss = soft_target_cross_entropy(logits, batch["target"])
        model.train_metrics.update(logits, batch["target"])
        model.train_loss.update(loss.detach(), weight=len(logits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.train_metrics.compute()
    model.train_loss.compute()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    datamodule = ImageDataModule(val_size=5000, batch_size=args.batch_size, train_subset=args.train_subset)
    datamodule.setup("fit")
    plain, lightning = [], []
    for _ in range(args.repeats):
        plain.append(plain_epoch(datamodule, args.seed))
        lightning.append(lightning_epoch(datamodule, args.seed))
    result = {
        "benchmark": "overhead",
        "images": len(datamodule.train_indices),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "lightning_s": round(statistics.median(lightning), 3),
        "plain_s": round(statistics.median(plain), 3),
        "ratio": round(statistics.median([lit / pln for lit, pln in zip(lightning, plain, strict=True)]), 4),
        "ratio_of_fastest": round(min(lightning) / min(plain), 4),
        "lightning_all_s": [round(t, 3) for t in lightning],
        "plain_all_s": [round(t, 3) for t in plain],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
