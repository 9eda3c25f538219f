"""The support matrix (family x method) of the documentation's model page, from the tests' results (issue 13).

Runs ``tests/test_families.py`` and ``tests/test_masked.py`` (small random models of each family, every method against a plain
reference) with ``MECHBIAS_SUPPORT_OUT`` set, reads which path each passing test recorded, and writes
``analyses/support_matrix.json``; the documentation build renders that file with :func:`render`
(``docs/conf.py``), so the page always shows the committed records.
A method a test did not record (it failed, or was not run) shows as "untested".

    python analyses/support_matrix.py            # ~1 min on 2 cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mechbias.core.families import FAMILIES

METHODS = ["bias metric", "IG²", "patching resid_pre", "patching mlp_out", "patching attn_out", "patching heads", "AtP",
           "neuron ablation", "head ablation", "neuron scores", "head scores", "Wanda norms", "GRADIEND gradients",
           "GRADIEND edits", "export (neurons)", "export (heads q)", "export (gradiend edit)"]


SHORT = {"fast (shared KV prefix)": "fast", "fast (KV cache)": "fast", "fast (full sequences)": "fast*",
         "exact (full sequences)": "exact", "exact (one backward)": "exact", "exact": "exact", "hook": "hook",
         "not applicable (masked LM)": "n/a", "exact (at [MASK])": "mask"}


def render(support: dict[str, dict[str, str]]) -> str:
    """Methods as rows, families as columns; cells shortened (legend under the table on the models page)."""
    lines = ["| method | " + " | ".join(FAMILIES) + " |", "|---" * (len(FAMILIES) + 1) + "|"]
    for m in METHODS:
        cells = [SHORT.get(support.get(f, {}).get(m, "untested"), support.get(f, {}).get(m, "untested"))
                 for f in FAMILIES]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "support.json"
        env = {**os.environ, "MECHBIAS_SUPPORT_OUT": str(out)}
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(ROOT / "tests" / "test_families.py"), str(ROOT / "tests" / "test_masked.py"),
                              "-k", "not cli"], env=env, cwd=ROOT)
        support = json.loads(out.read_text())
    (ROOT / "analyses" / "support_matrix.json").write_text(json.dumps(support, indent=1) + "\n")
    table = render(support)
    print(table)
    if rc != 0:
        raise SystemExit(f"tests/test_families.py or tests/test_masked.py failed (exit {rc}); failing cells show as 'untested'")


if __name__ == "__main__":
    main()
