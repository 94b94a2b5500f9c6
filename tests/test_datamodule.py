import lightning.pytorch as pl
import pytest
import torch

from lit_imgcls.data import ImageDataModule
from lit_imgcls.errors import ConfigError
from tests.conftest import needs_cuda, needs_fashion_mnist

pytestmark = needs_fashion_mnist


@pytest.fixture(scope="module")
def datamodule() -> ImageDataModule:
    dm = ImageDataModule(val_size=1000, batch_size=64, train_subset=2000)
    dm.setup("fit")
    return dm


def test_batches_are_uint8_then_normalized_float(datamodule):
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (64, 1, 28, 28)
    assert batch["target"].dtype == torch.int64 and batch["target"].shape == (64,)
    out = datamodule.transform_batch(batch, train=False)["image"]
    assert out.dtype == torch.float32
    expected = (batch["image"].float() / 255 - datamodule.mean[0]) / datamodule.std[0]
    torch.testing.assert_close(out, expected)


def test_statistics_are_those_of_fashion_mnist(datamodule):
    # the dataset's well-known per-pixel statistics: mean 0.2860, std 0.3530
    assert datamodule.mean[0] == pytest.approx(0.2860, abs=1e-3)
    assert datamodule.std[0] == pytest.approx(0.3530, abs=1e-3)


def test_split_is_deterministic_and_disjoint():
    a, b, c = (ImageDataModule(val_size=500, split_seed=s) for s in (1, 1, 2))
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.val_indices, b.val_indices) and torch.equal(a.train_indices, b.train_indices)
    assert not torch.equal(a.val_indices, c.val_indices)
    assert len(set(a.val_indices.tolist()) & set(a.train_indices.tolist())) == 0
    assert len(a.val_indices) + len(a.train_indices) == 60000


def test_val_fraction_and_subset():
    dm = ImageDataModule(val_fraction=0.2, train_subset=300)
    dm.setup("fit")
    assert len(dm.val_indices) == 12000 and len(dm.train_indices) == 300
    assert len(dm.train_dataloader().dataset) == 300


def test_an_epoch_serves_the_whole_training_split():
    dm = ImageDataModule(val_size=0, batch_size=256)
    dm.setup("fit")
    n = sum(len(batch["image"]) for batch in dm.train_dataloader())
    assert n == 60000 - 60000 % 256  # drop_last on the training loader


def test_training_augmentation_changes_images_and_keeps_range(datamodule):
    batch = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(0)
    augmented = datamodule.transform_batch(batch, train=True)["image"]
    plain = datamodule.transform_batch(batch, train=False)["image"]
    assert augmented.shape == plain.shape
    changed = (augmented != plain).flatten(1).any(dim=1).float().mean()
    assert changed > 0.5  # crop shift or flip hits almost every image
    low = (0 - datamodule.mean[0]) / datamodule.std[0]
    high = (1 - datamodule.mean[0]) / datamodule.std[0]
    assert augmented.min() >= low - 1e-5 and augmented.max() <= high + 1e-5


class Recorder(pl.LightningModule):
    """Stores the images each stage receives, to check where augmentation ran."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: dict[str, list] = {"train": [], "val": [], "sanity": []}

    def training_step(self, batch, batch_idx):
        self.seen["train"].append(batch)
        return self.layer(batch["image"].mean().view(1, 1)).sum()

    def validation_step(self, batch, batch_idx):
        self.seen["sanity" if self.trainer.sanity_checking else "val"].append(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_augmentation_only_during_training():
    dm = ImageDataModule(val_size=128, train_subset=128, batch_size=128)
    module = Recorder()
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(module, dm)
    raw_val = next(iter(dm.val_dataloader()))
    expected_val = dm.transform_batch(raw_val, train=False)["image"]
    for stage in ("sanity", "val"):
        assert len(module.seen[stage]) == 1
        torch.testing.assert_close(module.seen[stage][0]["image"], expected_val)
    train_batch = module.seen["train"][0]
    raw_train = dm.train_set.images[train_batch["index"]]
    plain = dm.transform_batch({"image": raw_train}, train=False)["image"]
    assert not torch.equal(train_batch["image"], plain)


def test_output_stays_on_cpu(datamodule):
    batch = next(iter(datamodule.train_dataloader()))
    assert datamodule.transform_batch(batch, train=True)["image"].device.type == "cpu"


@needs_cuda
def test_output_stays_on_cuda(datamodule):
    batch = {k: v.cuda() for k, v in next(iter(datamodule.train_dataloader())).items()}
    out = datamodule.transform_batch(batch, train=True)["image"]
    assert out.device == batch["image"].device


def test_channels_and_resize_options():
    dm = ImageDataModule(channels=3, image_size=32, val_size=10, train_subset=10)
    dm.setup("fit")
    assert dm.image_shape == (3, 32, 32) and len(dm.mean) == 3
    batch = next(iter(dm.train_dataloader()))
    assert dm.transform_batch(batch, train=True)["image"].shape == (10, 3, 32, 32)


def test_bad_options_raise_config_errors():
    with pytest.raises(ConfigError, match="val_fraction"):
        ImageDataModule(val_fraction=1.5)
    with pytest.raises(ConfigError, match="augment"):
        ImageDataModule(augment="fancy")
    with pytest.raises(ConfigError, match="train_subset"):
        ImageDataModule(train_subset=10**6).setup("fit")
    with pytest.raises(ConfigError, match="test_dir"):
        ImageDataModule(dataset="image_folder", data_dir="x")._load(train=False)


def test_image_folder_train_test_predict(image_folder, tmp_path):
    dm = ImageDataModule(
        dataset="image_folder",
        data_dir=str(image_folder),
        test_dir=str(image_folder),
        predict_dir=str(image_folder / "Trouser"),
        channels=1,
        val_size=6,
    )
    dm.setup("fit")
    dm.setup("predict")
    assert dm.classes == ("Pullover", "T-shirt-top", "Trouser") and dm.num_classes == 3
    assert len(dm.predict_set) == 20 and dm.source(0).endswith((".png", ".jpg"))
    batch = next(iter(dm.predict_dataloader()))
    assert "target" not in batch and batch["image"].shape[1:] == (1, 28, 28)
