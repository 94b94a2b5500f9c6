"""FixMatch: semi-supervised learning by consistency between a weak and a strong view (Sohn et al. 2020)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from lit_imgcls.data.protocol import DataRequest
from lit_imgcls.errors import ConfigError
from lit_imgcls.losses import softmax_with_temperature
from lit_imgcls.tasks.base import ClassificationTask


def fixmatch_unlabeled_loss(
    weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unlabeled term and its mask: mean_b 1[max_k p_bk >= threshold] * CE(strong_logits_b, argmax_k p_bk).

    p = softmax(weak_logits / temperature), without gradient: the weak view only makes the pseudo-label. The mean
    runs over the whole unlabeled batch, masked images included (as in the paper), so the term shrinks with the mask.
    """
    probs = softmax_with_temperature(weak_logits.detach().float(), temperature)
    confidence, pseudo_labels = probs.max(dim=-1)
    mask = (confidence >= threshold).to(strong_logits.dtype)
    per_image = F.cross_entropy(strong_logits, pseudo_labels, reduction="none")
    return (per_image * mask).mean(), mask


class FixMatch(ClassificationTask):
    """FixMatch (Sohn et al. 2020, "FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence").

    Loss per step, on a labeled batch (x, y) and an unlabeled batch u of `data.unlabeled_batch_ratio` (the paper's mu)
    times its size, each unlabeled image in a weak view w(u) (`data.weak_augment`) and a strong one s(u)
    (`data.strong_augment`):

        loss = CE(f(x), y) + unlabeled_weight * 1/|u| sum_b 1[max p_b >= threshold] * CE(f(s(u_b)), argmax p_b)
        p_b = softmax(f(w(u_b)) / temperature), without gradient

    The labeled, weak and strong images go through the network in one forward pass (BatchNorm sees all of them,
    as in the paper's code). Pseudo-labels are hard (argmax); the model's `label_smoothing` applies to the labeled
    term only. Logged per epoch: `train/loss` (the whole loss), `train/ce` (labeled), `train/unlabeled` (the masked
    term, unweighted) and `train/mask_rate` (the fraction of unlabeled images at or above the threshold).

    Args:
        threshold: confidence a weak view's top probability needs for its image to count (paper: 0.95).
        unlabeled_weight: weight of the unlabeled term (the paper's lambda_u: 1).
        temperature: divides the weak logits before the softmax whose maximum is compared with `threshold`; it
            changes which images pass, never the (hard) pseudo-labels. 1 is FixMatch.
        **kwargs: the network and training options every task shares (`ClassificationTask`).
    """

    data_request = DataRequest("combined")

    def __init__(
        self, threshold: float = 0.95, unlabeled_weight: float = 1.0, temperature: float = 1.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"model.threshold must be in [0, 1] (a probability; paper: 0.95), got {threshold}")
        if unlabeled_weight < 0:
            raise ConfigError(f"model.unlabeled_weight must be >= 0 (0: labels only), got {unlabeled_weight}")
        if temperature <= 0:
            raise ConfigError(f"model.temperature must be > 0 (1 is FixMatch), got {temperature}")
        self.threshold, self.unlabeled_weight, self.temperature = threshold, unlabeled_weight, temperature
        top = 1 - self.label_smoothing + self.label_smoothing / self.num_classes
        if top < threshold:
            rank_zero_warn(
                f"model.label_smoothing={self.label_smoothing} trains the labeled images towards a top probability "
                f"of {top:.3f}, below model.threshold={threshold}: few unlabeled images may pass. Set "
                "--model.init_args.label_smoothing=0 or lower the threshold"
            )
        self.track_loss_terms("ce", "unlabeled", "mask_rate")

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = batch["labeled"], batch["unlabeled"]
        n, m = len(labeled["image"]), len(unlabeled["image"])
        logits = self(torch.cat([labeled["image"], unlabeled["image"], unlabeled["image_strong"]]))
        labeled_logits, weak_logits, strong_logits = logits.split([n, m, m])
        target = labeled["target"]
        ce = self.compute_loss(labeled_logits, target)
        unlabeled_loss, mask = fixmatch_unlabeled_loss(weak_logits, strong_logits, self.threshold, self.temperature)
        loss = ce + self.unlabeled_weight * unlabeled_loss
        self.update_metrics("train", labeled_logits, target, loss)
        self.update_loss_terms(n, ce=ce)
        self.update_loss_terms(m, unlabeled=unlabeled_loss, mask_rate=mask.mean())
        self.log_step_loss(loss, n)
        return loss
