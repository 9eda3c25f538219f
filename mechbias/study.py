"""The study: every method across the built-in contexts, one report.

The study is a list of steps. Each step writes its results to
``OUT/steps/<step>/`` and finishes by writing ``summary.json``; a step whose
``summary.json`` exists is skipped on the next run, so an interrupted study
resumes from the last finished step (``--fresh`` recomputes everything).
At the end ``OUT/report.md`` is written from all step summaries, with the
figures in ``OUT/figures/`` (and copied to ``--figures``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .results import atomic_savefig, atomic_write_json, atomic_write_text


@dataclass
class StudyConfig:
    contexts: list[str]
    axes: list[str] = field(default_factory=lambda: ["race", "gender"])
    axis: str = "gender"             # the axis the methods and transfer matrices run on
    seed: int = 0
    n_boot: int = 2000
    quick: bool = False
    n_random: int = 2                # random-control draws per transfer cell
    ig2_pairs: int = 4               # name pairs per template for IG2
    patch_pairs: int = 6             # equal-length pairs per context for patching
    gradiend_contexts: int = 2       # GRADIEND is trained on the first k contexts (rows of its matrix)
    gradiend_steps: int = 30
    gradiend_batch: int = 8

    @classmethod
    def quick_config(cls, contexts, axis, seed):
        return cls(contexts=contexts, axis=axis, seed=seed, n_boot=300, quick=True, n_random=1, ig2_pairs=1,
                   patch_pairs=2, gradiend_contexts=1, gradiend_steps=4, gradiend_batch=4)


@dataclass
class Step:
    name: str
    title: str
    run: Callable  # (model, cfg, step_dir, ctx) -> summary dict
    report: Callable  # (summary, rel_fig) -> markdown


STEPS: list[Step] = []


def step(name: str, title: str, report: Callable):
    def deco(fn):
        STEPS.append(Step(name, title, fn, report))
        return fn

    return deco


# ----------------------------------------------------------------------------
# step: baseline bias
# ----------------------------------------------------------------------------

def _baseline_report(summary: dict, fig: Callable[[str], str]) -> str:
    lines = [
        "Bias gap = mean over prompts of log P(favourable answer) - log P(unfavourable answer), "
        "group A minus group B (positive: group A is favoured). 95% CIs from a crossed bootstrap "
        f"over names and templates. {summary['rows'][0]['n_templates']} templates x "
        f"{summary['rows'][0]['n_names_a'] + summary['rows'][0]['n_names_b']} names per context.",
        "",
        "| context | axis | gap | 95% CI | p | effect size (SD of name means) | significant |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['context']} | {r['axis']} ({r['group_a']} - {r['group_b']}) | {r['gap']:+.3f} | "
            f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {r['p_value']:.3f} | {r['effect_size']:+.2f} | "
            f"{'yes' if r['significant'] else 'no'} |"
        )
    lines += ["", f"![baseline bias]({fig('baseline_bias.png')})"]
    return "\n".join(lines)


@step("baseline", "Baseline bias per context and axis", _baseline_report)
def _baseline(model, cfg: StudyConfig, out: Path, shared: dict) -> dict:
    from .metrics import measure_bias

    res = measure_bias(model, cfg.contexts, cfg.axes, n_boot=cfg.n_boot, seed=cfg.seed, progress=True)
    res.save(out / "result")
    atomic_savefig(res.plot(), out / "figures" / "baseline_bias.png")
    return {"rows": res.rows, "figures": ["baseline_bias.png"]}


# ----------------------------------------------------------------------------
# shared helpers for the method steps
# ----------------------------------------------------------------------------

def _eval_sets(model, cfg: StudyConfig, shared: dict) -> dict:
    """Held-out evaluation sets (and their unmodified scores), built once and shared by every method."""
    from .contexts import load_context
    from .transfer import EvalSet

    if "eval_sets" not in shared:
        shared["eval_sets"] = {c: EvalSet.build(model, load_context(c), cfg.axis, seed=cfg.seed) for c in cfg.contexts}
    return shared["eval_sets"]


def _transfer(model, cfg, shared, out: Path, selector, method: str, rows=None, fig_name: str = "transfer.png",
              generation: dict | None = None):
    from .transfer import transfer_matrix

    tm = transfer_matrix(model, selector, rows or cfg.contexts, cfg.axis, method=method, eval_contexts=cfg.contexts,
                         n_random=cfg.n_random, n_boot=cfg.n_boot, seed=cfg.seed, eval_sets=_eval_sets(model, cfg, shared),
                         generation=generation, log=lambda m: print(f"[study]   {m}", file=sys.stderr))
    tm.save(out / "transfer")
    atomic_savefig(tm.plot(), out / "figures" / fig_name)
    return tm


def _transfer_md(summary: dict, fig: Callable[[str], str], name: str) -> str:
    from .results import markdown_table

    cells = summary["transfer"]
    lines = [markdown_table([{"selected on": c["selected_on"], "evaluated on": c["evaluated_on"],
                              "reduction": c["reduction"], "95% CI": f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]",
                              "random control": c.get("random_reduction", float("nan")),
                              "Δppl": c.get("perplexity_change", float("nan")), "components": c["n_components"]}
                             for c in cells]), "", f"![{name}]({fig(name)})"]
    return "\n".join(lines)


def _short(tm) -> list[dict]:
    keep = ("selected_on", "evaluated_on", "level", "reduction", "ci_low", "ci_high", "random_reduction",
            "random_ci_low", "random_ci_high", "perplexity_change", "random_perplexity_change", "gap_before",
            "gap_after", "n_components")
    return [{k: c.get(k) for k in keep} for c in tm.cells]


# ----------------------------------------------------------------------------
# step: IG2 and BNS
# ----------------------------------------------------------------------------

def _ig2_report(summary: dict, fig) -> str:
    from .results import markdown_table

    parts = [f"IG² on name pairs of each context's selection templates ({summary['config']}); the paper's "
             "selection (per prompt >= 0.2 max, per bag >= 70% adapted, per relation >= 10%). Verification on "
             "held-out names and templates: change of the attributed gap (P(yes) - P(no), group difference) "
             "when the selected neurons are suppressed (x0) or amplified (x2), against random neurons from the "
             "same layers.", "",
             markdown_table([{k: r[k] for k in ("context", "neurons", "operation", "n_neurons", "relative_change",
                                                 "ci_low", "ci_high")} for r in summary["verification"]]), "",
             f"Median per-layer completeness error of IG² (m = 20, left Riemann): "
             f"{summary['completeness_median']:.3f}; layer 0: {summary['completeness_layer0']:.2f}.", "",
             f"![IG2 attributions]({fig('ig2_attributions.png')})", "",
             f"![IG2 overlap]({fig('ig2_overlap.png')})", "",
             "**BNS transfer** (suppress the neurons selected on the row context, all positions):", "",
             _transfer_md(summary, fig, "transfer_ig2.png")]
    return "\n".join(parts)


@step("ig2", "IG² neuron attribution and Bias Neuron Suppression", _ig2_report)
def _ig2(model, cfg: StudyConfig, out: Path, shared: dict) -> dict:
    import numpy as np

    from .ig2 import contrast_units, favoured_group, run_ig2, select_neurons, selection_overlap, verify
    from .plotting import plot_overlap

    selections, ver_rows, comp, comp0 = {}, [], [], []
    for c in cfg.contexts:
        fav = favoured_group(model, c, cfg.axis, seed=cfg.seed)
        units = contrast_units(c, cfg.axis, favoured=fav, pairs_per_template=cfg.ig2_pairs, seed=cfg.seed)
        res = run_ig2(model, units, progress=True)
        sel = select_neurons(res)
        selections[c] = sel
        sel.save(out / f"selection_{c}")
        err = res.completeness_error()
        comp.append(float(err.median()))
        comp0.append(float(err[0]))
        if c == cfg.contexts[0]:
            atomic_savefig(res.plot(sel), out / "figures" / "ig2_attributions.png")
        held = contrast_units(c, cfg.axis, favoured=fav, templates="heldout", names="heldout",
                              pairs_per_template=cfg.ig2_pairs, seed=cfg.seed)
        if len(sel):
            v = verify(model, sel, held, n_random=cfg.n_random, seed=cfg.seed, n_boot=cfg.n_boot)
            ver_rows += [{"context": c, **{k: r[k] for k in r if k != "random_draws"}} for r in v.rows]
    ov = selection_overlap(selections, model.cfg.d_mlp)
    atomic_savefig(plot_overlap(ov, f"Overlap of IG²-selected neurons between contexts ({cfg.axis})"),
                   out / "figures" / "ig2_overlap.png")
    tm = _transfer(model, cfg, shared, out, lambda m, ctx, a: selections[ctx.name].intervention(0.0, "all"),
                   "IG² + BNS", fig_name="transfer_ig2.png")
    return {"config": {"pairs_per_template": cfg.ig2_pairs, "steps": 20, "kind": "prob", "axis": cfg.axis},
            "n_selected": {c: len(s) for c, s in selections.items()}, "verification": ver_rows,
            "completeness_median": float(np.median(comp)), "completeness_layer0": float(np.median(comp0)),
            "overlap": ov.to_dict(orient="records"), "transfer": _short(tm),
            "figures": ["ig2_attributions.png", "ig2_overlap.png", "transfer_ig2.png"]}


# ----------------------------------------------------------------------------
# step: activation patching
# ----------------------------------------------------------------------------

def _patch_report(summary: dict, fig) -> str:
    from .results import markdown_table

    rows = []
    for c in summary["contexts"]:
        for a in c["agreement"]:
            rows.append({"context": c["context"], "component": a["component"], "AtP Spearman": a["spearman"],
                         **{k: a[k] for k in a if k.startswith("recall")}})
    sets = [{"context": c["context"], **{k: s[k] for k in ("direction", "effect", "ci_low", "ci_high", "normalized")}}
            for c in summary["contexts"] for s in c["set_patching"]]
    return "\n".join([
        f"Denoising sweeps (clean = {summary['clean_group']} name, corrupted = the other group's name of the same "
        "token length; effect on logit(Yes) - logit(No)) over equal-length pairs of each context's selection split.",
        "", f"![residual stream]({fig('patch_resid.png')})", "", f"![head layer profiles]({fig('patch_layer_profiles.png')})",
        "", f"![head rank correlation]({fig('patch_head_correlation.png')})", "",
        "Attribution patching against exact patching (Spearman over cells, recall of the exact top-k):", "",
        markdown_table(rows), "", "The top-5 heads patched together:", "", markdown_table(sets), "",
        "**Transfer of patching-selected heads** (zero the top-5 heads by |denoising effect| on the row context's "
        "selection pairs, hook_z):", "", _transfer_md(summary, fig, "transfer_patching.png")])


@step("patching", "Activation patching and attribution patching", _patch_report)
def _patching(model, cfg: StudyConfig, out: Path, shared: dict) -> dict:
    from .contexts import make_pairs
    from .hooks import HeadIntervention
    from .patching import (Patch, atp_agreement, attribution_patch, compare_contexts, patch_set, patch_sweep)
    from .plotting import plot_correlation_matrix, plot_layer_profiles

    heads, profiles, ctx_rows, chosen = {}, {}, [], {}
    clean_group = None
    for c in cfg.contexts:
        pairs = make_pairs(model, c, cfg.axis, templates="selection", names="selection", max_pairs=cfg.patch_pairs,
                           seed=cfg.seed)
        clean_group = pairs.axis.groups[0]
        comps = ["heads"] if cfg.quick else ["resid_pre", "heads"]
        sweeps = {k: patch_sweep(model, pairs, k, progress=True) for k in comps}
        for k, r in sweeps.items():
            r.save(out / f"{c}_{k}")
        atp = attribution_patch(model, pairs, components=tuple(comps))
        agreement = [atp_agreement(atp, sweeps[k], k) for k in comps]
        top = sweeps["heads"].top(5)
        chosen[c] = [(t["layer"], t["head"]) for t in top]
        sets = [{**{k: v for k, v in patch_set(model, pairs, [Patch(l, "z", None, (h,)) for l, h in chosen[c]],
                                               direction=d).items() if k not in ("values", "ld_clean", "ld_corrupt")}}
                for d in ("denoise", "noise")]
        heads[c] = sweeps["heads"]
        profiles[c] = [float(x) for x in sweeps["heads"].layer_profile()]
        if c == cfg.contexts[0] and "resid_pre" in sweeps:
            atomic_savefig(sweeps["resid_pre"].plot(), out / "figures" / "patch_resid.png")
        ctx_rows.append({"context": c, "n_pairs": len(pairs), "agreement": agreement, "set_patching": sets,
                         "top_heads": top})
    atomic_savefig(plot_layer_profiles(profiles, f"Strongest head per layer (denoising, {cfg.axis})"),
                   out / "figures" / "patch_layer_profiles.png")
    corr = compare_contexts(heads)
    atomic_savefig(plot_correlation_matrix(corr, "Rank correlation of head effects between contexts"),
                   out / "figures" / "patch_head_correlation.png")
    tm = _transfer(model, cfg, shared, out, lambda m, ctx, a: HeadIntervention(chosen[ctx.name], mode="z"),
                   "patching-selected heads", fig_name="transfer_patching.png")
    figs = ["patch_layer_profiles.png", "patch_head_correlation.png", "transfer_patching.png"]
    if (out / "figures" / "patch_resid.png").exists():
        figs.insert(0, "patch_resid.png")
    return {"clean_group": clean_group, "contexts": ctx_rows, "head_correlation": corr.to_dict(orient="records"),
            "transfer": _short(tm), "figures": figs}


# ----------------------------------------------------------------------------
# steps: pruning (four variants)
# ----------------------------------------------------------------------------

PRUNING_VARIANTS = {
    "prune_neuron_paper": ("Neuron pruning (paper scoring)",
                           "Neurons scored by mean |activation| x ||W_out row||; set difference top 40% / top 35% for "
                           "each group (both sides); kept if chosen in every selection template; zeroed.",
                           dict(unit="neuron", k=None, score="activation")),
    "prune_neuron_attr": ("Neuron pruning (signed attribution)",
                          "Neurons scored by the signed attribution sum_pos activation x d(score)/d(activation); the "
                          "50 with the largest |S_A - S_B| over the selection templates; zeroed.",
                          dict(unit="neuron", k=50, score="signed_attribution", select="difference", common=None)),
    "prune_weight": ("Weight pruning (Wanda)",
                     "Weights scored by |W| x ||X||_2 with each layer's true inputs; set difference top 15% / top 15% "
                     "per matrix (both sides); kept if chosen in every selection template; zeroed.",
                     dict(unit="weight", k=None)),
    "prune_head": ("Head pruning (attention to the name)",
                   "Heads scored by attention from the answer position to the name tokens, both groups summed; the "
                   "top 10 among heads in the top 30% of every selection template; pruned by hook_q zeroing "
                   "(uniform attention, as the paper's code).", dict(unit="head", k=10, head_mode="q")),
}


def _prune_report_for(name):
    def report(summary, fig):
        lines = [summary["title"], ""]
        if summary.get("levels"):
            from .results import markdown_table

            lines += ["Generalization levels (L0: selected on one selection template, evaluated on it with "
                      "held-out names):", "", markdown_table(summary["levels"]), ""]
        lines.append(_transfer_md(summary, fig, f"transfer_{name}.png"))
        if summary.get("generation"):
            from .results import markdown_table

            lines += ["", "Sampled numeric answers (held-out names; per row's context; inlier ratio = share "
                      "inside the unmodified model's 5-95% band for the same prompt):", "",
                      markdown_table([{k: r[k] for k in ("context", "parse_failure_before", "parse_failure_after",
                                                        "inlier_ratio", "smd_before", "smd_after")}
                                      for r in summary["generation"]])]
        if summary.get("curve_figure"):
            lines += ["", f"![pruning curves]({fig(summary['curve_figure'])})"]
        return "\n".join(lines)

    return report


def _make_prune_step(name, title, description, kw):
    def run(model, cfg: StudyConfig, out: Path, shared: dict) -> dict:
        from dataclasses import asdict as _asdict

        from .pruning import PruneConfig, generalization_levels, pruning_curve, pruning_selector

        pc = PruneConfig(seed=cfg.seed, **kw)
        gen = None
        if name == "prune_neuron_attr":  # the paper's "anomalous behaviour": sampled numeric answers
            gen = {"n_samples": 2 if cfg.quick else 6, "max_new_tokens": 3 if cfg.quick else 6,
                   "n_names": 2 if cfg.quick else 6}
        tm = _transfer(model, cfg, shared, out, pruning_selector(pc), title, fig_name=f"transfer_{name}.png",
                       generation=gen)
        summary = {"title": description, "config": _asdict(pc.resolved()), "transfer": _short(tm),
                   "figures": [f"transfer_{name}.png"]}
        if gen:
            summary["generation"] = [{"context": r["context"], **r["generation"]} for r in tm.row_info]
        if name == "prune_neuron_attr":
            lv = generalization_levels(model, cfg.contexts, cfg.axis, pc, n_random=1,
                                       max_l0_templates=1 if cfg.quick else 2, n_boot=min(cfg.n_boot, 1000))
            summary["levels"] = [{k: r[k] for k in ("context", "level", "template", "reduction", "ci_low", "ci_high",
                                                     "random_reduction")} for r in lv.rows]
        if name in ("prune_neuron_attr", "prune_head") and not cfg.quick:
            ks = [5, 20, 80] if kw["unit"] == "neuron" else [2, 5, 10]
            curve = pruning_curve(model, cfg.contexts[0], cfg.axis, pc, ks,
                                  eval_set=_eval_sets(model, cfg, shared)[cfg.contexts[0]], n_boot=min(cfg.n_boot, 1000))
            curve.save(out / "curve")
            shared.setdefault("curves", []).append(curve)
            from .plotting import plot_curves

            atomic_savefig(plot_curves([curve]), out / "figures" / f"curve_{name}.png")
            summary["curve_figure"] = f"curve_{name}.png"
            summary["figures"].append(f"curve_{name}.png")
            summary["curve"] = curve.rows
        return summary

    step(name, title, _prune_report_for(name))(run)


for _name, (_title, _desc, _kw) in PRUNING_VARIANTS.items():
    _make_prune_step(_name, _title, _desc, _kw)


# ----------------------------------------------------------------------------
# step: GRADIEND
# ----------------------------------------------------------------------------

def _gradiend_report(summary: dict, fig) -> str:
    from .results import markdown_table

    rows = [{"trained on": r["context"], "val |Pearson| (best seed)": r["val_pearson"],
             "held-out AUC": r.get("auc"), "held-out sign accuracy": r["sign_accuracy"],
             "held-out Pearson": r["pearson"],
             "chosen h": (r["chosen"] or {}).get("h"), "chosen alpha": (r["chosen"] or {}).get("alpha")}
            for r in summary["features"]]
    return "\n".join([f"GRADIEND on {summary['params']} ({summary['n_params']:,} parameters), {summary['steps']} steps "
                      f"of batches of {summary['batch']} texts, lr {summary['lr']}.", "", markdown_table(rows), "",
                      f"![GRADIEND feature]({fig('gradiend_feature.png')})", "",
                      f"![GRADIEND grid]({fig('gradiend_grid.png')})", "",
                      "**Transfer** (edit chosen on the row context; control: a random direction of the same norm "
                      "per matrix):", "", _transfer_md(summary, fig, "transfer_gradiend.png")])


@step("gradiend", "GRADIEND feature and weight edit", _gradiend_report)
def _gradiend(model, cfg: StudyConfig, out: Path, shared: dict) -> dict:
    from .gradiend import GradiendConfig, choose_edit, evaluate_feature, gradiend_selector, param_set
    from .plotting import plot_gradiend_grid

    gcfg = GradiendConfig(params="mlp", steps=cfg.gradiend_steps, batch_texts=cfg.gradiend_batch, lr=1e-4,
                          seeds=(0,) if cfg.quick else (0, 1), val_batches=4 if cfg.quick else 6, seed=cfg.seed)
    cache: dict = {}
    rows = cfg.contexts[: cfg.gradiend_contexts]
    # features saved by an interrupted run of this step are reused when their settings match
    from .results import Result

    trained = {c: Result.load(out / f"gradiend_{c}") for c in rows if (out / f"gradiend_{c}" / "result.json").exists()}
    sel = gradiend_selector(gcfg, edit_kw=dict(n_names=8 if cfg.quick else 16, neutral_max_texts=4 if cfg.quick else 6),
                            cache=cache, trained=trained, log=lambda m: print(f"[study]   {m}", file=sys.stderr))
    tm = _transfer(model, cfg, shared, out, sel, "GRADIEND", rows=rows, fig_name="transfer_gradiend.png")
    feats = []
    for c in rows:
        res = cache[c]
        ev = evaluate_feature(model, res, batch_texts=cfg.gradiend_batch, n_batches=2 if cfg.quick else 5,
                              n_neutral=2 if cfg.quick else 4)
        res.save(out / f"gradiend_{c}")
        if c == rows[0]:
            atomic_savefig(res.plot(), out / "figures" / "gradiend_feature.png")
            atomic_savefig(plot_gradiend_grid(res), out / "figures" / "gradiend_grid.png")
        feats.append({"context": c, "val_pearson": max(abs(s["val_pearson"]) for s in res.seeds),
                      "auc": ev["auc"], "sign_accuracy": ev["sign_accuracy"], "pearson": ev["pearson"], "stats": ev["stats"],
                      "chosen": res.edit.get("chosen"), "gap_before": res.edit.get("gap_before")})
    return {"params": gcfg.params, "n_params": param_set(model, gcfg.params).numel, "steps": gcfg.steps,
            "batch": gcfg.batch_texts, "lr": gcfg.lr, "features": feats, "transfer": _short(tm),
            "figures": ["gradiend_feature.png", "gradiend_grid.png", "transfer_gradiend.png"]}


# ----------------------------------------------------------------------------
# step: the methods side by side
# ----------------------------------------------------------------------------

def _summary_report(summary: dict, fig) -> str:
    from .results import markdown_table

    return "\n".join(["Mean relative bias reduction on the diagonal (selected and evaluated on the same context, "
                      "held-out names and templates) and off the diagonal (another context), with the random "
                      "control and the capability cost (mean perplexity change on the neutral text).", "",
                      markdown_table(summary["rows"]), "", f"![methods]({fig('methods_summary.png')})"])


@step("summary", "The methods side by side", _summary_report)
def _summary(model, cfg: StudyConfig, out: Path, shared: dict) -> dict:
    import numpy as np

    from .plotting import plot_methods_summary

    root = out.parent
    rows = []
    for st in STEPS:
        f = root / st.name / "summary.json"
        if st.name == "summary" or not f.exists():
            continue
        s = json.loads(f.read_text())
        cells = s.get("transfer")
        if not cells:
            continue
        diag = [c for c in cells if c["selected_on"] == c["evaluated_on"]]
        off = [c for c in cells if c["selected_on"] != c["evaluated_on"]]
        mean = lambda xs, k: float(np.nanmean([x[k] for x in xs if x.get(k) is not None])) if xs else float("nan")  # noqa: E731
        rows.append({"method": st.title, "diagonal": mean(diag, "reduction"), "off-diagonal": mean(off, "reduction"),
                     "random (diag)": mean(diag, "random_reduction"), "random (off)": mean(off, "random_reduction"),
                     "Δppl": mean(cells, "perplexity_change"), "Δppl random": mean(cells, "random_perplexity_change"),
                     "significant diagonal cells": f"{sum(c['ci_low'] > 0 for c in diag)}/{len(diag)}"})
    atomic_savefig(plot_methods_summary(rows, cfg.axis), out / "figures" / "methods_summary.png")
    return {"rows": rows, "figures": ["methods_summary.png"]}


# ----------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------

def run_study(args) -> int:
    import torch

    from .cli import _setup

    out: Path = args.out
    contexts = args.contexts if args.contexts != ["all"] else None
    from .contexts import load_contexts

    names = [c.name for c in load_contexts(contexts)]
    axis = getattr(args, "axis", "gender")
    if args.quick:
        cfg = StudyConfig.quick_config(names, axis, args.seed)
    else:
        cfg = StudyConfig(contexts=names, axis=axis, seed=args.seed, n_boot=args.boot)
    skip = set(getattr(args, "skip", None) or [])
    t0 = time.time()
    model, _ = _setup(args)
    shared: dict = {}
    timings = {}
    ran_any = False
    for st in STEPS:
        if st.name in skip:
            continue
        step_dir = out / "steps" / st.name
        done = step_dir / "summary.json"
        stale = st.name == "summary" and ran_any  # the comparison must include steps rerun now
        if done.exists() and not args.fresh and not stale:
            print(f"[study] {st.name}: finished earlier, skipped", file=sys.stderr)
            timings[st.name] = json.loads(done.read_text()).get("seconds")
            continue
        print(f"[study] {st.name}: {st.title} ...", file=sys.stderr)
        t = time.time()
        summary = st.run(model, cfg, step_dir, shared)
        ran_any = True
        summary["seconds"] = round(time.time() - t, 1)
        timings[st.name] = summary["seconds"]
        atomic_write_json(summary, done)
        print(f"[study] {st.name}: done in {summary['seconds']:.1f} s", file=sys.stderr)
    from .models import model_label

    write_report(out, cfg, timings, figures=getattr(args, "figures", None), total=time.time() - t0,
                 model=model_label(model))
    print(f"[study] report: {out / 'report.md'} (total {time.time() - t0:.0f} s)", file=sys.stderr)
    del torch
    return 0


def write_report(out: Path, cfg: StudyConfig, timings: dict, figures: Path | None = None, total: float = 0,
                 model: str = "smollm2-135m-instruct") -> Path:
    """Assemble ``report.md`` from the finished steps; copy figures next to it (and to ``figures``)."""
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        "# mechbias study report",
        "",
        f"Model: {model}. Contexts: {', '.join(cfg.contexts)}. "
        f"Baseline axes: {', '.join(cfg.axes)}; methods and transfer matrices on the {cfg.axis} axis. "
        f"Seed {cfg.seed}, {cfg.n_boot} bootstrap replicates, {cfg.n_random} random-control draws per cell"
        f"{' (quick configuration)' if cfg.quick else ''}.",
        "",
    ]
    for st in STEPS:
        done = out / "steps" / st.name / "summary.json"
        if not done.exists():
            continue
        summary = json.loads(done.read_text())
        for f in summary.get("figures", []):
            src = out / "steps" / st.name / "figures" / f
            if src.exists():
                shutil.copyfile(src, fig_dir / f)
                if figures is not None:
                    Path(figures).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, Path(figures) / f)
        parts += [f"## {st.title}", "", st.report(summary, lambda f: f"figures/{f}"), ""]
    parts += ["## Step times", "", "| step | seconds |", "|---|---|"]
    parts += [f"| {k} | {v} |" for k, v in timings.items()]
    parts += [f"| total (this run, incl. loading) | {total:.0f} |", ""]
    return atomic_write_text("\n".join(parts), out / "report.md")
