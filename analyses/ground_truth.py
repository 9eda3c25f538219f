"""Score every method against the planted model's known bias units.

    python analyses/ground_truth.py --out results/ground_truth [--model planted] [--figures figures] [--quick]
    python analyses/ground_truth.py --model planted-v3 --methods gradiend --no-recovery \
        --merge results/ground_truth_v3 --out results/ground_truth_v3_gradiend   # add one method to a run

On ``load_model("planted")`` (v3: context-specific units dominate; see
``analyses/train_planted.py``), for the selection contexts finance and commerce:

1. **Unit recovery**: each method's ranking of neurons (IG², with
   ``--all-positions`` also its all-positions extension, AtP, pruning scores) or heads (exact head patching, AtP, attention
   to the name) against the planted units of the context, precision/recall at k
   (k = number of planted units of that type for the context) with
   Clopper-Pearson intervals, recall per kind (name-position neurons,
   prediction-position neurons, heads) and the chance level.
2. **Transfer-matrix recovery**: each registered method selects on finance and on
   commerce and is evaluated on all four contexts' held-out split (the same
   evaluation sets as the oracle, which zeroes exactly the planted units of the
   row's context). Per method: Pearson r and mean absolute error between its and
   the oracle's cells (``gap_removed``, log-odds), with CIs from one bootstrap of
   the shared design, and whether its diagonal - off-diagonal test detects the
   planted difference.

Writes ``OUT/ground_truth.json`` (a GroundTruthResult), ``OUT/ground_truth.md``
(the documentation's tables) and ``OUT/ground_truth.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch

from mechbias.core.models import load_model
from mechbias.core.results import atomic_savefig, atomic_write_text, markdown_table
from mechbias.data.axes import load_axis
from mechbias.data.contexts import YES_NO_CONTEXTS, load_context
from mechbias.data.pairs import make_pairs
from mechbias.eval.cells import EvalSet, TransferConfig
from mechbias.eval.transfer import transfer_matrix
from mechbias.groundtruth.delta import planted_manifest
from mechbias.groundtruth.recovery import (
    GroundTruthResult,
    matrix_recovery,
    oracle_matrix,
    rank_recovery,
    ranked_units,
    truth_units,
)
from mechbias.interventions.units import HeadIntervention, NeuronIntervention
from mechbias.methods.gradiend.method import Gradiend, GradiendConfig
from mechbias.methods.ig2 import contrast_units, run_ig2
from mechbias.methods.ig2.method import IG2, IG2Config
from mechbias.methods.leace import Leace, LeaceConfig
from mechbias.methods.patching import attribution_patch
from mechbias.methods.patching.method import Patching, PatchingConfig
from mechbias.methods.pruning import PruneConfig, candidates
from mechbias.methods.pruning.method import Pruning
from mechbias.methods.steering import Steering, SteeringConfig

NEURON_KINDS = ("neuron@name", "neuron@last")
MATRIX_METHODS = ("ig2", "patching", "prune_neuron", "prune_neuron_paper", "prune_weight", "prune_head", "steering",
                  "gradiend", "leace")


def selected_units(iv) -> dict[str, set]:
    out: dict[str, set] = {"neurons": set(), "heads": set()}
    parts = getattr(iv, "parts", [iv])
    for p in parts:
        if isinstance(p, NeuronIntervention):
            out["neurons"] |= {(l, i) for l, idx in p.neurons.items() for i in idx}
        elif isinstance(p, HeadIntervention):
            out["heads"] |= {(l, h) for l, idx in p.heads.items() for h in idx}
    return out


def first_templates(n: int) -> None:
    """Every context loaded from now on in this process keeps its first ``n`` templates (and the split blocks
    inside them; a context's blocks are split on their own, so these templates keep their split)."""
    from mechbias.data import contexts as C

    parse = C.parse_context

    def parse_first(data: dict, source: str = "<dict>"):
        ctx = parse(data, source)
        if len(ctx.templates) <= n:
            return ctx
        blocks, total = [], 0
        for b in ctx.split_blocks:
            if total + b > n:
                break
            blocks.append(b)
            total += b
        if ctx.split_blocks and total != n:
            raise SystemExit(f"--first-templates {n} cuts a split block of {ctx.name} ({ctx.split_blocks})")
        return dataclasses.replace(ctx, templates=ctx.templates[:n], split_blocks=tuple(blocks))

    C.parse_context = parse_first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("results/ground_truth"))
    ap.add_argument("--model", default="planted")
    ap.add_argument("--figures", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--all-positions", action="store_true", help="also score IG²'s all-positions extension")
    ap.add_argument("--methods", nargs="+", choices=MATRIX_METHODS, default=list(MATRIX_METHODS),
                    help="methods of the transfer-matrix recovery (default: all)")
    ap.add_argument("--no-recovery", action="store_true", help="skip the unit recovery (part 1)")
    ap.add_argument("--draws", type=int, default=1,
                    help="random-control draws per cell (0: none; sensitivity and leakage do not read them)")
    ap.add_argument("--first-templates", type=int, default=None,
                    help="use only each context's first N templates (planted v3 and v4 were built when every "
                         "context had 10, and their committed results use those 10: pass 10 to extend them)")
    ap.add_argument("--merge", type=Path, default=None,
                    help="a previous run's OUT: keep its unit recovery and the matrices of methods not rerun "
                         "(its oracle must equal this run's)")
    args = ap.parse_args()
    if args.first_templates is not None:
        if args.first_templates < 2:
            ap.error(f"--first-templates must be at least 2 (a selection and a held-out template), not {args.first_templates}")
        first_templates(args.first_templates)
    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
    t0 = time.time()
    say = lambda s: print(f"[{time.time() - t0:6.0f} s] {s}", flush=True)
    model = load_model(args.model)
    cfg = planted_manifest(model)
    truth = truth_units(cfg)
    rows_ctx = ["finance", "commerce"]
    axis = cfg.get("axis", "race")  # v4: "gender@extended"; held-out names of that roster in every cell
    fav = load_axis(axis).groups.index(cfg.get("favoured", "White"))
    L, H, D = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_mlp
    recovery: list[dict] = []

    def add(method, context, ranked, unit):
        kinds = NEURON_KINDS if unit == "neurons" else ("head@last",)
        t = {k: truth[context][k] for k in kinds}
        r = rank_recovery(ranked, t, L * (D if unit == "neurons" else H)).as_dict()
        recovery.append({"method": method, "context": context, "units": unit, **r})
        say(f"{method} {context}: {r['hits']}/{r['k']} " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()
                                                                      if k.startswith("recall ")))

    # 1. unit recovery from each method's ranking (selection split of each context)
    pairs_per = 3 if args.quick else 4
    for c in ([] if args.no_recovery else rows_ctx):
        res = run_ig2(model, contrast_units(c, axis, favoured=fav, pairs_per_template=pairs_per), steps=20,
                      kind="logit")
        add("IG² (prediction position, as the paper)", c, ranked_units(res.aggregate()), "neurons")
        pairs = make_pairs(model, c, axis, templates="selection", names="selection", max_pairs=12)
        atp = attribution_patch(model, pairs, components=("neurons", "heads"))
        add("AtP", c, ranked_units(torch.nanmean(atp.estimates["neurons"], 0).abs()), "neurons")
        add("AtP", c, ranked_units(torch.nanmean(atp.estimates["heads"], 0).abs()), "heads")
        for label, pc in (("pruning score: signed attribution", PruneConfig(unit="neuron", k=None,
                                                                             score="signed_attribution",
                                                                             select="difference", common=None)),
                          ("pruning score: activation (paper)", PruneConfig(unit="neuron", k=None, common=None)),
                          ("pruning score: attention to the name", PruneConfig(unit="head", k=None, common=None,
                                                                               select="sum"))):
            cand = candidates(model, load_context(c), axis, pc)
            add(label, c, cand.items, "neurons" if pc.unit == "neuron" else "heads")
    if args.all_positions and not args.no_recovery:  # the extension costs ~sequence-length times IG²: finance, one pair per template
        res = run_ig2(model, contrast_units("finance", axis, favoured=fav, pairs_per_template=1), steps=20,
                      kind="logit", position="all", internal_batch_size=64)
        add("IG² (all positions, extension)", "finance", ranked_units(res.aggregate()), "neurons")

    # 2. transfer-matrix recovery
    eval_sets = {c: EvalSet.build(model, load_context(c), axis) for c in YES_NO_CONTEXTS}
    oracle = oracle_matrix(model, cfg, rows_ctx, axis, evaluate_on=list(YES_NO_CONTEXTS), eval_sets=eval_sets)
    say(f"oracle: test {oracle.transfer_test['within_minus_cross']:+.3f} "
        f"[{oracle.transfer_test['ci_low']:+.3f}, {oracle.transfer_test['ci_high']:+.3f}]")

    def mergeable() -> GroundTruthResult:
        """The run to merge into, if its model and oracle equal this run's (checked before any method runs)."""
        old = GroundTruthResult.load(args.merge)
        if old.meta.get("model") != args.model or abs(old.meta.get("oracle_test", {}).get(
                "within_minus_cross", float("nan")) - oracle.transfer_test["within_minus_cross"]) > 1e-5:
            raise SystemExit(f"--merge {args.merge}: another model or oracle (this run's oracle test "
                             f"{oracle.transfer_test['within_minus_cross']:+.4f}; its evaluation templates may "
                             f"differ, see --first-templates); not merged")
        return old

    if args.merge is not None:
        mergeable()
    n_truth = len(truth["finance"]["neuron@name"] | truth["finance"]["neuron@last"])
    every = {
        "ig2": ("IG² + BNS", lambda: IG2(IG2Config(plain_ig=False, verify_random=0, pairs=pairs_per))),
        "patching": ("Patching-selected heads",
                     lambda: Patching(PatchingConfig(components=("heads",), atp=False, top_heads=2))),
        "prune_neuron": ("Neuron pruning (signed attribution)",
                         lambda: Pruning(PruneConfig(unit="neuron", k=n_truth, score="signed_attribution",
                                                     select="difference", common=None))),
        # the paper's pruning and Wanda exactly as the study runs them
        "prune_neuron_paper": (Pruning.VARIANTS["prune_neuron_paper"][0],
                               lambda: Pruning(PruneConfig(**Pruning.VARIANTS["prune_neuron_paper"][1]))),
        "prune_weight": (Pruning.VARIANTS["prune_weight"][0],
                         lambda: Pruning(PruneConfig(**Pruning.VARIANTS["prune_weight"][1]))),
        "prune_head": ("Head pruning (attention to the name)",
                       lambda: Pruning(PruneConfig(unit="head", k=2, head_mode="z", common=None))),
        "steering": ("Steering (mean difference)", lambda: Steering(SteeringConfig())),
        "leace": ("LEACE concept erasure (baseline)", lambda: Leace(LeaceConfig())),
        # all down-projections (the planted units sit in layers 17-18, outside down-late's last quarter); one seed
        # and no shuffled-label control to keep the run within ~an hour on 2 CPU threads
        "gradiend": ("GRADIEND (all down-projections)",
                     lambda: Gradiend(GradiendConfig(params="down", steps=60 if args.quick else 400, seeds=(0,),
                                                     shuffled_control=False))),
    }
    methods = {every[k][0]: every[k][1]() for k in dict.fromkeys(args.methods)}  # in the order asked
    tcfg = TransferConfig(n_random=args.draws, controls=("random",) if args.draws else (), capability=False,
                          n_boot=1000)
    matrices: list[dict] = []
    transfer: list[dict] = []
    oracle_rows: list[dict] = []

    def write() -> None:
        """Save every method finished so far (after each one: a stopped run keeps what it measured)."""
        mats, trans, secs, rec_rows = list(matrices), transfer + oracle_rows, round(time.time() - t0), recovery
        if args.merge is not None:
            old = mergeable()
            rerun = {m["method"] for m in mats}
            rec_rows = old.rows + recovery
            mats = [m for m in old.meta.get("matrices", []) if m["method"] not in rerun] + mats
            trans = [t for t in old.transfer if t["method"] not in rerun and t["method"] != "oracle"] + trans
            secs += int(old.meta.get("seconds", 0))
        gt = GroundTruthResult(rec_rows, trans, {"model": args.model, "first_templates": args.first_templates,
                                                 "rows": rows_ctx,
                                                 "columns": list(YES_NO_CONTEXTS), "seconds": secs,
                                                 "oracle_test": oracle.transfer_test, "matrices": mats})
        gt.save(args.out)
        fig = gt.plot()
        atomic_savefig(fig, args.out / "ground_truth.png", close=False)
        if args.figures:
            atomic_savefig(fig, args.figures / "ground_truth.png")
        atomic_write_text(report(gt), args.out / "ground_truth.md")

    for cell in oracle.cells:
        oracle_rows.append({"method": "oracle", "selected_on": cell.selected_on, "evaluated_on": cell.evaluated_on,
                            "gap_removed": cell.gap_removed, "ci_low": cell.ci_low, "ci_high": cell.ci_high,
                            "reduction": cell.reduction, "oracle_gap_removed": cell.gap_removed,
                            "oracle_reduction": cell.reduction})
    for label, method in methods.items():
        tm = transfer_matrix(model, method, rows_ctx, axis, method=label, evaluate_on=list(YES_NO_CONTEXTS),
                             config=tcfg, eval_sets=eval_sets)
        rec = matrix_recovery(tm, oracle)
        for c, sel in method.selections.items():
            units = selected_units(sel.intervention)
            for unit, kinds in (("neurons", NEURON_KINDS), ("heads", ("head@last",))):
                if units[unit]:
                    t = set().union(*[truth[c][k] for k in kinds])
                    rec.setdefault("selected", {})[f"{c}/{unit}"] = {
                        "n": len(units[unit]), "hits": len(units[unit] & t), "truth": len(t),
                        **({"units": sorted(units[unit])} if unit == "heads" else {})}
        matrices.append(rec)
        for cell in tm.cells:
            o = oracle.cell(cell.selected_on, cell.evaluated_on)
            transfer.append({"method": label, "selected_on": cell.selected_on, "evaluated_on": cell.evaluated_on,
                             "gap_removed": cell.gap_removed, "ci_low": cell.ci_low, "ci_high": cell.ci_high,
                             "reduction": cell.reduction, "random_gap_removed": cell.controls["random"].gap_removed
                             if "random" in cell.controls else None,
                             "oracle_gap_removed": o.gap_removed, "oracle_reduction": o.reduction})
        say(f"{label}: r {rec['pearson']:+.2f} {rec['pearson_ci']}, MAE {rec['mae']:.3f}, sensitivity "
            f"{rec['sensitivity']:.2f} {rec['sensitivity_ci']}, leakage {rec['leakage']:+.3f} {rec['leakage_ci']}, "
            f"test {rec['within_minus_cross']:+.3f} [{rec['ci_low']:+.3f}, {rec['ci_high']:+.3f}] "
            f"detects={rec['detects']}")
        write()
    write()
    say(f"wrote {args.out}")


