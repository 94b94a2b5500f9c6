import copy
import threading
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from lit_imgcls.cli import evaluate_best_checkpoint
from lit_imgcls.data import ImageDataModule
from lit_imgcls.errors import ConfigError
from lit_imgcls.tasks import ImageClassifier
from tests.conftest import needs_fashion_mnist, quiet_trainer

pytestmark = needs_fashion_mnist


def test_learns_fashion_mnist_in_seconds():
    """2,000 real training images, 2 epochs: test accuracy far above the 10% of chance."""
    pl.seed_everything(0)
    dm = ImageDataModule(train_subset=2000, val_size=500, test_subset=1000, batch_size=32, augment="none")
    model = ImageClassifier("lenet5")
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(model, dm)
    assert trainer.callback_metrics["val/acc"] > 0.65
    (result,) = trainer.test(model, dm, verbose=False)
    assert result["test/acc"] > 0.65
    assert result["test/acc_top5"] > result["test/acc"]


def test_fast_resnet_with_weight_ema_learns_and_evaluates_the_average(tmp_path):
    """EMAWeightAveraging from Lightning: the checkpoint's state_dict and the tested weights are the average."""
    pl.seed_everything(0)
    dm = ImageDataModule(train_subset=2000, val_size=500, test_subset=1000, batch_size=64, augment="none")
    model = ImageClassifier("fast_resnet", channels_last=True, label_smoothing=0.1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/acc", mode="max", save_last=True)
    callbacks = [EMAWeightAveraging(decay=0.9), checkpoint]
    trainer = quiet_trainer(max_epochs=2, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(model, dm)
    best = torch.load(tmp_path / "best.ckpt", weights_only=False)  # saved mid-fit: the average and the raw weights
    average, raw = best["state_dict"], best["current_model_state"]
    assert any(not torch.equal(average[k], raw[k]) for k in average if k.startswith("net."))
    final_average = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(v, final_average[f"net.{k}"]) for k, v in model.net.state_dict().items())
    (result,) = trainer.test(model, dm, verbose=False)
    assert result["test/acc"] > 0.7
    evaluate_best_checkpoint(trainer, model, dm)  # --test_after_fit: the best checkpoint's averaged weights
    assert all(torch.equal(v, average[f"net.{k}"]) for k, v in model.net.state_dict().items())


def test_soft_targets_train_too():
    """A batch whose targets are distributions (as CutMix/MixUp produce) gives a finite loss and updates."""
    model = ImageClassifier("lenet5")
    batch = {"image": torch.randn(8, 1, 28, 28), "target": torch.softmax(torch.randn(8, 10), dim=1)}
    loss = model.compute_loss(model(batch["image"]), batch["target"])
    loss.backward()
    assert torch.isfinite(loss) and model.net.fc.weight.grad.abs().sum() > 0


def test_predict_step_returns_probabilities():
    model = ImageClassifier("lenet5").eval()
    out = model.predict_step({"image": torch.randn(4, 1, 28, 28), "index": torch.arange(4)}, 0)
    torch.testing.assert_close(out["probs"].sum(dim=1), torch.ones(4))
    assert out["index"].tolist() == [0, 1, 2, 3]


def test_default_optimizer_and_per_step_cosine():
    model = ImageClassifier("lenet5")
    dm = ImageDataModule(train_subset=256, val_size=64, batch_size=64)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0)
    trainer.fit(model, dm)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == "step" and config.scheduler.T_max == 8
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_num_classes_mismatch_is_explained():
    dm = ImageDataModule(train_subset=64, val_size=64)
    with pytest.raises(ConfigError, match=r"num_classes=5 but the dataset has 10 classes.*num_classes=10"):
        quiet_trainer(max_epochs=1).fit(ImageClassifier("lenet5", num_classes=5), dm)


def test_channel_mismatch_is_explained():
    dm = ImageDataModule(train_subset=64, val_size=64)
    with pytest.raises(ConfigError, match=r"in_chans=3 but the images have 1 channel"):
        quiet_trainer(max_epochs=1).fit(ImageClassifier("lenet5", in_chans=3), dm)


def test_checkpoint_round_trip(tmp_path):
    model = ImageClassifier("lenet5", label_smoothing=0.1)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, ImageDataModule(train_subset=64, val_size=64, batch_size=64))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.hparams.label_smoothing == 0.1
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_fit_after_validate_on_the_same_module():
    """validate runs under inference mode; the metric states it leaves must not break a later fit."""
    model = ImageClassifier("lenet5")
    dm = ImageDataModule(train_subset=128, val_size=64, batch_size=64)
    trainer = quiet_trainer(max_epochs=1)
    trainer.validate(model, dm, verbose=False)
    trainer.fit(model, dm)
    assert "val/acc" in trainer.callback_metrics


def test_deepcopy_shares_the_optimizer_factory_and_copies_the_network():
    """Weight averaging deep-copies the task: the factories (which can hold locks under CLI + DDP) are shared."""
    lock = threading.Lock()

    def sgd_with_a_lock(params, lock=lock):
        return torch.optim.SGD(params, lr=0.1)

    task = ImageClassifier("lenet5", optimizer=partial(sgd_with_a_lock, lock=lock))
    twin = copy.deepcopy(task)
    assert twin.optimizer_factory is task.optimizer_factory
    assert type(twin) is ImageClassifier and twin.hparams == task.hparams
    for original, copied in zip(task.parameters(), twin.parameters(), strict=True):
        assert copied is not original and torch.equal(copied, original)
