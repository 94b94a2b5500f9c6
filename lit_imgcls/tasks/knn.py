"""k-NN classification on pixels or learned features, and a k-NN monitor callback for any fit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import timm
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lit_imgcls.errors import ConfigError
from lit_imgcls.neighbors import KNNIndex, Metric, Strategy, Weights, knn_vote
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
    """Features and labels of the training-set images `indices`, without augmentation, `batch_size` at a time."""
    data = datamodule.train_set
    feats = []
    for part in indices.split(batch_size):
        images = datamodule.transform_batch({"image": data.images[part].to(device)}, train=False)["image"]
        feats.append(extract(images).float())
    labels = data.targets[indices].to(device)
    return (torch.cat(feats) if feats else torch.empty(0, 0, device=device)), labels


def gather_padded(pl_module: pl.LightningModule, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's 1-D `tensors` (of equal length on a rank, different across ranks) concatenated, on every rank."""
    length = torch.tensor(len(tensors[0]), device=pl_module.device)
    longest = int(pl_module.all_gather(length).max())
    mask = torch.arange(longest, device=pl_module.device) < length
    mask = pl_module.all_gather(mask).flatten()
    padded = [torch.cat([t, t.new_zeros(longest - len(t))]) for t in tensors]
    return [pl_module.all_gather(t).flatten()[mask] for t in padded]


def gather_bank(
    extract: Extractor, datamodule: Any, indices: torch.Tensor, pl_module: pl.LightningModule, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute_features` sharded over the ranks and gathered, in the order of `indices`, on every rank.

    Rank r takes indices r, r + world, ...: no image is repeated (no sampler padding in the bank).
    """
    rank, world = pl_module.global_rank, pl_module.trainer.world_size
    feats, labels = compute_features(extract, datamodule, indices[rank::world], pl_module.device, batch_size)
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
        search_precision: `fp32` or `bf16` bounds for the candidate search; candidates are always re-ranked
            exactly in float64. bf16 products are cheaper on AMX CPUs and GPUs, but their rounding margin leaves
            1-4% of the pairs to re-rank: 5x (84-d) and 13x (512-d) slower than fp32 on an AMX CPU (docs/knn.md).
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
        search_precision: Literal["fp32", "bf16"] = "fp32",
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
        self.index = KNNIndex(self.bank[0], hp.metric, hp.search_precision == "bf16", hp.strategy)

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
