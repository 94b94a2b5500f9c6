"""`instantiate_from_config`: a CLI config built in Python, as the notebooks do."""

import pytest
from jsonargparse import ArgumentError
from lightning.pytorch.loggers import CSVLogger

from lit_imgcls.cli import instantiate_from_config
from lit_imgcls.data import ImageDataModule
from lit_imgcls.errors import ConfigError
from lit_imgcls.tasks import ImageClassifier
from tests.conftest import REPO, needs_fashion_mnist

CONFIG = REPO / "configs" / "fashion_mnist" / "lenet5.yaml"


def test_builds_the_configs_classes_with_overrides(tmp_path):
    overrides = {
        "data.train_subset": 64,
        "data.augment": "none",
        "trainer.max_epochs": 3,
        "trainer.logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(tmp_path)},
        },
    }
    model, datamodule, trainer = instantiate_from_config(CONFIG, overrides)
    assert isinstance(model, ImageClassifier) and model.hparams.model == "lenet5"
    assert isinstance(datamodule, ImageDataModule)
    assert (datamodule.hparams.train_subset, datamodule.hparams.augment, datamodule.hparams.batch_size) == (
        64,
        "none",
        128,
    )
    assert trainer.max_epochs == 3
    assert isinstance(trainer.logger, CSVLogger) and trainer.logger.save_dir == str(tmp_path)
    assert instantiate_from_config(CONFIG, ["--trainer.max_epochs=2"]).trainer.max_epochs == 2


@needs_fashion_mnist
def test_the_built_experiment_fits(tmp_path):
    overrides = {
        "data.train_subset": 64,
        "data.val_size": 64,
        "data.batch_size": 32,
        "trainer.max_epochs": 1,
        "trainer.logger": False,
        "trainer.enable_checkpointing": False,
        "trainer.callbacks": [],
        "trainer.default_root_dir": str(tmp_path),
        "trainer.enable_progress_bar": False,
    }
    model, datamodule, trainer = instantiate_from_config(CONFIG, overrides)
    trainer.fit(model, datamodule)
    assert trainer.global_step == 2
    assert 0.0 <= trainer.callback_metrics["val/acc"] <= 1.0


def test_mistakes_raise_instead_of_exiting():
    with pytest.raises(ArgumentError, match="no_such_option"):
        instantiate_from_config(CONFIG, {"data.no_such_option": 1})
    with pytest.raises(ConfigError, match="val_fraction"):
        instantiate_from_config(CONFIG, {"data.val_size": None, "data.val_fraction": 2.0})
