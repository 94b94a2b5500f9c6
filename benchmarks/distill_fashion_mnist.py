"""Knowledge distillation on Fashion-MNIST: LeNet-5 alone against LeNet-5 distilled from the FastResNet teacher,
both trained by the shipped config (configs/distill/labeled.yaml: same data, augmentation, epochs and seeds; the
student alone is the config's student without the teacher).

The teacher is trained once by its documented config (writes checkpoints/fashion_mnist_fast_resnet_teacher.ckpt):

    lit-imgcls fit --config configs/fashion_mnist/fast_resnet.yaml --config configs/distill/teacher_fast_resnet.yaml
    python benchmarks/distill_fashion_mnist.py [--seeds 0 1 2] [--workers 2] [-- --model.init_args.alpha=0.5 ...]

Options after `--` override the config for both runs (data, trainer) or for the distilled run (model.init_args.*
distillation options). Each run uses one CPU thread; `--workers` runs that many at once. Finished runs are appended
to `--results` (JSON lines) and reused by any later call whose run resolves to the same setting (`setting_sha1`:
the task's options, the student's alone, data options, optimizer, epochs), whatever the config's text. Prints every
run's test accuracy (last epoch), then one JSON line: teacher, student_alone and distilled (means over seeds, with std
and per-seed lists), gain, gap_recovered = (distilled - alone) / (teacher - alone), seeds, epochs, settings.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lit_imgcls.cli import instantiate_from_config
from lit_imgcls.tasks import ImageClassifier
from lit_imgcls.tasks.checkpoints import load_task
from lit_imgcls.tasks.distill import student_hparams

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "distill" / "labeled.yaml"
DISTILL_OPTIONS = ("temperature", "alpha", "view", "teacher_precision")  # the student alone does not depend on them
DISTILL_OVERRIDES = tuple(
    f"--model.init_args.{name}"
    for name in ("teacher", "temperature", "alpha", "teacher_view", "teacher_precision", "unlabeled_weight")
)
QUIET = {
    "trainer.logger": False,
    "trainer.enable_checkpointing": False,
    "trainer.enable_progress_bar": False,
    "trainer.enable_model_summary": False,
    "trainer.callbacks": [],
    "trainer.limit_val_batches": 0,
}


def test_accuracy(module: pl.LightningModule, datamodule: pl.LightningDataModule) -> float:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]


def student_alone(distiller: pl.LightningModule) -> ImageClassifier:
    """The distillation config's student as a plain ImageClassifier (same architecture and optimizer)."""
    options = student_hparams(distiller.hparams)
    return ImageClassifier(**options, optimizer=distiller.optimizer_factory, lr_scheduler=distiller.scheduler_factory)


