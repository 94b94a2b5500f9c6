"""The batch pipeline object, its one options dataclass (flat `data.*` keys) and the task <-> data protocol."""

import re
from dataclasses import fields
from pathlib import Path

import kornia.augmentation as K
import pytest
import torch
from lightning.pytorch.cli import LightningArgumentParser

import lit_imgcls.data.datamodule as datamodule_module
from lit_imgcls.data import ImageDataModule
from lit_imgcls.data.pipeline import BatchPipeline, PipelineOptions
from lit_imgcls.data.protocol import DataRequest, TaskData
from lit_imgcls.errors import ConfigError
from tests.conftest import REPO, needs_cuda, needs_fashion_mnist

TINY_DM = dict(val_size=64, train_subset=64, batch_size=32, mean=[0.286], std=[0.353])
# `datamodule_hyper_parameters` of a checkpoint written before the pipeline object existed (every flat key)
OLD_HPARAMS = dict(
    dataset="fashion_mnist", data_dir="data", test_dir=None, predict_dir=None, image_size=None, channels=None,
    val_fraction=0.1, val_size=5000, train_subset=None, test_subset=None, classes=None, batch_size=128,
    eval_batch_size=None, num_workers=0, augment="strong", crop_padding=2, hflip=False, randaugment_n=1,
    randaugment_m=5, same_on_batch=False, cutmix_alpha=1.0, mixup_alpha=0.0, mix_prob=0.5, switch_prob=0.5,
    mix_label_smoothing=0.1, weak_augment="basic", strong_augment="strong", mean=None, std=None, download=True,
    skip_corrupt=False, split_seed=42, labels_per_class=None, labeled_fraction=None, unlabeled_dir=None,
    unlabeled_batch_ratio=1.0, _class_path="lit_imgcls.data.ImageDataModule",
)  # fmt: skip
OPTION_NAMES = [f.name for f in fields(PipelineOptions)]


def protocol_members() -> set[str]:
    """The attributes and methods `TaskData` declares."""
    return {name for name in {*TaskData.__annotations__, *vars(TaskData)} if not name.startswith("_")}


def test_every_option_is_a_flat_data_key_with_its_default_and_documentation(capsys):
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(ImageDataModule, "data")
    defaults = parser.get_defaults().data
    for option in fields(PipelineOptions):
        assert defaults[option.name] == option.default, option.name
    ops = "[{class_path: kornia.augmentation.RandomRotation, init_args: {degrees: 15}}]"
    config = parser.parse_args(["--data.cutmix_alpha=1.0", "--data.hflip=false", f"--data.augment_ops={ops}"])
    dm = parser.instantiate(config).data
    assert dm.options.cutmix_alpha == 1.0 and dm.options.hflip is False
    assert [type(op) for op in dm.options.augment_ops] == [K.RandomRotation]
    parser.print_help()
    assert "zero padding before the random crop" in capsys.readouterr().out  # the dataclass's docstring


def test_options_are_saved_flat_and_an_old_checkpoints_hyperparameters_rebuild_the_module():
    saved = ImageDataModule(cutmix_alpha=1.0).hparams
    assert set(OPTION_NAMES) - set(saved) == {"augment_ops"}  # defaults included; Kornia modules are not values
    assert saved["cutmix_alpha"] == 1.0 and saved["crop_padding"] == 4
    dm = ImageDataModule(**{k: v for k, v in OLD_HPARAMS.items() if not k.startswith("_")})
    assert (dm.options.augment, dm.options.crop_padding, dm.options.mix_label_smoothing) == ("strong", 2, 0.1)
    assert dm.hparams["val_size"] == 5000 and dm.mix_label_smoothing == 0.1
    assert set(OPTION_NAMES) - {"augment_ops"} <= set(OLD_HPARAMS)


def test_a_misspelt_option_names_the_options():
    with pytest.raises(ConfigError, match=r"augmnet.*augment, augment_ops, crop_padding"):
        ImageDataModule(augmnet="strong")


def uint8_batch(n: int = 16, channels: int = 1, size: int = 8, classes: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8)
    return {"image": images, "target": torch.randint(classes, (n,)), "index": torch.arange(n)}


def test_pipeline_serves_each_request_its_views():
    pipeline = BatchPipeline(PipelineOptions(cutmix_alpha=1.0, mix_label_smoothing=0.1), (1, 8, 8), 4, [0.5], [0.25])
    batch = uint8_batch()
    plain = (batch["image"].float() / 255 - 0.5) / 0.25
    evaluated = pipeline.eval_batch(batch)
    torch.testing.assert_close(evaluated["image"], plain)
    assert torch.equal(evaluated["target"], batch["target"])  # evaluation never mixes
    labeled = pipeline.train_batch(batch, DataRequest())
    assert labeled["target"].shape == (16, 4) and "image_clean" not in labeled
    torch.testing.assert_close(labeled["target"].sum(dim=1), torch.ones(16))
    assert labeled["target"].min() >= 0.1 / 4 - 1e-6  # smoothing folded in
    unlabeled = {"image": batch["image"], "index": batch["index"]}
    combined = pipeline.train_batch({"labeled": batch, "unlabeled": unlabeled}, DataRequest("combined"))
    assert set(combined["unlabeled"]) == {"image", "image_strong", "index"}
    assert combined["labeled"]["image"].dtype == combined["unlabeled"]["image_strong"].dtype == torch.float32
    assert set(pipeline.train_batch(unlabeled, DataRequest("unlabeled"))) == {"image", "image_strong", "index"}


def test_the_clean_view_is_the_evaluation_view_of_the_same_images():
    pipeline = BatchPipeline(PipelineOptions(augment="standard"), (3, 8, 8), 4, [0.5] * 3, [0.25] * 3)
    batch = uint8_batch(channels=3)
    out = pipeline.train_batch(batch, DataRequest(clean_view=True))
    torch.testing.assert_close(out["image_clean"], pipeline.eval_batch(batch)["image"])
    assert not torch.equal(out["image"], out["image_clean"])


def test_mean_and_std_need_one_value_per_channel():
    with pytest.raises(ConfigError, match="3 values, one per channel"):
        BatchPipeline(PipelineOptions(), (3, 8, 8), 4, [0.5], [0.25])


@needs_cuda
def test_pipeline_follows_the_batch_between_devices():
    pipeline = BatchPipeline(PipelineOptions(augment="strong", mixup_alpha=1.0), (1, 8, 8), 4, [0.5], [0.25])
    for device in ("cuda", "cpu", "cuda"):
        batch = {k: v.to(device) for k, v in uint8_batch().items()}
        out = pipeline.train_batch(batch, DataRequest())
        assert out["image"].device == out["target"].device == batch["image"].device
        views = pipeline.unlabeled_batch(batch)
        assert views["image"].device == views["image_strong"].device == batch["image"].device


@needs_fashion_mnist
def test_image_datamodule_provides_every_member_of_the_task_protocol():
    dm = ImageDataModule(labels_per_class=2, **TINY_DM)
    dm.setup("fit")
    members = protocol_members()
    assert {"transform_batch", "select_unlabeled", "unlabeled_dataloader", "mix_label_smoothing"} <= members
    for name in members:
        assert hasattr(dm, name), name


def test_tasks_use_only_the_protocol_and_the_datamodule_reads_only_the_request():
    used: set[str] = set()
    for path in (REPO / "lit_imgcls" / "tasks").glob("*.py"):
        source = path.read_text()
        used |= set(re.findall(r"datamodule\.(\w+)", source))
        used |= set(re.findall(r"(?:getattr|hasattr)\(datamodule, \"(\w+)\"", source))
    assert used and used <= protocol_members(), used - protocol_members()
    source = Path(datamodule_module.__file__).read_text()
    assert re.findall(r"lightning_module\b.*", source) == ["lightning_module if self.trainer is not None else None)"]
    assert "data_request(" in source


@needs_fashion_mnist
@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_true_precision_fit_gets_images_in_the_model_dtype(precision):
    """The float images are made after Lightning's input conversion; the DataModule converts them once more."""
    from lit_imgcls.tasks import ImageClassifier
    from tests.conftest import quiet_trainer

    dtype = {"64-true": torch.float64, "bf16-true": torch.bfloat16}[precision]
    seen = []

    class Probe(ImageClassifier):
        def training_step(self, batch, batch_idx):
            seen.append(batch["image"].dtype)
            return super().training_step(batch, batch_idx)

    model = Probe(model="lenet5", num_classes=10, in_chans=1)
    data = ImageDataModule(train_subset=128, val_size=64, test_subset=64, batch_size=64, augment="basic")
    trainer = quiet_trainer(precision=precision, max_steps=2, limit_val_batches=1, num_sanity_val_steps=1)
    trainer.fit(model, data)
    assert seen == [dtype, dtype]
    assert torch.isfinite(trainer.callback_metrics["train/loss"]).item()
