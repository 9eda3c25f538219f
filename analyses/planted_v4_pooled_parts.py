"""Which part of the pooled-context v4 attempt moves the gap in which context, on its fitting prompts only.

Rebuilds the attempt (``ConstructConfig(context_pool=True)``, the flags of analyses/planted_v4_pooled_attempt.log)
and zeroes each part of each chain (the context neuron, the pooling head, the name neurons with the pointer,
the group head, the prediction neurons, the whole chain) on the selection templates x the 16 selection names
per cell that the construction read; no held-out template or name is read. docs/groundtruth.md.

    python analyses/planted_v4_pooled_parts.py [--out analyses/results/planted_v4_pooled_parts.json]
"""
import argparse
import os
import time
from pathlib import Path

import torch

from mechbias.core.log import log_to_console
from mechbias.core.models import load_model
from mechbias.core.results import atomic_write_json
from mechbias.data.axes import load_axis
from mechbias.data.contexts import load_context
from mechbias.eval.cells import EvalSet, TransferConfig, evaluate
from mechbias.groundtruth.construct import ConstructConfig, construct_planted
from mechbias.groundtruth.reads import first_per_cell
from mechbias.interventions.base import Compose
from mechbias.interventions.units import HeadIntervention, NeuronIntervention

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--out", type=Path, default=Path("analyses/results/planted_v4_pooled_parts.json"))
args = ap.parse_args()
log_to_console()
torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
t0 = time.time()
model = load_model()
cfg = ConstructConfig(axis="gender@extended", favoured="female", shift=0.15, templates="selection", names_per_cell=16,
                      fit_contexts=("finance", "commerce", "hiring", "housing"), calibrate_rounds=4, context_pool=True)
delta, plant, stats = construct_planted(model, cfg)
print("built", time.time() - t0, flush=True)
people = first_per_cell(load_axis(cfg.axis).split_people("selection", 0), 16, 0)
ctxs = ["finance", "commerce", "hiring", "housing"]
sets = {c: EvalSet.build(model, load_context(c), cfg.axis, templates="selection", names=people) for c in ctxs}
tc = TransferConfig(n_random=0, controls=(), capability=False, n_boot=1000)
out = {}
for c in cfg.planted:
    name_only = [tuple(u) for u in plant.only[c][:-1]]
    ctx_n = [tuple(plant.only[c][-1])]
    last = [tuple(u) for u in plant.only_last[c]]
    group_head, pool_head = [tuple(plant.heads[c][0])], [tuple(plant.heads[c][1])]
    ivs = {"context neuron": NeuronIntervention(ctx_n), "pooling head": HeadIntervention(pool_head),
           "name neurons and pointer": NeuronIntervention(name_only), "group head": HeadIntervention(group_head),
           "prediction neurons": NeuronIntervention(last),
           "whole chain": Compose([NeuronIntervention(name_only + ctx_n + last), HeadIntervention(group_head + pool_head)])}
    for k, iv in ivs.items():
        row = {}
        for e in ctxs:
            cell = evaluate(model, iv, sets[e], None, tc, selected_on=c)
            row[e] = [round(cell.gap_change, 4), round(cell.ci_low, 4), round(cell.ci_high, 4)]
        out[f"{c}: {k}"] = row
        print(f"{c}: {k}: " + ", ".join(f"{e} {v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]" for e, v in row.items()), flush=True)
out["n_prompts"] = {e: len(sets[e].prompts.texts) for e in ctxs}
atomic_write_json({"selection_prompts": out, "seconds": time.time() - t0,
                   "stats": {k: v for k, v in stats.items() if k.startswith(("context_read", "pool_", "last_"))}}, args.out)
print("done", time.time() - t0)
