"""Few-label transfer on Fashion-MNIST: pre-train LeNet-5 on classes 0-4 (all their 30,000 training images), then
learn classes 5-9 from 10 and from 100 labelled training images per class, four ways at the same budget
(same optimizer, steps, batch size and augmentation): from scratch, linear probe, full fine-tuning (backbone at
0.1 x lr) and gradual unfreezing (head only for the first half, then full). The head, re-initialised and trained
by the probe, is LeNet-5's fully connected block (`--head mlp`) or only its last layer (`--head fc`). Test
accuracy is on all 5,000 test images of classes 5-9, averaged over seeds (each seed draws its own labelled images
and head initialisation).

Prints one JSON line: {"10": {"scratch": acc, "linear_probe": acc, "full": acc, "gradual": acc}, "100": {...}, ...}

    python benchmarks/transfer_fashion_mnist.py [--seeds 3] [--steps 300] [--pretrain-epochs 8] [--head mlp|fc]
        [--pretrained CKPT]

The pre-trained checkpoint is written to checkpoints/transfer_lenet5_classes_0-4.ckpt; `--pretrained` reuses one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lit_imgcls.data import ImageDataModule
from lit_imgcls.tasks import ImageClassifier

SOURCE, TARGET = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
MODES = ("scratch", "linear_probe", "full", "gradual")
HEADS = {  # what is re-initialised and trained by the probe: LeNet-5's fully connected block, or its last layer only
    "mlp": ["features.10", "features.13", "fc"],
    "fc": ["fc"],
}
DATA = {"dataset": "fashion_mnist", "augment": "basic", "crop_padding": 0, "hflip": True, "download": False}


def trainer(max_epochs: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def pretrain(epochs: int, path: Path) -> tuple[list[float], list[float]]:
    """LeNet-5 on every training image of classes 0-4; returns the normalization it was trained with."""
    pl.seed_everything(0)
    dm = ImageDataModule(classes=SOURCE, val_size=0, batch_size=128, **DATA)
    model = ImageClassifier("lenet5", num_classes=len(SOURCE))
    fit = trainer(epochs)
    fit.fit(model, dm)
    fit.save_checkpoint(path)
    return dm.mean, dm.std


def few_labels(per_class: int, seed: int, mean: list[float], std: list[float]) -> ImageDataModule:
    """Classes 5-9 with `per_class` training images of each, drawn with `seed` (in this script: the
    DataModule's `train_subset` draws without regard to classes)."""
    batch_size = min(50, per_class * len(TARGET))
    dm = ImageDataModule(classes=TARGET, val_size=0, batch_size=batch_size, mean=mean, std=std, **DATA)
    dm.setup("fit")
    targets = dm.train_set.targets
    generator = torch.Generator().manual_seed(seed)
    picks = [
        (targets == c).nonzero().flatten()[torch.randperm(int((targets == c).sum()), generator=generator)[:per_class]]
        for c in range(len(TARGET))
    ]
    dm.train_indices = torch.cat(picks).sort().values
    return dm


def transfer(mode: str, per_class: int, seed: int, steps: int, checkpoint: Path, norm: tuple, head: str) -> float:
    dm = few_labels(per_class, seed, *norm)
    epochs = math.ceil(steps / max(1, len(dm.train_indices) // dm.hparams.batch_size))
    pl.seed_everything(seed)
    transfer_args = {} if mode == "scratch" else {"pretrained_checkpoint": str(checkpoint), "finetune": mode}
    model = ImageClassifier(
        "lenet5",
        num_classes=len(TARGET),
        head=HEADS[head],
        backbone_lr_scale=0.1,
        unfreeze_epoch=epochs // 2,
        **transfer_args,
    )
    run = trainer(epochs)
    run.fit(model, dm)
    (result,) = run.test(model, dm, verbose=False)
    return result["test/acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every transfer run")
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--pretrained", type=Path, help="reuse the checkpoint of an earlier pre-training run")
    parser.add_argument("--labels", type=int, nargs="+", default=[10, 100], help="labelled images per class")
    parser.add_argument("--head", choices=sorted(HEADS), default="mlp", help="the layers transfer re-initialises")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    start = time.perf_counter()
    checkpoint = args.pretrained or Path("checkpoints") / "transfer_lenet5_classes_0-4.ckpt"
    if args.pretrained is None:
        norm = pretrain(args.pretrain_epochs, checkpoint)
    else:
        source = ImageDataModule(classes=SOURCE, val_size=0, **DATA)
        source.setup("fit")
        norm = (source.mean, source.std)
    pretrain_s = time.perf_counter() - start
    result: dict = {"benchmark": "transfer_fashion_mnist", "model": "lenet5", "head": HEADS[args.head]}
    spread: dict = {}
    for per_class in args.labels:
        runs = [(m, s) for m in MODES for s in range(args.seeds)]
        accs = {m: [] for m in MODES}
        for mode, seed in runs:
            accs[mode].append(transfer(mode, per_class, seed, args.steps, checkpoint, norm, args.head))
        result[str(per_class)] = {m: round(statistics.mean(a), 4) for m, a in accs.items()}
        spread[str(per_class)] = {m: round(statistics.pstdev(a), 4) for m, a in accs.items()}
        print(f"{per_class} labels/class: {accs}", flush=True)
    result.update(std=spread, seeds=args.seeds, steps=args.steps, pretrain_epochs=args.pretrain_epochs)
    result.update(pretrain_s=round(pretrain_s, 1), total_s=round(time.perf_counter() - start, 1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
