"""Figures of the test report: confusion matrix, confident mistakes, reliability diagram, learning curves."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

CELL_TEXT_MAX_CLASSES = 20  # beyond this, per-cell counts make the confusion matrix unreadable
TICK_LABELS_MAX = 40  # beyond this, every n-th class name is written on the axes


def _short(name: str, width: int = 16) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def confusion_figure(confusion: torch.Tensor, classes: Sequence[str]) -> Figure:
    """Rows: true class, columns: predicted; colour: share of the true class (recall), text: counts up to 20 classes."""
    k = len(classes)
    side = min(24.0, max(6.0, 0.3 * k + 3))
    fig = Figure(figsize=(side, side * 0.9))
    ax = fig.subplots()
    share = confusion.double() / confusion.sum(dim=1, keepdim=True).clamp_min(1)
    image = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    step = max(1, -(-k // TICK_LABELS_MAX))
    ticks = list(range(0, k, step))
    labels = [_short(classes[i]) for i in ticks]
    ax.set_xticks(ticks, labels, rotation=90 if k > 10 else 45, ha="right" if k <= 10 else "center", fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    if k <= CELL_TEXT_MAX_CLASSES:
        for i, row in enumerate(confusion.tolist()):
            for j, count in enumerate(row):
                if count:
                    color = "white" if share[i, j] > 0.5 else "black"
                    ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix ({int(confusion.sum())} images)")
    fig.tight_layout()
    return fig


def mistakes_figure(
    images: torch.Tensor, true: Sequence[str], predicted: Sequence[str], confidence: Sequence[float], columns: int = 6
) -> Figure:
    """A grid of uint8 images (N, C, H, W), each titled with its true and predicted class and the confidence."""
    n = max(1, len(images))
    rows = -(-n // columns)
    fig = Figure(figsize=(columns * 1.9, rows * 2.2))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, t, p, c in zip(axes.flat, images, true, predicted, confidence, strict=False):
        picture = image.permute(1, 2, 0).numpy()
        ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true: {_short(t, 14)}\npred: {_short(p, 14)} ({c:.2f})", fontsize=7)
    if len(images) == 0:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle("Most confident mistakes")
    fig.tight_layout()
    return fig


def reliability_figure(accuracy: torch.Tensor, confidence: torch.Tensor, count: torch.Tensor, ece: float) -> Figure:
    """Accuracy against mean confidence per confidence bin; the gap to the diagonal is the miscalibration."""
    bins = len(count)
    edges = torch.linspace(0, 1, bins + 1)
    centers = ((edges[:-1] + edges[1:]) / 2).numpy()
    fig = Figure(figsize=(5, 6))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = count > 0
    ax.bar(centers[filled], accuracy[filled].numpy(), width=1 / bins, edgecolor="black", label="accuracy")
    gap = (confidence - accuracy)[filled].numpy()
    ax.bar(centers[filled], gap, bottom=accuracy[filled].numpy(), width=1 / bins, color="red", alpha=0.3, label="gap")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(f"Reliability diagram (ECE {ece:.4f}, {bins} bins)")
    hist.bar(centers, count.numpy(), width=1 / bins, edgecolor="black")
    hist.set_xlabel("confidence (top-1 probability)")
    hist.set_ylabel("images")
    fig.tight_layout()
    return fig


def read_epoch_metrics(metrics_csv: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Epoch-level `train/*` and `val/*` series of a CSVLogger file: name -> (epochs, values)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            epoch = row.get("epoch")
            for key, value in row.items():
                if not key.startswith(("train/", "val/")) or key.endswith("_step") or value in ("", None) or not epoch:
                    continue
                epochs, values = series.setdefault(key, ([], []))
                epochs.append(float(epoch))
                values.append(float(value))
    return series


def learning_curves_figure(series: dict[str, tuple[list[float], list[float]]]) -> Figure | None:
    """Losses on the left, accuracies (and any other metric) on the right, against the epoch; None without data."""
    if not series:
        return None
    fig = Figure(figsize=(11, 4))
    losses, others = fig.subplots(1, 2)
    for name, (epochs, values) in sorted(series.items()):
        ax = losses if "loss" in name else others
        ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, label=name)
    for ax, title in ((losses, "loss"), (others, "accuracy and other metrics")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
