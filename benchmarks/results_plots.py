"""Plots and Markdown tables of the stored results (docs/results/<section>.json, written by benchmarks/results.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def machine_label(record: dict[str, Any]) -> str:
    m = record["machine"]
    where = m["gpu"] or f"{m['cores']}-core CPU ({m['capability']})"
    return f"{where}, torch {m['torch'].split('+')[0]}"


def bars(ax: plt.Axes, names: list[str], means: list[float], stds: list[float], runs: list[list[float]]) -> None:
    """Mean with a std error bar per setting, and every seed's value as a dot."""
    ax.bar(names, means, yerr=stds, capsize=4, color="#9ecae1", edgecolor="#3182bd")
    for i, values in enumerate(runs):
        ax.scatter([i] * len(values), values, color="#08519c", zorder=3, s=14)
    low = min(v for values in runs for v in values)
    ax.set_ylim(low - 0.01, max(means) + 0.01)
    ax.set_ylabel("test accuracy")


def fast_resnet(record: dict[str, Any], ax: plt.Axes) -> str:
    row = record["rows"][-1]
    for seed, curve in zip(row["seeds"], row["val_acc_curves"], strict=True):
        ax.plot(range(1, len(curve) + 1), curve, marker=".", label=f"seed {seed}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val accuracy (EMA weights)")
    ax.set_ylim(0.88, 0.95)
    ax.legend()
    ax.set_title(f"FastResNet: test {row['ema']['mean']:.4f} (EMA) vs {row['raw']['mean']:.4f} (raw)")
    return "| weights | test accuracy (mean ± std) | per seed |\n|---|---|---|\n" + "\n".join(
        f"| {k} | {row[k]['mean']:.4f} ± {row[k]['std']:.4f} | {row[k]['runs']} |" for k in ("ema", "raw")
    )


def distill(record: dict[str, Any], ax: plt.Axes) -> str:
    """Student alone and distilled, side by side for each stored setting, against the teacher's line."""
    lines = ["| setting | student alone | distilled | gain | every distilled > every alone |", "|---|---|---|---|---|"]
    ticks: list[tuple[float, str]] = []
    for i, row in enumerate(record["rows"]):
        view = "CutMix/MixUp" if row["mix"] else "flip only"
        name = f"{view}, T={row['temperature']:g}, alpha={row['alpha']:g}, {row['epochs']} epochs"
        for j, (kind, runs) in enumerate((("alone", row["alone_runs"]), ("distilled", row["distilled_runs"]))):
            x = i * 3 + j
            mean = row["student_alone" if kind == "alone" else "distilled"]
            ax.bar(x, mean, color="#bdbdbd" if kind == "alone" else "#6baed6", label=kind if i == 0 else None)
            ax.scatter([x] * len(runs), runs, color="black", s=10, zorder=3)
        ticks.append((i * 3 + 0.5, f"{view}\nT={row['temperature']:g}, alpha={row['alpha']:g}\n{row['epochs']} epochs"))
        alone = f"{row['student_alone']:.4f} ± {row['student_alone_std']:.4f}"
        distilled = f"{row['distilled']:.4f} ± {row['distilled_std']:.4f}"
        every = row["every_distilled_beats_every_alone"]
        lines.append(f"| {name} | {alone} | {distilled} | {row['gain']:+.4f} | {'yes' if every else 'no'} |")
    ax.axhline(record["rows"][0]["teacher"], color="#08519c", linestyle="--", label="teacher (FastResNet)")
    ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks], fontsize=8)
    ax.set_ylim(0.895, 0.955)
    ax.set_ylabel("test accuracy (LeNet-5 student, 3 seeds)")
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    ax.set_title("distillation on Fashion-MNIST")
    return "\n".join(lines)


def noisy_student(record: dict[str, Any], ax: plt.Axes) -> str:
    row = record["rows"][-1]
    values = [row["teacher"], *row["generations"]]
    names = ["teacher", *(f"gen {i}" for i in range(1, len(values)))]
    ax.plot(names, values, marker="o")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"noisy student, {row['labels_per_class']} labels per class")
    rows = [f"| {name} | {value:.4f} |" for name, value in zip(names, values, strict=True)]
    return "| model | test accuracy |\n|---|---|\n" + "\n".join(rows)


def transfer(record: dict[str, Any], ax: plt.Axes) -> str:
    row = record["rows"][-1]
    labels = [key for key in row if key.isdigit()]
    modes = list(row[labels[0]])
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [row[n][mode] for n in labels], width, yerr=[row["std"][n][mode] for n in labels], label=mode)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], [f"{n} labels/class" for n in labels])
    ax.set_ylim(0.7, 1.0)
    ax.set_ylabel("test accuracy (classes 5-9)")
    ax.legend()
    cells = {n: " | ".join(f"{row[n][m]:.4f} ± {row['std'][n][m]:.4f}" for m in modes) for n in labels}
    lines = [f"| {n} | {cells[n]} |" for n in labels]
    return f"| labels per class | {' | '.join(modes)} |\n|---|{'---|' * len(modes)}\n" + "\n".join(lines)


def architectures(record: dict[str, Any], ax: plt.Axes) -> str:
    rows = record["rows"]
    names = [row["model"] for row in rows]
    ax.bar(names, [row["test_acc"] for row in rows], color="#6baed6")
    for i, row in enumerate(rows):
        ax.text(i, row["test_acc"] + 0.01, f"{row['steps']} steps", ha="center", fontsize=7)
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.set_ylabel("test accuracy (first 2,000 test images)")
    ax.set_title(f"seed architectures, {rows[0]['budget_minutes']:g} minutes of CPU training each")
    lines = ["| config | steps | epochs | test accuracy | Fashion-MNIST README |", "|---|---:|---:|---:|---|"]
    for row in rows:
        reference = row["reference"] or "not listed"
        lines.append(f"| {row['model']} | {row['steps']} | {row['epochs']} | {row['test_acc']:.4f} | {reference} |")
    return "\n".join(lines)


DRAWERS: dict[str, Callable[[dict[str, Any], plt.Axes], str]] = {
    "fast_resnet": fast_resnet,
    "distill": distill,
    "noisy_student": noisy_student,
    "transfer": transfer,
    "architectures": architectures,
}


def draw_all(results: Path, docs: Path) -> list[Path]:
    """One PNG per stored section (docs/results_<section>.png); prints each section's Markdown table."""
    written = []
    for name, draw in DRAWERS.items():
        path = results / f"{name}.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        table = draw(record, ax)
        fig.text(0.99, 0.01, machine_label(record), ha="right", fontsize=7, color="gray")
        fig.tight_layout()
        out = docs / f"results_{name}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        print(f"\n### {name} ({machine_label(record)})\n{table}")
        written.append(out)
    return written
