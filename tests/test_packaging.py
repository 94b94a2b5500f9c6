"""setup.cfg and environment.yml list the same packages; the entry points run."""

import configparser
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO


def setup_cfg_requirements() -> set[str]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines() + config["options.extras_require"]["dev"].splitlines()
    return {line.strip() for line in lines if line.strip()}


def environment_yml_requirements() -> set[str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    (pip,) = [dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict)]
    return set(pip)


def test_environment_yml_matches_setup_cfg():
    assert environment_yml_requirements() == setup_cfg_requirements()


def test_torch_pinned_in_both():
    for requirements in (setup_cfg_requirements(), environment_yml_requirements()):
        assert {"torch==2.14.1", "torchvision==0.29.1"} <= requirements


def test_environment_python_is_311():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]


@pytest.mark.parametrize(
    "command", [[sys.executable, "-m", "lit_imgcls"], [str(Path(sys.executable).parent / "lit-imgcls")]]
)
def test_entry_points_offer_the_four_subcommands(command):
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "{fit,validate,test,predict}" in result.stdout