def _ci(v, lo, hi, fmt="{:+.2f}"):
    return f"{fmt.format(v)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _units(sel: dict) -> str:
    return f" ({', '.join(f'L{l}H{h}' for l, h in sel['units'])})" if sel.get("units") else ""


def report(gt: GroundTruthResult) -> str:
    rec = [{"method": r["method"], "context": r["context"], "units": r["units"],
            "hits / k": f"{r['hits']}/{r['k']}",
            "precision [95% CI]": _ci(r["precision"], *r["precision_ci"], fmt="{:.2f}"),
            "chance": f"{r['chance_precision']:.4f}",
            **{k: f"{r[f'recall {k}']:.2f}" if f"recall {k}" in r else "" for k in
               ("neuron@name", "neuron@last", "head@last")},
            "median rank": f"{r['median_rank']:.0f}"} for r in gt.rows]
    mats = [{"method": m["method"], "Pearson r [95% CI]": _ci(m["pearson"], *m["pearson_ci"]),
             "MAE [95% CI]": _ci(m["mae"], *m["mae_ci"], fmt="{:.3f}"),
             "sensitivity [95% CI]": _ci(m["sensitivity"], *m["sensitivity_ci"], fmt="{:.2f}")
             if "sensitivity" in m else "",
             "leakage [95% CI]": _ci(m["leakage"], *m["leakage_ci"], fmt="{:+.3f}") if "leakage" in m else "",
             "within - cross, within columns [95% CI]": _ci(m["within_minus_cross"], m["ci_low"], m["ci_high"], fmt="{:+.3f}"),
             "MDD": f"{m['min_detectable']:.3f}", "detects": "yes" if m["detects"] else "no",
             "planted units selected": "; ".join(f"{k} {v['hits']}/{v['n']}" + _units(v)
                                                 for k, v in m.get("selected", {}).items())}
            for m in gt.meta["matrices"]]
    o = gt.meta["oracle_test"]
    return (("## Unit recovery\n\n" + markdown_table(rec) + "\n\n" if rec else "") + "## Transfer-matrix recovery\n\n"
            f"Oracle within - cross (within columns): {o['within_minus_cross']:+.3f} "
            f"[{o['ci_low']:+.3f}, {o['ci_high']:+.3f}] (log-odds of gap removed).\n\n" + markdown_table(mats) + "\n")


if __name__ == "__main__":
    main()
