"""Transfer learning: loading pretrained weights (head re-init, channel adaptation, clear errors), linear probe,
full fine-tuning with two learning rates, gradual unfreezing, the transfer configs and DDP, on tiny real subsets."""

import logging
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
import yaml
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from lit_imgcls.cli import main
from lit_imgcls.data import ImageDataModule
from lit_imgcls.data.tensors import select_classes
from lit_imgcls.errors import ConfigError, UserError
from lit_imgcls.models import LeNet5
from lit_imgcls.tasks import ImageClassifier
from tests.conftest import QUIET, REPO, needs_fashion_mnist, quiet_trainer, run_cli
from tests.test_cli import read_metrics

pytestmark = needs_fashion_mnist
HEAD = ("fc.weight", "fc.bias")  # LeNet-5's classifier


def backbone_state(model: ImageClassifier) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.net.state_dict().items() if k not in HEAD}


def checkpoint_net(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=False)["state_dict"]
    return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A LeNet-5 checkpoint after 4 steps on classes 0-2 (so its BatchNorm statistics are not the initial ones)."""
    pl.seed_everything(0)
    dm = ImageDataModule(classes=[0, 1, 2], train_subset=256, val_size=64, batch_size=64, augment="none")
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(ImageClassifier("lenet5", num_classes=3), dm)
    path = tmp_path_factory.mktemp("pretrained") / "classes_0-2.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def target() -> ImageDataModule:
    """Classes 3-5 (other names, same count), 128 training images."""
    return ImageDataModule(classes=[3, 4, 5], train_subset=128, val_size=64, batch_size=32, augment="none")


def transfer_model(checkpoint: Path, finetune: str, **kwargs) -> ImageClassifier:
    return ImageClassifier("lenet5", num_classes=3, pretrained_checkpoint=str(checkpoint), finetune=finetune, **kwargs)


def test_select_classes_relabels_in_the_given_order(fashion_test):
    subset = select_classes(fashion_test, [7, 2])
    targets = fashion_test.targets
    keep = (targets == 7) | (targets == 2)
    assert subset.classes == ("Sneaker", "Pullover")
    assert torch.equal(subset.images, fashion_test.images[keep])
    assert torch.equal(subset.targets, (targets[keep] == 2).long())  # 7 -> 0, 2 -> 1
    with pytest.raises(ConfigError, match="distinct class indices"):
        select_classes(fashion_test, [3, 3])


def test_linear_probe_keeps_backbone_and_batchnorm_bit_identical(pretrained, target):
    model = transfer_model(pretrained, "linear_probe")
    model.load_pretrained(("Dress", "Coat", "Sandal"))
    head_before = model.net.fc.weight.clone()
    quiet_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1).fit(model, target)
    loaded = checkpoint_net(pretrained)
    after = backbone_state(model)
    assert {k for k in after if "running_" in k}, "LeNet-5 should have BatchNorm buffers"
    for name, value in after.items():
        assert torch.equal(value, loaded[name]), name
    assert not torch.equal(model.net.fc.weight, head_before)


def test_full_uses_two_learning_rates_and_logs_them(pretrained, target, tmp_path):
    model = transfer_model(pretrained, "full", backbone_lr_scale=0.1)
    monitor = LearningRateMonitor(logging_interval="step")
    trainer = quiet_trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=CSVLogger(tmp_path),
        callbacks=[monitor],
        log_every_n_steps=1,
    )
    trainer.fit(model, target)
    head, backbone = trainer.optimizers[0].param_groups
    assert (head["name"], backbone["name"]) == ("head", "backbone")
    assert {id(p) for p in head["params"]} == {id(model.net.fc.weight), id(model.net.fc.bias)}
    assert len(backbone["params"]) == len(list(model.net.parameters())) - 2
    assert backbone["initial_lr"] == pytest.approx(0.1 * head["initial_lr"])
    assert monitor.lrs["lr-SGD/head"][0] == pytest.approx(0.05)  # default_optimizer's lr
    assert monitor.lrs["lr-SGD/backbone"][0] == pytest.approx(0.005)
    logged = read_metrics(Path(trainer.logger.log_dir))
    assert {"lr-SGD/head", "lr-SGD/backbone"} <= logged.keys()


class BackboneTrace(Callback):
    """Whether the backbone still equals the loaded weights, and its BatchNorm mode, at each epoch's end."""

    def __init__(self, loaded: dict[str, torch.Tensor]) -> None:
        self.loaded, self.unchanged, self.bn_training = loaded, [], []

    def on_train_epoch_end(self, trainer: pl.Trainer, module: ImageClassifier) -> None:
        state = backbone_state(module)
        self.unchanged.append(all(torch.equal(v, self.loaded[k]) for k, v in state.items()))
        self.bn_training.append(module.net.features[1].training)


