"""FixMatch: the masked loss against a hand computation, its logged terms, learning on real data, options, DDP."""

import math

import pytest
import torch
import yaml

from lit_imgcls.cli import instantiate_from_config
from lit_imgcls.data import ImageDataModule
from lit_imgcls.errors import ConfigError
from lit_imgcls.tasks import FixMatch
from lit_imgcls.tasks.base import task_options
from lit_imgcls.tasks.fixmatch import fixmatch_unlabeled_loss
from tests.conftest import QUIET, REPO, needs_fashion_mnist, quiet_trainer, run_cli
from tests.test_cli import read_metrics

CONFIG = str(REPO / "configs" / "fixmatch" / "fashion_mnist_100.yaml")
N_VAL = 101  # odd, so DistributedSampler pads one validation image on 2 ranks
# 1,300 training images: 20 labels per class, 1,100 unlabeled (34 steps an epoch); 101 validation images
TINY_DATA = [
    "--data.train_subset=1300",
    f"--data.val_size={N_VAL}",
    "--data.labels_per_class=20",
    "--data.batch_size=16",
    "--data.unlabeled_batch_ratio=2",
    "--data.eval_batch_size=128",
]


def tiny_data(**kwargs) -> ImageDataModule:
    options = dict(train_subset=1300, val_size=N_VAL, labels_per_class=20, batch_size=16, unlabeled_batch_ratio=2)
    return ImageDataModule(**{**options, "eval_batch_size": 128, **kwargs})


def by_hand(logits: list[float], label: int) -> float:
    """Cross-entropy of one row of logits against a class index: log sum_k exp(z_k) - z_label."""
    return math.log(sum(math.exp(z) for z in logits)) - logits[label]


def test_unlabeled_loss_matches_a_hand_computation():
    weak = torch.tensor([[4.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 8.0], [2.0, 2.1, 0.0]])
    strong = torch.tensor([[1.0, 2.0, 0.0], [0.3, -1.0, 2.0], [0.5, 0.5, 0.5], [0.0, 3.0, 1.0]])
    # top weak probabilities: e^4/(e^4+2) = 0.965, 0.506, e^8/(e^8+2) = 0.9993, 0.475
    loss, mask = fixmatch_unlabeled_loss(weak, strong, threshold=0.95)
    assert mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    expected = (by_hand([1.0, 2.0, 0.0], 0) + by_hand([0.5, 0.5, 0.5], 2)) / 4  # the mean counts masked images
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    # temperature 2 flattens the weak softmax: image 1 drops to e^2/(e^2+2) = 0.787, image 3 stays at e^4/(e^4+2)
    loss, mask = fixmatch_unlabeled_loss(weak, strong, threshold=0.95, temperature=2.0)
    assert mask.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert loss.item() == pytest.approx(by_hand([0.5, 0.5, 0.5], 2) / 4, rel=1e-6)

    # the threshold is inclusive: a top probability exactly at it passes, the next float above it does not
    edge = weak.softmax(dim=-1).max(dim=-1).values[0]
    assert fixmatch_unlabeled_loss(weak[:1], strong[:1], threshold=edge.item())[1].item() == 1.0
    above = torch.nextafter(edge, torch.tensor(2.0)).item()
    assert fixmatch_unlabeled_loss(weak[:1], strong[:1], threshold=above)[1].item() == 0.0
    # threshold 0 keeps every image; 1 keeps none short of a saturated softmax
    assert fixmatch_unlabeled_loss(weak, strong, threshold=0.0)[1].sum() == 4
    assert fixmatch_unlabeled_loss(weak, strong, threshold=1.0)[1].sum() == 0


def test_no_gradient_through_the_weak_view():
    weak = torch.tensor([[5.0, 0.0], [0.0, 5.0]], requires_grad=True)
    strong = torch.tensor([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    loss, _ = fixmatch_unlabeled_loss(weak, strong, threshold=0.9)
    loss.backward()
    assert weak.grad is None and strong.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threshold": 1.5}, r"model.threshold must be in \[0, 1\].*got 1.5"),
        ({"threshold": -0.1}, r"model.threshold must be in \[0, 1\]"),
        ({"unlabeled_weight": -1.0}, "model.unlabeled_weight must be >= 0"),
        ({"temperature": 0.0}, "model.temperature must be > 0"),
    ],
)
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        FixMatch(**options)


def test_options_and_the_label_smoothing_warning():
    assert {"threshold", "unlabeled_weight", "temperature", "model", "label_smoothing"} <= task_options(FixMatch)
    assert FixMatch.data_request.train_data == "combined"
    with pytest.warns(UserWarning, match=r"top probability of 0.910, below model.threshold=0.95"):
        FixMatch(label_smoothing=0.1)


