"""Fashion-MNIST test accuracy of chosen `configs/fashion_mnist/` configs, next to the dataset README's numbers.

Trains each config through the CLI (`fit --test_after_fit=true`, best checkpoint by val/acc) for an epoch budget,
in its own folder under --out, and prints one JSON line per model
`{"model": name, "test_acc": acc, "epochs": n, "reference": acc or null}`, then a Markdown table. The references
are the Fashion-MNIST README's benchmark (zalandoresearch/fashion-mnist), for the closest architecture it lists.

`--minutes M` gives every architecture the same wall-clock training budget instead of its epochs: two short probes
(2 and 6 steps, same config, Lightning's SimpleProfiler) time one training step, and the run gets the number of steps
that fits in M minutes, as whole epochs of `limit_train_batches` batches so that validation (best checkpoint) and the
per-step cosine schedule end with the budget. This is how the GPU recipes get a CPU row that still says something.

    python benchmarks/fashion_mnist_table.py --configs lenet5 resnet18 [--epochs N] [--train-subset N] [-- CLI args]
    python benchmarks/fashion_mnist_table.py --minutes 3 --configs lenet5 alexnet vgg16 googlenet resnet18 \
        seresnet18 densenet121 efficientnet_b0 fast_resnet
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# The Fashion-MNIST README's benchmark: architecture it lists and its test accuracy (the top of a listed range).
REFERENCES: dict[str, tuple[str, float | None]] = {
    "lenet5": ("2 conv + pooling, 0.876 to 0.916", 0.916),
    "fast_resnet": ("not listed; ResNet18 0.949", None),
    "alexnet": ("not listed", None),
    "vgg16": ("VGG16", 0.935),
    "googlenet": ("GoogLeNet", 0.937),
    "resnet18": ("ResNet18", 0.949),
    "densenet121": ("DenseNet-BC 768K", 0.954),
    "seresnet18": ("not listed", None),
    "efficientnet_b0": ("not listed", None),
}


def last_metric(run_root: Path, name: str) -> float:
    """The last logged value of `name` in the CSVLogger metrics under `run_root`."""
    metrics = max(run_root.glob("runs/*/version_*/metrics.csv"), key=lambda path: path.stat().st_mtime)
    value = None
    with metrics.open() as f:
        for row in csv.DictReader(f):
            if row.get(name):
                value = float(row[name])
    if value is None:
        raise RuntimeError(f"{metrics} has no {name}")
    return value


def fit(config: str, run_root: Path, args: list[str], log_name: str = "fit.log") -> float:
    """Run `lit-imgcls fit` on `config` in `run_root` with `args`; returns the wall time in seconds."""
    run_root.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "lit_imgcls",
        "fit",
        "--config",
        str(REPO / "configs/fashion_mnist" / f"{config}.yaml"),
    ]
    command += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *args]
    start = time.perf_counter()
    log = run_root / log_name
    with log.open("w") as f:
        result = subprocess.run(command, cwd=run_root, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
    if result.returncode != 0:
        raise RuntimeError(f"{config} failed, see {log}")
    return time.perf_counter() - start


def training_batch_seconds(log: Path) -> float:
    """Total time of `run_training_batch` in the SimpleProfiler report of a fit log."""
    for line in log.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == "run_training_batch":
            return float(cells[3])
    raise RuntimeError(f"{log} has no profiler report")


def seconds_per_step(config: str, run_root: Path, extra: list[str], short: int = 2, long: int = 6) -> float:
    """One training step's time: SimpleProfiler's training-batch time of a `long`-step run minus a `short`-step one,
    so that start-up, data set-up and the first (warm-up) step cancel out."""
    probe = ["--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.logger=false"]
    probe += ["--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.profiler=simple", *extra]
    totals = []
    for steps in (short, long):
        name = f"probe_{steps}.log"
        fit(config, run_root / "probe", [*probe, f"--trainer.max_steps={steps}"], name)
        totals.append(training_batch_seconds(run_root / "probe" / name))
    return max(totals[1] - totals[0], 1e-4) / (long - short)


def budget_args(steps: int, steps_per_epoch: int) -> tuple[list[str], int]:
    """`steps` training steps as whole epochs of equal length (validation and the schedule end with the budget)."""
    epochs = max(1, math.ceil(steps / steps_per_epoch))
    per_epoch = max(1, steps // epochs)
    return [f"--trainer.max_epochs={epochs}", f"--trainer.limit_train_batches={per_epoch}"], epochs


def train(
    config: str, out: Path, epochs: int | None, train_subset: int | None, extra: list[str], minutes: float | None
) -> dict:
    """Fit and test `config` in `out/config` (for `epochs`, or for a `minutes` budget); returns the JSON row."""
    run_root = out / config
    args = [*extra] if train_subset is None else [*extra, f"--data.train_subset={train_subset}"]
    budget: dict = {}
    if minutes is not None:
        step_s = seconds_per_step(config, run_root, args)
        recipe = yaml.safe_load((REPO / "configs" / "fashion_mnist" / f"{config}.yaml").read_text())
        steps_per_epoch = math.ceil((train_subset or 55000) / recipe["data"]["batch_size"])
        steps = int(minutes * 60 / step_s)
        budget_cli, epochs = budget_args(steps, steps_per_epoch)
        args += budget_cli
        budget = {"budget_minutes": minutes, "seconds_per_step": round(step_s, 4), "steps": steps}
    elif epochs is not None:
        args.append(f"--trainer.max_epochs={epochs}")
    seconds = fit(config, run_root, ["--test_after_fit=true", *args])
    reference_name, reference = REFERENCES.get(config, ("not listed", None))
    return {
        "model": config,
        "test_acc": round(last_metric(run_root, "test/acc"), 4),
        "epochs": epochs if epochs is not None else config_epochs(config),
        "train_subset": train_subset,
        "reference": reference,
        "reference_name": reference_name,
        "minutes": round(seconds / 60, 1),
        **budget,
    }


def config_epochs(config: str) -> int:
    return yaml.safe_load((REPO / "configs" / "fashion_mnist" / f"{config}.yaml").read_text())["trainer"]["max_epochs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["lenet5"])
    parser.add_argument("--epochs", type=int, default=None, help="default: each config's max_epochs")
    parser.add_argument("--train-subset", type=int, default=None, help="train on N images (default: all 55,000)")
    parser.add_argument("--minutes", type=float, default=None, help="same training time budget for every config")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "fashion_mnist_table")
    parser.add_argument("extra", nargs="*", help="more CLI arguments for every run, after --")
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        rows.append(train(config, args.out, args.epochs, args.train_subset, args.extra, args.minutes))
        keys = ("model", "test_acc", "epochs", "reference", "budget_minutes", "steps")
        print(json.dumps({k: rows[-1][k] for k in keys if k in rows[-1]}), flush=True)
    print("\n| config | epochs | training images | test accuracy | Fashion-MNIST README | minutes |")
    print("|---|---:|---:|---:|---|---:|")
    for r in rows:
        images = r["train_subset"] or 55000
        reference = f"{r['reference']} ({r['reference_name']})" if r["reference"] else r["reference_name"]
        print(f"| {r['model']} | {r['epochs']} | {images} | {r['test_acc']:.4f} | {reference} | {r['minutes']} |")


if __name__ == "__main__":
    main()
