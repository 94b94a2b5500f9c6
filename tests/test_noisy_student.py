"""NoisyStudent on real Fashion-MNIST subsets: frozen clean-view teacher, strong-view student, generations, DDP."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lit_imgcls.cli import build_cli
from lit_imgcls.data import ImageDataModule
from lit_imgcls.data.augment import normalize, to_float
from lit_imgcls.errors import ConfigError, UserError
from lit_imgcls.noisy_student_run import run_generations
from lit_imgcls.tasks import ImageClassifier, NoisyStudent
from lit_imgcls.tasks.base import task_options
from lit_imgcls.tasks.checkpoints import load_task_network, read_checkpoint
from lit_imgcls.tasks.classifier import FINETUNE_OPTIONS
from lit_imgcls.tasks.noisy_student import PSEUDO_LABEL_FILE
from tests.conftest import QUIET, REPO, needs_fashion_mnist, quiet_trainer, run_cli

pytestmark = needs_fashion_mnist
STUDENT = str(REPO / "configs" / "noisy_student" / "fashion_mnist_100.yaml")
TEACHER = str(REPO / "configs" / "noisy_student" / "teacher_fashion_mnist_100.yaml")
# 1,200 training images: 100 val, 10 labels per class, 1,000 unlabeled
TINY_DATA = [
    "--data.train_subset=1100",
    "--data.val_size=100",
    "--data.labels_per_class=10",
    "--data.test_subset=200",
    "--data.batch_size=16",
    "--data.unlabeled_batch_ratio=2",
    "--data.eval_batch_size=128",
]
TINY_FIT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=4", *QUIET]


def tiny_data(**kwargs) -> ImageDataModule:
    options = dict(train_subset=1100, val_size=100, labels_per_class=10, test_subset=200, batch_size=16)
    return ImageDataModule(**{**options, "unlabeled_batch_ratio": 2, "eval_batch_size": 128, **kwargs})


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """A LeNet-5 teacher trained briefly on the 100 labeled images."""
    root = tmp_path_factory.mktemp("teacher")
    pl.seed_everything(0)
    trainer = quiet_trainer(default_root_dir=root, max_epochs=3, enable_checkpointing=False)
    trainer.fit(ImageClassifier("lenet5"), tiny_data(augment="none"))
    trainer.save_checkpoint(root / "teacher.ckpt")
    return root / "teacher.ckpt"


def test_frozen_teacher_labels_the_clean_view_and_the_student_sees_the_strong_one(teacher_checkpoint, tmp_path):
    teacher_calls, student_inputs, batches = [], [], []

    class Spy(NoisyStudent):
        def load_teacher(self):
            teacher = super().load_teacher()
            teacher.register_forward_hook(
                lambda m, inputs, out: teacher_calls.append(
                    (m.training, torch.is_grad_enabled(), any(p.requires_grad for p in m.parameters()), inputs[0])
                )
            )
            return teacher

        def on_train_batch_start(self, batch, batch_idx):
            batches.append(batch)

    data = tiny_data(augment="strong", strong_augment="strong")
    student = Spy(str(teacher_checkpoint), hard_labels=True, drop_rate=0.3)
    student.net.register_forward_hook(lambda m, inputs, out: m.training and student_inputs.append(inputs[0]))
    trainer = quiet_trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(student, data)

    assert teacher_calls
    assert not any(training or grad or trainable for training, grad, trainable, _ in teacher_calls)
    seen = torch.cat([images for *_, images in teacher_calls])
    clean = normalize(to_float(data.unlabeled_set.images), data.mean, data.std)
    torch.testing.assert_close(seen, clean)  # every unlabeled image once, in order, not augmented
    assert not any("teacher" in key for key in student.state_dict())

    n = len(batches[0]["labeled"]["image"])
    unlabeled = batches[0]["unlabeled"]
    torch.testing.assert_close(student_inputs[0][n:], unlabeled["image_strong"])
    assert not torch.allclose(unlabeled["image_strong"], clean[unlabeled["index"].cpu()])

    saved = torch.load(tmp_path / PSEUDO_LABEL_FILE)
    teacher_net = load_task_network(teacher_checkpoint).eval()
    with torch.no_grad():
        expected = teacher_net(clean).argmax(-1)
    assert saved["kept"] == len(clean) == saved["summary"]["unlabeled"]
    assert torch.equal(saved["targets"], expected[saved["indices"]])


def test_logs_the_labeled_and_pseudo_label_terms_and_their_sum(teacher_checkpoint, tmp_path):
    """One step: train/ce on the labeled images, train/pseudo on the strong views against the pseudo-labels,
    train/loss = ce + unlabeled_weight * pseudo, each recomputed by hand from the logits of the one forward pass."""
    weight, outputs, batches = 0.5, [], []
    student = NoisyStudent(str(teacher_checkpoint), hard_labels=True, unlabeled_weight=weight)
    student.net.register_forward_hook(lambda net, inputs, out: net.training and outputs.append(out.detach()))
    student.on_train_batch_start = lambda batch, batch_idx: batches.append(batch)
    trainer = quiet_trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(student, tiny_data())

    (logits,), (batch,) = outputs, batches
    n = len(batch["labeled"]["image"])
    saved = torch.load(tmp_path / PSEUDO_LABEL_FILE)
    row = {int(i): j for j, i in enumerate(saved["indices"])}  # hard labels, every image kept: one row each
    pseudo_targets = saved["targets"][[row[int(i)] for i in batch["unlabeled"]["index"]]]
    ce = torch.nn.functional.cross_entropy(logits[:n], batch["labeled"]["target"])
    pseudo = torch.nn.functional.cross_entropy(logits[n:], pseudo_targets.to(logits.device))
    logged = trainer.callback_metrics
    torch.testing.assert_close(logged["train/ce"], ce)
    torch.testing.assert_close(logged["train/pseudo"], pseudo)
    torch.testing.assert_close(logged["train/loss"], ce + weight * pseudo)


def test_only_its_own_options_and_the_shared_teacher_checks(teacher_checkpoint, tmp_path):
    options = task_options(NoisyStudent)
    assert {"teacher", "per_class", "drop_rate", "drop_path_rate"} <= options
    assert not options & set(FINETUNE_OPTIONS)
    with pytest.raises(ConfigError, match="NoisyStudent takes no pretrained_checkpoint"):
        NoisyStudent(str(teacher_checkpoint), pretrained_checkpoint=str(teacher_checkpoint))
    student = NoisyStudent(str(teacher_checkpoint), num_classes=5)
    data = tiny_data(classes=[0, 1, 2, 3, 4])
    with pytest.raises(ConfigError, match="predicts 10 classes but the dataset has 5"):
        quiet_trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=1).fit(student, data)


def test_threshold_that_keeps_nothing_is_a_clear_error(teacher_checkpoint, tmp_path):
    student = NoisyStudent(str(teacher_checkpoint), confidence_threshold=1.0)
    with pytest.raises(UserError, match=r"threshold 1.0 keeps none of the 1000 unlabeled images.*lower the threshold"):
        quiet_trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=1).fit(student, tiny_data())


def test_empty_unlabeled_set_is_a_clear_error(teacher_checkpoint, tmp_path):
    student = NoisyStudent(str(teacher_checkpoint))
    data = tiny_data(labels_per_class=None, labeled_fraction=0.999)  # every training image is labeled
    with pytest.raises(UserError, match="the unlabeled set is empty"):
        quiet_trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=1).fit(student, data)


@pytest.mark.slow
def test_ddp_generation_labels_like_one_process(teacher_checkpoint, tmp_path):
    # 10 labeling batches of 100, 5 per rank; balanced to 120 rows per predicted class
    ddp_args = [*TINY_DATA, *TINY_FIT, f"--model.init_args.teacher={teacher_checkpoint}"]
    ddp_args += ["--model.init_args.per_class=120", "--model.init_args.hard_labels=true", "--data.eval_batch_size=100"]
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    result = run_cli("fit", "--config", STUDENT, *ddp_args, *ddp, cwd=tmp_path / "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (tmp_path / "ddp").rglob(PSEUDO_LABEL_FILE)
    two = torch.load(path)

    student = NoisyStudent(str(teacher_checkpoint), hard_labels=True, per_class=120)
    trainer = quiet_trainer(
        default_root_dir=tmp_path / "single", max_epochs=1, limit_train_batches=1, limit_val_batches=0
    )
    trainer.fit(student, tiny_data(eval_batch_size=100))
    one = torch.load(tmp_path / "single" / PSEUDO_LABEL_FILE)

    assert one["total"] == two["total"] == 1000
    predicted_classes = sum(count > 0 for count in one["summary"]["per_class"])
    assert len(one["indices"]) == 120 * predicted_classes  # no padding duplicates
    assert torch.equal(one["indices"], two["indices"])
    assert torch.equal(one["targets"], two["targets"])


@pytest.mark.slow
def test_generation_two_learns_from_generation_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "checkpoints"
    rows = run_generations(
        STUDENT,
        2,
        out,
        teacher_config=TEACHER,
        shared_args=[*TINY_DATA, *TINY_FIT, "--trainer.accelerator=cpu"],
        teacher_args=["--trainer.max_epochs=2", "--trainer.limit_train_batches=null"],
    )
    assert [row["generation"] for row in rows] == [0, 1, 2]
    assert all(0.0 <= row["val_acc"] <= 1.0 and 0.0 <= row["test_acc"] <= 1.0 for row in rows)
    assert (out / "summary.csv").read_text().splitlines()[0].startswith("generation,architecture,pseudo_labels_kept")
    gen1, gen2 = (read_checkpoint(out / f"generation_{n}.ckpt") for n in (1, 2))
    assert gen2["hyper_parameters"]["teacher"] == str(out / "generation_1.ckpt")
    assert read_checkpoint(out / "generation_1.ckpt")["hyper_parameters"]["teacher"] == str(out / "generation_0.ckpt")
    # generation 2's pseudo-labels are generation 1's predictions on the clean unlabeled images
    (gen2_labels,) = sorted((tmp_path / "runs").rglob(PSEUDO_LABEL_FILE))[-1:]
    saved = torch.load(gen2_labels)
    net = load_task_network(out / "generation_1.ckpt").eval()
    data = tiny_data()
    data.setup("fit")
    with torch.no_grad():
        predicted = net(normalize(to_float(data.unlabeled_set.images), data.mean, data.std)).argmax(-1)
    assert torch.equal(saved["classes"], predicted[saved["indices"]])
    assert gen1["state_dict"].keys() == gen2["state_dict"].keys()


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "noisy_student").glob("*.yaml")), ids=lambda p: p.stem)
def test_configs_instantiate(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(config)])
    expected = ImageClassifier if config.stem.startswith("teacher") else NoisyStudent
    assert type(cli.model) is expected
    data = cli.datamodule.hparams
    assert (data.labels_per_class, data.labeled_fraction) in ((100, None), (None, 0.1))
    if expected is NoisyStudent:
        assert cli.model.data_request.train_data == "combined"
        assert cli.model.hparams.teacher.endswith("generation_0.ckpt")
        recorded = set(cli.model.hparams) - {"_class_path", "_instantiator"}
        assert recorded == task_options(NoisyStudent) - {"optimizer", "lr_scheduler"}  # no fine-tuning option
