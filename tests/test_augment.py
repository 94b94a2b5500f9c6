"""The augmentation suite: presets, Kornia op lists, per-image randomness, CutMix/MixUp soft targets, views, CLI."""

import cv2
import kornia.augmentation as K
import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lit_imgcls.data import ImageDataModule
from lit_imgcls.data.augment import apply_op, policy_ops
from lit_imgcls.data.mix import BatchMix
from lit_imgcls.data.pipeline import AUGMENT_PRESETS, PipelineOptions, build_train_augmentation
from lit_imgcls.errors import ConfigError
from lit_imgcls.losses import soft_target_cross_entropy
from lit_imgcls.tasks import ImageClassifier
from tests.conftest import QUIET, REPO, needs_cuda, needs_fashion_mnist, run_cli
from tests.test_cli import read_metrics
from tests.test_datamodule import Recorder

STRONG = str(REPO / "configs" / "fashion_mnist" / "strong.yaml")
TINY_DM = dict(val_size=64, train_subset=64, batch_size=32, mean=[0.286], std=[0.353])


@pytest.fixture(scope="module")
def gray(fashion_test) -> torch.Tensor:
    """32 real Fashion-MNIST images as float (32, 1, 28, 28) in [0, 1]."""
    return fashion_test.images[:32].float() / 255


def colored(gray: torch.Tensor) -> torch.Tensor:
    """A 3-channel version with unequal channels."""
    return gray.expand(-1, 3, -1, -1) * torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)


def check_output(out: torch.Tensor, images: torch.Tensor) -> float:
    """Assert shape, dtype, device and [0, 1] range are kept; return the share of images that changed."""
    assert out.shape == images.shape and out.dtype == images.dtype and out.device == images.device
    assert out.min() >= 0 and out.max() <= 1
    return (out - images).abs().flatten(1).amax(dim=1).gt(1e-4).float().mean().item()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("preset", AUGMENT_PRESETS)
def test_presets_keep_shape_dtype_device_range_and_change_images(preset, channels, gray):
    images = gray if channels == 1 else colored(gray)
    torch.manual_seed(0)
    changed = check_output(build_train_augmentation(preset, (28, 28))(images), images)
    assert changed == 0.0 if preset == "none" else changed > 0.5


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("op", policy_ops(0.9)[1:], ids=lambda op: type(op).__name__)
def test_every_randaugment_op_keeps_range_and_changes_images(op, channels, gray):
    images = gray * 0.7 + 0.1  # mid-range, so autocontrast, equalize and solarize all have work to do
    images = images if channels == 1 else colored(images)
    torch.manual_seed(0)
    changed = check_output(apply_op(op, images), images)
    if isinstance(op, K.RandomSaturation) and channels == 1:
        assert changed == 0.0  # saturation is a no-op on gray images (run on 3 equal channels)
    else:
        assert changed > 0.5


def test_kornia_policies_run_on_one_channel_through_the_pipeline(gray):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"\(\*, 3, H, W\)"):  # the pitfall: Kornia alone refuses 1 channel
        for _ in range(50):
            K.auto.RandAugment(n=2, m=10)(gray)
    ops = [K.auto.RandAugment(n=2, m=10), K.auto.TrivialAugment(), K.ColorJiggle(0.2, 0.2, 0.2, 0.1, p=1)]
    pipeline = build_train_augmentation("none", (28, 28), ops=ops)
    for _ in range(3):
        check_output(pipeline(gray), gray)


def test_presets_and_op_lists_combine(gray):
    extra = K.RandomVerticalFlip(p=1.0)
    pipeline = build_train_augmentation("basic", (28, 28), ops=[extra])
    assert [type(op) for op in pipeline] == [K.RandomCrop, K.RandomHorizontalFlip, K.RandomVerticalFlip]
    torch.manual_seed(0)
    flipped = build_train_augmentation("none", (28, 28), ops=[extra])(gray)
    torch.testing.assert_close(flipped, gray.flip(-2))


def test_photometric_ops_saturate_instead_of_wrapping():
    bright = K.RandomBrightness((1.4, 1.4), p=1.0)
    out = build_train_augmentation("none", (4, 4), ops=[bright])(torch.full((2, 1, 4, 4), 0.98))
    torch.testing.assert_close(out, torch.ones_like(out))
    dm = ImageDataModule(augment="none", augment_ops=[bright], **TINY_DM)
    dm.setup("fit")
    uint8 = {"image": torch.full((2, 1, 28, 28), 250, dtype=torch.uint8), "target": torch.zeros(2, dtype=torch.long)}
    expected = dm.transform_batch({"image": torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)}, train=False)
    torch.testing.assert_close(dm.transform_batch(uint8, train=True)["image"], expected["image"])


