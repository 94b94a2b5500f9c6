"""Pseudo-labels from teacher probabilities: confidence threshold, soft or hard targets, per-class balancing.

Pure functions on tensors, so the selection is tested on hand-built teacher outputs and is identical on every
DDP rank given identical probabilities. Balancing follows the official Noisy Student code (`filter_unlabel.py`):
images are grouped by the teacher's predicted class; a class with more confident images than the target keeps its
most confident ones, a class with fewer duplicates them until it reaches the target. The official code draws the
fractional copy at random; here the extra copies go to the most confident images, so the result is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_imgcls.errors import ConfigError, UserError


@dataclass
class PseudoLabels:
    """Selected unlabeled images and their targets.

    indices: (M,) indices into the unlabeled set, repeats allowed (balancing by duplication), sorted.
    targets: (M,) class indices (hard) or (M, K) distributions (soft), row i belongs to `indices[i]`.
    classes: (M,) the teacher's predicted class of each row.
    confidence: (M,) the teacher's top probability (at temperature 1) of each row.
    kept: number of distinct unlabeled images that passed the threshold and the balancing.
    total: size of the unlabeled set that was labeled.
    """

    indices: torch.Tensor
    targets: torch.Tensor
    classes: torch.Tensor
    confidence: torch.Tensor
    kept: int
    total: int

    def per_class_counts(self, num_classes: int) -> list[int]:
        """Rows per predicted class (after balancing)."""
        return torch.bincount(self.classes, minlength=num_classes).tolist()

    def target_table(self, size: int | None = None) -> torch.Tensor:
        """Targets laid out by unlabeled index (rows of unselected images are zero), for lookup by `batch["index"]`."""
        size = self.total if size is None else size
        table = self.targets.new_zeros((size, *self.targets.shape[1:]))
        table[self.indices] = self.targets
        return table


def soften(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) computed from probabilities: softmax(log(p) / T) (log-softmax is logits up to a shift)."""
    if temperature <= 0:
        raise ConfigError(f"pseudo-label temperature must be positive, got {temperature}")
    if temperature == 1.0:
        return probs
    return torch.softmax(probs.clamp_min(1e-12).log() / temperature, dim=-1)


def balance_counts(classes: torch.Tensor, confidence: torch.Tensor, per_class: int, num_classes: int) -> torch.Tensor:
    """Indices into `classes` with repeats so that each predicted class present has exactly `per_class` rows.

    Per class, candidates are ordered by decreasing confidence (ties by position); more than `per_class` keeps the
    first `per_class`, fewer repeats each `per_class // n` times and the first `per_class % n` once more.
    Classes without candidates stay empty.
    """
    if per_class < 1:
        raise ConfigError(f"pseudo-label per_class must be a positive count, got {per_class}")
    picks = []
    for c in range(num_classes):
        members = (classes == c).nonzero().flatten()
        if len(members) == 0:
            continue
        order = torch.sort(confidence[members], descending=True, stable=True).indices
        members = members[order]
        if len(members) >= per_class:
            picks.append(members[:per_class])
        else:
            copies, extra = divmod(per_class, len(members))
            picks.append(torch.cat([members.repeat(copies), members[:extra]]))
    return torch.cat(picks)


def select_pseudo_labels(
    probs: torch.Tensor,
    threshold: float = 0.0,
    hard: bool = False,
    temperature: float = 1.0,
    per_class: int | None = None,
) -> PseudoLabels:
    """Pseudo-labels from teacher probabilities `probs` (N, K) over the unlabeled set (row i = unlabeled index i).

    Args:
        probs: the teacher's softmax outputs on the clean view.
        threshold: keep images whose top probability is >= threshold (0 keeps all; the official code uses 0.3).
        hard: one-hot class indices (argmax) instead of the teacher's distribution.
        temperature: soft labels only: soften (T > 1) or sharpen (T < 1) the distribution.
        per_class: balance to exactly this many rows per predicted class (duplicate or drop); None keeps all.
    """
    if probs.ndim != 2:
        raise ValueError(f"teacher probabilities must be (N, K), got shape {tuple(probs.shape)}")
    total, num_classes = probs.shape
    if total == 0:
        raise UserError(
            "the unlabeled set is empty: nothing to pseudo-label (check data.labels_per_class / data.unlabeled_dir)"
        )
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"pseudo-label threshold must be in [0, 1], got {threshold}")
    if hard and temperature != 1.0:
        raise ConfigError("a temperature only applies to soft pseudo-labels: set temperature=1 or hard=false")
    probs = probs.float()
    confidence, classes = probs.max(dim=-1)
    keep = (confidence >= threshold).nonzero().flatten()
    if len(keep) == 0:
        raise UserError(
            f"the confidence threshold {threshold} keeps none of the {total} unlabeled images (highest teacher "
            f"confidence {confidence.max().item():.3f}): lower the threshold"
        )
    if per_class is not None:
        keep = keep[balance_counts(classes[keep], confidence[keep], per_class, num_classes)]
    indices = keep.sort(stable=True).values
    targets = classes[indices] if hard else soften(probs[indices], temperature)
    return PseudoLabels(
        indices=indices,
        targets=targets,
        classes=classes[indices],
        confidence=confidence[indices],
        kept=len(indices.unique()),
        total=total,
    )