def test_gradual_unfreezes_at_the_configured_epoch(pretrained, target, caplog):
    model = transfer_model(pretrained, "gradual", unfreeze_epoch=2)
    trace = BackboneTrace(checkpoint_net(pretrained))
    with caplog.at_level(logging.INFO):
        quiet_trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=0, callbacks=[trace]).fit(model, target)
    assert trace.unchanged == [True, True, False]
    assert trace.bn_training == [False, False, True]
    assert "epoch 2: backbone unfrozen" in caplog.text


@pytest.mark.parametrize(
    ("num_classes", "classes", "reinit"),
    [(2, None, True), (3, ("Dress", "Coat", "Sandal"), True), (3, ("T-shirt/top", "Trouser", "Pullover"), False)],
)
def test_head_reinitialised_only_when_classes_differ(pretrained, caplog, num_classes, classes, reinit):
    model = ImageClassifier("lenet5", num_classes=num_classes, pretrained_checkpoint=str(pretrained))
    fresh_head = model.net.fc.weight.clone()
    with caplog.at_level(logging.INFO):
        model.load_pretrained(classes)
    loaded = checkpoint_net(pretrained)
    for name, value in backbone_state(model).items():
        assert torch.equal(value, loaded[name]), name
    assert torch.equal(model.net.fc.weight, fresh_head if reinit else loaded["fc.weight"])
    assert caplog.text.count("re-initialised") == int(reinit)


def test_custom_head_is_reinitialised_and_trained_alone(pretrained, target):
    head = ["features.10", "features.13", "fc"]
    model = ImageClassifier("lenet5", num_classes=3, pretrained_checkpoint=str(pretrained), head=head)
    fresh = {k: v.clone() for k, v in model.net.state_dict().items()}
    model.load_pretrained(("Dress", "Coat", "Sandal"))
    loaded, state = checkpoint_net(pretrained), model.net.state_dict()
    for name, value in state.items():
        expected = fresh[name] if name.startswith(("features.10.", "features.13.", "fc.")) else loaded[name]
        assert torch.equal(value, expected), name
    model = ImageClassifier("lenet5", num_classes=3, head=head, finetune="linear_probe")
    assert [n for n, p in model.net.named_parameters() if p.requires_grad] == [
        "features.10.weight",
        "features.10.bias",
        "features.13.weight",
        "features.13.bias",
        "fc.weight",
        "fc.bias",
    ]
    with pytest.raises(ConfigError, match=r"model.head \['fc2'\] names no module of LeNet5"):
        ImageClassifier("lenet5", head=["fc2"], finetune="linear_probe")


def test_other_architecture_is_a_clear_error(pretrained, tmp_path):
    model = ImageClassifier("resnet18", num_classes=3, pretrained_checkpoint=str(pretrained))
    with pytest.raises(ConfigError, match=r"holds a lenet5 network but the model is resnet18"):
        model.load_pretrained()
    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=3).state_dict(), weights)
    lenet = ImageClassifier("lenet5", num_classes=3, pretrained_checkpoint=str(weights))
    message = r"\(a state dict of 122 tensors: conv1.weight, .*\) does not fit the model lenet5"
    with pytest.raises(ConfigError, match=message):
        lenet.load_pretrained()


def test_missing_file_is_a_clear_error(tmp_path):
    model = ImageClassifier(pretrained_checkpoint=str(tmp_path / "nowhere.pth"), finetune="linear_probe")
    with pytest.raises(UserError, match=r"nowhere.pth not found: fix the path in model.pretrained_checkpoint"):
        model.load_pretrained()


