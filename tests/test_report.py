"""The test report: its numbers against hand computations, its files from `test`, `lit-imgcls report`, every task."""

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.functional.classification import multiclass_calibration_error

from lit_imgcls.cli import instantiate_from_config
from lit_imgcls.commands import report_from_path
from lit_imgcls.report import TestReport, class_metrics, confident_mistakes, reliability_bins, write_report
from lit_imgcls.report_plots import confusion_figure
from lit_imgcls.tasks import DistillationModule, ImageClassifier, NoisyStudent
from tests.conftest import REPO

FILES = {"per_class.csv", "confusion_matrix.csv", "confusion_matrix.png", "reliability.png", "report.json"}


def read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(path.open()))


def check_report(out: Path, n_images: int, classes: list[str]) -> dict:
    """The CSVs agree with each other and with the image count; returns report.json."""
    confusion_rows = read_csv(out / "confusion_matrix.csv")
    assert confusion_rows[0][1:] == classes and [r[0] for r in confusion_rows[1:]] == classes
    confusion = torch.tensor([[int(v) for v in r[1:]] for r in confusion_rows[1:]])
    assert confusion.sum() == n_images
    per_class = list(csv.DictReader((out / "per_class.csv").open()))
    assert [r["class"] for r in per_class] == classes
    recall = torch.tensor([float(r["recall"]) for r in per_class])
    support = confusion.sum(dim=1)
    expected = confusion.diag() / support.clamp_min(1)
    assert torch.allclose(recall, expected.float(), atol=1e-5)
    assert [int(r["support"]) for r in per_class] == support.tolist()
    summary = json.loads((out / "report.json").read_text())
    assert summary["images"] == n_images
    assert summary["accuracy"] == pytest.approx(float(confusion.diag().sum() / n_images), abs=1e-6)
    return summary


def test_ece_and_bins_match_a_hand_computation():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    target = torch.tensor([0, 1, 1, 0])
    # 2 bins: [0, .5) empty; [.5, 1]: confidences .9 .8 .7 .55 (mean .7375), correct 1 0 1 0 (acc .5)
    ece = abs(0.7375 - 0.5)
    tm = multiclass_calibration_error(probs, target, 2, n_bins=2, norm="l1")
    assert float(tm) == pytest.approx(ece)
    accuracy, confidence, count = reliability_bins(probs, target, 2)
    assert count.tolist() == [0, 4] and accuracy[1] == 0.5 and confidence[1] == pytest.approx(0.7375)
    assert class_metrics(probs, target, bins=2)["ece"] == pytest.approx(ece)


def test_bins_give_torchmetrics_ece_and_mistakes_are_the_most_confident():
    generator = torch.Generator().manual_seed(0)
    probs = torch.randn(500, 7, generator=generator).mul(2).softmax(dim=1)
    target = torch.randint(0, 7, (500,), generator=generator)
    accuracy, confidence, count = reliability_bins(probs, target, 15)
    ece = float(((accuracy - confidence).abs() * count).sum() / count.sum())
    assert ece == pytest.approx(class_metrics(probs, target)["ece"], abs=1e-6)
    rows = confident_mistakes(probs, target, 5)
    top = probs.max(dim=1)
    assert (top.indices[rows] != target[rows]).all()
    wrong = top.values[top.indices != target]
    assert top.values[rows].tolist() == wrong.sort(descending=True).values[:5].tolist()


@pytest.mark.parametrize(("k", "channels"), [(2, 3), (120, 1)])
def test_write_report_any_class_count(tmp_path, k, channels):
    generator = torch.Generator().manual_seed(k)
    n = 6 * k
    target = torch.arange(n) % k
    probs = (torch.randn(n, k, generator=generator) + 3 * torch.nn.functional.one_hot(target, k)).softmax(dim=1)
    classes = [f"class {i}" for i in range(k)]
    rows = confident_mistakes(probs, target, 8)
    images = torch.randint(0, 256, (len(rows), channels, 16, 16), dtype=torch.uint8)
    predictions = {"probs": probs, "target": target, "classes": classes, "mistake_rows": rows, "mistake_images": images}
    summary = write_report(predictions, tmp_path)
    assert FILES | {"mistakes.png"} <= {p.name for p in tmp_path.iterdir()}
    check_report(tmp_path, n, classes)
    assert summary["macro_recall"] == pytest.approx(summary["accuracy"], abs=1e-6)  # balanced classes


