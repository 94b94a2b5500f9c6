"""k-NN classification on pixels or learned features, and a k-NN monitor callback for any fit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from lit_imgcls.data.datasets import TensorImageDataset, collate_batch
from lit_imgcls.errors import ConfigError
from lit_imgcls.neighbors import KNNIndex, Metric, Strategy, Weights, fast_bf16_available, knn_search, knn_vote
from lit_imgcls.tasks.checkpoints import load_task_network

Extractor = Callable[[torch.Tensor], torch.Tensor]


def penultimate_features(net: nn.Module, name: str = "the network") -> Extractor:
    """The features before the classifier of a timm-style network (`forward_features` + `forward_head`)."""
    if not (hasattr(net, "forward_features") and hasattr(net, "forward_head")):
        raise ConfigError(
            f"{name} ({type(net).__name__}) cannot give features: k-NN needs a backbone with timm's "
            "forward_features/forward_head (lenet5 and timm models have them); use features=pixels or a timm model"
        )
    return lambda images: net.forward_head(net.forward_features(images), pre_logits=True).flatten(1)


@torch.no_grad()
def compute_features(
    extract: Extractor, datamodule: Any, indices: torch.Tensor, device: torch.device, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of the training-set images `indices`, without augmentation."""
    dataset = TensorImageDataset(datamodule.train_set, indices)
    feats, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_batch):
        batch = datamodule.transform_batch({k: v.to(device) for k, v in batch.items()}, train=False)
        feats.append(extract(batch["image"]).float())
        labels.append(batch["target"])
    return torch.cat(feats), torch.cat(labels)


