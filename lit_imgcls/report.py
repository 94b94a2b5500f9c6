"""The test report: per-class metrics, confusion matrix, confident mistakes, calibration, learning curves.

`TestReport` (a callback the CLI adds to every run) collects each test batch's probabilities, gathers them once
across ranks and writes the report on rank 0 into `<run folder>/report/`; `write_report` draws it again from the
saved `predictions.pt` (`lit-imgcls report`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.functional.classification import (
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from lit_imgcls.callbacks import concat_batches, merge_ranks
from lit_imgcls.errors import UserError
from lit_imgcls.report_plots import (
    confusion_figure,
    learning_curves_figure,
    mistakes_figure,
    read_epoch_metrics,
    reliability_figure,
)

PREDICTIONS_FILE = "predictions.pt"


def reliability_bins(probs: torch.Tensor, target: torch.Tensor, bins: int) -> tuple[torch.Tensor, ...]:
    """Per confidence bin (uniform on [0, 1], as torchmetrics bins): accuracy, mean confidence, image count."""
    confidence, predicted = probs.max(dim=1)
    index = (confidence * bins).long().clamp(0, bins - 1)
    count = torch.zeros(bins).index_add_(0, index, torch.ones_like(confidence))
    correct = torch.zeros(bins).index_add_(0, index, (predicted == target).float())
    summed = torch.zeros(bins).index_add_(0, index, confidence.float())
    return correct / count.clamp_min(1), summed / count.clamp_min(1), count


def class_metrics(probs: torch.Tensor, target: torch.Tensor, bins: int = 15) -> dict[str, Any]:
    """Confusion matrix (rows true), per-class precision/recall/F1 and the expected calibration error."""
    k = probs.shape[1]
    per_class = {"average": None, "zero_division": 0}
    return {
        "confusion": multiclass_confusion_matrix(probs, target, k),
        "precision": multiclass_precision(probs, target, k, **per_class),
        "recall": multiclass_recall(probs, target, k, **per_class),
        "f1": multiclass_f1_score(probs, target, k, **per_class),
        "ece": float(multiclass_calibration_error(probs, target, k, n_bins=bins, norm="l1")),
        "accuracy": float((probs.argmax(1) == target).float().mean()),
    }


def confident_mistakes(probs: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of the `n` wrong predictions with the highest confidence, most confident first."""
    confidence, predicted = probs.max(dim=1)
    wrong = (predicted != target).nonzero().flatten()
    return wrong[confidence[wrong].argsort(descending=True)[:n]]


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_report(
    predictions: Mapping[str, Any],
    out_dir: str | Path,
    metrics_csv: str | Path | None = None,
    tensorboard: TensorBoardLogger | None = None,
    bins: int = 15,
) -> dict[str, Any]:
    """Write every part of the report into `out_dir` (and to `tensorboard`); returns the summary (report.json).

    `predictions`: `probs` (N, K), `target` (N,), `classes`, and optionally `mistake_images` (uint8, for the rows
    `mistake_rows` of `probs`): what `TestReport` saves as predictions.pt.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probs, target, classes = predictions["probs"].float(), predictions["target"].long(), list(predictions["classes"])
    if probs.shape[1] != len(classes):
        raise UserError(f"{probs.shape[1]} class probabilities but {len(classes)} class names: is the report stale?")
    m = class_metrics(probs, target, bins)
    support = m["confusion"].sum(dim=1)
    rows = [
        [name, f"{p:.6f}", f"{r:.6f}", f"{f:.6f}", int(s)]
        for name, p, r, f, s in zip(classes, m["precision"], m["recall"], m["f1"], support, strict=True)
    ]
    _write_csv(out / "per_class.csv", ["class", "precision", "recall", "f1", "support"], rows)
    _write_csv(
        out / "confusion_matrix.csv",
        ["true\\predicted", *classes],
        [[c, *r] for c, r in zip(classes, m["confusion"].tolist(), strict=True)],
    )
    figures = {"confusion_matrix": confusion_figure(m["confusion"], classes)}
    accuracy, confidence, count = reliability_bins(probs, target, bins)
    figures["reliability"] = reliability_figure(accuracy, confidence, count, m["ece"])
    rows_shown = predictions.get("mistake_rows", torch.empty(0, dtype=torch.long))
    if predictions.get("mistake_images") is not None:
        top = probs[rows_shown].max(dim=1)
        true = [classes[t] for t in target[rows_shown].tolist()]
        predicted = [classes[p] for p in top.indices.tolist()]
        figures["mistakes"] = mistakes_figure(predictions["mistake_images"], true, predicted, top.values.tolist())
    if metrics_csv is not None and Path(metrics_csv).is_file():
        curves = learning_curves_figure(read_epoch_metrics(Path(metrics_csv)))
        if curves is not None:
            figures["learning_curves"] = curves
    summary = {
        "images": len(target),
        "accuracy": m["accuracy"],
        "ece": m["ece"],
        "macro_precision": float(m["precision"].mean()),
        "macro_recall": float(m["recall"].mean()),
        "macro_f1": float(m["f1"].mean()),
        "figures": sorted(f"{name}.png" for name in figures),
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=110)
        if tensorboard is not None:
            tensorboard.experiment.add_figure(f"report/{name}", fig, close=False)
        fig.clf()
    if tensorboard is not None:
        _log_scalars(tensorboard, summary, classes, m)
    return summary


def _log_scalars(tensorboard: TensorBoardLogger, summary: Mapping[str, Any], classes: list[str], m: dict) -> None:
    writer = tensorboard.experiment
    for key in ("ece", "macro_precision", "macro_recall", "macro_f1"):
        writer.add_scalar(f"report/{key}", summary[key])
    for name, p, r, f in zip(classes, m["precision"], m["recall"], m["f1"], strict=True):
        for metric, value in (("precision", p), ("recall", r), ("f1", f)):
            writer.add_scalar(f"report/{metric}/{name}", float(value))
    writer.flush()


class TestReport(pl.Callback):
    """Writes the test report (see the module docstring) at the end of every `test`.

    Args:
        enabled: write the report (`--report.enabled=false` turns it off).
        output: the report folder; default `<log_dir>/report` (the run folder of the first logger).
        mistakes: how many of the most confident mistakes to show.
        bins: confidence bins of the ECE and the reliability diagram.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, enabled: bool = True, output: str | None = None, mistakes: int = 24, bins: int = 15) -> None:
        self.enabled, self.output, self.mistakes, self.bins = enabled, output, mistakes, bins
        self.parts: list[dict[str, torch.Tensor]] = []
        self.written: Path | None = None
        self.summary: dict[str, Any] | None = None

    def output_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.output) if self.output else Path(trainer.log_dir or trainer.default_root_dir) / "report"

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.parts = []

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, *_: Any
    ) -> None:
        if not self.enabled:
            return
        if not isinstance(outputs, Mapping) or not ({"logits", "probs"} & outputs.keys()):
            raise UserError(
                f"{type(pl_module).__name__}.test_step returns no logits or probs for the test report: return "
                "{'logits': ..., 'target': ...} from it, or set --report.enabled=false"
            )
        probs = outputs["probs"] if "probs" in outputs else outputs["logits"].float().softmax(dim=-1)
        target = outputs["target"]
        target = target.argmax(dim=-1) if target.ndim > 1 else target
        part = {"probs": probs.detach().float(), "target": target, "index": batch["index"]}
        self.parts.append({key: value.detach().cpu() for key, value in part.items()})

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        # every rank asks: under DDP, trainer.log_dir is a broadcast (rank 0 alone asking would hang)
        out, metrics_csv = self.output_dir(trainer), find_metrics_csv(trainer)
        local = concat_batches(self.parts)
        gathered = [local]
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered = [None] * trainer.world_size
            dist.all_gather_object(gathered, local)
        self.parts = []
        if not trainer.is_global_zero or not any(gathered):
            return
        predictions = self.collect(trainer, merge_ranks(gathered), metrics_csv)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(predictions, out / PREDICTIONS_FILE)
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        self.summary = write_report(predictions, out, metrics_csv, tensorboard, self.bins)
        self.written = out
        print(f"test report ({self.summary['images']} images, ECE {self.summary['ece']:.4f}) written to {out}")

    def collect(
        self, trainer: pl.Trainer, merged: dict[str, torch.Tensor], metrics_csv: Path | None = None
    ) -> dict[str, Any]:
        """The merged predictions with the class names, the checkpoint and the mistakes' images."""
        datamodule = trainer.datamodule
        k = merged["probs"].shape[1]
        classes = list(getattr(datamodule, "classes", ())) or [str(c) for c in range(k)]
        rows = confident_mistakes(merged["probs"], merged["target"], self.mistakes)
        test_set = getattr(datamodule, "test_set", None)
        images = test_set.images[merged["index"][rows]] if getattr(test_set, "images", None) is not None else None
        if images is None:
            rank_zero_warn("the test report shows no mistake images: the datamodule has no `test_set.images`")
        checkpoint = str(trainer.ckpt_path) if trainer.ckpt_path else None
        return {
            **merged,
            "classes": classes,
            "mistake_rows": rows,
            "mistake_images": images,
            "checkpoint": checkpoint,
            "metrics_csv": str(metrics_csv) if metrics_csv else None,
        }


def find_metrics_csv(trainer: pl.Trainer) -> Path | None:
    """The fit's metrics.csv: next to the tested checkpoint's `checkpoints/` folder, else in the run folder."""
    candidates = []
    if trainer.ckpt_path:
        candidates.append(Path(trainer.ckpt_path).resolve().parent.parent / "metrics.csv")
    candidates.append(Path(trainer.log_dir or trainer.default_root_dir) / "metrics.csv")
    return next((path for path in candidates if path.is_file()), None)
