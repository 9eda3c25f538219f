"""The ``mechbias`` command line. Each subcommand mirrors a library function,
takes ``--model`` and ``--out DIR``, and writes a JSON summary plus figures to DIR."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _common(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--model", default=None,
                   help="model name: default the embedded SmolLM2-135M-Instruct; 'planted' for the "
                        "planted-bias variant; or a Hugging Face id / local folder")
    p.add_argument("--out", required=out_required, type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed for splits, bootstrap and sampling")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--intervention", type=Path, default=None,
                   help="folder of a saved intervention to apply (e.g. DIR/intervention from `prune`)")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap replicates for confidence intervals")


def _setup(args):
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from .models import load_model

    t = time.time()
    model = load_model(args.model)
    print(f"[mechbias] loaded {args.model or 'the embedded SmolLM2-135M-Instruct'} in {time.time() - t:.1f} s",
          file=sys.stderr)
    intervention = None
    if getattr(args, "intervention", None):
        from .hooks import load_intervention

        intervention = load_intervention(args.intervention)
        print(f"[mechbias] applying {intervention.describe()}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    return model, intervention


def cmd_bias(args) -> int:
    from .metrics import measure_bias
    from .results import atomic_savefig, atomic_write_json

    model, intervention = _setup(args)
    res = measure_bias(model, args.contexts, args.axis, templates=args.templates, names=args.names,
                       intervention=intervention, n_boot=args.boot, seed=args.seed, progress=True)
    res.save(args.out / "result")
    keep = ("context", "axis", "group_a", "group_b", "gap", "ci_low", "ci_high", "p_value", "effect_size",
            "significant", "n_prompts", "n_templates", "n_names_a", "n_names_b")
    atomic_write_json({"rows": [{k: r[k] for k in keep} for r in res.rows], "meta": res.meta},
                      args.out / "bias.json")
    atomic_savefig(res.plot(), args.out / "figures" / "baseline_bias.png")
    _print_table(res.to_dataframe()[["context", "axis", "gap", "ci_low", "ci_high", "p_value", "significant"]])
    print(f"[mechbias] wrote {args.out / 'bias.json'}", file=sys.stderr)
    return 0


def _print_table(df) -> None:
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(df.to_string(index=False))


def cmd_ig2(args) -> int:
    from .ig2 import ig2_experiment
    from .results import atomic_savefig

    model, _ = _setup(args)
    positions = "last" if args.positions == "last" else "all"
    exp = ig2_experiment(model, args.context, args.axis, mode=args.mode, pairs_per_template=args.pairs,
                         steps=args.steps, rule=args.rule, kind=args.kind, positions=positions,
                         n_random=args.random, seed=args.seed, progress=True)
    exp.save(args.out)
    atomic_savefig(exp.attributions.plot(exp.selection), args.out / "figures" / f"ig2_{exp.context}_{exp.axis}.png")
    atomic_savefig(exp.verification.plot(), args.out / "figures" / f"ig2_verification_{exp.context}_{exp.axis}.png")
    s = exp.summary()
    print(f"favoured group: {s['favoured_group']}; {s['n_units']} units; median completeness error "
          f"{s['completeness_error_median']:.3f}; {s['n_selected']} neurons selected")
    _print_table(exp.verification.to_dataframe().drop(columns=["random_draws"], errors="ignore"))
    print(f"[mechbias] wrote {args.out / 'ig2.json'}; BNS intervention in {args.out / 'intervention'}",
          file=sys.stderr)
    return 0


def cmd_patch(args) -> int:
    from .patching import patching_experiment
    from .results import atomic_savefig

    model, _ = _setup(args)
    exp = patching_experiment(model, args.context, args.axis, direction=args.direction,
                              components=args.components, max_pairs=args.pairs, top_k_heads=args.top_heads,
                              seed=args.seed, progress=True)
    exp.save(args.out)
    for c, r in exp.sweeps.items():
        atomic_savefig(r.plot(), args.out / "figures" / f"patch_{exp.context}_{exp.axis}_{c}.png")
    s = exp.summary()
    print(f"{s['n_pairs']} pairs; clean ({s['clean_group']}) LD {s['ld_clean_mean']:+.3f}, "
          f"corrupted LD {s['ld_corrupt_mean']:+.3f} ({args.direction})")
    import pandas as pd

    _print_table(pd.DataFrame(exp.agreement))
    for row in exp.set_patching:
        print(f"{row['set']} patched together ({row['direction']}): effect {row['effect']:+.3f} "
              f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}], normalized {row['normalized']:.2f}")
    print(f"[mechbias] wrote {args.out / 'patch.json'}", file=sys.stderr)
    return 0


def cmd_prune(args) -> int:
    from .contexts import load_contexts
    from .pruning import PruneConfig, pruning_selector
    from .results import atomic_savefig, atomic_write_json
    from .transfer import transfer_matrix

    model, _ = _setup(args)
    cfg = PruneConfig(unit=args.unit, k=args.k, p=args.p, q=args.q, score=args.score, target=args.target,
                      head_mode=args.head_mode, select=args.select, common=None if args.common <= 0 else args.common,
                      seed=args.seed)
    rows = [c.name for c in load_contexts(args.select_on)]
    cols = [c.name for c in load_contexts(args.evaluate_on)]
    chosen = {}
    select = pruning_selector(cfg)

    def selector(m, ctx, axis):  # keep what was chosen, to save it
        chosen[ctx.name] = select(m, ctx, axis)
        return chosen[ctx.name]

    gen = {"n_samples": args.generation, "n_names": 8} if args.generation else None
    tm = transfer_matrix(model, selector, rows, args.axis, method=f"{args.unit} pruning",
                         eval_contexts=cols, n_random=args.random, n_boot=args.boot, seed=args.seed,
                         generation=gen, log=lambda m: print(m, file=sys.stderr))
    tm.save(args.out / "result")
    for r, iv in chosen.items():  # the chosen interventions, re-appliable with --intervention
        iv.save(args.out / "intervention" if len(rows) == 1 else args.out / "intervention" / r)
    keep = ("selected_on", "evaluated_on", "level", "reduction", "ci_low", "ci_high", "random_reduction",
            "random_ci_low", "random_ci_high", "perplexity_change", "random_perplexity_change", "gap_before",
            "gap_after", "n_components")
    atomic_write_json({"unit": args.unit, "config": cfg.resolved().__dict__,
                       "head_ablation": ("hook_q zeroing (uniform attention)" if args.head_mode == "q"
                                         else "hook_z zeroing (output ablation)") if args.unit == "head" else None,
                       "cells": [{k: c.get(k) for k in keep} for c in tm.cells], "rows": tm.row_info,
                       "baseline": tm.baseline, "meta": tm.meta}, args.out / "transfer.json")
    atomic_savefig(tm.plot(), args.out / "figures" / f"transfer_{args.unit}_{args.axis}.png")
    _print_table(tm.to_dataframe()[["selected_on", "evaluated_on", "reduction", "ci_low", "ci_high",
                                    "random_reduction"] + (["perplexity_change"] if "perplexity_change" in tm.cells[0] else [])])
    print(f"[mechbias] wrote {args.out / 'transfer.json'}; intervention(s) in {args.out / 'intervention'}",
          file=sys.stderr)
    return 0


def cmd_gradiend(args) -> int:
    from .contexts import load_contexts
    from .gradiend import DEFAULT_ALPHAS, GradiendConfig, choose_edit, evaluate_feature, train_gradiend
    from .plotting import plot_gradiend_grid
    from .results import atomic_savefig, atomic_write_json
    from .transfer import transfer_matrix

    model, _ = _setup(args)
    cfg = GradiendConfig(params=args.params, steps=args.steps, batch_texts=args.batch, lr=args.lr,
                         seeds=tuple(range(args.seeds)), seed=args.seed)
    res = train_gradiend(model, args.train_on, args.axis, cfg, log=lambda m: print(m, file=sys.stderr))
    ev = evaluate_feature(model, res)
    hs = [float(x) for x in args.h] if args.h else (-1.0, 0.0, 1.0)
    alphas = [float(x) for x in args.alpha] if args.alpha else DEFAULT_ALPHAS
    ch = choose_edit(model, res, hs=hs, alphas=alphas, max_ppl_increase=args.max_ppl_increase)
    res.save(args.out / "gradiend")
    atomic_savefig(res.plot(), args.out / "figures" / f"gradiend_feature_{res.context}_{res.axis}.png")
    atomic_savefig(plot_gradiend_grid(res), args.out / "figures" / f"gradiend_grid_{res.context}_{res.axis}.png")
    summary = {"context": res.context, "axis": res.axis, "config": res.config, "seeds": res.seeds,
               "feature": {k: v for k, v in ev.items() if k != "values"}, "chosen_edit": ch["chosen"],
               "gap_before": ch["gap_before"], "perplexity_before": ch["perplexity_before"], "transfer": None}
    if ch["chosen"] is not None:
        edit = res.edit_for(ch["chosen"]["h"], ch["chosen"]["alpha"])
        edit.save(args.out / "intervention")
        cols = [c.name for c in load_contexts(args.evaluate_on)]
        tm = transfer_matrix(model, lambda m, c, a: edit, [res.context], args.axis, method="GRADIEND",
                             eval_contexts=cols, n_random=args.random, n_boot=args.boot, seed=args.seed,
                             log=lambda m: print(m, file=sys.stderr))
        tm.save(args.out / "transfer")
        atomic_savefig(tm.plot(), args.out / "figures" / f"transfer_gradiend_{res.axis}.png")
        summary["transfer"] = tm.cells
    atomic_write_json(summary, args.out / "gradiend.json")
    print(f"feature on held-out data: AUC {ev['auc']:.2f}, sign accuracy {ev['sign_accuracy']:.2f}, "
          f"Pearson {ev['pearson']:+.2f}; "
          f"chosen edit {ch['chosen']}")
    print(f"[mechbias] wrote {args.out / 'gradiend.json'}", file=sys.stderr)
    return 0


def cmd_crows(args) -> int:
    from .crows import crows_score
    from .results import atomic_savefig, atomic_write_json

    model, intervention = _setup(args)
    res = crows_score(model, args.csv, n_boot=args.boot, seed=args.seed)
    out = {"unmodified": res.summary()}
    if intervention is not None:
        after = crows_score(model, args.csv, intervention=intervention, n_boot=args.boot, seed=args.seed)
        out["intervention"] = after.summary()
        atomic_savefig(after.plot(), args.out / "figures" / "crows_intervention.png")
        print(f"CrowS-Pairs score under the intervention: {after.score:.1f} [{after.ci_low:.1f}, {after.ci_high:.1f}]")
    # the top level holds the unmodified model's score (or the intervention's, when one is given)
    main = out.get("intervention", out["unmodified"])
    atomic_write_json({**{k: main[k] for k in ("score", "ci_low", "ci_high", "n", "bias_type")}, **out},
                      args.out / "crows.json")
    atomic_savefig(res.plot(), args.out / "figures" / "crows.png")
    print(f"CrowS-Pairs score (unmodified): {res.score:.1f} [{res.ci_low:.1f}, {res.ci_high:.1f}] over {res.n} pairs")
    return 0


def cmd_study(args) -> int:
    from .study import run_study

    return run_study(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechbias", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bias", help="baseline bias per context and axis, with CIs")
    _common(p)
    p.add_argument("--contexts", nargs="+", default=["all"], help="context names or YAML paths ('all' = built-ins)")
    p.add_argument("--axis", nargs="+", default=["race", "gender"], help="demographic axes")
    p.add_argument("--templates", default="all", choices=["all", "selection", "heldout"])
    p.add_argument("--names", default="all", choices=["all", "selection", "heldout"])
    p.set_defaults(func=cmd_bias)

    p = sub.add_parser("ig2", help="IG2 neuron attribution, selection, and the BNS verification experiment")
    _common(p)
    p.add_argument("--context", required=True, help="context name or YAML path")
    p.add_argument("--axis", default="race")
    p.add_argument("--mode", default="contrast", choices=["contrast", "demographic", "demographic-single"])
    p.add_argument("--pairs", type=int, default=6, help="name pairs per template (contrast mode)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rule", default="left", choices=["left", "right", "middle", "trapezoid"])
    p.add_argument("--kind", default="prob", choices=["prob", "abs_prob", "logprob", "logit"])
    p.add_argument("--positions", default="all", choices=["all", "last"],
                   help="where BNS suppresses the neurons: every position or the prediction position")
    p.add_argument("--random", type=int, default=5, help="random-neuron control draws")
    p.set_defaults(func=cmd_ig2)

    p = sub.add_parser("patch", help="activation patching sweeps, attribution patching and set patching")
    _common(p)
    p.add_argument("--context", required=True)
    p.add_argument("--axis", default="race")
    p.add_argument("--direction", default="denoise", choices=["denoise", "noise"])
    p.add_argument("--components", nargs="+", default=["resid_pre", "attn_out", "mlp_out", "heads", "k_heads", "v_heads"],
                   choices=["resid_pre", "attn_out", "mlp_out", "heads", "heads_by_pos", "k_heads", "v_heads"])
    p.add_argument("--pairs", type=int, default=8, help="maximum number of equal-length name pairs")
    p.add_argument("--top-heads", type=int, default=5, help="heads patched together in the set-patching check")
    p.set_defaults(func=cmd_patch)

    p = sub.add_parser("prune", help="per-context pruning and its cross-context transfer matrix")
    _common(p)
    p.add_argument("--unit", default="neuron", choices=["neuron", "weight", "head"])
    p.add_argument("--select-on", nargs="+", default=["finance"], help="contexts to select components on")
    p.add_argument("--evaluate-on", nargs="+", default=["all"], help="contexts to evaluate on ('all' = built-ins)")
    p.add_argument("--axis", default="race")
    p.add_argument("--k", type=int, default=None, help="prune the k best candidates (default: all candidates)")
    p.add_argument("--p", type=float, default=None, help="top-p fraction for the target group (set difference)")
    p.add_argument("--q", type=float, default=None, help="top-q fraction for the other group (set difference)")
    p.add_argument("--score", default="activation",
                   choices=["activation", "attribution", "signed_attribution", "attention", "patching"])
    p.add_argument("--select", default=None, choices=["setdiff", "difference", "sum"])
    p.add_argument("--target", default="both", help="both | disfavoured | favoured | a group name")
    p.add_argument("--head-mode", default="q", choices=["q", "z"],
                   help="head pruning: q = zero the query (uniform attention, the paper), z = zero the output")
    p.add_argument("--common", type=float, default=1.0,
                   help="fraction of selection templates a component must be chosen in (<= 0: pool templates)")
    p.add_argument("--random", type=int, default=3, help="random-control draws per cell")
    p.add_argument("--generation", type=int, default=0,
                   help="also sample N numeric answers per prompt: parse failures and inlier ratio (0 = off)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("gradiend", help="GRADIEND: train a one-neuron bias feature, edit weights, measure transfer")
    _common(p)
    p.add_argument("--train-on", required=True, help="context to train on")
    p.add_argument("--axis", default="gender")
    p.add_argument("--evaluate-on", nargs="+", default=["all"])
    p.add_argument("--params", default="mlp", choices=["mlp", "down", "attn", "mlp+attn"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16, help="texts averaged per gradient")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--h", nargs="+", default=None, help="feature values of the edit grid")
    p.add_argument("--alpha", nargs="+", default=None, help="learning rates of the edit grid")
    p.add_argument("--max-ppl-increase", type=float, default=0.05)
    p.add_argument("--random", type=int, default=3, help="random-direction controls per cell")
    p.set_defaults(func=cmd_gradiend)

    p = sub.add_parser("crows", help="score a CrowS-Pairs CSV (before and under an intervention)")
    _common(p)
    p.add_argument("--csv", required=True, type=Path, help="CrowS-Pairs CSV (sent_more, sent_less, "
                                                           "stereo_antistereo, bias_type)")
    p.set_defaults(func=cmd_crows)

    p = sub.add_parser("study", help="the full study: every method across contexts, a report and figures")
    _common(p)
    p.add_argument("--contexts", nargs="+", default=["all"])
    p.add_argument("--figures", type=Path, default=None, help="also copy the figures into this folder")
    p.add_argument("--axis", default="gender", help="axis of the method steps and transfer matrices")
    p.add_argument("--skip", nargs="*", default=[], help="step names to skip")
    p.add_argument("--quick", action="store_true", help="a small configuration (for tests and smoke runs)")
    p.add_argument("--fresh", action="store_true", help="ignore finished steps in --out and recompute")
    p.set_defaults(func=cmd_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        from .contexts import ContextError
        from .models import ModelLoadError

        if isinstance(err, (ContextError, ModelLoadError, FileNotFoundError)) or type(err) is ValueError:
            print(f"mechbias: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
