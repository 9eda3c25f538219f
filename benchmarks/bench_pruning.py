"""Pruning speed on the embedded model: scoring a context per unit, and evaluating one transfer cell.

The cell evaluation (held-out names x templates under the pruning intervention)
uses mechbias' shared-prefix batching; its peer is the same scoring with prefix
sharing off (plain length-bucketed batches). Prints seconds and the ratio.

    python benchmarks/bench_pruning.py
"""

from __future__ import annotations

import os
import time

import torch


def main() -> None:
    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
    from mechbias.core.models import load_model
    from mechbias.data.contexts import load_context
    from mechbias.eval.metrics import contrast_scores
    from mechbias.methods.pruning import PruneConfig, candidates

    model = load_model()
    ctx = load_context("finance")
    ps = ctx.prompts("gender", templates="heldout", names="heldout")
    contrast_scores(model, ps.subset(range(8)))  # warm-up
    print(f"embedded SmolLM2-135M-Instruct, finance/gender; {torch.get_num_threads()} thread(s)")
    print(f"{'unit':<34}{'score s':>9}{'cell s (shared prefix)':>24}{'cell s (plain)':>16}{'ratio':>7}")
    for name, cfg in [("neuron (activation, set diff.)", PruneConfig(unit="neuron", k=None)),
                      ("neuron (signed attribution)", PruneConfig(unit="neuron", k=50, score="signed_attribution",
                                                                  select="difference", common=None)),
                      ("weight (Wanda, chat calibration)", PruneConfig(unit="weight", k=None)),
                      ("weight (Wanda, prompt only)", PruneConfig(unit="weight", k=None, calibration="prompt")),
                      ("head (greedy, 10 rounds)", PruneConfig(unit="head", k=10, common=None)),
                      ("head (one-shot sum)", PruneConfig(unit="head", k=10, select="sum"))]:
        t = time.perf_counter()
        iv = candidates(model, ctx, "gender", cfg).intervention(cfg.k, cfg)
        t_score = time.perf_counter() - t
        t = time.perf_counter()
        contrast_scores(model, ps, intervention=iv, share_prefix=True)
        t_cell = time.perf_counter() - t
        t = time.perf_counter()
        contrast_scores(model, ps, intervention=iv, share_prefix=False)
        t_plain = time.perf_counter() - t
        print(f"{name:<34}{t_score:>9.1f}{t_cell:>24.1f}{t_plain:>16.1f}{t_plain / t_cell:>7.1f}")


if __name__ == "__main__":
    main()
