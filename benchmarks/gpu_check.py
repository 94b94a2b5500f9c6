"""One command that checks the template on a GPU machine (at most ~8 minutes on one GPU) and prints one JSON line.

Sections (each timed; one that fails records its error and the others still run):
  cuda_tests            `pytest -m cuda` (the tests that skip without a GPU)
  kornia                the `standard` Kornia pipeline's images/s on the GPU against the CPU (28x28x1)
  augmentation_share    share of a ResNet-18 bf16-mixed training step (configs/fashion_mnist/resnet18.yaml's data
                        and model) spent in the DataModule's batch transform; the goal is under 10%
  throughput            training images/s of LeNet-5 and ResNet-18 at 32-true, bf16-mixed and 16-mixed
  fits                  every seed architecture's config fitted for a fixed budget (`--fit-epochs`), its test accuracy
  ddp                   a 2-GPU DDP fit + test of LeNet-5 through the CLI, when more than one GPU is present

`--dry-run` runs the same code on the CPU at toy sizes (a few steps, tiny subsets; 2-process CPU DDP) so a test
can check it without a GPU.

    python benchmarks/gpu_check.py [--dry-run] [--fit-epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import chdir
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from augment import kornia_img_s, make_images
from compile_channels_last import AUTOCAST, train_images_per_second

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "fashion_mnist"
SEED = ["lenet5", "alexnet", "vgg16", "googlenet", "resnet18", "densenet121", "seresnet18", "efficientnet_b0"]
QUIET = {"trainer.enable_progress_bar": False, "trainer.enable_model_summary": False}


@dataclass
class Budget:
    """Sizes of one check: the real one on a GPU, or the dry run on the CPU."""

    device: str
    models: tuple[str, ...]  # throughput; the dry run skips ResNet-18 (fp16 convolutions crawl on CPUs)
    kornia_images: int
    repeats: int
    batch_size: int
    steps: int
    fit: dict[str, Any]
    ddp: list[str]
    configs: tuple[str, ...] = tuple(SEED)


def budget(dry_run: bool, fit_epochs: int) -> Budget:
    if dry_run:
        tiny = {"data.train_subset": 32, "data.val_size": 8, "data.test_subset": 16, "data.batch_size": 8}
        fit = {**tiny, "trainer.max_steps": 1, "trainer.limit_val_batches": 1, "trainer.accelerator": "cpu"}
        ddp = ["--data.train_subset=128", "--data.val_size=32", "--data.test_subset=65", "--data.batch_size=32"]
        ddp += ["--trainer.max_steps=2", "--trainer.accelerator=cpu"]
        return Budget("cpu", ("lenet5",), 512, 1, 8, 2, fit, ddp)
    fit = {"trainer.max_epochs": fit_epochs, "trainer.accelerator": "gpu", "trainer.devices": 1}
    ddp = ["--trainer.max_epochs=1", "--trainer.accelerator=gpu"]
    return Budget("cuda", ("lenet5", "resnet18"), 16384, 3, 128, 30, fit, ddp)


def cuda_tests(b: Budget) -> dict[str, Any]:
    """`pytest -m cuda` in a subprocess: its exit status and summary line."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-n", "0", "-q", "-p", "no:cacheprovider", "tests"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return {"returncode": result.returncode, "summary": lines[-1] if lines else result.stderr[-300:]}


def kornia(b: Budget) -> dict[str, Any]:
    images = make_images(b.kornia_images, 28, 1)
    cpu = kornia_img_s(images, 256, b.repeats, "cpu")
    device = kornia_img_s(images, 256, b.repeats, b.device)
    return {"cpu_img_s": round(cpu), "device_img_s": round(device), "ratio": round(device / cpu, 2)}


