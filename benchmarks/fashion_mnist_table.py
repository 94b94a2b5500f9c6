"""Fashion-MNIST test accuracy of chosen `configs/fashion_mnist/` configs, next to the dataset README's numbers.

Trains each config through the CLI (`fit --test_after_fit=true`, best checkpoint by val/acc) for an epoch budget,
in its own folder under --out, and prints one JSON line per model
`{"model": name, "test_acc": acc, "epochs": n, "reference": acc or null}`, then a Markdown table. The references
are the Fashion-MNIST README's benchmark (zalandoresearch/fashion-mnist), for the closest architecture it lists.

    python benchmarks/fashion_mnist_table.py --configs lenet5 resnet18 [--epochs N] [--train-subset N] [-- CLI args]
"""

from __future__ import annotations

import argparse
import csv
import json
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
    (metrics,) = sorted(run_root.glob("runs/*/version_*/metrics.csv"))
    value = None
    with metrics.open() as f:
        for row in csv.DictReader(f):
            if row.get(name):
                value = float(row[name])
    if value is None:
        raise RuntimeError(f"{metrics} has no {name}")
    return value


def train(config: str, out: Path, epochs: int | None, train_subset: int | None, extra: list[str]) -> dict:
    """Fit and test `config` in `out/config`; returns the JSON row."""
    run_root = out / config
    run_root.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable,
        "-m",
        "lit_imgcls",
        "fit",
        "--config",
        str(REPO / "configs/fashion_mnist" / f"{config}.yaml"),
    ]
    args += ["--test_after_fit=true", "--trainer.enable_progress_bar=false", *extra]
    if epochs is not None:
        args.append(f"--trainer.max_epochs={epochs}")
    if train_subset is not None:
        args.append(f"--data.train_subset={train_subset}")
    start = time.perf_counter()
    log = run_root / "fit.log"
    with log.open("w") as f:
        result = subprocess.run(args, cwd=run_root, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
    if result.returncode != 0:
        raise RuntimeError(f"{config} failed, see {log}")
    reference_name, reference = REFERENCES.get(config, ("not listed", None))
    return {
        "model": config,
        "test_acc": round(last_metric(run_root, "test/acc"), 4),
        "epochs": epochs if epochs is not None else config_epochs(config),
        "train_subset": train_subset,
        "reference": reference,
        "reference_name": reference_name,
        "minutes": round((time.perf_counter() - start) / 60, 1),
    }


def config_epochs(config: str) -> int:
    return yaml.safe_load((REPO / "configs" / "fashion_mnist" / f"{config}.yaml").read_text())["trainer"]["max_epochs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["lenet5"])
    parser.add_argument("--epochs", type=int, default=None, help="default: each config's max_epochs")
    parser.add_argument("--train-subset", type=int, default=None, help="train on N images (default: all 55,000)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "fashion_mnist_table")
    parser.add_argument("extra", nargs="*", help="more CLI arguments for every run, after --")
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        rows.append(train(config, args.out, args.epochs, args.train_subset, args.extra))
        print(json.dumps({k: rows[-1][k] for k in ("model", "test_acc", "epochs", "reference")}), flush=True)
    print("\n| config | epochs | training images | test accuracy | Fashion-MNIST README | minutes |")
    print("|---|---:|---:|---:|---|---:|")
    for r in rows:
        images = r["train_subset"] or 55000
        reference = f"{r['reference']} ({r['reference_name']})" if r["reference"] else r["reference_name"]
        print(f"| {r['model']} | {r['epochs']} | {images} | {r['test_acc']:.4f} | {reference} | {r['minutes']} |")


if __name__ == "__main__":
    main()
