"""IG² on every built-in context and axis: attribution, selection, the paper's
verification experiment (suppress x0 / amplify x2 the selected neurons vs. random
neurons from the same layers and vs. plain-IG neurons, on held-out names and
templates), and the overlap of selected neurons between contexts.

    python analyses/ig2_verification.py --out results/ig2 [--axes race gender] [--pairs 6]

Writes, per context and axis, the folder written by ``mechbias ig2``; then
``verification.csv``, ``overlap_<axis>.csv`` and figures. Resumable: a context
whose ``ig2.json`` exists is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("results/ig2"))
    ap.add_argument("--contexts", nargs="+", default=["finance", "commerce", "hiring", "housing"])
    ap.add_argument("--axes", nargs="+", default=["race", "gender"])
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--figures", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))

    import pandas as pd

    from mechbias.ig2 import NeuronSelection, ig2_experiment, selection_overlap
    from mechbias.models import load_model
    from mechbias.plotting import plot_overlap
    from mechbias.results import atomic_savefig, atomic_write_text, markdown_table

    model = load_model()
    rows = []
    for axis in args.axes:
        selections = {}
        for ctx in args.contexts:
            d = args.out / f"{ctx}_{axis}"
            if not (d / "ig2.json").exists():
                t = time.time()
                exp = ig2_experiment(model, ctx, axis, pairs_per_template=args.pairs, progress=True)
                exp.save(d)
                atomic_savefig(exp.attributions.plot(exp.selection), d / "figures" / f"ig2_{ctx}_{axis}.png")
                atomic_savefig(exp.verification.plot(), d / "figures" / f"ig2_verification_{ctx}_{axis}.png")
                print(f"{ctx}/{axis}: {time.time() - t:.0f} s", flush=True)
            summary = json.loads((d / "ig2.json").read_text())
            selections[ctx] = NeuronSelection.load(d / "selection")
            for r in summary["verification"]:
                rows.append({"context": ctx, "axis": axis, "favoured": summary["favoured_group"],
                             "completeness_error_median": summary["completeness_error_median"],
                             "completeness_error_layer0": summary["completeness_error_per_layer"][0],
                             **{k: v for k, v in r.items() if k != "random_draws"}})
        ov = selection_overlap(selections, model.cfg.d_mlp)
        ov.to_csv(args.out / f"overlap_{axis}.csv", index=False)
        fig = plot_overlap(ov, f"Overlap of IG²-selected neurons between contexts ({axis})")
        atomic_savefig(fig, args.out / f"ig2_overlap_{axis}.png", close=False)
        if args.figures:
            atomic_savefig(fig, args.figures / f"ig2_overlap_{axis}.png")
    df = pd.DataFrame(rows)
    df.to_csv(args.out / "verification.csv", index=False)
    atomic_write_text(markdown_table(rows), args.out / "verification.md")
    print(df.to_string())


if __name__ == "__main__":
    main()
