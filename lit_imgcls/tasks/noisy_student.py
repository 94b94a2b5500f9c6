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
from lit_imgcls.tasks.checkpoints import load_task_network
from lit_imgcls.tasks.classifier import ImageClassifier

PSEUDO_LABEL_FILE = "pseudo_labels.pt"


class NoisyStudent(ImageClassifier):
    """A student trained from scratch on labeled + teacher-pseudo-labeled data (`DataRequest("combined")`).

    Loss per step: CE(student(labeled), labels) + unlabeled_weight * CE(student(strong unlabeled view), pseudo-labels),
    both views in one forward pass (BatchNorm sees both, as in the official code). The unlabeled batch size is
    `data.unlabeled_batch_ratio` times the labeled one. Pseudo-labels are computed once, in `on_fit_start`, and
    written to `<log_dir>/pseudo_labels.pt` (indices into the unlabeled set with repeats, targets, confidence).

    Args:
        teacher: checkpoint of the teacher (an `ImageClassifier`, a previous `NoisyStudent`, any task with a `net`).
        hard_labels: train on the teacher's argmax instead of its probabilities.
        temperature: soft labels only: softmax(teacher logits / T).
        confidence_threshold: keep unlabeled images whose top teacher probability is at least this.
        per_class: balance the pseudo-labeled set to this many images per predicted class (duplicate or drop,
            as the official code does); None keeps every image that passes the threshold.
        unlabeled_weight: weight of the pseudo-label term.
        label_batch_size: teacher batch size while labeling; default: the data's eval batch size.
        **kwargs: the student: every `ImageClassifier` argument; noise it with `drop_rate`, `drop_path_rate`
            (stochastic depth, timm models) and `data.strong_augment`.
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
        super().__init__(**kwargs)
        if unlabeled_weight < 0:
            raise ConfigError(f"model.unlabeled_weight must be >= 0, got {unlabeled_weight}")
        self.pseudo_labels: PseudoLabels | None = None
        # a plain attribute, not a buffer: identical on every rank already, so DDP must not broadcast it each step
        self.pseudo_targets = torch.empty(0)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = self.trainer.datamodule
        teacher = self.load_teacher()
        probs = self.label_unlabeled(teacher, datamodule.unlabeled_dataloader(train=False))
        del teacher
        hp = self.hparams
        self.pseudo_labels = select_pseudo_labels(
            probs, hp.confidence_threshold, hp.hard_labels, hp.temperature, hp.per_class
        )
        datamodule.select_unlabeled(self.pseudo_labels.indices)
        self.pseudo_targets = self.pseudo_labels.target_table().to(self.device)
        self.report_pseudo_labels(getattr(datamodule, "unlabeled_true_targets", None))

    def load_teacher(self) -> nn.Module:
        """The teacher network from its checkpoint: frozen, in eval mode, on this module's device."""
        teacher = load_task_network(self.hparams.teacher).to(self.device).eval().requires_grad_(False)
        probe = self.trainer.datamodule
        channels = probe.image_shape[0]
        classes = getattr(teacher, "num_classes", probe.num_classes)
        if classes != probe.num_classes:
            raise ConfigError(
                f"the teacher {self.hparams.teacher} predicts {classes} classes but the data has "
                f"{probe.num_classes}: use a teacher trained on this dataset"
            )
        if self.hparams.in_chans != channels:
            raise ConfigError(f"model.in_chans={self.hparams.in_chans} but the images have {channels} channel(s)")
        return teacher

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
        k = self.hparams.num_classes
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
            "per_class": labels.per_class_counts(self.hparams.num_classes),
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
        supervised = self.compute_loss(logits[:n], target)
        pseudo = self.compute_loss(logits[n:], self.pseudo_targets[unlabeled["index"]])
        loss = supervised + self.hparams.unlabeled_weight * pseudo
        self.stage_metrics("train").update(logits[:n], target if target.ndim == 1 else target.argmax(dim=-1))
        self.stage_loss("train").update(loss.detach(), weight=len(logits))
        return loss
