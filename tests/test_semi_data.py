"""Labeled / unlabeled data: class-balanced splits, unlabeled folders, loaders chosen by the task."""

import lightning.pytorch as pl
import pytest
import torch

from lit_imgcls.data import ImageDataModule
from lit_imgcls.data.protocol import DataRequest
from lit_imgcls.data.semi import UNKNOWN_TARGET
from lit_imgcls.errors import ConfigError
from tests.conftest import needs_fashion_mnist, write_image_folder

pytestmark = needs_fashion_mnist
SMALL = {"val_size": 500, "train_subset": 2000, "batch_size": 32}


@pytest.fixture(scope="module")
def split_dm() -> ImageDataModule:
    dm = ImageDataModule(labels_per_class=20, **SMALL)
    dm.setup("fit")
    return dm


def test_labels_per_class_is_balanced_disjoint_and_seeded(split_dm):
    labeled, unlabeled = split_dm.train_indices, split_dm.unlabeled_indices
    targets = split_dm.train_set.targets
    assert torch.equal(torch.bincount(targets[labeled], minlength=10), torch.full((10,), 20))
    assert len(set(labeled.tolist()) & set(unlabeled.tolist())) == 0
    assert len(labeled) + len(unlabeled) == 2000
    assert len(split_dm.unlabeled_set) == 1800 and split_dm.unlabeled_set.targets is None
    torch.testing.assert_close(split_dm.unlabeled_set.images, split_dm.train_set.images[unlabeled])
    assert torch.equal(split_dm.unlabeled_true_targets, targets[unlabeled])  # hidden labels, for diagnostics only
    again, other = (ImageDataModule(labels_per_class=20, split_seed=s, **SMALL) for s in (42, 7))
    again.setup("fit")
    other.setup("fit")
    assert torch.equal(again.train_indices, labeled)
    assert not torch.equal(other.train_indices, labeled)


def test_labeled_fraction_keeps_each_class_share():
    dm = ImageDataModule(labeled_fraction=0.1, **SMALL)
    dm.setup("fit")
    pool = torch.cat([dm.train_indices, dm.unlabeled_indices])
    per_class = torch.bincount(dm.train_set.targets[pool], minlength=10)
    labeled = torch.bincount(dm.train_set.targets[dm.train_indices], minlength=10)
    assert torch.equal(labeled, (per_class * 0.1).round().long())


def test_unlabeled_batches_have_views_and_no_target(split_dm):
    dm = ImageDataModule(labels_per_class=20, unlabeled_batch_ratio=2.5, **SMALL)
    dm.setup("fit")
    batch = next(iter(dm.unlabeled_dataloader(train=True)))
    assert "target" not in batch and len(batch["image"]) == 80  # round(2.5 * 32)
    assert torch.equal(batch["image"], dm.unlabeled_set.images[batch["index"]])
    views = dm.pipeline.unlabeled_batch(batch)
    assert "target" not in views and views["image"].dtype == views["image_strong"].dtype == torch.float32
    ordered = [b["index"] for b in dm.unlabeled_dataloader(train=False)]
    assert torch.equal(torch.cat(ordered), torch.arange(1800))  # labeling pass: everything, in order


def test_default_unlabeled_set_is_the_training_split_without_labels():
    dm = ImageDataModule(**SMALL)
    dm.setup("fit")
    assert torch.equal(dm.unlabeled_set.images, dm.train_set.images[dm.train_indices])
    assert len(dm.train_indices) == 2000  # the labeled loader is unchanged


def test_select_unlabeled_restricts_repeats_and_resets(split_dm):
    picks = torch.tensor([3, 3, 3, 5] * 16)
    split_dm.select_unlabeled(picks)
    seen = torch.cat([b["index"] for b in split_dm.unlabeled_dataloader(train=True)])
    assert sorted(seen.tolist()) == sorted(picks.tolist())
    split_dm.select_unlabeled(None)
    assert len(split_dm.unlabeled_dataloader(train=True).dataset) == 1800
    with pytest.raises(ValueError, match=r"0\.\.1799"):
        split_dm.select_unlabeled(torch.tensor([1800]))