def run(kind: str, seed: int, config: str, overrides: list[str]) -> tuple[float, float]:
    """Fit `kind` (alone | distilled) with `seed`; (test accuracy of the last epoch, seconds)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    quiet = [f"--{key}={json.dumps(value)}" for key, value in QUIET.items()]
    model, datamodule, trainer = instantiate_from_config(config, [f"--seed_everything={seed}", *quiet, *overrides])
    if kind == "alone":
        pl.seed_everything(seed)
        model = student_alone(model)
    trainer.fit(model, datamodule=datamodule)
    return test_accuracy(model, datamodule), time.perf_counter() - start


def describe_factory(factory: Any) -> Any:
    """An optimizer/scheduler factory as plain data: its class and keyword arguments (no memory addresses)."""
    if isinstance(factory, functools.partial):
        return [repr(factory.args[-1]) if factory.args else repr(factory.func), factory.keywords]
    return None if factory is None else repr(factory)


def setting_sha1(
    distiller: pl.LightningModule, datamodule: pl.LightningDataModule, trainer: pl.Trainer, kind: str
) -> str:
    """What a run of `kind` depends on, hashed: the task's options (the student's alone for `alone`), the data
    options, the optimizer and scheduler, the epochs. Config comments or layout do not change it."""
    model = student_hparams(distiller.hparams) if kind == "alone" else dict(distiller.hparams)
    setting = {
        "model": model,
        "data": dict(datamodule.hparams),
        "optimizer": describe_factory(distiller.optimizer_factory),
        "scheduler": describe_factory(distiller.scheduler_factory),
        "epochs": trainer.max_epochs,
    }
    return hashlib.sha1(json.dumps(setting, sort_keys=True, default=repr).encode()).hexdigest()[:12]


def summary(values: list[float]) -> dict[str, Any]:
    return {"mean": round(statistics.mean(values), 4), "std": round(statistics.pstdev(values), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="runs at once, one CPU thread each")
    parser.add_argument("--results", default="runs/distill_benchmark.jsonl")
    parser.add_argument("overrides", nargs="*", help="config options for both runs, after --")
    args = parser.parse_args()
    model, datamodule, trainer = instantiate_from_config(args.config, args.overrides)
    teacher_path = model.hparams.teacher
    if not Path(teacher_path).is_file():
        raise SystemExit(f"{teacher_path} missing: lit-imgcls fit --config configs/distill/teacher_fast_resnet.yaml")
    hp = model.hparams
    setting = {
        "config": Path(args.config).name,
        "epochs": trainer.max_epochs,
        "temperature": hp.temperature,
        "alpha": hp.alpha,
        "view": hp.teacher_view,
        "teacher_precision": hp.teacher_precision,
        "mix": datamodule.options.mixes,
        "overrides": args.overrides,
    }
    results_file = Path(args.results)
    results_file.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.is_file() else []
    teacher = test_accuracy(load_task(teacher_path), datamodule)
    print(f"teacher {teacher_path}: test acc {teacher:.4f}", flush=True)
    jobs = [(kind, seed) for seed in args.seeds for kind in ("alone", "distilled")]
    # the student alone does not depend on the distillation options: its runs are reused across them
    alone = {k: v for k, v in setting.items() if k not in DISTILL_OPTIONS}
    alone["overrides"] = [o for o in args.overrides if not o.startswith(DISTILL_OVERRIDES)]
    info = {"alone": alone, "distilled": setting}
    digests = {kind: setting_sha1(model, datamodule, trainer, kind) for kind in info}
    keys = {
        (kind, seed): {**info[kind], "setting_sha1": digests[kind], "kind": kind, "seed": seed} for kind, seed in jobs
    }
    match = ("setting_sha1", "kind", "seed")
    found = {job: next((r for r in done if all(r.get(k) == keys[job][k] for k in match)), None) for job in jobs}
    todo = [job for job in jobs if found[job] is None]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {job: pool.submit(run, *job, args.config, args.overrides) for job in todo}
        for job, future in futures.items():
            acc, seconds = future.result()
            found[job] = {**keys[job], "acc": acc, "seconds": round(seconds, 1)}
            with results_file.open("a") as f:
                f.write(json.dumps(found[job]) + "\n")
    accuracy: dict[str, list[float]] = {"alone": [], "distilled": []}
    for kind, seed in jobs:
        record = found[(kind, seed)]
        accuracy[kind].append(record["acc"])
        print(f"seed {seed} {kind:9s}: test acc {record['acc']:.4f} ({record['seconds']:.0f} s)", flush=True)
    alone, distilled = summary(accuracy["alone"]), summary(accuracy["distilled"])
    gap = teacher - alone["mean"]
    result = {
        "teacher": round(teacher, 4),
        "student_alone": alone["mean"],
        "student_alone_std": alone["std"],
        "distilled": distilled["mean"],
        "distilled_std": distilled["std"],
        "gain": round(distilled["mean"] - alone["mean"], 4),
        "gap_recovered": round((distilled["mean"] - alone["mean"]) / gap, 3) if gap > 0 else None,
        "every_distilled_beats_every_alone": min(accuracy["distilled"]) > max(accuracy["alone"]),
        "seeds": args.seeds,
        "alone_runs": [round(a, 4) for a in accuracy["alone"]],
        "distilled_runs": [round(a, 4) for a in accuracy["distilled"]],
        **setting,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
