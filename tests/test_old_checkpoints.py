"""Checkpoints written before the redesign of issue 14 (tests/fixtures/make_old_checkpoints.py, at dc525c0) still
load through every route of the project and predict exactly what they predicted then."""

from pathlib import Path

import pytest
import torch

from lit_imgcls.checkpoint_io import read_checkpoint
from lit_imgcls.models.weights import DATA_KEY
from lit_imgcls.tasks import DistillationModule, ImageClassifier, NoisyStudent, export_student
from lit_imgcls.tasks.checkpoints import load_task, load_task_network
from tests.conftest import REPO, needs_fashion_mnist, run_cli
from tests.test_cli import read_metrics

FIXTURES = Path(__file__).resolve().parent / "fixtures"
STORED = torch.load(FIXTURES / "old_predictions.pt", weights_only=False)
TASKS = {
    "old_image_classifier.ckpt": ImageClassifier,
    "old_distillation.ckpt": DistillationModule,
    "old_noisy_student.ckpt": NoisyStudent,
}


def inputs(checkpoint: Path) -> torch.Tensor:
    """The stored images, normalised with the statistics the checkpoint records."""
    data = read_checkpoint(checkpoint)[DATA_KEY]
    mean, std = (torch.tensor(data[key]).view(1, -1, 1, 1) for key in ("mean", "std"))
    return (STORED["images"].float() / 255 - mean) / std


def assert_same_predictions(net: torch.nn.Module, name: str) -> None:
    with torch.no_grad():
        logits = net.eval()(inputs(FIXTURES / name))
    torch.testing.assert_close(logits, STORED["logits"][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", TASKS)
def test_old_checkpoint_loads_as_its_task_and_predicts_as_before(name):
    path = FIXTURES / name
    task = load_task(path)
    assert type(task) is TASKS[name]
    assert getattr(getattr(task, "teacher", None), "net", None) is None  # a teacher is only built for fit
    assert_same_predictions(task, name)
    assert_same_predictions(load_task_network(path), name)
    assert_same_predictions(TASKS[name].load_from_checkpoint(path), name)


@pytest.mark.parametrize("name", ["old_distillation.ckpt", "old_noisy_student.ckpt"])
def test_old_student_exports_as_a_classifier(name, tmp_path):
    exported = export_student(FIXTURES / name, tmp_path / "student.ckpt")
    assert read_checkpoint(exported)["hyper_parameters"]["_class_path"] == "lit_imgcls.tasks.ImageClassifier"
    assert_same_predictions(ImageClassifier.load_from_checkpoint(exported), name)


@needs_fashion_mnist
@pytest.mark.slow
@pytest.mark.parametrize("name", TASKS)
def test_old_checkpoint_through_lit_imgcls_test(name, tmp_path):
    """`lit-imgcls test --config CONFIG --ckpt_path OLD`: the test accuracy measured when the fixture was made.

    The architecture is named as the checkpoint has it: a shipped config may have moved on (noisy student's
    config now trains FastResNet students, the fixture holds a LeNet-5 one)."""
    config, *args = STORED["test_args"][name]
    model = read_checkpoint(FIXTURES / name)["hyper_parameters"]["model"]
    args = [*args, f"--model.init_args.model={model}", f"--ckpt_path={FIXTURES / name}"]
    result = run_cli("test", "--config", str(REPO / config), *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = tmp_path.rglob("metrics.csv")
    assert read_metrics(metrics.parent)["test/acc"] == pytest.approx(STORED["test_acc"][name], abs=1e-6)
