"""Every notebook in notebooks/ runs top to bottom (small-data mode) and is stored without outputs.

The notebooks run in a Jupyter kernel of this Python (nbclient, kernel ``python3`` from ipykernel)
with ``TRANSFERKIT_NOTEBOOK_SMALL=1``: the tiny test backbone on the bundled demo photos, seconds
each. A cell that raises fails the test with the cell's traceback.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_notebooks_cover_the_documented_topics():
    names = " ".join(nb.stem for nb in NOTEBOOKS)
    for topic in ("quickstart", "features-and-scikit-learn", "fine-tuning-and-grad-cam", "results-tables"):
        assert topic in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_notebook_is_stored_without_outputs_and_without_library_code(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip the outputs"
            # Short cells calling transferkit: no classes, at most a small helper function.
            tree = ast.parse(cell.source)
            assert not any(isinstance(node, ast.ClassDef) for node in ast.walk(tree)), path.name
            assert len(cell.source.splitlines()) <= 30, f"{path.name}: a cell of library code? keep cells short"
    assert any("import transferkit" in cell.source for cell in nb.cells if cell.cell_type == "code")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_notebook_runs_in_small_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(tmp_path)}})  # outputs land in tmp_path/runs
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{exc}")
    assert (tmp_path / "runs").is_dir()
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors
