"""Shared fixtures: real Fashion-MNIST subsets, image folders written to tmp_path, CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import lightning.pytorch as pl
import pytest
import torch

from lit_imgcls.cli import main
from lit_imgcls.data.datasets import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, load_fashion_mnist
from lit_imgcls.data.tensors import ImageTensors

REPO = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 on a 2-core machine: two torch thread pools of 2 would oversubscribe the cores (10x slower here)
    torch.set_num_threads(1)
HAS_FASHION_MNIST = (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file()
needs_fashion_mnist = pytest.mark.skipif(
    not HAS_FASHION_MNIST,
    reason=f"Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist ({DEBIAN_FASHION_MNIST})",
)


def needs_cuda(test):
    """Mark `test` as a CUDA test (`pytest -m cuda`, run by benchmarks/gpu_check.py) that skips without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or model summary; `kwargs` override any of them."""
    options = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    return pl.Trainer(**{**options, "enable_model_summary": False, **kwargs})


@pytest.fixture(scope="session")
def fashion_test() -> ImageTensors:
    """The 10,000 real Fashion-MNIST test images (uint8, 1x28x28)."""
    if not HAS_FASHION_MNIST:
        pytest.skip(f"Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist ({DEBIAN_FASHION_MNIST})")
    return load_fashion_mnist("data", train=False, download=False)


def write_image_folder(root: Path, data: ImageTensors, per_class: int, classes: int = 3, ext: str = ".png") -> Path:
    """Write `per_class` real images of the first `classes` classes as `root/<class>/<i><ext>`."""
    names = [FASHION_MNIST_CLASSES[c].replace("/", "-") for c in range(classes)]
    for label, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        picks = (data.targets == label).nonzero().flatten()[:per_class]
        for i, index in enumerate(picks.tolist()):
            cv2.imwrite(str(root / name / f"{i:04d}{ext}"), data.images[index, 0].numpy())
    return root


@pytest.fixture
def image_folder(tmp_path: Path, fashion_test: ImageTensors) -> Path:
    """A 3-class ImageFolder of real Fashion-MNIST images, half PNG and half JPEG."""
    root = tmp_path / "folder"
    write_image_folder(root, fashion_test, per_class=20, ext=".png")
    for path in sorted(root.rglob("*.png"))[::2]:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(path.with_suffix(".jpg")), image)
        path.unlink()
    return root


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m lit_imgcls ARGS` in `cwd` and return the finished process (stdout/stderr as text)."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lit_imgcls", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


TINY_FIT = [
    "--data.train_subset=1000",
    "--data.val_size=256",
    "--data.test_subset=300",
    "--data.batch_size=32",
    "--trainer.max_epochs=1",
    *QUIET,
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One LeNet-5 `fit --test_after_fit=true` of 31 steps on 1,000 Fashion-MNIST images; its run folder."""
    if not HAS_FASHION_MNIST:
        pytest.skip(f"Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist ({DEBIAN_FASHION_MNIST})")
    cwd = tmp_path_factory.mktemp("tiny_run")
    config = REPO / "configs" / "fashion_mnist" / "lenet5.yaml"
    result = run_cli("fit", "--config", str(config), *TINY_FIT, "--test_after_fit=true", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = sorted((cwd / "runs" / "fashion_mnist_lenet5").glob("version_*"))
    return run_dir


@pytest.fixture
def run_main(capsys, monkeypatch, tmp_path):
    """Run the CLI in this process (in tmp_path), expecting a user error; returns what it printed to stderr."""
    monkeypatch.setattr("sys.argv", ["lit-imgcls"])
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main([*args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "lit-imgcls: error:" in err
        return err

    return run
