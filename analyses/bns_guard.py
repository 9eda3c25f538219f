"""IG² + BNS with and without a capability guard, paired on the same held-out prompts.

    python analyses/bns_guard.py --out results/bns_guard [--contexts finance commerce] [--max-ppl 0.5]

IG² selects, in every context of the embedded model, a hub neuron (28, 1095) whose ablation alone
raises neutral-text perplexity by ~5. The guard measures each selected neuron's own ablation cost on
the **selection** half of the neutral texts and drops those above ``--max-ppl`` (absolute perplexity);
the rest are suppressed as BNS does. Per row context the unguarded selection is carried as a control of
the guarded one, so both are scored on the same held-out names and templates, and every difference
between them gets a CI from one crossed bootstrap (templates per context, names shared).

Decisions: the axis (gender) is the study's, chosen on the selection split; the threshold 0.5 was set
in the first session *after* the hub neuron had been seen (docs/statistics.md says so); nothing here looks at
the reporting texts or the held-out prompts before the matrix is scored.

Writes ``OUT/transfer/`` (the guarded matrix; controls: unguarded, random, matched), ``OUT/bns_guard.json``
(costs, dropped neurons, contrasts) and ``OUT/bns_guard.md``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from mechbias.core.log import log_to_console
from mechbias.core.models import load_model
from mechbias.core.results import atomic_savefig, atomic_write_json, atomic_write_text, markdown_table
from mechbias.data.contexts import YES_NO_CONTEXTS, Context
from mechbias.eval.cells import TransferConfig
from mechbias.eval.transfer import transfer_matrix
from mechbias.methods.base import Selection
from mechbias.methods.ig2 import capability_guard, neuron_costs
from mechbias.methods.ig2.method import IG2, IG2Config


class GuardedIG2(IG2):
    """IG² + BNS, then the capability guard; the unguarded selection rides along as the control
    ``unguarded`` (scored on the same prompts, so the two can be contrasted)."""

    def __init__(self, config: IG2Config, max_ppl: float, **kw):
        super().__init__(config, **kw)
        self.max_ppl = max_ppl

    def select(self, model, context: Context, axis: str) -> Selection:
        sel = super().select(model, context, axis)
        neurons = sel.artifacts["selection"]
        costs = neuron_costs(model, neurons)  # the selection half of the neutral texts
        guarded = capability_guard(model, neurons, self.max_ppl, costs=costs)
        dropped = sorted(set(neurons.as_pairs()) - set(guarded.as_pairs()))
        self.log(f"{context.name}: {len(neurons)} -> {len(guarded)} neurons; dropped {dropped}")
        iv = guarded.intervention(0.0, self.config.positions, f"BNS guarded {context.name}/{axis}")
        summary = {**sel.summary, "costs": [[l, i, c] for (l, i), c in sorted(costs.items())],
                   "dropped": [list(n) for n in dropped], "n_guarded": len(guarded)}
        return Selection(context.name, axis, iv, {**sel.artifacts, "guarded": guarded}, summary,
                         controls={"unguarded": [sel.intervention]})


def _ci(e: dict, fmt: str = "{:+.3f}") -> str:
    return f"{fmt.format(e['estimate'])} [{fmt.format(e['ci_low'])}, {fmt.format(e['ci_high'])}]"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/bns_guard"))
    ap.add_argument("--figures", type=Path, default=None, help="also write the matrix figure here")
    ap.add_argument("--contexts", nargs="+", default=["finance", "commerce"], choices=YES_NO_CONTEXTS,
                    help="row contexts (selected on); every built-in context is an evaluation column")
    ap.add_argument("--max-ppl", type=float, default=0.5, help="guard: drop neurons costing more than this")
    ap.add_argument("--axis", default="gender")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M ('tiny' for a smoke run)")
    ap.add_argument("--pairs", type=int, default=4, help="IG² name pairs per selection template")
    ap.add_argument("--random", type=int, default=2, help="draws of the random and matched controls")
    ap.add_argument("--boot", type=int, default=2000)
    args = ap.parse_args(argv)
    if args.max_ppl <= 0:
        ap.error("--max-ppl must be > 0")
    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
    t0 = time.time()
    say = lambda s: print(f"[{time.time() - t0:6.0f} s] {s}", flush=True)

    model = load_model(args.model)
    log_to_console()  # the library's progress lines
    method = GuardedIG2(IG2Config(pairs=args.pairs, plain_ig=False, verify_random=0), args.max_ppl)
    cfg = TransferConfig(n_random=args.random, controls=("random", "matched"), n_boot=args.boot)
    tm = transfer_matrix(model, method, args.contexts, args.axis, evaluate_on=list(YES_NO_CONTEXTS),
                         method=f"IG² + BNS, capability guard ≤ {args.max_ppl} ppl", config=cfg)
    tm.save(args.out / "transfer")
    fig = tm.plot()
    atomic_savefig(fig, args.out / "transfer_bns_guard.png", close=False)
    if args.figures:
        atomic_savefig(fig, args.figures / "transfer_bns_guard.png")

    diag, off = tm.diagonal_cells(), tm.offdiagonal_cells()
    every = diag + off

    def mean_of(which: str, cells) -> dict:
        return tm.contrast([(which, r, c, 1.0 / len(cells)) for r, c in cells]).as_dict()

    def minus(a: str, b: str, cells) -> dict:
        return tm.contrast([(a, r, c, 1.0 / len(cells)) for r, c in cells]
                           + [(b, r, c, -1.0 / len(cells)) for r, c in cells]).as_dict()

    info = {ri["context"]: ri for ri in tm.row_info}
    rows = []
    for which, label in (("control/unguarded", "unguarded (IG² + BNS)"), ("after", "guarded"),
                         ("control/matched", "magnitude-matched to the guarded"),
                         ("control/random", "random, same layers as the guarded")):
        key = "perplexity_change" if which == "after" else f"{which.split('/', 1)[1]}_perplexity_change"
        part = {"after": "guarded", "control/unguarded": "selection"}.get(which)
        rows.append({"intervention": label,
                     "neurons per row": ", ".join(str(len(method.selections[c].artifacts[part]))
                                                  for c in args.contexts) if part else "same count",
                     "within: gap removed [95% CI]": _ci(mean_of(which, diag)),
                     "cross: gap removed [95% CI]": _ci(mean_of(which, off)),
                     "Δppl (reporting texts), per row": ", ".join(f"{info[c][key]:+.2f}" for c in args.contexts)})
    contrasts = {
        "guarded - unguarded, all cells": minus("after", "control/unguarded", every),
        "guarded - unguarded, within": minus("after", "control/unguarded", diag),
        "guarded - matched, within": minus("after", "control/matched", diag),
        "guarded - random, within": minus("after", "control/random", diag),
    }
    tests = {"guarded": tm.transfer_test, "unguarded": tm.transfer_test.get("control_unguarded", {})}
    sels = {c: {"selected": method.selections[c].artifacts["selection"].as_pairs(),
                "dropped": method.selections[c].summary["dropped"], "costs": method.selections[c].summary["costs"]}
            for c in args.contexts}
    atomic_write_json({"max_ppl": args.max_ppl, "axis": args.axis, "selections": sels, "rows": rows,
                       "contrasts": contrasts, "transfer_tests": tests, "seconds": round(time.time() - t0)},
                      args.out / "bns_guard.json")
    crow = [{"contrast": k, "gap removed [95% CI]": _ci(v), "p": f"{v['p_value']:.3f}",
             "detectable (80%)": f"{v['min_detectable']:.3f}"} for k, v in contrasts.items()]
    trow = [{"selection": k, "within - cross [95% CI]": f"{t['within_minus_cross']:+.3f} "
             f"[{t['ci_low']:+.3f}, {t['ci_high']:+.3f}]", "p": f"{t['p_value']:.3f}",
             "detectable (80%)": f"{t['min_detectable']:.3f}"} for k, t in tests.items() if t]
    cost = {c: {(l, i): v for l, i, v in s["costs"]} for c, s in sels.items()}
    drop = "; ".join(f"{c}: {len(s['selected'])} selected, dropped "
                     + (", ".join(f"({l}, {i}) at {cost[c][(l, i)]:+.2f} ppl" for l, i in s["dropped"]) or "none")
                     for c, s in sels.items())
    atomic_write_text(f"# IG² + BNS with a capability guard (≤ {args.max_ppl} perplexity per neuron)\n\n"
                      f"Axis {args.axis}; rows {', '.join(args.contexts)}; columns every built-in context; held-out "
                      f"names and templates; gap removed in log-odds. {drop}.\n\n" + markdown_table(rows)
                      + "\n\n" + markdown_table(crow) + "\n\n" + markdown_table(trow)
                      + f"\n\n{round(time.time() - t0)} s.\n", args.out / "bns_guard.md")
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
