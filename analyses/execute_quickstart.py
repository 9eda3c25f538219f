"""Execute the quick-start notebook on the embedded model and save the executed copy the docs render.

    python analyses/execute_quickstart.py            # writes docs/quickstart_notebook.ipynb

The notebook runs in its small configuration (``MECHBIAS_NOTEBOOK_SMALL=1``: fewer steps, pairs and
bootstrap replicates) on the default model, SmolLM2-135M-Instruct, offline. The documentation build never
runs a model: it renders this committed copy (``nb_execution_mode = "off"`` in ``docs/conf.py``). The test
suite executes the same notebook on a tiny random model (``tests/test_notebook.py``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "notebooks" / "quickstart.ipynb"
TARGET = ROOT / "docs" / "quickstart_notebook.ipynb"


def main() -> int:
    nb = nbformat.read(SOURCE, as_version=4)
    os.environ["MECHBIAS_NOTEBOOK_SMALL"] = "1"
    os.environ.pop("MECHBIAS_NOTEBOOK_MODEL", None)
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend: figures become outputs the docs show
    t0 = time.perf_counter()
    work = ROOT / "results" / "quickstart_run"
    work.mkdir(parents=True, exist_ok=True)
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    if errors:
        print(f"the notebook raised: {errors[0].get('ename')}: {errors[0].get('evalue')}", file=sys.stderr)
        return 1
    nb.metadata["mechbias"] = {"executed_by": "analyses/execute_quickstart.py", "small": True,
                               "seconds": round(time.perf_counter() - t0, 1)}
    tmp = TARGET.with_suffix(".tmp")
    nbformat.write(nb, tmp)
    tmp.replace(TARGET)
    print(f"wrote {TARGET.relative_to(ROOT)} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
