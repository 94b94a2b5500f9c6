"""benchmarks/gpu_check.py --dry-run: every section runs its real code on the CPU at toy sizes."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, needs_fashion_mnist

pytestmark = [needs_fashion_mnist, pytest.mark.slow]


def test_dry_run_runs_every_section():
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    script = str(REPO / "benchmarks" / "gpu_check.py")
    command = [sys.executable, script, "--dry-run", "--configs", "lenet5", "googlenet"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    sections = ("cuda_tests", "kornia", "augmentation_share", "throughput", "fits", "ddp")
    assert not [name for name in sections if "error" in out[name]], out
    assert out["dry_run"] is True and out["cuda_tests"]["returncode"] in (0, 5)  # 5: none collected
    assert 0 < out["augmentation_share"]["share"] < 1
    assert {"lenet5/32-true", "lenet5/bf16-mixed", "lenet5/16-mixed"} <= out["throughput"].keys()
    assert all(0 <= out["fits"][name]["test_acc"] <= 1 for name in ("lenet5", "googlenet"))
    assert out["ddp"]["returncode"] == 0 and out["ddp"]["test_images"] == 65  # padding dropped
