"""Which context read carries to new templates: planted v4's context gate against two alternatives,
on selection templates only.

Planted v4's prediction-position neurons are gated by context: a ridge probe through the origin on the MLP
input of layer 18, fitted at the prediction position of the fitting contexts' prompts (+1 for its context,
-1 for the others' and for neutral text and every third position; ``mechbias/groundtruth/construct.py``,
step 4). Its held-out templates keep about two thirds of the planted gap (``analyses/planted_v4_losses.py``).
This script asks, **without reading a held-out template or name**, how well a gate fitted on some selection
templates reads the others. The selection templates of each context are split in two by their order
(even, odd); a gate is fitted on one half (optionally its first ``K`` templates) and read on the other
half, and the halves are swapped. Three reads:

- ``origin``: the construction's gate (penalty 1e-2, the construction's value).
- ``last``: a ridge probe with an intercept, fitted on the prediction positions only (its threshold is
  halfway between the mean read of the gate's context and that of the others on the fitting prompts).
- ``pooled``: the same probe on the mean of the attention input over the prompt's positions (BOS
  excluded): what an attention head with uniform attention could carry to the prediction position.
  ``pooled-kv<k>`` restricts it to the 64 value dimensions of key-value head ``k`` of that layer (what
  such a head, reusing that head's value projection, can carry).

Every gate is scaled so that its fitting prompts' median is 12 (the construction's ``last_gate_on``).
Reported per read, penalty and gated context, on the **unseen** half: the median and 5% quantile of the
gate's pre-activation on its own context, the 95% quantile on each other context, and the mean of the
gate's SiLU (what the planted neurons multiply their output by) on each. Housing is never fitted; it is
read as a context the gate has not seen.

    python analyses/planted_v4_gate.py [--names-per-cell 4] [--out analyses/results/planted_v4_gate.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from mechbias.core.results import atomic_write_json

GATE_ON = 12.0
GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
FIT = ("finance", "commerce", "hiring")
UNSEEN_CONTEXT = "housing"


def summary(values: dict[str, torch.Tensor], own: str) -> dict:
    silu = torch.nn.functional.silu
    out = {}
    for c, v in values.items():
        row = {"mean_silu": float(silu(v).mean()), "n": len(v)}
        if c == own:
            row.update(median=float(v.median()), q05=float(v.quantile(0.05)))
        else:
            row.update(q95=float(v.quantile(0.95)))
        out[c] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--names-per-cell", type=int, default=4, help="selection names per gender x race cell")
    ap.add_argument("--layer", type=int, default=18, help="the layer of the planted heads and prediction neurons")
    ap.add_argument("--fit-templates", type=int, nargs="+", default=[4, 0],
                    help="fit on the first K templates of each half (0: the whole half)")
    ap.add_argument("--out", type=Path, default=Path("analyses/results/planted_v4_gate.json"))
    args = ap.parse_args()
    if args.names_per_cell < 1:
        ap.error(f"--names-per-cell must be at least 1, not {args.names_per_cell}")
    if any(k < 0 for k in args.fit_templates):
        ap.error(f"--fit-templates must be 0 or more, not {args.fit_templates}")
    from mechbias.core.models import embedded_n_layers, load_model
    from mechbias.data.axes import load_axis
    from mechbias.data.contexts import load_context
    from mechbias.data.neutral import neutral_texts
    from mechbias.data.prompts import tokenize
    from mechbias.groundtruth.linalg import balanced_weights, centered_ridge, ridge
    from mechbias.groundtruth.planted import mention_positions
    from mechbias.groundtruth.reads import Item, capture, first_per_cell, gate_target, stack_rows

    n_layers = embedded_n_layers()
    if not 1 <= args.layer < n_layers:
        ap.error(f"--layer must lie in 1..{n_layers - 1}, not {args.layer}")
    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
    t0 = time.time()
    model = load_model()
    ax = load_axis("gender@extended")
    fav = ax.groups.index("female")
    people = first_per_cell(ax.split_people("selection", 0), args.names_per_cell, 0)
    items: list[Item] = []
    half: list[int] = []                 # template half of each item (-1: neutral text)
    rank: list[int] = []                 # the template's rank within its half
    for c in (*FIT, UNSEEN_CONTEXT):
        ctx = load_context(c)
        tpl = sorted({q.template for q in ctx.prompts(ax, templates="selection", names=people[:1], seed=0)})
        ps = ctx.prompts(ax, templates=tpl, names=people, seed=0)
        for p, t in zip(ps, tokenize(model, ps.texts), strict=True):
            items.append(Item(t, c, 1.0 if p.group == fav else -1.0, mention_positions(model, p.text, p.person.name),
                              p.person.name))
            k = tpl.index(p.template)
            half.append(k % 2)
            rank.append(k // 2)
    for t in tokenize(model, neutral_texts(8, split="selection")):
        items.append(Item(t[:96], "neutral", 0.0, []))
        half.append(-1)
        rank.append(-1)
    L = args.layer
    got = capture(model, items, [("in:mlp.gate", L), ("in:attn.v", L)])
    gate_in, attn_in = got[("in:mlp.gate", L)], got[("in:attn.v", L)]
    last = torch.stack([x[-1] for x in gate_in]).double()
    pooled = torch.stack([x[1:].mean(0) for x in attn_in]).double()
    w_v = model.blocks[L].attn.v.original_component.weight.detach().double()
    dh = model.cfg.d_head
    n_kv = w_v.shape[0] // dh
    reads = {"last": last, "pooled": pooled} | {f"pooled-kv{k}": pooled @ w_v[k * dh:(k + 1) * dh].T for k in range(n_kv)}
    print(f"{len(items)} prompts and texts, features in {time.time() - t0:.0f} s", flush=True)
    ctx_of = [it.context for it in items]
    rows = []
    for k_fit in args.fit_templates:
        for read in ("origin", *reads):
            for lam in ((1e-2,) if read == "origin" else GRID):
                for c in ("finance", "commerce"):
                    unseen: dict[str, list[torch.Tensor]] = {}
                    for h in (0, 1):
                        fit = [i for i in range(len(items)) if (half[i] == h and (k_fit == 0 or rank[i] < k_fit)
                                                                and ctx_of[i] in FIT) or half[i] == -1]
                        if read == "origin":
                            Xg, yg = stack_rows([gate_in[i] for i in fit], [items[i] for i in fit],
                                                lambda it, p, c=c: gate_target(c, it, p))
                            w = ridge(Xg, yg, lam, balanced_weights(yg))
                            feats, thr = last, 0.0
                        else:
                            feats = reads[read]
                            named = [i for i in fit if ctx_of[i] != "neutral"]
                            y = torch.tensor([1.0 if ctx_of[i] == c else -1.0 for i in named])
                            w, thr = centered_ridge(feats[named], y, lam)
                        own = torch.tensor([i for i in fit if ctx_of[i] == c])
                        scale = GATE_ON / float((feats[own] @ w - thr).median())
                        for cc in (*FIT, UNSEEN_CONTEXT):
                            idx = torch.tensor([i for i in range(len(items)) if ctx_of[i] == cc and half[i] == 1 - h])
                            unseen.setdefault(cc, []).append(scale * (feats[idx] @ w - thr))
                    res = summary({cc: torch.cat(v) for cc, v in unseen.items()}, c)
                    rows.append({"fit_templates_per_half": k_fit or "all", "read": read, "penalty": lam, "context": c,
                                 "unseen_templates": res})
                    others = "  ".join(f"{cc[:4]} q95 {res[cc]['q95']:6.2f} silu {res[cc]['mean_silu']:5.2f}"
                                       for cc in res if cc != c)
                    print(f"K={k_fit or 'all':>3} {read:10} {lam:>6g} {c:9} own median {res[c]['median']:6.2f} "
                          f"q05 {res[c]['q05']:6.2f} silu {res[c]['mean_silu']:5.2f} | {others}", flush=True)
    n_tpl = {c: len({q.template for q in load_context(c).prompts(ax, templates="selection", names=people[:1], seed=0)})
             for c in (*FIT, UNSEEN_CONTEXT)}
    atomic_write_json({"layer": L, "names_per_cell": args.names_per_cell, "selection_templates": n_tpl,
                       "gate_on": GATE_ON, "rows": rows, "seconds": time.time() - t0}, args.out)
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