def _timed(fn: Callable[[], Any], device: torch.device, steps: int) -> float:
    """Mean seconds of `fn` over `steps` calls, after one untimed call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def augmentation_share(b: Budget) -> dict[str, Any]:
    """Seconds of the batch transform and of the model's step (bf16-mixed), ResNet-18 as its config builds it."""
    from lit_imgcls.cli import instantiate_from_config
    from lit_imgcls.tasks.classifier import default_optimizer

    overrides = {"trainer.logger": False, "trainer.callbacks": [], **QUIET}
    if b.device == "cpu":
        overrides.update({"data.train_subset": 64, "data.batch_size": 16})
    model, datamodule, _ = instantiate_from_config(CONFIGS / "resnet18.yaml", overrides)
    datamodule.setup("fit")
    device = torch.device(b.device)
    raw = {k: v.to(device) for k, v in next(iter(datamodule.train_dataloader())).items()}
    model.to(device).train()
    optimizer = default_optimizer(model.parameters())
    batch = datamodule.transform_batch(raw, train=True)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model.compute_loss(model(batch["image"]), batch["target"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    augment_s = _timed(lambda: datamodule.transform_batch(raw, train=True), device, b.steps)
    step_s = _timed(step, device, b.steps)
    share = augment_s / (augment_s + step_s)
    return {"augment_ms": round(augment_s * 1e3, 3), "step_ms": round(step_s * 1e3, 3), "share": round(share, 4)}


def throughput(b: Budget) -> dict[str, Any]:
    rates = {}
    for model in b.models:
        for precision in AUTOCAST:
            rate, _ = train_images_per_second(model, b.device, precision, b.batch_size, b.steps, 1, b.repeats)
            rates[f"{model}/{precision}"] = round(rate, 1)
    return rates


def fits(b: Budget) -> dict[str, Any]:
    """Each seed config fitted with the budget's overrides, then tested (test/acc) on its test split."""
    from lit_imgcls.cli import instantiate_from_config

    results = {}
    for name in b.configs:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp, chdir(tmp):
            model, datamodule, trainer = instantiate_from_config(CONFIGS / f"{name}.yaml", {**b.fit, **QUIET})
            trainer.fit(model, datamodule=datamodule)
            (metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
        results[name] = {"test_acc": round(metrics["test/acc"], 4), "seconds": round(time.perf_counter() - start, 1)}
    return results


def ddp(b: Budget) -> dict[str, Any]:
    """A 2-process DDP fit + test of LeNet-5 through the CLI (2 GPUs; 2 CPU processes in the dry run)."""
    if b.device == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU"}
    config = str(CONFIGS / "lenet5.yaml")
    args = ["fit", "--config", config, *b.ddp, "--trainer.devices=2", "--trainer.strategy=ddp", "--test_after_fit=true"]
    args += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "lit_imgcls", *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=400
        )
        if result.returncode != 0:
            return {"returncode": result.returncode, "stderr": result.stderr[-500:]}
        (report,) = Path(tmp).glob("runs/*/version_*/report/report.json")
        summary = json.loads(report.read_text())
    return {"returncode": 0, "test_acc": round(summary["accuracy"], 4), "test_images": summary["images"]}


SECTIONS = {
    "cuda_tests": cuda_tests,
    "kornia": kornia,
    "augmentation_share": augmentation_share,
    "throughput": throughput,
    "fits": fits,
    "ddp": ddp,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at toy sizes")
    parser.add_argument("--fit-epochs", type=int, default=1, help="epochs of each seed architecture's fit")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--configs", nargs="+", default=SEED, choices=SEED, help="the fits section's configs")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run it on a GPU machine, or with --dry-run to check the code on the CPU")
    b = budget(args.dry_run, args.fit_epochs)
    b.configs = tuple(args.configs)
    start = time.perf_counter()
    results: dict[str, Any] = {}
    for name in args.sections:
        section_start = time.perf_counter()
        try:
            results[name] = SECTIONS[name](b)
        except Exception as error:  # one broken section must not hide the others' results
            results[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
        results[name]["seconds"] = round(time.perf_counter() - section_start, 1)
    share = results.get("augmentation_share", {}).get("share")
    out = {
        "benchmark": "gpu_check",
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run else "cpu",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "augmentation_share_under_10pct": share < 0.10 if share is not None else None,
        **results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