@pytest.mark.parametrize(("name", "source", "target"), [("lenet5", 3, 1), ("lenet5", 1, 3), ("resnet18", 3, 1)])
def test_stem_channels_adapted(tmp_path, fashion_test, name, source, target):
    """3-channel weights on 1-channel data (and back) give the same outputs on gray images."""
    torch.manual_seed(0)
    net = LeNet5(10, in_chans=source) if name == "lenet5" else timm.create_model(name, num_classes=10, in_chans=source)
    path = tmp_path / "weights.pth"
    torch.save(net.state_dict(), path)
    model = ImageClassifier(name, num_classes=10, in_chans=target, pretrained_checkpoint=str(path))
    model.load_pretrained()
    gray = fashion_test.images[:8].float() / 255
    with torch.no_grad():
        expected = net.eval()(gray.expand(-1, source, -1, -1))
        got = model.eval()(gray.expand(-1, target, -1, -1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_finetune_options_are_checked():
    with pytest.raises(ConfigError, match="backbone_lr_scale"):
        ImageClassifier(finetune="full", backbone_lr_scale=0)
    with pytest.raises(ConfigError, match="unfreeze_epoch"):
        ImageClassifier(finetune="gradual", unfreeze_epoch=-1)


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "transfer").glob("*.yaml")), ids=lambda p: p.stem)
def test_transfer_configs_parse(config, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-imgcls"])  # LightningCLI warns when pytest's own arguments are there
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert not exit_info.value.code
    printed = yaml.safe_load(capsys.readouterr().out)
    finetune = printed["model"]["init_args"]["finetune"]
    assert finetune == ("none" if config.stem.startswith("pretrain") else config.stem)


TINY = ["--data.train_subset=200", "--data.val_size=100", "--data.test_subset=200", "--trainer.max_epochs=2", *QUIET]


def config_datamodule(config: Path, **overrides) -> ImageDataModule:
    """The ImageDataModule a CLI run of `config` builds, with `overrides`."""
    return ImageDataModule(**{**yaml.safe_load(config.read_text())["data"], **overrides})


@pytest.mark.slow
def test_cli_linear_probe_config_and_checkpoint_without_the_pretrained_file(pretrained, tmp_path):
    config = REPO / "configs" / "transfer" / "linear_probe.yaml"
    weights = tmp_path / "pretrained.ckpt"
    weights.write_bytes(pretrained.read_bytes())
    args = [f"--model.init_args.pretrained_checkpoint={weights}", *TINY]
    fit = run_cli("fit", "--config", str(config), *args, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    reinit = "head features.10, features.13, fc re-initialised for 5 classes (Sandal, Shirt, Sneaker, Bag, Ankle boot)"
    assert reinit in fit.stderr + fit.stdout
    (run_dir,) = (tmp_path / "runs" / "transfer_linear_probe").glob("version_*")
    assert read_metrics(run_dir)["val/acc"] > 0.2  # 8 steps of a probe; chance is 0.2
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.equal(checkpoint_net(last)["features.0.weight"], checkpoint_net(pretrained)["features.0.weight"])
    weights.unlink()  # a fine-tuned checkpoint no longer needs the pretrained file, not even for another fit
    model = ImageClassifier.load_from_checkpoint(last)
    model.load_pretrained()
    assert torch.equal(model.net.fc.weight, checkpoint_net(last)["fc.weight"])


class RankWeights(Callback):
    """Saves each rank's final parameters as rank_<r>.pt in the working directory (for the DDP test)."""

    def on_train_end(self, trainer: pl.Trainer, module: ImageClassifier) -> None:
        torch.save(dict(module.net.named_parameters()), Path.cwd() / f"rank_{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_gradual_matches_one_process(pretrained, tmp_path, monkeypatch):
    """2-process gradual unfreezing: the backbone, unfrozen at epoch 1, trains in sync on both ranks (identical
    parameters at the end), and the 2-rank validation accuracy equals a 1-process validation of last.ckpt."""
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")  # for RankWeights
    config = REPO / "configs" / "transfer" / "gradual.yaml"
    data = {"train_subset": 200, "val_size": 100, "batch_size": 25}  # val 100: no DistributedSampler padding
    args = [
        f"--model.init_args.pretrained_checkpoint={pretrained}",
        "--model.init_args.unfreeze_epoch=1",
        *(f"--data.{k}={v}" for k, v in data.items()),
        "--trainer.max_epochs=2",
        *QUIET,
    ]
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    ddp.append("--trainer.callbacks+=tests.test_transfer.RankWeights")
    fit = run_cli("fit", "--config", str(config), *args, *ddp, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "transfer_gradual").glob("version_*")
    last = run_dir / "checkpoints" / "last.ckpt"
    assert not torch.equal(checkpoint_net(last)["features.0.weight"], checkpoint_net(pretrained)["features.0.weight"])
    rank0, rank1 = (torch.load(tmp_path / f"rank_{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    (single,) = quiet_trainer().validate(ImageClassifier.load_from_checkpoint(last), config_datamodule(config, **data))
    assert single["val/acc"] == read_metrics(run_dir)["val/acc"]
