"""DistillationModule: a frozen teacher, the three methods, checkpoints usable without the teacher, DDP."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lit_imgcls.cli import main
from lit_imgcls.data import ImageDataModule
from lit_imgcls.errors import ConfigError
from lit_imgcls.tasks import DistillationModule, ImageClassifier, export_student
from lit_imgcls.tasks.base import task_options
from lit_imgcls.tasks.checkpoints import load_task, read_checkpoint
from lit_imgcls.tasks.classifier import FINETUNE_OPTIONS
from lit_imgcls.tasks.teacher import FrozenTeacher, has_native_bf16
from tests.conftest import QUIET, REPO, needs_fashion_mnist, quiet_trainer, run_cli
from tests.test_cli import read_metrics

pytestmark = needs_fashion_mnist
SMALL = {"val_size": 128, "train_subset": 512, "batch_size": 32}
TINY_CLI = [
    "--data.train_subset=600",
    "--data.val_size=128",
    "--data.test_subset=201",
    "--data.batch_size=32",
    "--data.labels_per_class=20",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",
    *QUIET,
]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A LeNet-5 (with BatchNorm) ImageClassifier fitted for a few steps: real weights and running statistics."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    pl.seed_everything(0)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=8, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(ImageClassifier(model="lenet5"), datamodule=ImageDataModule(**SMALL))
    trainer.save_checkpoint(path)
    return path


class Watch(pl.Callback):
    """Checks, at every training batch, that the teacher is in eval mode and the student in train mode."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        teacher = module.teacher.net
        assert not teacher.training and not any(m.training for m in teacher.modules())
        assert module.net.training
        self.batches += 1


@pytest.mark.parametrize(("method", "view"), [("semi", "same"), ("labeled", "clean")])
def test_teacher_is_frozen_in_eval_and_untouched_by_a_fit(teacher_ckpt, method, view):
    teacher_state = {k[4:]: v for k, v in read_checkpoint(teacher_ckpt)["state_dict"].items() if k.startswith("net.")}
    module = DistillationModule(teacher=str(teacher_ckpt), method=method, teacher_view=view)
    seen = []
    teacher_logits = module.teacher_logits
    module.teacher_logits = lambda images: seen.append(images) or teacher_logits(images)
    inputs = []
    module.on_train_batch_start = lambda batch, batch_idx: inputs.append(batch)
    student_before = {k: v.clone() for k, v in module.net.state_dict().items()}
    watch = Watch()
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=[watch])
    trainer.fit(module, datamodule=ImageDataModule(labels_per_class=10, **SMALL))

    assert watch.batches == 3
    after = module.teacher.net.state_dict()
    assert after.keys() == teacher_state.keys() and any("running_mean" in k for k in after)
    for key, value in teacher_state.items():  # weights and BatchNorm running statistics, bit for bit
        assert torch.equal(after[key], value), key
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.net.parameters())
    assert not any(k.startswith("teacher") for k in module.state_dict())  # no part of the student's checkpoints
    assert {id(p) for p in module.parameters()}.isdisjoint(id(p) for p in module.teacher.net.parameters())
    assert any(not torch.equal(v, student_before[k]) for k, v in module.net.state_dict().items())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.net.parameters()}

    batch = inputs[0]
    if method == "semi":  # labeled batch: the student's view; unlabeled batch: the strong view
        assert torch.equal(seen[0], batch["labeled"]["image"]) and torch.equal(
            seen[1], batch["unlabeled"]["image_strong"]
        )
    else:
        assert torch.equal(seen[0], batch["image_clean"]) and not torch.equal(seen[0], batch["image"])


def test_alpha_zero_is_plain_supervised_training(teacher_ckpt):
    """With alpha=0 the teacher has no say: the student's weights equal a plain ImageClassifier's, bit for bit."""
    nets = []
    for make in (lambda: ImageClassifier(model="lenet5"), lambda: DistillationModule(str(teacher_ckpt), alpha=0.0)):
        pl.seed_everything(3)
        module = make()
        quiet_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0).fit(module, ImageDataModule(**SMALL))
        nets.append(module.net.state_dict())
    for key, value in nets[0].items():
        assert torch.equal(nets[1][key], value), key


def test_student_checkpoint_loads_without_the_teacher(teacher_ckpt, tmp_path):
    module = DistillationModule(teacher=str(teacher_ckpt))
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, datamodule=ImageDataModule(**SMALL))
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    assert not any(k.startswith("teacher.") for k in read_checkpoint(path)["state_dict"])

    images = torch.randn(4, 1, 28, 28)
    expected = module.eval().net(images)
    for loaded in (
        load_task(path),  # no class path (written from Python): its student, as a plain classifier
        DistillationModule.load_from_checkpoint(path),  # the teacher is only built for fit
        ImageClassifier.load_from_checkpoint(export_student(path, tmp_path / "exported.ckpt")),
    ):
        assert getattr(getattr(loaded, "teacher", None), "net", None) is None
        torch.testing.assert_close(loaded.eval()(images), expected)
    exported = read_checkpoint(tmp_path / "exported.ckpt")
    assert "teacher" not in exported["hyper_parameters"] and all(k.startswith("net.") for k in exported["state_dict"])

    resumed = DistillationModule(teacher=str(teacher_ckpt))  # resuming rebuilds the teacher from its checkpoint
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(resumed, datamodule=ImageDataModule(**SMALL), ckpt_path=path)
    assert trainer.global_step == 4


