"""Knowledge distillation on Fashion-MNIST: LeNet-5 alone against LeNet-5 distilled (labeled method) from a CNN4
teacher, at the same epoch budget, seeds and data (55,000 training images, the configs' split; augmentation: flip).

The teacher is trained once by its documented config (writes checkpoints/fashion_mnist_cnn4_teacher.ckpt):

    lit-imgcls fit --config configs/distill/teacher_cnn4.yaml --test_after_fit=true
    python benchmarks/distill_fashion_mnist.py [--epochs 5] [--seeds 0 1 2] [--temperature 4] [--alpha 0.9]

Each finished run is appended to `--results` (JSON lines) and skipped when the script is started again, so a
long benchmark can be resumed. Prints every run's test accuracy, then one JSON line: teacher, student_alone and
distilled (means over seeds), gap_recovered = (distilled - alone) / (teacher - alone), seeds, epochs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lit_imgcls.data import ImageDataModule
from lit_imgcls.tasks import DistillationModule, ImageClassifier
from lit_imgcls.tasks.checkpoints import load_task

DATA = {"val_size": 5000, "batch_size": 128, "augment": "basic", "crop_padding": 0, "hflip": True}


def test_accuracy(module: pl.LightningModule, datamodule: ImageDataModule) -> float:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]


def train_and_test(kind: str, seed: int, args: argparse.Namespace) -> float:
    """Fit `kind` (alone | distilled) for `args.epochs` epochs with `seed`; test accuracy of the last epoch."""
    pl.seed_everything(seed)
    if kind == "alone":
        module = ImageClassifier(model="lenet5")
    else:
        module = DistillationModule(
            teacher=args.teacher,
            temperature=args.temperature,
            alpha=args.alpha,
            teacher_view=args.teacher_view,
        )
    datamodule = ImageDataModule(**DATA)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return test_accuracy(module, datamodule)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="checkpoints/fashion_mnist_cnn4_teacher.ckpt")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--teacher_view", choices=["same", "clean"], default="same")
    parser.add_argument("--results", default="runs/distill_benchmark.jsonl")
    args = parser.parse_args()
    if not Path(args.teacher).is_file():
        raise SystemExit(f"{args.teacher} missing: lit-imgcls fit --config configs/distill/teacher_cnn4.yaml")
    torch.set_num_threads(1)

    setting = {"epochs": args.epochs, "temperature": args.temperature, "alpha": args.alpha, "view": args.teacher_view}
    results_file = Path(args.results)
    results_file.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.is_file() else []
    teacher = test_accuracy(load_task(args.teacher), ImageDataModule(**DATA))
    print(f"teacher {args.teacher}: test acc {teacher:.4f}", flush=True)
    accuracy: dict[str, list[float]] = {"alone": [], "distilled": []}
    for seed in args.seeds:
        for kind in ("alone", "distilled"):
            key = {**setting, "kind": kind, "seed": seed}
            if kind == "alone":  # the student alone does not depend on the distillation settings
                key = {"epochs": args.epochs, "kind": kind, "seed": seed}
            previous = [r for r in done if all(r.get(k) == v for k, v in key.items()) and len(r) == len(key) + 2]
            if previous:
                acc, seconds = previous[0]["acc"], previous[0]["seconds"]
            else:
                start = time.perf_counter()
                acc = train_and_test(kind, seed, args)
                seconds = time.perf_counter() - start
                with results_file.open("a") as f:
                    f.write(json.dumps({**key, "acc": acc, "seconds": round(seconds, 1)}) + "\n")
            accuracy[kind].append(acc)
            print(f"seed {seed} {kind:9s}: test acc {acc:.4f} ({seconds:.0f} s)", flush=True)
    alone, distilled = statistics.mean(accuracy["alone"]), statistics.mean(accuracy["distilled"])
    result = {
        "teacher": round(teacher, 4),
        "student_alone": round(alone, 4),
        "distilled": round(distilled, 4),
        "gap_recovered": round((distilled - alone) / (teacher - alone), 3) if teacher != alone else None,
        "seeds": len(args.seeds),
        "epochs": args.epochs,
        "alone_runs": accuracy["alone"],
        "distilled_runs": accuracy["distilled"],
        **{k: v for k, v in setting.items() if k != "epochs"},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