def gather_bank(
    extract: Extractor, datamodule: Any, indices: torch.Tensor, pl_module: pl.LightningModule
) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute_features` sharded over the ranks and gathered, in the order of `indices`, on every rank.

    Rank r takes indices r, r + world, ...: no image is repeated (no sampler padding in the bank).
    """
    rank, world = pl_module.global_rank, pl_module.trainer.world_size
    feats, labels = compute_features(extract, datamodule, indices[rank::world], pl_module.device)
    if world == 1:
        return feats, labels
    pad = -(-len(indices) // world) - len(feats)  # shards differ by at most one image
    feats = torch.cat([feats, feats.new_zeros(pad, feats.shape[1])])
    labels = torch.cat([labels, labels.new_full((pad,), -1)])
    feats, labels = pl_module.all_gather(feats), pl_module.all_gather(labels)  # (world, shard, ...)
    feats, labels = feats.transpose(0, 1).reshape(-1, feats.shape[-1]), labels.transpose(0, 1).reshape(-1)
    keep = labels >= 0
    return feats[keep], labels[keep]


class KNNClassifier(pl.LightningModule):
    """k nearest neighbours in the training set, on raw pixels or on the features of a trained network.

    The reference bank (the training split) is built in one no-grad pass, and prepared once for search, when
    validate/test/predict starts.

    Args:
        num_classes: number of classes of the data.
        k: neighbours that vote.
        metric: `euclidean` or `cosine` distance.
        weights: `uniform`, `distance` (1/d, as scikit-learn) or `temperature` (exp(similarity / T), as DINO).
        temperature: T for `temperature` weights.
        features: `pixels` (the normalized images, flattened), `checkpoint` (penultimate features of a checkpoint
            of this project), or `timm` (a timm model's pooled features).
        checkpoint: path of the checkpoint for `features: checkpoint`.
        timm_model: model name for `features: timm`; `pretrained` loads timm's weights.
        bank_size: use only the first N training images as the bank (quick runs).
        chunk_size: queries per brute-force pass (bounds memory: chunk_size x 4096 scores per tile).
        search_precision: `auto` (bf16 candidate search where bf16 is fast, else fp32), `fp32` or `bf16`;
            candidates are always re-ranked exactly in float64.
        strategy: exact search `auto` (pruned: bank clustered and bounded by principal components, for a large
            high-dimensional bank where a probe predicts it pays; else brute force), `brute` or `pruned`; the
            neighbours are the same.
    """

    def __init__(
        self,
        num_classes: int = 10,
        k: int = 5,
        metric: Metric = "euclidean",
        weights: Weights = "uniform",
        temperature: float = 0.07,
        features: Literal["pixels", "checkpoint", "timm"] = "pixels",
        checkpoint: str | None = None,
        timm_model: str | None = None,
        pretrained: bool = False,
        in_chans: int = 1,
        bank_size: int | None = None,
        chunk_size: int = 1024,
        search_precision: Literal["auto", "fp32", "bf16"] = "auto",
        strategy: Strategy = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if k < 1:
            raise ConfigError(f"model.k must be at least 1, got {k}")
        self.backbone = self._build_backbone()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.bank: tuple[torch.Tensor, torch.Tensor] | None = None
        self.index: KNNIndex | None = None

    def _build_backbone(self) -> nn.Module | None:
        hp = self.hparams
        if hp.features == "pixels":
            return None
        if hp.features == "checkpoint":
            if hp.checkpoint is None:
                raise ConfigError("features=checkpoint needs model.init_args.checkpoint=PATH")
            net = load_task_network(hp.checkpoint)
            penultimate_features(net, f"the backbone of {hp.checkpoint}")
        else:
            if hp.timm_model is None:
                raise ConfigError("features=timm needs model.init_args.timm_model=NAME")
            net = timm.create_model(hp.timm_model, pretrained=hp.pretrained, in_chans=hp.in_chans, num_classes=0)
        return net.requires_grad_(False).eval()

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        if self.backbone is None:
            return images.flatten(1)
        self.backbone.eval()
        return penultimate_features(self.backbone)(images)

    def build_bank(self) -> None:
        datamodule = self.trainer.datamodule
        indices = datamodule.train_indices[: self.hparams.bank_size]
        if self.hparams.k > len(indices):
            raise ConfigError(f"model.k={self.hparams.k} is larger than the reference bank ({len(indices)} images)")
        self.bank = gather_bank(self.extract, datamodule, indices, self)
        hp = self.hparams
        bf16 = hp.search_precision == "bf16" or (hp.search_precision == "auto" and fast_bf16_available(self.device))
        self.index = KNNIndex(self.bank[0], hp.metric, bf16, hp.strategy)

    def on_validation_start(self) -> None:
        self.build_bank()

    def on_test_start(self) -> None:
        self.build_bank()

    def on_predict_start(self) -> None:
        self.build_bank()

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities (N, K) and the neighbours' bank indices (N, k)."""
        hp = self.hparams
        dist, idx = self.index.search(self.extract(images), hp.k, hp.chunk_size)
        return knn_vote(dist, self.bank[1][idx], hp.num_classes, hp.weights, hp.temperature, hp.metric), idx

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_acc.update(self.classify(batch["image"])[0], batch["target"])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Class probabilities and targets, for callbacks such as the test report."""
        probs = self.classify(batch["image"])[0]
        self.test_acc.update(probs, batch["target"])
        return {"probs": probs, "target": batch["target"]}

    def on_validation_epoch_end(self) -> None:
        self.log("val/acc", self.val_acc, prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        probs, idx = self.classify(batch["image"])
        out = {"probs": probs, "index": batch["index"], "neighbor_labels": self.bank[1][idx]}
        if "target" in batch:
            out["target"] = batch["target"]
        return out

    def configure_optimizers(self) -> None:
        return None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        raise ConfigError("KNNClassifier has nothing to train: use `lit-imgcls test` or `validate` or `predict`")


class KNNMonitor(pl.Callback):
    """Logs `val/knn_acc`: k-NN accuracy of the validation split on the current backbone's features.

    Args:
        every_n_epochs: evaluate after every N-th validation.
        k, metric, weights, temperature: as in `KNNClassifier` (defaults follow DINO: 20, cosine, T=0.07).
        bank_size: the first N training images form the bank (None: all).
        strategy: exact search strategy, as in `KNNClassifier`.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        k: int = 20,
        metric: Metric = "cosine",
        weights: Weights = "temperature",
        temperature: float = 0.07,
        bank_size: int | None = 10000,
        strategy: Strategy = "auto",
    ) -> None:
        self.every_n_epochs = every_n_epochs
        self.k, self.metric, self.weights, self.temperature = k, metric, weights, temperature
        self.bank_size, self.strategy = bank_size, strategy

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """k-NN accuracy (all ranks together) of the validation split against the training bank."""
        datamodule = trainer.datamodule
        extract = penultimate_features(getattr(pl_module, "net", pl_module), type(pl_module).__name__)
        was_training = pl_module.training
        pl_module.eval()
        bank_feats, bank_labels = gather_bank(
            extract, datamodule, datamodule.train_indices[: self.bank_size], pl_module
        )
        queries = datamodule.val_indices[trainer.global_rank :: trainer.world_size]
        feats, labels = compute_features(extract, datamodule, queries, pl_module.device)
        dist, idx = knn_search(feats, bank_feats, self.k, self.metric, strategy=self.strategy)
        probs = knn_vote(dist, bank_labels[idx], datamodule.num_classes, self.weights, self.temperature, self.metric)
        correct = (probs.argmax(1) == labels).sum().float()
        total = torch.tensor(float(len(labels)), device=pl_module.device)
        pl_module.train(was_training)
        correct, total = (
            trainer.strategy.reduce(correct, reduce_op="sum"),
            trainer.strategy.reduce(total, reduce_op="sum"),
        )
        return (correct / total.clamp_min(1)).item()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        pl_module.log("val/knn_acc", self.evaluate(trainer, pl_module), prog_bar=True)
