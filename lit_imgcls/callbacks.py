"""Callbacks shared by every task."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """Writes `predict` results to one CSV: index, source (file path or dataset index), target, predicted class,
    its probability, the top-k classes as `name:prob` joined by `|`, and for k-NN the neighbours' classes.

    Under DDP every rank's predictions are gathered and rank 0 writes the file once, sorted by index and without
    the duplicates a distributed sampler may add.

    Args:
        output: CSV path; default `<log_dir>/predictions.csv` (or `<default_root_dir>/predictions.csv`).
        top_k: how many classes to list in the `top_k` column.
    """

    def __init__(self, output: str | None = None, top_k: int = 5) -> None:
        super().__init__(write_interval="epoch")
        self.output = output
        self.top_k = top_k
        self.written: Path | None = None

    def output_path(self, trainer: pl.Trainer) -> Path:
        if self.output is not None:
            return Path(self.output)
        return Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv"

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: list[Any], batch_indices: Any
    ) -> None:
        local = concat_batches(predictions)
        gathered = [local]
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered = [None] * trainer.world_size
            dist.all_gather_object(gathered, local)
        if trainer.is_global_zero:
            merged = merge_ranks(gathered)
            self.written = self.write_csv(trainer, merged)
            print(f"{len(merged['index'])} predictions written to {self.written}")

    def write_csv(self, trainer: pl.Trainer, predictions: dict[str, torch.Tensor]) -> Path:
        path = self.output_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        datamodule = trainer.datamodule
        classes = list(getattr(datamodule, "classes", ())) or [str(k) for k in range(predictions["probs"].shape[1])]
        top_probs, top_classes = predictions["probs"].topk(min(self.top_k, len(classes)), dim=1)
        has_target = "target" in predictions
        neighbors = predictions.get("neighbor_labels")
        header = ["index", "source", *(["target"] if has_target else []), "predicted", "probability", "top_k"]
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header + (["neighbors"] if neighbors is not None else []))
            for row, index in enumerate(predictions["index"].tolist()):
                source = datamodule.source(index) if hasattr(datamodule, "source") else str(index)
                target = [_class_name(classes, predictions["target"][row])] if has_target else []
                pairs = zip(top_classes[row].tolist(), top_probs[row].tolist(), strict=True)
                top = "|".join(f"{classes[c]}:{p:.4f}" for c, p in pairs)
                votes = ["|".join(classes[c] for c in neighbors[row].tolist())] if neighbors is not None else []
                best = classes[top_classes[row, 0]]
                writer.writerow([index, source, *target, best, f"{top_probs[row, 0]:.6f}", top, *votes])
        return path


def _class_name(classes: list[str], target: torch.Tensor) -> str:
    return classes[int(target.argmax()) if target.ndim else int(target)]


def concat_batches(predictions: list[Any]) -> dict[str, torch.Tensor]:
    """One dict of CPU tensors from a list of per-batch dicts (or a list of such lists, one per dataloader)."""
    batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
    return {key: torch.cat([b[key].cpu() for b in batches]) for key in batches[0]} if batches else {}


def merge_ranks(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-rank predictions, sort by index and drop repeated indices (sampler padding)."""
    parts = [p for p in parts if p]
    merged = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    order = torch.argsort(merged["index"], stable=True)
    merged = {key: value[order] for key, value in merged.items()}
    keep = torch.ones(len(order), dtype=torch.bool)
    keep[1:] = merged["index"][1:] != merged["index"][:-1]
    return {key: value[keep] for key, value in merged.items()}