def test_confusion_counts_written_only_while_readable():
    small, large = torch.eye(20, dtype=torch.long) * 3, torch.eye(21, dtype=torch.long) * 3
    assert len(confusion_figure(small, [str(i) for i in range(20)]).axes[0].texts) == 20
    assert len(confusion_figure(large, [str(i) for i in range(21)]).axes[0].texts) == 0


def test_every_task_reports_through_one_test_step():
    assert DistillationModule.test_step is ImageClassifier.test_step
    assert NoisyStudent.test_step is ImageClassifier.test_step


def test_fit_writes_report_and_tensorboard(tiny_run):
    out = tiny_run / "report"
    assert FILES | {"mistakes.png", "learning_curves.png", "predictions.pt"} <= {p.name for p in out.iterdir()}
    summary = check_report(out, 300, list(torch.load(out / "predictions.pt", weights_only=False)["classes"]))
    metrics = {r["test/acc"] for r in csv.DictReader((tiny_run / "metrics.csv").open()) if r.get("test/acc")}
    assert summary["accuracy"] == pytest.approx(float(metrics.pop()), abs=1e-6)  # the test loop's own accuracy
    (events_dir,) = (tiny_run.parents[1] / "tensorboard" / "fashion_mnist_lenet5").glob("version_*")
    tags = set()
    for events in events_dir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0}).Reload()
        tags |= set(accumulator.Tags()["images"]) | set(accumulator.Tags()["scalars"])
    assert {"report/confusion_matrix", "report/reliability", "report/mistakes", "report/ece"} <= tags
    assert "report/f1/Ankle boot" in tags


def test_report_command_redraws_and_tests_a_checkpoint(tiny_run, tmp_path):
    redrawn = report_from_path(tiny_run, tmp_path / "redrawn")
    assert (redrawn / "per_class.csv").read_text() == (tiny_run / "report" / "per_class.csv").read_text()
    assert (redrawn / "learning_curves.png").is_file()
    (best,) = (tiny_run / "checkpoints").glob("best-*.ckpt")
    tested = report_from_path(best, tmp_path / "tested", accelerator="cpu")
    # the checkpoint's data settings include test_subset=300: the same images, the same numbers
    assert (tested / "confusion_matrix.csv").read_text() == (tiny_run / "report" / "confusion_matrix.csv").read_text()


def test_report_of_knn_on_three_channel_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = {
        "data.channels": 3,
        "data.train_subset": 500,
        "data.test_subset": 200,
        "data.batch_size": 100,
        "trainer.logger": False,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
    }
    model, datamodule, _ = instantiate_from_config(REPO / "configs" / "knn" / "fashion_mnist_pixels.yaml", overrides)
    report = TestReport(output=str(tmp_path / "report"))
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[report], enable_progress_bar=False)
    (result,) = trainer.test(model, datamodule=datamodule, verbose=False)
    summary = check_report(tmp_path / "report", 200, list(datamodule.classes))
    assert summary["accuracy"] == pytest.approx(result["test/acc"], abs=1e-6)
    images = torch.load(tmp_path / "report" / "predictions.pt", weights_only=False)["mistake_images"]
    assert images.shape[1:] == (3, 28, 28) and images.dtype == torch.uint8


def test_cli_adds_the_report_and_can_turn_it_off(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "fashion_mnist" / "lenet5.yaml"
    for overrides, enabled in (({}, True), ({"report.enabled": False}, False)):
        trainer = instantiate_from_config(config, {**overrides, "trainer.logger": False}).trainer
        (report,) = [c for c in trainer.callbacks if isinstance(c, TestReport)]
        assert report.enabled is enabled
