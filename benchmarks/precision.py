"""Select fast, evaluate exact: each method's selection at ``exact`` (float32) and at ``fast`` (bfloat16 autocast),
on the embedded model, with the default study's configuration of each method.

For every method it prints and saves (``benchmarks/precision.json``):

* the selection time at each precision (same process, one after the other, the same torch threads);
* how alike the two selections are (:meth:`Intervention.overlap`: Jaccard for units, |cosine| for directions
  and edits, mean cos^2 of principal angles for erasures);
* the reported cell each selection gives, always evaluated exact: the gap removed on the held-out prompts of
  the context it was selected on, with its 95% CI; and the change between the two, as a fraction of the exact
  selection's CI half-width (below 1: the precision of the selection moves the reported number by less than
  its own uncertainty).

    python benchmarks/precision.py [--context finance] [--axis gender] [--methods ig2 prune ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mechbias.core.models import load_model
from mechbias.data.contexts import load_context
from mechbias.eval.cells import EvalSet, TransferConfig, cell_from_grids
from mechbias.methods.base import registered_methods


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", default="finance")
    ap.add_argument("--axis", default="gender")
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "precision.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model()
    ctx = load_context(args.context)
    es = EvalSet.build(model, ctx, args.axis)
    tcfg = TransferConfig(n_random=0, n_boot=2000)
    rows = []
    for name, cls in registered_methods().items():
        if args.methods and name not in args.methods:
            continue
        for step, cfg in cls.study_configs(quick=False, full=False).items():
            got = {}
            for prec in ("exact", "fast"):
                import dataclasses

                method = cls(dataclasses.replace(cfg, precision=prec), seed=0)
                t0 = time.perf_counter()
                iv = method(model, ctx, args.axis)
                secs = time.perf_counter() - t0
                cell = cell_from_grids(es, es.scores(model, iv), iv.n_components, tcfg, selected_on=ctx.name)
                got[prec] = (iv, secs, cell)
            (ie, te, ce), (if_, tf, cf) = got["exact"], got["fast"]
            half = (ce.ci_high - ce.ci_low) / 2
            ov = ie.overlap(if_)
            row = {"step": step, "method": cls.title, "seconds_exact": round(te, 1), "seconds_fast": round(tf, 1),
                   "speedup": round(te / tf, 2) if tf > 0 else None, "overlap": ov.as_dict() if ov else None,
                   "exact": {"intervention": ie.describe(), "gap_removed": ce.gap_removed,
                             "ci": [ce.ci_low, ce.ci_high]},
                   "fast": {"intervention": if_.describe(), "gap_removed": cf.gap_removed,
                            "ci": [cf.ci_low, cf.ci_high]},
                   "change_over_ci_half_width": abs(cf.gap_removed - ce.gap_removed) / half if half > 0 else None}
            rows.append(row)
            ov = row["overlap"] or {}
            print(f"{step:22s} exact {te:7.1f} s, fast {tf:7.1f} s ({row['speedup']}x); overlap "
                  f"{ov.get('measure', '-')} {ov.get('value', float('nan')):.3f}; gap removed exact "
                  f"{ce.gap_removed:+.4f} [{ce.ci_low:+.4f}, {ce.ci_high:+.4f}], fast {cf.gap_removed:+.4f}; "
                  f"|change| / CI half-width {row['change_over_ci_half_width']:.2f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"context": ctx.name, "axis": args.axis, "threads": torch.get_num_threads(),
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
