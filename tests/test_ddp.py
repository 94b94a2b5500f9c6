"""A 2-process CPU DDP fit + test through the CLI agrees with a 1-process test of the same checkpoint."""

import json
from pathlib import Path

import pytest

from tests.conftest import QUIET, REPO, needs_fashion_mnist, run_cli
from tests.test_cli import only_run_dir, read_metrics

pytestmark = [needs_fashion_mnist, pytest.mark.slow]
CONFIG = str(REPO / "configs" / "fashion_mnist" / "lenet5.yaml")
N_TEST = 1001  # odd, so DistributedSampler pads one image on 2 ranks


def single_process_test(run_dir: Path, args: list[str], cwd: Path) -> Path:
    """`lit-imgcls test` of `run_dir`'s best checkpoint in one process (lenet5.yaml and `args`); its run folder."""
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    single = run_cli("test", "--config", CONFIG, *args, *QUIET, f"--ckpt_path={best}", cwd=cwd)
    assert single.returncode == 0, single.stderr[-3000:]
    return only_run_dir(cwd)


def padding_tolerance(n: int, world_size: int = 2) -> float:
    """How far `world_size` ranks' accuracy on `n` images may be from one process's: each image DistributedSampler
    repeats to pad the last batch moves it by at most 1 / (n + padding)."""
    padding = -n % world_size
    return padding / (n + padding) + 1e-6


def test_ddp_fit_and_test_match_one_process(tmp_path):
    data = [
        "--data.train_subset=1000",
        "--data.val_size=500",
        f"--data.test_subset={N_TEST}",
        "--data.batch_size=32",
        "--trainer.max_epochs=2",
    ]
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    fit = run_cli("fit", "--config", CONFIG, *data, *ddp, *QUIET, "--test_after_fit=true", cwd=tmp_path / "ddp")
    assert fit.returncode == 0, fit.stderr[-3000:]
    ddp_run = only_run_dir(tmp_path / "ddp")
    ddp_metrics = read_metrics(ddp_run)
    assert ddp_metrics["test/acc"] > 0.4  # the 2-rank fit learned (32 steps; chance is 0.1)

    single_run = single_process_test(ddp_run, data, tmp_path / "single")
    single_acc = read_metrics(single_run)["test/acc"]
    assert abs(ddp_metrics["test/acc"] - single_acc) <= padding_tolerance(N_TEST)
    # the report gathers every rank's predictions once and drops the sampler's padding: exactly the 1-process report
    ddp_report, single_report = ddp_run / "report", single_run / "report"
    assert json.loads((ddp_report / "report.json").read_text())["images"] == N_TEST
    for name in ("confusion_matrix.csv", "per_class.csv"):
        assert (ddp_report / name).read_text() == (single_report / name).read_text()
