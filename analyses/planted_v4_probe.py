"""How well planted v4's group probe carries to new names, on selection names only.

Planted v4's name neurons read the name's gender with a ridge probe on the MLP input of layer 17 at the
name's tokens (``mechbias/groundtruth/construct.py``, step 1). Its held-out effect is a fifth of the fitted
one. This script measures, **on the selection names only** (no held-out name or template is read), how much of
the probe's separation carries to names it was not fitted on, for the penalty grid the construction searches,
a wider grid, and the plain difference of group means, with 8, 16 and 25 training names per race x gender cell.

The selection names are split in two by the construction's own fold (a hash of each name's letters): the
probe is fitted on fold 0 and read on fold 1. Reported per setting: sign accuracy on fold 1 and the
**carry-over** = (mean fold-1 projection of group A - group B) / (the same on the fitting names): the share
of the planted shift a linear reader would keep on new names.

    python analyses/planted_v4_probe.py [--contexts finance] [--templates 5] [--out analyses/results/planted_v4_probe.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from mechbias.core.models import embedded_n_layers, load_model
from mechbias.core.results import atomic_write_json
from mechbias.data.axes import load_axis, stable_hash
from mechbias.data.contexts import load_context
from mechbias.data.prompts import tokenize
from mechbias.groundtruth.linalg import ridge
from mechbias.groundtruth.planted import mention_positions
from mechbias.groundtruth.reads import Item, capture, name_fold, stack_rows

GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", nargs="+", default=["finance"])
    ap.add_argument("--templates", type=int, default=5, help="the first N selection templates of each context")
    ap.add_argument("--layer", type=int, default=17)
    ap.add_argument("--out", type=Path, default=Path("analyses/results/planted_v4_probe.json"))
    args = ap.parse_args()
    if args.templates < 1:
        ap.error(f"--templates must be at least 1, not {args.templates}")
    for c in args.contexts:
        try:
            load_context(c)
        except (KeyError, ValueError, FileNotFoundError) as e:
            ap.error(f"--contexts: {e}")
    n_layers = embedded_n_layers()
    if not 0 <= args.layer < n_layers:
        ap.error(f"--layer must lie in 0..{n_layers - 1}, not {args.layer}")
    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", 1)))
    t0 = time.time()
    model = load_model()
    ax = load_axis("gender@extended")
    fav = ax.groups.index("female")
    people = ax.split_people("selection", 0)
    items = []
    for c in args.contexts:
        ctx = load_context(c)
        tpl = sorted({q.template for q in ctx.prompts(ax, templates="selection", names=people[:1], seed=0)})
        ps = ctx.prompts(ax, templates=tpl[: args.templates], names=people, seed=0)
        for p, t in zip(ps, tokenize(model, ps.texts), strict=True):
            items.append(Item(t, c, 1.0 if p.group == fav else -1.0, mention_positions(model, p.text, p.person.name),
                               p.person.name))
    feats = capture(model, items, [("in:mlp.gate", args.layer)])[("in:mlp.gate", args.layer)]
    X, y = stack_rows(feats, items, lambda it, p: it.sign if p in it.name_positions else None)
    names = [it.name for it in items for p in range(1, len(it.tokens)) if p in it.name_positions]
    cell = {p.name: (p.race, p.gender) for p in people}
    fold = torch.tensor([name_fold(n) for n in names])
    rank: dict[str, int] = {}
    for key in set(cell.values()):
        members = sorted((n for n in cell if cell[n] == key and name_fold(n) == 0), key=lambda n: stable_hash(0, n))
        rank.update({n: i for i, n in enumerate(members)})
    test = fold == 1
    rows = []
    for m in (8, 16, 25):
        train = torch.tensor([name_fold(n) == 0 and rank[n] < m for n in names])
        Xt, yt = X[train].double(), y[train]
        fits = {f"ridge {lam:g}": ridge(Xt, yt, lam) for lam in GRID}
        fits["difference of means"] = Xt[yt > 0].mean(0) - Xt[yt < 0].mean(0)
        for label, w in fits.items():
            pt, pe = Xt @ w, X[test].double() @ w
            sep_t = float(pt[yt > 0].mean() - pt[yt < 0].mean())
            sep_e = float(pe[y[test] > 0].mean() - pe[y[test] < 0].mean())
            acc = float(((pe > pe.median()) == (y[test] > 0)).double().mean())  # offset-free: split at the median
            rows.append({"train_names_per_cell": m, "probe": label, "carry_over": sep_e / sep_t,
                         "new_name_sign_accuracy": acc,
                         "fit_sign_accuracy": float(((pt > pt.median()) == (yt > 0)).double().mean())})
            print(f"{m:>3} names/cell  {label:<22} carry-over {sep_e / sep_t:5.2f}  new-name accuracy {acc:.3f}  "
                  f"fit accuracy {rows[-1]['fit_sign_accuracy']:.3f}", flush=True)
    atomic_write_json({"layer": args.layer, "contexts": args.contexts, "templates": args.templates,
                       "n_rows": len(y), "rows": rows, "seconds": time.time() - t0}, args.out)
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
