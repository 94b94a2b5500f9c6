"""The FastResNet recipe on Fashion-MNIST over seeds, and what its weight EMA buys: each run trains
configs/fashion_mnist/fast_resnet.yaml (EMAWeightAveraging among its callbacks) and tests both the averaged weights
and the raw weights of the same run at the last epoch. EMA does not change the training trajectory, so the raw
weights are exactly the run without EMA: a paired comparison at half the cost of two runs.

    python benchmarks/fast_resnet_fashion_mnist.py [--seeds 0 1 2] [--workers 3] [-- CLI overrides]

Each run uses one CPU thread; `--workers` runs that many at once (a 2-core machine still gains from 3 single-thread
runs). Prints one JSON line: ema and raw test accuracy (mean, std, per seed), gain, the validation curves (EMA
weights, per epoch) and each run's seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lit_imgcls.cli import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fashion_mnist" / "fast_resnet.yaml"


class Recorder(pl.Callback):
    """Records val/acc per epoch and keeps the raw weights before EMAWeightAveraging replaces them at the end."""

    def __init__(self) -> None:
        self.val_acc: list[float] = []
        self.raw_state: dict[str, torch.Tensor] | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "val/acc" in trainer.callback_metrics:
            self.val_acc.append(round(float(trainer.callback_metrics["val/acc"]), 4))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.raw_state = copy.deepcopy(pl_module.state_dict())


def test_accuracy(trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule) -> float:
    return trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]


def run(seed: int, config: str, overrides: list[str]) -> dict[str, Any]:
    """Fit with `seed` in a temporary folder; test accuracy of the EMA and of the raw weights, val curve, seconds."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": folder}}
        options = {"trainer.logger": logger, "trainer.default_root_dir": folder, "seed_everything": seed}
        quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
        options_args = [f"--{key}={json.dumps(value)}" for key, value in options.items()]
        experiment = instantiate_from_config(config, [*options_args, *quiet, *overrides])
        model, datamodule, trainer = experiment
        recorder = Recorder()
        trainer.callbacks.insert(0, recorder)  # before EMAWeightAveraging's on_train_end
        trainer.fit(model, datamodule=datamodule)
        seconds = time.perf_counter() - start
        ema = test_accuracy(trainer, model, datamodule)
        model.load_state_dict(recorder.raw_state)
        raw = test_accuracy(trainer, model, datamodule)
    return {"seed": seed, "ema": ema, "raw": raw, "val_acc": recorder.val_acc, "fit_seconds": round(seconds)}


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "mean": round(statistics.mean(values), 4),
        "std": round(statistics.pstdev(values), 4),
        "runs": [round(v, 4) for v in values],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=3, help="runs at once, one CPU thread each")
    parser.add_argument("overrides", nargs="*", help="config options, after --")
    args = parser.parse_args()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        runs = list(pool.map(run, args.seeds, [args.config] * len(args.seeds), [args.overrides] * len(args.seeds)))
    ema, raw = summary([r["ema"] for r in runs]), summary([r["raw"] for r in runs])
    result = {
        "config": Path(args.config).name,
        "overrides": args.overrides,
        "seeds": args.seeds,
        "epochs": len(runs[0]["val_acc"]),
        "ema": ema,
        "raw": raw,
        "ema_gain": round(ema["mean"] - raw["mean"], 4),
        "val_acc_curves": [r["val_acc"] for r in runs],
        "fit_seconds_one_thread": [r["fit_seconds"] for r in runs],
        "workers": args.workers,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
