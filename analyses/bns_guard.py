"""BNS with and without a capability guard, from the study's saved IG² selections.

    python analyses/bns_guard.py [--study results/study] [--out results/bns_guard] [--max-ppl 0.5]

The study's IG² step selects, in every context, a hub neuron whose ablation alone
raises neutral-text perplexity by ~5. This script measures every selected
neuron's own cost, drops those above ``--max-ppl``, and recomputes the BNS
transfer matrix (held-out names and templates, random controls, perplexity) for
the guarded selections.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", type=Path, default=Path("results/study"))
    ap.add_argument("--out", type=Path, default=Path("results/bns_guard"))
    ap.add_argument("--figures", type=Path, default=None)
    ap.add_argument("--max-ppl", type=float, default=0.5)
    ap.add_argument("--axis", default="gender")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
    from mechbias.methods.ig2 import capability_guard, neuron_costs
    from mechbias.core.models import load_model
    from mechbias.core.results import Result, atomic_savefig, atomic_write_json
    from mechbias.eval.transfer import transfer_matrix

    model = load_model()
    contexts = ["finance", "commerce", "hiring", "housing"]
    sels = {c: Result.load(args.study / "steps" / "ig2" / f"selection_{c}") for c in contexts}
    # each neuron's cost is measured once, even when several contexts selected it
    every = sorted({n for s in sels.values() for n in s.as_pairs()})
    costs = neuron_costs(model, every)
    guarded = {c: capability_guard(model, s, args.max_ppl, costs=costs) for c, s in sels.items()}
    for c in contexts:
        print(f"{c}: {len(sels[c])} -> {len(guarded[c])} neurons; dropped "
              f"{sorted(set(sels[c].as_pairs()) - set(guarded[c].as_pairs()))}")

    def selector(model, ctx, axis):
        return guarded[ctx.name].intervention(0.0, "all", f"BNS guarded {ctx.name}")

    tm = transfer_matrix(model, selector, contexts, args.axis, method=f"IG² + BNS, capability guard ≤ {args.max_ppl} ppl",
                         eval_contexts=contexts, n_random=2, n_boot=2000, seed=0,
                         log=lambda m: print(m, flush=True))
    tm.save(args.out / "transfer")
    atomic_savefig(tm.plot(), args.out / "transfer_bns_guard.png", close=False)
    if args.figures:
        atomic_savefig(tm.plot(), args.figures / "transfer_bns_guard.png")
    atomic_write_json({"costs": [{"layer": l, "neuron": i, "ppl_change": v} for (l, i), v in sorted(costs.items())],
                       "guarded": {c: g.as_pairs() for c, g in guarded.items()}, "cells": tm.records()},
                      args.out / "bns_guard.json")
    print(json.dumps([{k: c[k] for k in ("selected_on", "evaluated_on", "reduction", "ci_low", "ci_high",
                                         "random_reduction", "perplexity_change")} for c in tm.cells], indent=0))


if __name__ == "__main__":
    main()