@needs_fashion_mnist
def test_logs_each_term_and_the_whole_loss(tmp_path):
    """One step, recomputed by hand from the one forward pass over labeled + weak + strong images."""
    weight, threshold, outputs, batches = 0.5, 0.12, [], []
    torch.manual_seed(0)
    task = FixMatch(threshold=threshold, unlabeled_weight=weight)
    task.net.register_forward_hook(lambda net, inputs, out: net.training and outputs.append((inputs[0], out.detach())))
    task.on_train_batch_start = lambda batch, batch_idx: batches.append(batch)
    trainer = quiet_trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(task, tiny_data())

    ((inputs, logits),), (batch,) = outputs, batches
    labeled, unlabeled = batch["labeled"], batch["unlabeled"]
    n, m = len(labeled["image"]), len(unlabeled["image"])
    assert (n, m) == (16, 32)
    torch.testing.assert_close(inputs, torch.cat([labeled["image"], unlabeled["image"], unlabeled["image_strong"]]))
    ce = torch.nn.functional.cross_entropy(logits[:n], labeled["target"])
    confidence, pseudo = logits[n : n + m].softmax(dim=-1).max(dim=-1)
    mask = (confidence >= threshold).float()
    per_image = torch.nn.functional.cross_entropy(logits[n + m :], pseudo, reduction="none")
    unlabeled_term = (mask * per_image).sum() / m
    logged = trainer.callback_metrics
    assert 0 < logged["train/mask_rate"] < 1  # the threshold splits this batch: the mask is really exercised
    torch.testing.assert_close(logged["train/mask_rate"], mask.mean())
    torch.testing.assert_close(logged["train/ce"], ce)
    torch.testing.assert_close(logged["train/unlabeled"], unlabeled_term)
    torch.testing.assert_close(logged["train/loss"], ce + weight * unlabeled_term)


@needs_fashion_mnist
def test_learns_on_real_fashion_mnist(tmp_path):
    """68 steps of LeNet-5 on 200 labels + 1,100 unlabeled images: well above chance (0.1).

    Seeds 0-3 reached val/acc 0.495-0.604 (mask rate 0.01-0.08 at threshold 0.8)."""
    torch.manual_seed(0)
    task = FixMatch(threshold=0.8)
    trainer, data = quiet_trainer(default_root_dir=tmp_path, max_epochs=2), tiny_data()
    trainer.fit(task, data)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 2 * (len(data.unlabeled_set) // 32)  # an epoch: one pass over the unlabeled set
    assert metrics["val/acc"] > 0.4
    assert 0 <= metrics["train/mask_rate"] <= 1


@needs_fashion_mnist
def test_config_instantiates(tmp_path):
    overrides = {"trainer.logger": False, "trainer.default_root_dir": str(tmp_path)}
    model, datamodule, trainer = instantiate_from_config(CONFIG, overrides)
    assert type(model) is FixMatch
    assert (model.threshold, model.unlabeled_weight, model.temperature, model.label_smoothing) == (0.95, 1.0, 1.0, 0)
    assert model.hparams.model == "lenet5" and model.channels_last
    data = datamodule.hparams
    assert (data.labels_per_class, data.val_size, data.unlabeled_batch_ratio) == (100, 1000, 7)
    assert (datamodule.options.weak_augment, datamodule.options.strong_augment) == ("basic", "strong")
    assert trainer.max_epochs == 6


@needs_fashion_mnist
@pytest.mark.slow
def test_ddp_validation_matches_one_process(tmp_path):
    """A 2-rank fit of the shipped config (LeNet-5, tiny data, its EMA callback included): its val/acc is that of its
    checkpoint validated in one process, up to the one image DistributedSampler repeats."""
    tiny = [*TINY_DATA, "--trainer.max_epochs=1", "--trainer.limit_train_batches=4"]
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    fit = run_cli("fit", "--config", CONFIG, *tiny, *ddp, *QUIET, cwd=tmp_path / "ddp")
    assert fit.returncode == 0, fit.stderr[-3000:]
    (ddp_run,) = sorted((tmp_path / "ddp" / "runs" / "fixmatch_fashion_mnist_100").glob("version_*"))
    ddp_metrics = read_metrics(ddp_run)
    assert {"train/ce", "train/unlabeled", "train/loss", "train/mask_rate"} <= ddp_metrics.keys()
    assert yaml.safe_load((ddp_run / "config.yaml").read_text())["model"]["class_path"] == "lit_imgcls.tasks.FixMatch"

    (best,) = (ddp_run / "checkpoints").glob("best-*.ckpt")
    single = run_cli("validate", "--config", CONFIG, *tiny, *QUIET, f"--ckpt_path={best}", cwd=tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    (single_run,) = sorted((tmp_path / "one" / "runs" / "fixmatch_fashion_mnist_100").glob("version_*"))
    padding = -N_VAL % 2
    # each padded duplicate can move the 2-rank accuracy by at most 1 / (N + padding)
    assert abs(ddp_metrics["val/acc"] - read_metrics(single_run)["val/acc"]) <= padding / (N_VAL + padding) + 1e-6
