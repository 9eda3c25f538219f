"""Score every method against the planted model's known bias neurons.

    python analyses/ground_truth.py --out results/ground_truth [--figures figures]

IG² (contrast pairs), attribution patching over all neurons, neuron-pruning
candidates: precision@k and recall@k of the planted neurons per context, with
the random baseline; IG² also with its all-positions extension (finance). Pruning transfer (selected on finance and on commerce,
evaluated on finance, commerce and hiring) against the oracle matrix from the
manifest. GRADIEND trained on finance: feature separation on held-out names and
the decoder's concentration on the planted neurons.
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
    ap.add_argument("--out", type=Path, default=Path("results/ground_truth"))
    ap.add_argument("--figures", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
    from mechbias.methods.gradiend import GradiendConfig, evaluate_feature, train_gradiend
    from mechbias.groundtruth.scoring import (GroundTruthResult, oracle_transfer, score_atp, score_gradiend, score_ig2,
                                      score_pruning)
    from mechbias.core.models import load_model
    from mechbias.core.models import planted_manifest
    from mechbias.methods.pruning import PruneConfig, pruning_selector
    from mechbias.core.results import atomic_savefig, markdown_table
    from mechbias.eval.transfer import transfer_matrix

    model = load_model("planted")
    cfg = planted_manifest(model)
    contexts = ["finance", "commerce", "hiring"]
    rows, transfer = [], []
    t = time.time()
    rows += score_ig2(model, cfg, contexts, "race", pairs_per_template=2 if args.quick else 4, progress=True)
    # the all-positions extension: costs ~sequence-length times more, so finance with one pair per template
    rows += score_ig2(model, cfg, ["finance"], "race", pairs_per_template=1, position="all", internal_batch_size=64)
    print(f"IG2 done ({time.time() - t:.0f} s)", flush=True)
    rows += score_atp(model, cfg, contexts, "race")
    print(f"AtP done ({time.time() - t:.0f} s)", flush=True)
    pc = PruneConfig(unit="neuron", k=None, score="signed_attribution", select="difference")
    rows += score_pruning(model, cfg, contexts, "race", pc)
    paper = PruneConfig(unit="neuron", k=None)
    rows += score_pruning(model, cfg, contexts, "race", paper)
    print(f"pruning candidates done ({time.time() - t:.0f} s)", flush=True)
    oracle = {(r["selected_on"], r["evaluated_on"]): r for r in oracle_transfer(model, cfg, contexts[:2] + ["hiring"],
                                                                                "race")}
    k = len(cfg["shared"]) + len(cfg["only"]["finance"])
    tm = transfer_matrix(model, pruning_selector(PruneConfig(unit="neuron", k=k, score="signed_attribution",
                                                             select="difference")),
                         ["finance", "commerce"], "race", method="neuron pruning (signed attribution)",
                         eval_contexts=["finance", "commerce", "hiring"], n_random=1, capability=False)
    for c in tm.cells:
        o = oracle[(c["selected_on"], c["evaluated_on"])]
        transfer.append({"method": tm.method, "selected_on": c["selected_on"], "evaluated_on": c["evaluated_on"],
                         "reduction": c["reduction"], "ci_low": c["ci_low"], "ci_high": c["ci_high"],
                         "random_reduction": c["random_reduction"], **o})
    print(f"transfer done ({time.time() - t:.0f} s)", flush=True)
    gres = train_gradiend(model, "finance", "race", GradiendConfig(params="mlp", steps=10 if args.quick else 30,
                                                                   batch_texts=16, seeds=(0,), lr=1e-4))
    evaluate_feature(model, gres, batch_texts=8, n_batches=4, n_neutral=3)
    g = score_gradiend(model, cfg, gres)
    rows.append(g)
    print(f"GRADIEND done ({time.time() - t:.0f} s)", flush=True)
    gt = GroundTruthResult(rows, transfer, {"model": "planted", "contexts": contexts})
    gt.save(args.out)
    fig = gt.plot()
    atomic_savefig(fig, args.out / "ground_truth.png", close=False)
    if args.figures:
        atomic_savefig(fig, args.figures / "ground_truth.png")
    rec = [r for r in rows if "precision" in r]
    text = markdown_table(rec, ["method", "context", "k", "hits", "precision", "recall", "random_precision"])
    text += "\n\n" + markdown_table(transfer, ["selected_on", "evaluated_on", "reduction", "ci_low", "ci_high",
                                               "random_reduction", "oracle_reduction"])
    text += "\n\n" + json.dumps(g, indent=1)
    (args.out / "ground_truth.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
