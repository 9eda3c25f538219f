"""Where planted v4's gap is lost: the oracle's removal on the construction's own prompts and on new names,
new templates or both (docs/groundtruth.md, "Where the planted gap is lost").

v4 was built when every context had 10 templates, so the contexts are cut to their first 10 (its 5 selection
templates are the fitting templates). Fitting names are the 16 selection names per race x gender cell that the
construction read (first by name hash); held-out names are the roster's 200 held-out names.

    python analyses/planted_v4_losses.py [--out analyses/results/planted_v4_losses.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from ground_truth import first_templates

from mechbias.core.results import atomic_write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("analyses/results/planted_v4_losses.json"))
    args = ap.parse_args()
    first_templates(10)  # before any context loads
    from mechbias.core.models import load_model
    from mechbias.data.axes import load_axis
    from mechbias.data.contexts import load_context
    from mechbias.eval.cells import EvalSet, TransferConfig, evaluate
    from mechbias.groundtruth.delta import planted_manifest
    from mechbias.groundtruth.reads import first_per_cell
    from mechbias.groundtruth.recovery import oracle_intervention

    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
    t0 = time.time()
    model = load_model("planted-v4")
    manifest = planted_manifest(model)
    sel = load_axis("gender@extended").split_people("selection", 0)

    fitting = first_per_cell(sel, 16, 0)  # the names the construction read
    tc = TransferConfig(n_random=0, controls=(), capability=False, n_boot=1000)
    rows = []
    for c in ("finance", "commerce"):
        iv = oracle_intervention(manifest, c)
        for names_label, names in (("fitting", fitting), ("held-out", "heldout")):
            for templates in ("selection", "heldout"):
                es = EvalSet.build(model, load_context(c), "gender@extended", templates=templates, names=names)
                x = evaluate(model, iv, es, None, tc, selected_on=f"oracle {c}")
                rows.append({"context": c, "names": names_label, "templates": "fitting" if templates == "selection"
                             else "held-out", "n_prompts": len(es.prompts), "gap": x.gap_before,
                             "chain_removal": x.gap_change, "ci_low": x.ci_low, "ci_high": x.ci_high})
                print(f"{c:<9} {names_label:<9} names x {rows[-1]['templates']:<9} templates  removal "
                      f"{x.gap_change:+.3f} [{x.ci_low:+.3f}, {x.ci_high:+.3f}]  ({time.time() - t0:.0f} s)", flush=True)
    atomic_write_json({"model": "planted-v4", "first_templates": 10, "n_boot": 1000, "rows": rows,
                       "seconds": round(time.time() - t0)}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
