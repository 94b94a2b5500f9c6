"""Losses shared by every task: cross-entropy on hard or soft targets, knowledge distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy against class indices (N,) or a distribution per row (N, K).

    With smoothing e, a target distribution q becomes (1 - e) q + e / K, the same rule
    `torch.nn.functional.cross_entropy` applies to class indices:
    loss = -1/N sum_n sum_k q'_nk log softmax(logits)_nk.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if target.ndim == 1:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    if target.shape != logits.shape:
        raise ValueError(f"soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}")
    target = target.to(logits.dtype)
    if label_smoothing > 0:
        target = target * (1 - label_smoothing) + label_smoothing / logits.shape[-1]
    return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def softmax_with_temperature(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) over the last dimension: T = 1 is the plain softmax, larger T flattens it."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return F.softmax(logits / temperature, dim=-1)


def kd_kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes and averaged over the batch.

    `batchmean`: sum_n sum_k p_nk (log p_nk - log q_nk) / N, the true KL per sample (`mean` would also divide
    by the class count). The T^2 factor keeps the gradient's scale independent of T (Hinton et al. 2015).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Knowledge-distillation loss (Hinton et al. 2015):

        total = (1 - alpha) * CE(student, target) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))

    with KL in `batchmean` reduction (`kd_kl_divergence`) and CE from `soft_target_cross_entropy` (hard or soft
    targets). `alpha` in [0, 1] is the weight of the distillation term: alpha=0 is plain supervised training,
    alpha=1 pure distillation (no labels needed; `target` may then be None).

    Conventions differ between libraries: torchdistill's `KDLoss` weights CE by its `alpha` and KL by
    `beta = 1 - alpha` (so its alpha is our 1 - alpha); timm's `LogitDistillationTask` takes independent
    `task_loss_weight` and `distill_loss_weight` (or `distill = 1 - task` when only the task weight is given).
    Here w_task = 1 - alpha and w_kd = alpha, with T^2 applied inside the KD term as both of them do.
    The teacher logits are detached: no gradient reaches the teacher.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    kd = kd_kl_divergence(student_logits, teacher_logits, temperature)
    if alpha == 1.0:
        return kd
    if target is None:
        raise ValueError("distillation_loss with alpha < 1 needs targets for the cross-entropy term")
    ce = soft_target_cross_entropy(student_logits, target, label_smoothing)
    return (1 - alpha) * ce + alpha * kd
