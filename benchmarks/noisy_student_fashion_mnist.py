"""Noisy Student on Fashion-MNIST with 100 labels per class: a supervised FastResNet teacher on the 1,000 labels,
then two generations of noised FastResNet students on the labels + pseudo-labels of the other 58,000 training images
(1,000 more are the validation split), through `lit_imgcls.noisy_student_run` and the configs in
configs/noisy_student/. Each generation's checkpoint is the best by val/acc; accuracies are on the 10,000 test images.

Prints the summary table, then one JSON line
{"labels_per_class": 100, "teacher": acc, "generations": [acc_1, acc_2], "epochs": n, "pseudo_labels": ...}.

    OMP_NUM_THREADS=1 python benchmarks/noisy_student_fashion_mnist.py [--epochs 8] [--pseudo-labels hard] \
        [--threshold 0.3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from lit_imgcls.noisy_student_run import run_generations

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "noisy_student"


def config_epochs(name: str) -> int:
    return yaml.safe_load((CONFIGS / name).read_text())["trainer"]["max_epochs"]


def config_pseudo_labels(name: str) -> str:
    """`hard` or `soft`, as the student config sets `hard_labels`."""
    return "hard" if yaml.safe_load((CONFIGS / name).read_text())["model"]["init_args"]["hard_labels"] else "soft"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="student epochs per generation (default: config)")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: config)")
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--pseudo-labels", choices=("hard", "soft"), default=None, help="default: the config's")
    parser.add_argument("--threshold", type=float, default=None, help="confidence threshold (default: config)")
    parser.add_argument("--out", type=Path, default=Path("checkpoints/noisy_student/benchmark_fashion_mnist_100"))
    args = parser.parse_args()
    student_args, teacher_args = [], []
    if args.epochs is not None:
        student_args.append(f"--trainer.max_epochs={args.epochs}")
    if args.teacher_epochs is not None:
        teacher_args.append(f"--trainer.max_epochs={args.teacher_epochs}")
    pseudo_labels = args.pseudo_labels or config_pseudo_labels("fashion_mnist_100.yaml")
    student_args.append(f"--model.init_args.hard_labels={pseudo_labels == 'hard'}")
    if args.threshold is not None:
        student_args.append(f"--model.init_args.confidence_threshold={args.threshold}")
    shared = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    start = time.perf_counter()
    rows = run_generations(
        str(CONFIGS / "fashion_mnist_100.yaml"),
        args.generations,
        args.out,
        teacher_config=str(CONFIGS / "teacher_fashion_mnist_100.yaml"),
        shared_args=shared,
        teacher_args=teacher_args,
        student_args=student_args,
    )
    result = {
        "benchmark": "noisy_student_fashion_mnist",
        "labels_per_class": 100,
        "teacher": rows[0]["test_acc"],
        "generations": [row["test_acc"] for row in rows[1:]],
        "epochs": args.epochs or config_epochs("fashion_mnist_100.yaml"),
        "teacher_epochs": args.teacher_epochs or config_epochs("teacher_fashion_mnist_100.yaml"),
        "pseudo_labels": pseudo_labels,
        "threshold": args.threshold,
        "seconds": round(time.perf_counter() - start),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
