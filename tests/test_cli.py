"""The `lit-imgcls` command end to end: subprocess runs of fit, validate, test and predict on tiny subsets."""

import csv
from pathlib import Path

import pytest
import yaml

from lit_imgcls.data import datasets
from tests.conftest import QUIET, REPO, TINY_FIT, needs_fashion_mnist, run_cli

pytestmark = [needs_fashion_mnist, pytest.mark.slow]
CONFIG = str(REPO / "configs" / "fashion_mnist" / "lenet5.yaml")
TINY = TINY_FIT


def read_metrics(run_dir: Path) -> dict[str, float]:
    """Last logged value of every metric in a CSVLogger's metrics.csv."""
    values: dict[str, float] = {}
    with (run_dir / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def only_run_dir(cwd: Path) -> Path:
    (run_dir,) = sorted((cwd / "runs" / "fashion_mnist_lenet5").glob("version_*"))
    return run_dir


@pytest.fixture(scope="module")
def fitted(tiny_run) -> Path:
    """One `fit --test_after_fit=true` on 1,000 images (conftest's `tiny_run`); returns its run folder."""
    return tiny_run


def test_fit_saves_config_metrics_and_best_checkpoint(fitted):
    config = yaml.safe_load((fitted / "config.yaml").read_text())
    assert config["model"]["class_path"] == "lit_imgcls.tasks.ImageClassifier"
    assert config["data"]["train_subset"] == 1000
    metrics = read_metrics(fitted)
    assert {"train/loss", "train/acc", "val/acc", "val/acc_top5", "test/acc"} <= metrics.keys()
    assert metrics["test/acc"] > 0.4  # 31 steps; chance is 0.1
    assert len(list((fitted / "checkpoints").glob("best-*.ckpt"))) == 1
    assert (fitted / "checkpoints" / "last.ckpt").is_file()


def test_test_and_validate_from_checkpoint_reproduce_fit(fitted, tmp_path):
    (best,) = (fitted / "checkpoints").glob("best-*.ckpt")
    result = run_cli("test", "--config", CONFIG, *TINY, f"--ckpt_path={best}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(only_run_dir(tmp_path))["test/acc"] == pytest.approx(read_metrics(fitted)["test/acc"])
    result = run_cli("validate", "--config", CONFIG, *TINY, f"--ckpt_path={best}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/acc" in result.stdout


def test_predict_writes_csv_with_class_names(fitted, tmp_path):
    (best,) = (fitted / "checkpoints").glob("best-*.ckpt")
    out = tmp_path / "pred.csv"
    result = run_cli(
        "predict", "--config", CONFIG, *TINY, f"--ckpt_path={best}", f"--prediction_writer.output={out}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 300 and [r["index"] for r in rows] == [str(i) for i in range(300)]
    assert rows[0].keys() == {"index", "source", "target", "predicted", "probability", "top_k"}
    assert rows[0]["target"] == "Ankle boot"  # the first Fashion-MNIST test image
    assert all(r["predicted"] in datasets.FASHION_MNIST_CLASSES for r in rows)
    assert len(rows[0]["top_k"].split("|")) == 5
    accuracy = sum(r["predicted"] == r["target"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(read_metrics(fitted)["test/acc"], abs=1e-6)


def test_image_folder_fit_and_predict_round_trip_class_names(image_folder, tmp_path):
    data = [
        "--data.dataset=image_folder",
        f"--data.data_dir={image_folder}",
        f"--data.test_dir={image_folder}",
        f"--data.predict_dir={image_folder}",
        "--data.channels=1",
        "--data.val_size=12",
        "--model.init_args.num_classes=3",
        "--trainer.max_epochs=1",
        *QUIET,
    ]
    result = run_cli("fit", "--config", CONFIG, *data, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (best,) = (only_run_dir(tmp_path) / "checkpoints").glob("best-*.ckpt")
    out = tmp_path / "pred.csv"
    result = run_cli(
        "predict", "--config", CONFIG, *data, f"--ckpt_path={best}", f"--prediction_writer.output={out}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 60 and "target" not in rows[0]
    sources = {Path(r["source"]) for r in rows}
    assert sources == {p for p in image_folder.rglob("*") if p.is_file()}
    assert {r["predicted"] for r in rows} <= {"Pullover", "T-shirt-top", "Trouser"}


def test_print_config_round_trips(tmp_path):
    first = run_cli("fit", "--config", CONFIG, "--data.batch_size=32", "--print_config", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "printed.yaml").write_text(first.stdout)
    second = run_cli("fit", "--config", str(tmp_path / "printed.yaml"), "--print_config", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout == first.stdout
    config = yaml.safe_load(first.stdout)
    assert config["data"]["batch_size"] == 32 and config["model"]["init_args"]["model"] == "lenet5"


def test_user_error_exits_without_traceback(tmp_path):
    result = run_cli("fit", "--config", CONFIG, "--model.init_args.model=resnet81", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unknown model 'resnet81'" in result.stderr and "resnet18" in result.stderr


def test_missing_dataset_names_apt_and_download(run_main, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    err = run_main("fit", "--config", CONFIG, "--data.download=false", *QUIET)
    assert "apt-get install -y dataset-fashion-mnist" in err and "data.download=true" in err


def test_missing_image_folder(run_main, tmp_path, monkeypatch):
    err = run_main("fit", "--config", CONFIG, "--data.dataset=image_folder", "--data.data_dir=nope", *QUIET)
    assert "nope does not exist" in err


def test_empty_image_folder(run_main, tmp_path, monkeypatch):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    err = run_main("fit", "--config", CONFIG, "--data.dataset=image_folder", "--data.data_dir=empty", *QUIET)
    assert "no images found" in err


def test_corrupt_image(run_main, image_folder, monkeypatch, tmp_path):
    (image_folder / "Trouser" / "zz.jpg").write_bytes(b"garbage")
    err = run_main(
        "fit",
        "--config",
        CONFIG,
        "--data.dataset=image_folder",
        f"--data.data_dir={image_folder}",
        "--data.channels=1",
        "--model.init_args.num_classes=3",
        *QUIET,
    )
    assert "zz.jpg" in err and "data.skip_corrupt=true" in err


def test_num_classes_disagreeing_with_data(run_main, tmp_path, monkeypatch):
    err = run_main("fit", "--config", CONFIG, "--model.init_args.num_classes=5", *TINY)
    assert "num_classes=5" in err and "--model.init_args.num_classes=10" in err


def test_bad_data_option(run_main, tmp_path, monkeypatch):
    err = run_main("fit", "--config", CONFIG, "--data.augment=fancy", *QUIET)
    assert "data.augment" in err and "basic" in err
