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
    README's k-NN section for the measured share of a LeNet-5 epoch and the trade-off of `bank_size`.

    Args:
        every_n_epochs: evaluate after every N-th validation.
        k, metric, weights, temperature: as in `KNNClassifier` (defaults follow DINO: 20, cosine, T=0.07).
        bank_size: the first N training images form the bank (None: all). The cost grows with it (a LeNet-5 epoch on
            Fashion-MNIST: about 5% at 5,000, twice that at 10,000), and so does the accuracy (about 1 point per
            doubling); `every_n_epochs` divides the cost instead.
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
        bank_size: int | None = 5000,
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
