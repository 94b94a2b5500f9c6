"""NoisyStudent: one generation of Noisy Student training (Xie et al. 2020).

At the start of `fit` the frozen teacher (any task checkpoint of this project) labels the unlabeled set on the
clean view; the student, noised by the data's strong augmentation and the model's dropout / stochastic depth,
then learns from the labeled batches and the pseudo-labeled strong views together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_imgcls.data.protocol import DataRequest
from lit_imgcls.errors import ConfigError
from lit_imgcls.pseudo_labels import PseudoLabels, select_pseudo_labels
from lit_imgcls.tasks.base import ClassificationTask
from lit_imgcls.tasks.classifier import drop_finetune_options
from lit_imgcls.tasks.teacher import FrozenTeacher

PSEUDO_LABEL_FILE = "pseudo_labels.pt"


class NoisyStudent(ClassificationTask):
    """A student trained from scratch on labeled + teacher-pseudo-labeled data (`DataRequest("combined")`).

    Loss per step: CE(student(labeled), labels) + unlabeled_weight * CE(student(strong unlabeled view), pseudo-labels),
    both views in one forward pass (BatchNorm sees both, as in the official code); logged per epoch as `train/loss`,
    with its terms `train/ce` (labeled) and `train/pseudo` (unweighted). The unlabeled batch size is
    `data.unlabeled_batch_ratio` times the labeled one. Pseudo-labels are computed once, in `on_fit_start`, and
    written to `<log_dir>/pseudo_labels.pt` (indices into the unlabeled set with repeats, targets, confidence).

    Args:
        teacher: checkpoint of the teacher (an `ImageClassifier`, a previous `NoisyStudent`, any task with a `net`),
            loaded, checked against the data and frozen by `FrozenTeacher` when the fit starts, freed once it
            has labeled the unlabeled set.
        hard_labels: train on the teacher's argmax instead of its probabilities.
        temperature: soft labels only: softmax(teacher logits / T).
        confidence_threshold: keep unlabeled images whose top teacher probability is at least this.
        per_class: balance the pseudo-labeled set to this many images per predicted class (duplicate or drop,
            as the official code does); None keeps every image that passes the threshold.
        unlabeled_weight: weight of the pseudo-label term.
        **kwargs: the student: the network and training options every task shares (`ClassificationTask`); noise
            it with `drop_rate`, `drop_path_rate` (stochastic depth, timm models) and `data.strong_augment`.
    """

    data_request = DataRequest("combined")

    def __init__(
        self,
        teacher: str,
        hard_labels: bool = False,
        temperature: float = 1.0,
        confidence_threshold: float = 0.0,
        per_class: int | None = None,
        unlabeled_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        drop_finetune_options(kwargs, type(self).__name__)
        super().__init__(**kwargs)
        if unlabeled_weight < 0:
            raise ConfigError(f"model.unlabeled_weight must be >= 0, got {unlabeled_weight}")
        self.hard_labels, self.temperature, self.per_class = hard_labels, temperature, per_class
        self.confidence_threshold, self.unlabeled_weight = confidence_threshold, unlabeled_weight
        self.teacher = FrozenTeacher(teacher)
        self.track_loss_terms("ce", "pseudo")
        self.pseudo_labels: PseudoLabels | None = None
        # a plain attribute, not a buffer: identical on every rank already, so DDP must not broadcast it each step
        self.pseudo_targets = torch.empty(0)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.teacher.load(self.num_classes, self.in_chans, self.channels_last)
            self.teacher.check(getattr(self.trainer, "datamodule", None))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = self.trainer.datamodule
        probs = self.label_unlabeled(self.load_teacher(), datamodule.unlabeled_dataloader(train=False))
        self.teacher.release()
        self.pseudo_labels = select_pseudo_labels(
            probs, self.confidence_threshold, self.hard_labels, self.temperature, self.per_class
        )
        datamodule.select_unlabeled(self.pseudo_labels.indices)
        self.pseudo_targets = self.pseudo_labels.target_table().to(self.device)
        self.report_pseudo_labels(getattr(datamodule, "unlabeled_true_targets", None))

    def load_teacher(self) -> nn.Module:
        """The teacher network (built and checked in `setup`): frozen, in eval mode, on this module's device."""
        self.teacher.place(self.device, self.dtype)
        return self.teacher.net

    @torch.no_grad()
    def label_unlabeled(self, teacher: nn.Module, loader: torch.utils.data.DataLoader) -> torch.Tensor:
        """Teacher probabilities (N, K) for the whole unlabeled set, row i = unlabeled index i, on every rank.

        Each rank labels every `world_size`-th batch of the unshuffled loader (its shard) on the clean view; the
        shards are gathered and placed by index, so no image is counted twice and every rank ends with the same table.
        """
        rank, world = self.trainer.global_rank, self.trainer.world_size
        datamodule = self.trainer.datamodule
        indices, probs = [], []
        for i, batch in enumerate(loader):
            if i % world != rank:
                continue
            images = batch["image"].to(self.device)
            clean = datamodule.transform_batch({"image": images}, train=False)["image"]
            probs.append(teacher(clean).float().softmax(dim=-1))
            indices.append(batch["index"].to(self.device))
        total = len(datamodule.unlabeled_set)
        k = self.num_classes
        mine_idx = torch.cat(indices) if indices else torch.empty(0, dtype=torch.long, device=self.device)
        mine = torch.cat(probs) if probs else torch.empty(0, k, device=self.device)
        if world > 1:
            mine_idx, mine = self._gather_shards(mine_idx, mine)
        table = torch.full((total, k), float("nan"), device=self.device)
        table[mine_idx] = mine
        if torch.isnan(table).any():
            raise RuntimeError("some unlabeled images were not labeled by any rank")
        return table.cpu()

    def _gather_shards(self, indices: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """all_gather of ragged shards: pad to the largest with index -1, gather, drop the padding."""
        count = torch.tensor([len(indices)], device=self.device)
        longest = int(self.all_gather(count).max())
        pad = longest - len(indices)
        indices = torch.cat([indices, indices.new_full((pad,), -1)])
        probs = torch.cat([probs, probs.new_zeros(pad, probs.shape[1])])
        indices = self.all_gather(indices).flatten()
        probs = self.all_gather(probs).flatten(0, 1)
        real = indices >= 0
        return indices[real], probs[real]

    def report_pseudo_labels(self, true_targets: torch.Tensor | None) -> None:
        """Log and save (rank 0) the selection: counts per class, and pseudo-label accuracy when the truth is known."""
        labels = self.pseudo_labels
        summary: dict[str, Any] = {
            "unlabeled": labels.total,
            "kept": labels.kept,
            "rows": len(labels.indices),
            "per_class": labels.per_class_counts(self.num_classes),
        }
        if true_targets is not None and len(true_targets) == labels.total:
            summary["accuracy"] = round((labels.classes == true_targets[labels.indices]).float().mean().item(), 4)
        rank_zero_info(f"pseudo-labels: {json.dumps(summary)}")
        log_dir = self.trainer.log_dir
        if self.trainer.is_global_zero and log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            torch.save({**vars(labels), "summary": summary}, Path(log_dir) / PSEUDO_LABEL_FILE)

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = batch["labeled"], batch["unlabeled"]
        n = len(labeled["image"])
        logits = self(torch.cat([labeled["image"], unlabeled["image_strong"]]))
        target = labeled["target"]
        ce = self.compute_loss(logits[:n], target)
        pseudo = self.compute_loss(logits[n:], self.pseudo_targets[unlabeled["index"]])
        loss = ce + self.unlabeled_weight * pseudo
        self.update_metrics("train", logits[:n], target, loss)
        self.update_loss_terms(n, ce=ce)
        self.update_loss_terms(len(logits) - n, pseudo=pseudo)
        self.log_step_loss(loss, n)
        return loss