@pytest.mark.parametrize("preset", [p for p in AUGMENT_PRESETS if p != "none"])
def test_randomness_is_per_image_unless_same_on_batch(preset, gray):
    copies = gray[:1].expand(16, -1, -1, -1) * 0.7 + 0.1
    torch.manual_seed(0)
    out = build_train_augmentation(preset, (28, 28))(copies)
    assert len({tuple(row.flatten().tolist()) for row in out}) > 4
    same = build_train_augmentation(preset, (28, 28), PipelineOptions(same_on_batch=True))
    for seed in range(3):
        torch.manual_seed(seed)
        out = same(copies)
        torch.testing.assert_close(out, out[:1].expand_as(out))


def test_bad_options_name_the_fix():
    with pytest.raises(ConfigError, match="choose one of"):
        build_train_augmentation("fancy", (28, 28))
    with pytest.raises(ConfigError, match="not a Kornia augmentation"):
        build_train_augmentation("none", (28, 28), ops=[nn.ReLU()])
    with pytest.raises(ConfigError, match="cutmix_alpha"):
        ImageDataModule(augment_ops=[K.RandomCutMixV2(use_correct_lambda=True)])
    with pytest.raises(ConfigError, match="RandAugment needs"):
        PipelineOptions(randaugment_m=30)
    with pytest.raises(ConfigError, match="randaugment_n"):
        ImageDataModule(randaugment_n=0)
    with pytest.raises(ConfigError, match="crop_padding"):
        ImageDataModule(crop_padding=-1)
    with pytest.raises(ConfigError, match="std must be positive"):
        ImageDataModule(std=[0.0])
    for bad in (dict(cutmix_alpha=-1.0), dict(mix_prob=1.5), dict(switch_prob=-0.1), dict(mix_label_smoothing=1.0)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            ImageDataModule(**bad)
    with pytest.raises(ConfigError, match="strong_augment"):
        ImageDataModule(strong_augment="extreme")


def constant_rows(n: int, size: int = 32) -> torch.Tensor:
    """n images, image i filled with the distinct value (i + 1) / (n + 1)."""
    return ((torch.arange(n) + 1) / (n + 1)).view(n, 1, 1, 1).expand(n, 1, size, size).clone()


def partner_of(out: torch.Tensor, images: torch.Tensor, n: int) -> torch.Tensor:
    """For constant-row images: the index of the row whose value differs from the row's own the most."""
    other = torch.where((out - images).abs() > 1e-6, out, torch.nan).flatten(1).nanmedian(dim=1).values
    return (other * (n + 1) - 1).round().long()


def test_cutmix_targets_are_distributions_weighted_by_the_pasted_area():
    n = 64
    images, labels = constant_rows(n), torch.arange(n)
    torch.manual_seed(0)
    out, target = BatchMix(n, cutmix_alpha=1.0)(images, labels)
    torch.testing.assert_close(target.sum(dim=1), torch.ones(n))
    pasted = (out != images).flatten(1).float().mean(dim=1)
    assert 0.2 < pasted.mean() < 0.8 and (pasted > 0).float().mean() > 0.9
    rows = (pasted > 0).nonzero().flatten()
    partner = partner_of(out, images, n)[rows]
    torch.testing.assert_close(target[rows, partner], pasted[rows])
    torch.testing.assert_close(target[rows, rows], 1 - pasted[rows])


def test_mixup_targets_are_weighted_by_the_mix_weight():
    n = 64
    images, labels = constant_rows(n, size=4), torch.arange(n)
    torch.manual_seed(0)
    out, target = BatchMix(n, mixup_alpha=0.4)(images, labels)
    torch.testing.assert_close(target.sum(dim=1), torch.ones(n))
    partner = target.scatter(1, labels.unsqueeze(1), 0.0).argmax(dim=1)
    assert (target[torch.arange(n), partner] > 0).all()
    own, other = images[:, 0, 0, 0], images[partner, 0, 0, 0]
    weight = (own - out[:, 0, 0, 0]) / (own - other)
    torch.testing.assert_close(target[torch.arange(n), partner], weight, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["cutmix", "mixup", "both"])
def test_mixed_fraction_is_close_to_p(kind):
    n, p = 4000, 0.3
    alphas = dict(cutmix_alpha=1.0 * (kind != "mixup"), mixup_alpha=1.0 * (kind != "cutmix"))
    images, labels = torch.rand(n, 1, 16, 16), torch.arange(n)
    torch.manual_seed(0)
    out, target = BatchMix(n, prob=p, switch_prob=0.8, **alphas)(images, labels)
    changed = (out != images).flatten(1).float().mean(dim=1)
    mixed = changed > 0
    assert abs(mixed.float().mean().item() - p) < 0.03
    if kind == "both":  # a CutMix row changed exactly its pasted share; a MixUp row changed every pixel
        label_mass = 1 - target[labels, labels]
        cut = (changed - label_mass).abs() < 1e-6
        assert abs((cut & mixed).sum().item() / mixed.sum().item() - 0.8) < 0.05


def test_label_smoothing_is_folded_into_the_targets_once():
    labels = torch.tensor([0, 1, 2, 3])
    _, target = BatchMix(4, label_smoothing=0.2)(torch.rand(4, 1, 8, 8), labels)
    expected = torch.nn.functional.one_hot(labels, 4) * 0.8 + 0.05
    torch.testing.assert_close(target, expected)
    assert torch.isfinite(soft_target_cross_entropy(torch.randn(4, 4), target))
    dm = ImageDataModule(mix_label_smoothing=0.1, **TINY_DM)
    dm.setup("fit")
    with pytest.raises(ConfigError, match="label_smoothing=0"):
        ImageClassifier(label_smoothing=0.1).check_data_matches(dm)


@needs_fashion_mnist
def test_strong_cutmix_only_in_training_and_reproducible_with_seed():
    dm = ImageDataModule(augment="strong", cutmix_alpha=1.0, val_size=128, train_subset=128, batch_size=128)
    module = Recorder()
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, dm)
    assert module.seen["train"][0]["target"].shape == (128, 10)
    val = module.seen["val"][0]
    assert val["target"].ndim == 1
    torch.testing.assert_close(val["image"], dm.transform_batch(next(iter(dm.val_dataloader())), False)["image"])

    batch = next(iter(dm.train_dataloader()))
    runs = []
    for seed in (7, 7, 8):
        pl.seed_everything(seed, verbose=False)
        runs.append(dm.transform_batch(batch, train=True))
    assert torch.equal(runs[0]["image"], runs[1]["image"]) and torch.equal(runs[0]["target"], runs[1]["target"])
    assert not torch.equal(runs[0]["image"], runs[2]["image"])


