"""The example notebooks: in step with their builder, and they run without errors.

Each notebook is executed top to bottom in a fresh kernel, from a temporary
copy (so the stored outputs are never touched and nothing is written next
to them). Needs the ``notebooks`` extra: ``pip install -e ".[notebooks]"``.
"""
import importlib.util
import shutil
from pathlib import Path

import pytest

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT = 300   # seconds per cell; each notebook takes well under two minutes here

nbformat = pytest.importorskip(
    "nbformat", reason="nbformat is not installed (pip install -e '.[notebooks]')")


def _load_builder():
    spec = importlib.util.spec_from_file_location("numoe_notebook_build", NB_DIR / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUILDER = _load_builder()


def test_every_built_notebook_is_stored():
    assert sorted(BUILDER.NOTEBOOKS) == [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_builder(path):
    """The stored cells are exactly what ``notebooks/_build.py`` generates (rebuild if not)."""
    stored = nbformat.read(path, as_version=4)
    built = BUILDER.build(BUILDER.NOTEBOOKS[path.name])
    assert [(c.cell_type, c.source) for c in stored.cells] == \
        [(c.cell_type, c.source) for c in built.cells], \
        f"{path.name} is out of date: run `python notebooks/_build.py {path.name[:2]}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path):
    """Every cell of the notebook runs without raising, in a fresh kernel."""
    pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[notebooks]')")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e '.[notebooks]')")
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[notebooks]')")
    from nbclient import NotebookClient

    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    # raises CellExecutionError, naming the cell and the traceback, on the first failure
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
