"""The notebooks: stored without outputs, and each runs top to bottom on tiny settings (MEDSEG_NB_QUICK=1)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
KERNEL = "medseg-tests"


def test_notebooks_are_the_three_and_stored_without_outputs():
    assert [path.name for path in NOTEBOOKS] == [
        "01_data_and_augmentation.ipynb",
        "02_gradient_flow.ipynb",
        "03_compare_experiments.ipynb",
    ]
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"
        assert "MEDSEG_NB_QUICK" in notebook.cells[1].source, f"{path.name}: settings come first"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Jupyter kernel running this interpreter (the project's venv), found first through JUPYTER_PATH."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    folder = Path(install(kernel_name=KERNEL, prefix=str(prefix)))
    assert json.loads((folder / "kernel.json").read_text())["argv"][0] == sys.executable
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
        yield KERNEL


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebooks_run_on_tiny_settings(path, kernel, micro_ablation, monkeypatch):
    monkeypatch.setenv("MEDSEG_NB_QUICK", "1")
    monkeypatch.setenv("MEDSEG_NB_RUNS", str(micro_ablation))  # absolute: the notebooks join it to the repo
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs), "every notebook draws something"