def test_unlabeled_folder_is_added_and_conformed(tmp_path, fashion_test):
    folder = write_image_folder(tmp_path / "extra", fashion_test, per_class=4, classes=2)
    only = ImageDataModule(unlabeled_dir=str(folder), **SMALL)
    only.setup("fit")
    assert len(only.unlabeled_set) == 8 and only.unlabeled_set.images.shape[1:] == (1, 28, 28)
    assert (only.unlabeled_true_targets == UNKNOWN_TARGET).all()
    both = ImageDataModule(labels_per_class=20, unlabeled_dir=str(folder), channels=3, **SMALL)
    both.setup("fit")
    assert len(both.unlabeled_set) == 1808 and both.unlabeled_set.images.shape[1:] == (3, 28, 28)
    assert (both.unlabeled_true_targets[:1800] >= 0).all() and (both.unlabeled_true_targets[1800:] == -1).all()


def test_bad_semi_options_raise_config_errors():
    with pytest.raises(ConfigError, match="keep one"):
        ImageDataModule(labels_per_class=10, labeled_fraction=0.1)
    with pytest.raises(ConfigError, match="labeled_fraction"):
        ImageDataModule(labeled_fraction=1.5)
    with pytest.raises(ConfigError, match="unlabeled_batch_ratio"):
        ImageDataModule(unlabeled_batch_ratio=0)
    too_many = ImageDataModule(labels_per_class=500, val_size=100, train_subset=1000)
    with pytest.raises(ConfigError, match="only"):
        too_many.setup("fit")


class Recorder(pl.LightningModule):
    """Records the training batches it receives; asks for its data with `data_request`, as a task does."""

    def __init__(self, data_request: object = None) -> None:
        super().__init__()
        self.data_request = data_request
        self.layer = torch.nn.Linear(1, 1)
        self.batches: list = []

    def training_step(self, batch, batch_idx):
        self.batches.append(batch)
        return self.layer(torch.ones(1)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit_recorder(dm: ImageDataModule, module: Recorder, batches: int = 2) -> list:
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    return module.batches


def test_the_task_chooses_the_training_loader():
    dm = ImageDataModule(labels_per_class=10, augment="none", **SMALL)
    labeled = fit_recorder(dm, Recorder(DataRequest("labeled", clean_view=True)), batches=10)
    assert len(labeled) == 3  # 100 labeled images, batch 32, drop_last
    assert labeled[0]["target"].shape == (32,) and "image_clean" in labeled[0]
    torch.testing.assert_close(labeled[0]["image_clean"], labeled[0]["image"])  # augment=none: views agree

    (unlabeled, *_) = fit_recorder(dm, Recorder(DataRequest("unlabeled")))
    assert set(unlabeled) == {"image", "image_strong", "index"} and unlabeled["image"].dtype == torch.float32

    combined = fit_recorder(dm, Recorder(DataRequest("combined")), batches=5)
    assert len(combined) == 5  # max_size_cycle: the unlabeled loader sets the epoch length, labeled batches cycle
    assert set(combined[0]) == {"labeled", "unlabeled"}
    assert "target" in combined[0]["labeled"] and "image_clean" not in combined[0]["labeled"]
    assert "target" not in combined[0]["unlabeled"] and "image_strong" in combined[0]["unlabeled"]


def test_a_task_without_a_request_gets_labeled_batches():
    (batch, *_) = fit_recorder(ImageDataModule(**SMALL), Recorder())
    assert set(batch) == {"image", "target", "index"} and batch["target"].shape == (32,)


def test_a_bad_request_is_a_config_error():
    with pytest.raises(ConfigError, match="train_data='pseudo': choose one of labeled, unlabeled, combined"):
        DataRequest("pseudo")
    with pytest.raises(ConfigError, match=r"must be a lit_imgcls\.data\.protocol\.DataRequest"):
        fit_recorder(ImageDataModule(**SMALL), Recorder("combined"))
    mixing = ImageDataModule(cutmix_alpha=1.0, labels_per_class=10, **SMALL)
    with pytest.raises(ConfigError, match="clean view is not mixed"):
        fit_recorder(mixing, Recorder(DataRequest("combined", clean_view=True)))
