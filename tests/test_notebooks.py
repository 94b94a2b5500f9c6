"""Every notebook in notebooks/ runs top to bottom in a fresh kernel (fast mode), and is committed without outputs."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbformat.v4 import new_code_cell, new_notebook

from tests.conftest import REPO, needs_fashion_mnist

NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "lit-imgcls-test"
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    """A kernel spec running this interpreter (`sys.executable`), whatever kernels the machine has registered."""
    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / KERNEL)
    return KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)


def execute(notebook: nbformat.NotebookNode, kernel_specs: KernelSpecManager, cwd: Path) -> None:
    """Run every cell in a fresh kernel started in `cwd`; raises CellExecutionError on the first failing cell."""
    client = NotebookClient(
        notebook,
        km=KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs),
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()


def test_kernel_is_this_interpreter_and_errors_fail(kernel_specs, tmp_path):
    notebook = new_notebook(cells=[new_code_cell("import sys\nprint(sys.executable)")])
    execute(notebook, kernel_specs, tmp_path)
    assert notebook.cells[0].outputs[0].text.strip() == sys.executable
    with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
        execute(
            new_notebook(cells=[new_code_cell("1 / 0"), new_code_cell("print('not reached')")]), kernel_specs, tmp_path
        )


def test_there_are_notebooks():
    assert [path.name for path in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_augmentations.ipynb",
        "03_knowledge_distillation.ipynb",
        "04_noisy_student_and_knn.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {index} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {index} has an execution count"
    assert notebook.metadata["kernelspec"]["name"] == "python3"


@needs_fashion_mnist
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs(path: Path, kernel_specs: KernelSpecManager, tmp_path: Path, monkeypatch):
    """Execute in notebooks/ (as Jupyter does) on this checkout, runs written to tmp_path; a cell that raises fails."""
    monkeypatch.setenv("LIT_IMGCLS_FAST", "1")
    monkeypatch.setenv("LIT_IMGCLS_RUNS", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    execute(notebook, kernel_specs, NOTEBOOK_DIR)
    print(f"{path.name}: {time.perf_counter() - start:.1f} s with {sys.executable}")
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs), "no figure was drawn"