@needs_fashion_mnist
def test_weak_and_strong_views():
    dm = ImageDataModule(weak_augment="none", strong_augment="strong", **TINY_DM)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    views = dm.pipeline.unlabeled_batch(batch)
    torch.testing.assert_close(views["image"], dm.transform_batch(batch, train=False)["image"])
    assert views["image_strong"].shape == views["image"].shape
    assert not torch.equal(views["image_strong"], views["image"])


@needs_fashion_mnist
def test_preview_writes_a_png_grid_through_the_cli_parser(tmp_path, capsys):
    from lit_imgcls.cli import main

    out = tmp_path / "grid.png"
    main(["preview", "--config", STRONG, "--out", str(out), "--n", "6", "--scale", "1", "--data.image_size=32"])
    grid = cv2.imread(str(out))
    assert grid.shape == (4 * 32 + 5 * 2, 6 * 32 + 7 * 2, 3)  # 4 rows of 6 images of the overridden size
    assert f"wrote {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["preview", "--config", STRONG, "--data.cutmix_alpha=-1"])
    assert stop.value.code == 2 and "cutmix_alpha" in capsys.readouterr().err


@needs_cuda
@pytest.mark.parametrize("preset", AUGMENT_PRESETS)
def test_presets_and_mix_stay_on_cuda(preset, gray):
    images = gray.cuda()
    for x in (images, colored(images)):
        check_output(build_train_augmentation(preset, (28, 28)).cuda()(x), x)
    out, target = BatchMix(10, cutmix_alpha=1.0, mixup_alpha=1.0)(images, torch.zeros(32, dtype=torch.long).cuda())
    assert out.device == images.device and target.device == images.device


@needs_fashion_mnist
@pytest.mark.slow
def test_cli_fit_strong_cutmix_under_two_process_ddp(tmp_path):
    args = ["--data.train_subset=128", "--data.val_size=64", "--data.batch_size=32", "--trainer.max_epochs=1"]
    args += ["--data.mean=[0.286]", "--data.std=[0.353]"]  # skip the statistics pass over 60,000 images per rank
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    result = run_cli("fit", "--config", STRONG, *args, *ddp, *QUIET, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "fashion_mnist_strong").glob("version_*")
    metrics = read_metrics(run_dir)
    assert metrics["train/loss"] > 0 and 0 <= metrics["val/acc"] <= 1