def test_teacher_class_count_must_match_the_data(teacher_ckpt, image_folder):
    data = ImageDataModule(dataset="image_folder", data_dir=str(image_folder), channels=1, val_size=6, batch_size=8)
    module = DistillationModule(teacher=str(teacher_ckpt), num_classes=3)
    with pytest.raises(ConfigError, match="predicts 10 classes but the dataset has 3"):
        quiet_trainer(max_epochs=1, limit_train_batches=1).fit(module, datamodule=data)


def test_teacher_from_create_model_and_a_weights_file(teacher_ckpt, tmp_path):
    net = ImageClassifier.load_from_checkpoint(teacher_ckpt).net
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    module = DistillationModule(teacher=str(tmp_path / "weights.pt"), teacher_model="lenet5")
    quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(module, ImageDataModule(**SMALL))
    for key, value in net.state_dict().items():
        assert torch.equal(module.teacher.net.state_dict()[key], value)
    with pytest.raises(ConfigError, match="do not fit teacher_model='cnn4'"):
        wrong = DistillationModule(teacher=str(tmp_path / "weights.pt"), teacher_model="cnn4")
        quiet_trainer(max_epochs=1, limit_train_batches=1).fit(wrong, ImageDataModule(**SMALL))


def kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 * batch mean of sum_k p_k (log p_k - log q_k), p = softmax(teacher / T), q = softmax(student / T)."""
    p = torch.softmax(teacher / t, dim=1)
    return t * t * (p * (p.log() - torch.log_softmax(student / t, dim=1))).sum(dim=1).mean()


def test_semi_logs_each_term_and_a_total_that_includes_the_unlabeled_one(teacher_ckpt):
    """One `semi` step: train/loss = (1 - alpha) CE + alpha KD(labeled) + unlabeled_weight KD(unlabeled), by hand."""
    alpha, t, weight = 0.7, 3.0, 0.5
    module = DistillationModule(str(teacher_ckpt), method="semi", alpha=alpha, temperature=t, unlabeled_weight=weight)
    student, teacher, batches = [], [], []
    module.net.register_forward_hook(lambda net, inputs, out: student.append(out.detach()))
    teacher_logits = module.teacher_logits
    module.teacher_logits = lambda images: teacher.append(teacher_logits(images)) or teacher[-1]
    module.on_train_batch_start = lambda batch, batch_idx: batches.append(batch)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, datamodule=ImageDataModule(labels_per_class=10, **SMALL))

    (batch,) = batches
    target = batch["labeled"]["target"]
    ce = torch.nn.functional.cross_entropy(student[0], target)
    kd, kd_unlabeled = kl_by_hand(student[0], teacher[0], t), kl_by_hand(student[1], teacher[1], t)
    logged = trainer.callback_metrics
    torch.testing.assert_close(logged["train/ce"], ce)
    torch.testing.assert_close(logged["train/kd"], kd)
    torch.testing.assert_close(logged["train/kd_unlabeled"], kd_unlabeled)
    torch.testing.assert_close(logged["train/loss"], (1 - alpha) * ce + alpha * kd + weight * kd_unlabeled)
    assert not torch.isclose(logged["train/loss"], (1 - alpha) * ce + alpha * kd, rtol=1e-4)


def test_unlabeled_logs_the_kd_term_as_the_loss_and_no_accuracy(teacher_ckpt):
    module = DistillationModule(str(teacher_ckpt), method="unlabeled")
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, datamodule=ImageDataModule(labels_per_class=10, **SMALL))
    logged = trainer.callback_metrics
    torch.testing.assert_close(logged["train/loss"], logged["train/kd"])
    assert not {"train/ce", "train/kd_unlabeled", "train/acc"} & logged.keys()


def test_fine_tuning_options_are_not_distillation_options():
    assert not set(FINETUNE_OPTIONS) & task_options(DistillationModule)
    assert {"teacher", "alpha", "model", "drop_rate", "channels_last"} <= task_options(DistillationModule)
    with pytest.raises(ConfigError, match=r"DistillationModule takes no finetune \(got 'full'\): only ImageClassifier"):
        DistillationModule(teacher="t.ckpt", finetune="full")
    old = DistillationModule(teacher="t.ckpt", finetune="none", head=None)  # older checkpoints carry the defaults
    assert "finetune" not in old.hparams and not hasattr(old, "finetuner")


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "distill").glob("*.yaml")), ids=lambda p: p.stem)
def test_configs_print_only_their_own_options(config, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-imgcls"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert not exit_info.value.code
    model = yaml.safe_load(capsys.readouterr().out).get("model") or {"init_args": {}}
    options = set(model["init_args"])
    if model.get("class_path", "").endswith("DistillationModule"):
        assert options == task_options(DistillationModule)
    assert bool(options & set(FINETUNE_OPTIONS)) == model.get("class_path", "").endswith("ImageClassifier")


def test_model_help_lists_no_fine_tuning_option(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-imgcls"])
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "DistillationModule"])
    shown = capsys.readouterr().out
    assert "--model.teacher " in shown and "--model.drop_rate " in shown
    assert not [name for name in FINETUNE_OPTIONS if f"--model.{name}" in shown]


def test_bad_options_raise_config_errors():
    with pytest.raises(ConfigError, match="method"):
        DistillationModule(teacher="t.ckpt", method="mixed")
    with pytest.raises(ConfigError, match="alpha"):
        DistillationModule(teacher="t.ckpt", alpha=1.5)
    with pytest.raises(ConfigError, match="teacher precision 'fp16': choose one of 32, bf16, auto"):
        DistillationModule(teacher="t.ckpt", teacher_precision="fp16")


def test_teacher_precision_bf16_autocasts_and_returns_the_students_dtype(teacher_ckpt):
    """bf16 runs the teacher under bfloat16 autocast: float32 logits close to the float32 teacher's, not equal."""
    images = torch.rand(64, 1, 28, 28)
    logits = {}
    for precision in ("32", "bf16"):
        teacher = FrozenTeacher(str(teacher_ckpt), precision=precision)
        teacher.load(num_classes=10, in_chans=1)
        teacher.place(torch.device("cpu"), torch.float32)
        logits[precision] = teacher(images)
    assert logits["bf16"].dtype == torch.float32
    assert not torch.equal(logits["bf16"], logits["32"])
    torch.testing.assert_close(logits["bf16"], logits["32"], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_teacher_precision_auto_uses_bf16_only_where_native_and_the_student_is_float32(teacher_ckpt, dtype):
    teacher = FrozenTeacher(str(teacher_ckpt), precision="auto")
    teacher.load(num_classes=10, in_chans=1)
    teacher.place(torch.device("cpu"), dtype)
    native = has_native_bf16(torch.device("cpu"))
    assert teacher.autocast_dtype == (torch.bfloat16 if native and dtype == torch.float32 else None)
    assert teacher(torch.rand(4, 1, 28, 28, dtype=dtype)).dtype == dtype


def run_dir(cwd: Path, name: str) -> Path:
    (found,) = sorted((cwd / "runs" / name).glob("version_*"))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("method", ["labeled", "unlabeled"])  # semi: the DDP test below
def test_method_through_the_cli(teacher_ckpt, method, tmp_path):
    config = str(REPO / "configs" / "distill" / f"{method}.yaml")
    fit = run_cli("fit", "--config", config, f"--model.init_args.teacher={teacher_ckpt}", *TINY_CLI, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    metrics = read_metrics(run_dir(tmp_path, f"distill_{method}"))
    assert {"train/loss", "val/acc"} <= metrics.keys()
    assert ("train/acc" in metrics) == (method == "labeled")  # no labels, no training accuracy


@pytest.mark.slow
def test_semi_ddp_and_the_exported_student_as_a_plain_classifier(teacher_ckpt, tmp_path):
    """2-rank DDP fit of `semi` (no unused-parameter error from the frozen teacher), then its exported student
    tested in one process as a plain ImageClassifier with the LeNet-5 config: the same test accuracy up to padding."""
    config = str(REPO / "configs" / "distill" / "semi.yaml")
    teacher = f"--model.init_args.teacher={teacher_ckpt}"
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    fit = run_cli("fit", "--config", config, teacher, *TINY_CLI, *ddp, "--test_after_fit=true", cwd=tmp_path / "ddp")
    assert fit.returncode == 0, fit.stderr[-3000:]
    ddp_run = run_dir(tmp_path / "ddp", "distill_semi")
    ddp_acc = read_metrics(ddp_run)["test/acc"]
    (best,) = (ddp_run / "checkpoints").glob("best-*.ckpt")
    student = export_student(best, tmp_path / "student.ckpt")
    lenet = str(REPO / "configs" / "fashion_mnist" / "lenet5.yaml")
    single = run_cli("test", "--config", lenet, *TINY_CLI, f"--ckpt_path={student}", cwd=tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    single_run = run_dir(tmp_path / "one", "fashion_mnist_lenet5")
    assert yaml.safe_load((single_run / "config.yaml").read_text())["model"]["class_path"].endswith("ImageClassifier")
    single_acc = read_metrics(single_run)["test/acc"]
    n_test, padding = 201, 201 % 2  # DistributedSampler repeats one test image so both ranks get 101
    # each padded duplicate can move the 2-rank accuracy by at most 1 / (N + padding)
    assert abs(ddp_acc - single_acc) <= padding / (n_test + padding) + 1e-6
