"""KNNMonitor: a callback logging the k-NN accuracy of the validation images on the training network's features."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lit_imgcls.errors import ConfigError
from lit_imgcls.neighbors import Metric, Strategy, Weights, knn_search, knn_vote
from lit_imgcls.tasks.knn import gather_bank, gather_padded, penultimate_features


def count_once(correct: torch.Tensor, index: torch.Tensor) -> tuple[int, int]:
    """(correct, images) counting each image `index` once: its first occurrence decides (sampler padding repeats)."""
    order = index.argsort(stable=True)
    first = torch.ones_like(order, dtype=torch.bool)
    first[1:] = index[order[1:]] != index[order[:-1]]
    return int(correct[order][first].sum()), int(first.sum())


class KNNMonitor(pl.Callback):
    """Logs `val/knn_acc`: k-NN accuracy of the validated images on the current backbone's features.

    The query features are the input of the network's classifier (`get_classifier()`), captured by a hook during the
    normal validation pass (checked once against `forward_head(pre_logits=True)`; if they differ, or the network has
    no such module, each batch's features are computed by a second forward). The bank (the first `bank_size`
    training images, sharded over the ranks) is one no-grad pass of `batch_size` images at a time. Under DDP each
    rank searches its own queries and the counts are gathered, each image counted once (no sampler padding).

    Cost: the bank pass (bank_size forwards) plus the search (validation images x bank_size products); see the
    KNNMonitor section of docs/knn.md for the measured share of a LeNet-5 epoch and the trade-off of `bank_size`.

    Args:
        every_n_epochs: evaluate after every N-th validation.
        k, metric, weights, temperature: as in `KNNClassifier` (defaults follow DINO: 20, cosine, T=0.07).
        bank_size: the first N training images form the bank (None: all). The cost grows with it (a LeNet-5 epoch on
            Fashion-MNIST: about 4.5% at 4,096, 5.2% at 5,000, 9.6% at 10,000), the accuracy slowly (the same within
            0.1 point from 4,096 to 5,000; +0.9 point with all 55,000); `every_n_epochs` divides the cost instead.
        strategy: exact search strategy, as in `KNNClassifier`.
        batch_size: images per forward of the bank pass.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        k: int = 20,
        metric: Metric = "cosine",
        weights: Weights = "temperature",
        temperature: float = 0.07,
        bank_size: int | None = 4096,
        strategy: Strategy = "auto",
        batch_size: int = 512,
    ) -> None:
        if every_n_epochs < 1:
            raise ConfigError(f"KNNMonitor every_n_epochs must be at least 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.k, self.metric, self.weights, self.temperature = k, metric, weights, temperature
        self.bank_size, self.strategy, self.batch_size = bank_size, strategy, batch_size
        self.hook_checked = False  # the hook's features were compared with forward_head(pre_logits=True) once
        self.use_hook = True
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._captured: list[torch.Tensor] = []
        self._queries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None

    @staticmethod
    def _net(pl_module: pl.LightningModule) -> nn.Module:
        return getattr(pl_module, "net", pl_module)

    def _due(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        penultimate_features(self._net(pl_module), type(pl_module).__name__)  # a clear error before the pass
        self._queries, self._captured = [], []
        classifier = getattr(self._net(pl_module), "get_classifier", lambda: None)()
        if self.use_hook and isinstance(classifier, nn.Module):
            self._hook = classifier.register_forward_pre_hook(lambda _, args: self._captured.append(args[0]))

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        captured, self._captured = self._captured, []
        if self._queries is None or dataloader_idx != 0:  # k-NN accuracy of the first validation loader only
            return
        images = batch["image"]
        feats = next((f.flatten(1) for f in captured if len(f) == len(images)), None)
        if feats is not None and not self.hook_checked:
            self.hook_checked = True
            self.use_hook = torch.allclose(feats.float(), self._extract(pl_module, images), rtol=1e-4, atol=1e-5)
        if feats is None or not self.use_hook:
            feats = self._extract(pl_module, images)
        target = batch["target"]
        self._queries.append((feats.float(), target.argmax(1) if target.ndim > 1 else target, batch.get("index")))

    def _extract(self, pl_module: pl.LightningModule, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), pl_module.trainer.precision_plugin.forward_context():
            return penultimate_features(self._net(pl_module))(images).float()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._queries is None:
            return
        self._remove_hook()
        queries, self._queries = self._queries, None
        pl_module.log("val/knn_acc", self.evaluate(trainer, pl_module, queries), prog_bar=True)

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hook()
        self._queries = None

    @torch.no_grad()
    def evaluate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        queries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    ) -> float:
        """k-NN accuracy (all ranks together, each image once) of the captured queries against the training bank."""
        datamodule, net = trainer.datamodule, self._net(pl_module)
        extract = penultimate_features(net, type(pl_module).__name__)
        indices = datamodule.train_indices[: self.bank_size]
        with trainer.precision_plugin.forward_context():
            bank_feats, bank_labels = gather_bank(extract, datamodule, indices, pl_module, self.batch_size)
        if queries:
            feats, labels = torch.cat([q[0] for q in queries]), torch.cat([q[1] for q in queries])
        else:
            feats, labels = bank_feats[:0], bank_labels[:0]
        dist, idx = knn_search(feats, bank_feats, self.k, self.metric, strategy=self.strategy)
        probs = knn_vote(dist, bank_labels[idx], datamodule.num_classes, self.weights, self.temperature, self.metric)
        correct = probs.argmax(1) == labels.to(probs.device)
        if trainer.world_size == 1:
            return correct.float().mean().item() if len(correct) else 0.0
        if any(q[2] is None for q in queries):
            raise RuntimeError("KNNMonitor under DDP needs an `index` in every batch to drop sampler padding")
        index = torch.cat([q[2] for q in queries]) if queries else labels
        hits, total = count_once(*gather_padded(pl_module, correct.long(), index.to(correct.device)))
        return hits / max(total, 1)
