"""Clear answers for the usual mistakes: too-small inputs, negative learning rates, unwritable output folders,
missing, truncated or other-architecture checkpoints, range errors naming the option, hidden files in image folders,
and test/predict that take the data's description from the checkpoint (docs/reliability.md)."""

import csv
from pathlib import Path

import pytest
import torch
import yaml

from lit_imgcls.checks import check_input_size, check_learning_rates
from lit_imgcls.cli import instantiate_from_config
from lit_imgcls.data.datasets import load_image_folder
from lit_imgcls.errors import ConfigError
from lit_imgcls.models import create_model
from tests.conftest import QUIET, REPO, needs_fashion_mnist, run_cli

CONFIG = str(REPO / "configs" / "fashion_mnist" / "lenet5.yaml")


def test_hidden_files_and_folders_are_not_classes_or_images(image_folder):
    hidden = image_folder / ".ipynb_checkpoints"
    hidden.mkdir()
    (image_folder / "Trouser" / ".cache").mkdir()
    for target in (
        hidden / "a.png",
        image_folder / "Trouser" / ".cache" / "b.png",
        image_folder / "Trouser" / ".c.png",
    ):
        target.write_bytes(next(image_folder.rglob("*.png")).read_bytes())
    data = load_image_folder(image_folder, channels=1)
    assert data.classes == ("Pullover", "T-shirt-top", "Trouser")
    assert len(data) == 60 and not any("/." in source for source in data.sources)


def test_too_small_input_names_small_input():
    net = create_model("alexnet", 10, 1, False, False)
    with pytest.raises(ConfigError, match=r"1x28x28 images .*--model.init_args.small_input=true"):
        check_input_size(net, (1, 28, 28), small_input=False)
    check_input_size(create_model("alexnet", 10, 1, False, True), (1, 28, 28), small_input=True)
    assert net.training  # the check leaves the mode alone


def test_input_check_leaves_other_errors_to_the_run():
    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("not about sizes")

    check_input_size(Broken(), (1, 28, 28), small_input=False)  # no ConfigError: the real run reports it
    bf16 = create_model("lenet5", 10, 1, False, False).to(torch.bfloat16)
    check_input_size(bf16, (1, 28, 28), small_input=None)  # input made in the network's dtype


def test_negative_learning_rate_names_the_option():
    config = {"model": {"init_args": {"optimizer": {"init_args": {"lr": -0.1, "momentum": 0.9}}}}}
    with pytest.raises(ConfigError, match=r"model.init_args.optimizer.init_args.lr=-0.1 is negative"):
        check_learning_rates(config)
    check_learning_rates({"model": {"init_args": {"optimizer": {"init_args": {"lr": 0.1}}}}})


def test_cli_negative_learning_rate(run_main):
    err = run_main("fit", "--config", CONFIG, "--model.init_args.optimizer.init_args.lr=-0.1", *QUIET)
    assert "model.init_args.optimizer.init_args.lr=-0.1" in err


def test_unwritable_output_folder_names_the_option(run_main, tmp_path):
    (tmp_path / "afile").write_text("")
    err = run_main("fit", "--config", CONFIG, "--trainer.default_root_dir=afile/out", *QUIET)
    assert "cannot write to the output folder afile/out" in err and "--trainer.default_root_dir" in err


def test_missing_and_truncated_checkpoints(run_main, tmp_path):
    err = run_main("test", "--config", CONFIG, "--ckpt_path=missing.ckpt", *QUIET)
    assert "checkpoint missing.ckpt not found" in err
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, tmp_path / "whole.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "whole.ckpt").read_bytes()[:500])
    err = run_main("test", "--config", CONFIG, "--ckpt_path=cut.ckpt", *QUIET)
    assert "checkpoint cut.ckpt could not be read" in err and "truncated" in err


@needs_fashion_mnist
def test_val_size_range_error_names_the_option(run_main):
    err = run_main("fit", "--config", CONFIG, "--data.val_size=70000", *QUIET)
    assert "data.val_size=70000" in err and "0..59999" in err


@needs_fashion_mnist
@pytest.mark.slow
def test_checkpoint_of_another_architecture_names_both(run_main, tiny_run):
    best = next((tiny_run / "checkpoints").glob("best-*.ckpt"))
    err = run_main("test", "--config", CONFIG, "--model.init_args.model=cnn4", f"--ckpt_path={best}", *QUIET)
    assert "model.init_args.model=lenet5" in err and "model=cnn4" in err


@needs_fashion_mnist
@pytest.mark.slow
def test_predict_takes_data_from_checkpoint_without_training_data(image_folder, tmp_path):
    train = tmp_path / "train"
    image_folder.rename(train)
    data = [
        "--data.dataset=image_folder",
        f"--data.data_dir={train}",
        "--data.val_size=12",
        "--model.init_args.num_classes=3",
        "--trainer.max_epochs=1",
        *QUIET,
    ]
    fit = run_cli("fit", "--config", CONFIG, *data, "--data.channels=1", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (best,) = tmp_path.glob("runs/fashion_mnist_lenet5/version_0/checkpoints/best-*.ckpt")
    predict_dir = tmp_path / "new_images"
    (train / "Trouser").rename(predict_dir)
    for folder in train.iterdir():  # the training data is gone
        for file in folder.iterdir():
            file.unlink()
    out = tmp_path / "pred.csv"
    args = ["predict", "--config", CONFIG, *data, f"--data.predict_dir={predict_dir}", f"--ckpt_path={best}"]
    predict = run_cli(*args, f"--prediction_writer.output={out}", cwd=tmp_path)
    assert predict.returncode == 0, predict.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 20 and {r["predicted"] for r in rows} <= {"Pullover", "T-shirt-top", "Trouser"}
    wrong = run_cli(*args, "--data.channels=3", cwd=tmp_path)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "data.channels=3 but the checkpoint was trained with channels=1" in wrong.stderr


def test_default_root_dir_alone_decides_where_a_run_writes(tmp_path):
    for config in sorted((REPO / "configs").glob("*/*.yaml")):
        document = yaml.safe_load(config.read_text())
        if config.parent.name == "base":  # fragments (a callbacks list, an optimizer) that configs load in place
            continue
        loggers = (document.get("trainer") or {}).get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers] if isinstance(loggers, dict) else []:
            assert logger["init_args"]["save_dir"].startswith("{default_root_dir}"), config
    root = tmp_path / "scratch"
    trainer = instantiate_from_config(CONFIG, {"trainer.default_root_dir": str(root)}).trainer
    assert [Path(logger.log_dir) for logger in trainer.loggers] == [
        root / "fashion_mnist_lenet5" / "version_0",
        root / "tensorboard" / "fashion_mnist_lenet5" / "version_0",
    ]
