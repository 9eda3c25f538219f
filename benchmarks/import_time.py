"""Import time of mechbias against TransformerLens alone, in fresh interpreters of the same run.

``import mechbias`` imports TransformerLens (the bridge), transformers and torch itself; what it adds on top
should stay small: no Ray, lm-eval or captum, and no hashing of source files at import (issue 36). Prints
the median of 3 fresh interpreters each, and the difference, and which heavy optional packages each import
pulled in.

    python benchmarks/import_time.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

PROBE = ("import sys, time; t = time.perf_counter(); import {mod}; dt = time.perf_counter() - t; "
         "import json; print(json.dumps({{'s': dt, 'loaded': [m for m in ('ray', 'lm_eval', 'captum') "
         "if m in sys.modules]}}))")


def timed(mod: str, n: int = 3) -> tuple[float, list[str]]:
    runs = []
    for _ in range(n):
        out = subprocess.run([sys.executable, "-c", PROBE.format(mod=mod)], capture_output=True, text=True,
                             check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return statistics.median(r["s"] for r in runs), runs[-1]["loaded"]


def main() -> None:
    tl, tl_loaded = timed("transformer_lens")
    mb, mb_loaded = timed("mechbias")
    print(f"import transformer_lens: {tl:.2f} s (median of 3 fresh interpreters; optional packages loaded: "
          f"{tl_loaded or 'none'})")
    print(f"import mechbias:         {mb:.2f} s (optional packages loaded: {mb_loaded or 'none'})")
    print(f"mechbias adds {mb - tl:+.2f} s ({mb / tl:.2f}x TransformerLens alone); goal: <= +1 s")


if __name__ == "__main__":
    main()
