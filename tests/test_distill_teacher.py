"""FrozenTeacher, the component distillation and noisy student share: loading, checks, freezing, placement."""

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from lit_imgcls.data import ImageDataModule
from lit_imgcls.errors import ConfigError
from lit_imgcls.tasks import DistillationModule, ImageClassifier
from lit_imgcls.tasks.teacher import FrozenTeacher
from tests.conftest import needs_fashion_mnist, quiet_trainer

SMALL = {"val_size": 64, "train_subset": 256, "batch_size": 32}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """An untrained LeNet-5 ImageClassifier checkpoint (random weights are enough to teach the mechanics)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    torch.manual_seed(0)
    module = ImageClassifier("lenet5")
    torch.save(
        {
            "pytorch-lightning_version": pl.__version__,
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
        },
        path,
    )
    return path


def test_loads_frozen_in_eval_without_touching_the_random_stream(teacher_ckpt, tmp_path):
    torch.save(ImageClassifier("lenet5").net.state_dict(), tmp_path / "weights.pt")
    for teacher in (FrozenTeacher(str(teacher_ckpt)), FrozenTeacher(str(tmp_path / "weights.pt"), model="lenet5")):
        torch.manual_seed(1)
        expected = torch.rand(3)
        torch.manual_seed(1)
        net = teacher.load(num_classes=10, in_chans=1)
        assert torch.equal(torch.rand(3), expected)  # building it drew no number from the student's stream
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        assert teacher.load(10, 1) is net  # built once
        images = torch.randn(2, 1, 28, 28, requires_grad=True)
        assert not teacher(images).requires_grad  # no graph through the teacher
        teacher.release()
        assert teacher.net is None


def test_channels_last_and_dtype_follow_the_student(teacher_ckpt):
    teacher = FrozenTeacher(str(teacher_ckpt))
    conv = teacher.load(10, 1, channels_last=True).features[4].weight  # 6 -> 16 channels
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    teacher.place(torch.device("cpu"), torch.float64)  # what a true-precision fit gives the student
    assert teacher.net.features[4].weight.dtype == torch.float64 and not teacher.net.training
    assert teacher(torch.zeros(1, 1, 28, 28, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize(
    ("shape", "classes", "message"),
    [
        ((3, 28, 28), 10, r"takes 1-channel images but the data has 3: set --data.channels=1"),
        ((1, 28, 28), 3, r"predicts 10 classes but the dataset has 3: use a teacher trained on the same classes"),
    ],
)
def test_check_against_the_data_names_the_fix(teacher_ckpt, shape, classes, message):
    teacher = FrozenTeacher(str(teacher_ckpt))
    teacher.load(10, 1)
    with pytest.raises(ConfigError, match=message):
        teacher.check(SimpleNamespace(image_shape=shape, num_classes=classes))


@needs_fashion_mnist
@pytest.mark.parametrize("channels_last", [True, False])
def test_distillation_teacher_follows_the_students_memory_format(teacher_ckpt, channels_last):
    module = DistillationModule(str(teacher_ckpt), channels_last=channels_last)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, ImageDataModule(**SMALL))
    teacher, student = module.teacher.net.features[4].weight, module.net.features[4].weight
    for weight in (teacher, student):
        assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
