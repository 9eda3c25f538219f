"""Cross-fitted transfer on the embedded model: how much a method's cells move when it selects on the other half.

    python analyses/crossfit.py [--method steer] [--splits 2] [--out analyses/results/crossfit_steer]

Runs :func:`mechbias.crossfit_matrix` (finance and commerce rows and columns, gender axis, no random controls,
no capability texts: the cells alone) and writes the result (``OUT/result.json``) and ``OUT/crossfit.md``: per
cell the cross-fitted bias removed with its 95% interval, each split's two folds, and the spread between
splits; then the cross-fitted within - cross difference. Nothing here chooses anything.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from mechbias.core.models import load_model, model_label
from mechbias.core.results import atomic_write_text, markdown_table
from mechbias.eval.cells import TransferConfig
from mechbias.eval.crossfit import crossfit_matrix
from mechbias.methods.base import get_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="steer")
    ap.add_argument("--splits", type=int, default=2)
    ap.add_argument("--contexts", nargs="+", default=["finance", "commerce"])
    ap.add_argument("--axis", default="gender")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
    out = args.out or Path("analyses/results") / f"crossfit_{args.method}"
    model = load_model(args.model)
    cls = get_method(args.method)
    cfg = TransferConfig(n_random=0, controls=(), capability=False, n_boot=2000, seed=0)
    cf = crossfit_matrix(model, lambda: cls(cls.Config()), args.contexts, args.axis, config=cfg,
                         splits=args.splits, method=cls.title)
    cf.save(out)
    rows = [{"selected on": c["selected_on"], "evaluated on": c["evaluated_on"],
             "removed, cross-fitted [95% CI]": f"{c['gap_removed']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]",
             "p": f"{c['p_value']:.3f}",
             "folds per split": "; ".join(f"{a:+.3f} / {b:+.3f}" for a, b in c["folds"]),
             "SD between splits": "-" if c["between_split_sd"] is None else f"{c['between_split_sd']:.3f}"}
            for c in cf.cells]
    t = cf.test
    test = (f"within - cross, cross-fitted: {t['within_minus_cross']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}], "
            f"p {t['p_value']:.3f}; SD between splits "
            + ("-" if t.get("between_split_sd") is None else f"{t['between_split_sd']:.3f}")
            if "within_minus_cross" in t else t.get("note", ""))
    text = "\n".join([f"# Cross-fitted transfer: {cls.title}, {args.axis}, {model_label(model)}",
                      "", f"{args.splits} split(s) x 2 folds; bias removed in log-odds (positive: the gap shrank).",
                      "", markdown_table(rows), "", test, ""])
    atomic_write_text(text, out / "crossfit.md")
    print(text)


if __name__ == "__main__":
    main()
