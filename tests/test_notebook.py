"""The quickstart notebook runs top to bottom (on a tiny model, offline)."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    path = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("MECHBIAS_NOTEBOOK_MODEL", "tiny")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    last = nb.cells[-1].outputs[-1]
    assert "TransferMatrix" in last["data"]["text/plain"]
