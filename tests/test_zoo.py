"""The seed's architectures: names, small-input stems, drop options, GoogLeNet's auxiliary loss, their configs."""

import pytest
import torch
from conftest import QUIET, REPO, needs_fashion_mnist

from lit_imgcls.cli import build_cli
from lit_imgcls.errors import ConfigError
from lit_imgcls.models import create_model
from lit_imgcls.tasks import ImageClassifier

SEED_ARCHITECTURES = {
    "lenet5": "lenet5",
    "alexnet": "alexnet",
    "vgg16": "vgg16_bn",
    "googlenet": "googlenet",
    "resnet18": "resnet18",
    "densenet121": "densenet121",
    "seresnet18": "seresnet18",
    "efficientnet_b0": "efficientnet_b0",
}


@pytest.mark.parametrize("name", SEED_ARCHITECTURES.values())
@pytest.mark.parametrize(("in_chans", "size"), [(1, 28), (3, 32)])
def test_seed_architecture_forward_backward(name, in_chans, size):
    model = create_model(name, num_classes=10, in_chans=in_chans, small_input=name != "lenet5")
    out = model(torch.randn(2, in_chans, size, size))
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (2, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.get_classifier().parameters())
    features = model.forward_features(torch.randn(2, in_chans, size, size))
    width = getattr(model, "head_hidden_size", model.num_features)
    assert model.forward_head(features, pre_logits=True).flatten(1).shape[1] == width


@pytest.mark.parametrize(
    ("name", "first_layer"),
    [("resnet18", "conv1"), ("seresnet18", "conv1"), ("alexnet", "features.0"), ("googlenet", "conv1.conv")],
)
def test_small_input_stems_are_3x3_stride_1(name, first_layer):
    model = create_model(name, num_classes=10, in_chans=1, small_input=True)
    conv = model.get_submodule(first_layer)
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.in_channels == 1


def test_small_input_keeps_a_usable_map_at_28px():
    sizes = {
        name: create_model(name, 10, 1, small_input=True).eval().forward_features(torch.randn(1, 1, 28, 28)).shape[-1]
        for name in ("resnet18", "densenet121", "efficientnet_b0", "googlenet", "alexnet")
    }
    assert sizes == {"resnet18": 4, "densenet121": 3, "efficientnet_b0": 2, "googlenet": 4, "alexnet": 2}


def test_imagenet_stems_break_on_28px_without_small_input():
    with pytest.raises(RuntimeError):
        create_model("alexnet", num_classes=10, in_chans=1)(torch.randn(1, 1, 28, 28))


def test_drop_rate_and_drop_path_reach_the_models():
    resnet = create_model("resnet18", 10, 1, drop_rate=0.3, drop_path_rate=0.1)
    assert resnet.drop_rate == 0.3
    assert max(m.drop_prob for m in resnet.modules() if type(m).__name__ == "DropPath") == pytest.approx(0.1)
    assert create_model("googlenet", 10, 1, drop_rate=0.4).dropout.p == 0.4
    assert create_model("alexnet", 10, 1, drop_rate=0.1).classifier[0].p == 0.1
    assert create_model("lenet5", 10, 1, drop_rate=0.25).drop.p == 0.25
    efficientnet = create_model("efficientnet_b0", 10, 1, drop_rate=0.2, drop_path_rate=0.2)
    assert efficientnet.drop_rate == 0.2
    vgg = create_model("vgg16_bn", 10, 1, small_input=True, drop_rate=0.3)
    assert vgg.pre_logits.drop.p == 0.3


@pytest.mark.parametrize("name", ["vgg16_bn", "lenet5", "alexnet", "densenet121"])
def test_drop_path_on_a_model_without_it_is_a_clear_error(name):
    with pytest.raises(ConfigError, match=f"{name} has no option drop_path_rate"):
        create_model(name, 10, 1, drop_path_rate=0.1)


def test_drop_rate_out_of_range():
    with pytest.raises(ConfigError, match=r"drop_rate must be in \[0, 1\)"):
        create_model("resnet18", 10, 1, drop_rate=1.5)


def test_googlenet_aux_losses_count_in_training_only():
    torch.manual_seed(0)
    task = ImageClassifier("googlenet", num_classes=10, in_chans=1, small_input=True, aux_loss_weight=0.3)
    batch = {"image": torch.randn(4, 1, 28, 28), "target": torch.tensor([0, 1, 2, 3])}
    task.train()
    torch.manual_seed(1)
    loss, _ = task._shared_step(batch, "train")
    torch.manual_seed(1)
    logits, aux = task.forward_with_aux(batch["image"])
    assert len(aux) == 2
    ce = torch.nn.functional.cross_entropy
    expected = ce(logits, batch["target"]) + 0.3 * (ce(aux[0], batch["target"]) + ce(aux[1], batch["target"]))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert task.net.aux1.fc2.weight.grad.abs().sum() > 0 and task.net.aux2.fc2.weight.grad.abs().sum() > 0
    task.eval()
    with torch.no_grad():
        logits, aux = task.forward_with_aux(batch["image"])
        assert aux == [] and torch.equal(task(batch["image"]), logits)
        torch.testing.assert_close(task._shared_step(batch, "val")[0], ce(logits, batch["target"]))


def test_every_seed_architecture_has_a_config():
    configs = {path.stem for path in (REPO / "configs" / "fashion_mnist").glob("*.yaml")}
    assert set(SEED_ARCHITECTURES) <= configs


@needs_fashion_mnist
@pytest.mark.parametrize("config", SEED_ARCHITECTURES)
def test_config_fast_dev_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lit-imgcls"])
    args = ["--data.train_subset=64", "--data.val_size=64", "--data.batch_size=8", "--trainer.fast_dev_run=1"]
    config_path = REPO / "configs" / "fashion_mnist" / f"{config}.yaml"
    cli = build_cli(["fit", "--config", str(config_path), *args, *QUIET], run=True)
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert cli.model.hparams.model == SEED_ARCHITECTURES[config]
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])


def test_drop_rate_set_twice_is_a_clear_error():
    with pytest.raises(ConfigError, match="drop_rate is set twice"):
        ImageClassifier("lenet5", drop_rate=0.1, model_kwargs={"drop_rate": 0.2})
    assert ImageClassifier("lenet5", model_kwargs={"drop_rate": 0.2}).net.drop.p == 0.2
