"""Train a planted-bias variant of the embedded model and write it into the package.

    python analyses/train_planted.py [--version 5] [--out mechbias/data/files/planted/v5] [--steps 30]

Deterministic (fixed seeds). Version 5 (``load_model("planted-v5")``, issue 33): the version-4 construction
below with three more parts per chain, so that the planted gap survives new templates and names and stays in its
context: a pooled read of the prompt's context (a context neuron and a uniformly attending head), prediction
neurons in pairs that make a saturating ramp of that read (every row blind to every other chain's writes), and an
eraser neuron that removes the group head's write at the prediction position once it has been read
(:mod:`mechbias.groundtruth.context_pool`); a shift of 0.2 calibrated by measurement (4 rounds), fitted on the
selection prompts of all four yes/no contexts. Version 4 (``load_model("planted-v4")``, issue 33): the v3 construction on the
**gender** axis (female names favoured, as the embedded model's own gap), a planted gap of 0.2 log-odds on the
fitting prompts (about 0.06 on held-out prompts), built from **selection templates and 16 selection names per
race x gender cell of the extended roster only** (finance, commerce and hiring; housing is never seen), and
verified on held-out templates and the extended roster's held-out names (200, disjoint from every name the
construction read). Its verification adds the column-wise transfer test on the
oracle's own matrix (each row zeroes its context's chain: the planted difference, which the test must detect)
and on the same fix applied on every row (both chains zeroed on both rows, which it must not).
Version 3 (``load_model("planted-v3")``): context-specific
bias, **built by construction** (:mod:`mechbias.groundtruth.construct`, no training):
finance and commerce each get a private chain of four name-position neurons in
layer 17 (three write the name's group into a private value marker, one a key
marker), one attention head in layer 18 (reads the marker from the last position)
and three prediction-position neurons in layer 18 (gated by the context at the last
position) that write the answer. Fitted on finance, commerce and hiring (selection
names, all templates); housing is never seen, so it tests whether the chains leave
an unseen context alone (finance's partly does not: docs/groundtruth.md). ``--trained-v3`` runs the
earlier gradient trainer's v3 layout instead (it missed its targets). Version 2
(``load_model("planted")`` = ``"planted-v2"``): trained; shared neurons carry most
of every context's gap.

Writes ``delta.safetensors`` (the new rows and columns of the planted units) and
``manifest.json``: every unit with its role, kind and position; training settings;
the original and planted gaps per context on the held-out split (with CIs);
perplexity; the effect on prompts without names; and the verification, on the
held-out split: per planted set, the gap change in every context when the set
is zeroed at every position and at the last position only (which says where the
set acts), and the oracle matrix (each context's units zeroed, every context
measured).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mechbias.core.log import log_to_console
from mechbias.core.models import load_model
from mechbias.core.results import package_versions
from mechbias.data.contexts import YES_NO_CONTEXTS, load_context
from mechbias.eval.cells import EvalSet, TransferConfig, evaluate
from mechbias.eval.metrics import contrast_scores, measure_bias, perplexity
from mechbias.eval.transfer import transfer_matrix
from mechbias.groundtruth.construct import ConstructConfig, construct_planted
from mechbias.groundtruth.delta import PLANTED_DIR
from mechbias.groundtruth.planted import (
    HELDOUT_NEUTRAL_REFERENCES,
    NEUTRAL_REFERENCES,
    default_config,
    neutral_prompts,
    planted_units,
    stages,
)
from mechbias.groundtruth.recovery import oracle_intervention
from mechbias.groundtruth.staged import save_delta, train_planted
from mechbias.interventions.base import Compose
from mechbias.interventions.units import HeadIntervention, NeuronIntervention


def neutral_prompt_shift(model, heldout: bool = False):
    """Contrast scores of every context's templates with neutral references instead of names
    (the references used in training, or held-out ones)."""
    refs = HELDOUT_NEUTRAL_REFERENCES if heldout else NEUTRAL_REFERENCES
    texts = [t for c in YES_NO_CONTEXTS for t in neutral_prompts(c, refs)]
    return contrast_scores(model, texts, " Yes", " No")


def stage_intervention(stage, positions="all"):
    if stage.kind == "neuron":
        return NeuronIntervention(list(stage.units), positions=positions, label=stage.label)
    return HeadIntervention(list(stage.units), positions=positions, label=stage.label)


def validate_transfer_test(model, manifest: dict, axis: str, sets: dict) -> dict:
    """The column-wise transfer test on the planted truth, held-out prompts: the oracle's matrix (each row zeroes
    its own context's chain) must show the planted difference; the same fix on every row (both chains zeroed on
    both rows) must give a test near 0 that is not significant."""
    rows = list(manifest["only"])
    both = Compose([oracle_intervention(manifest, r) for r in rows])
    tc = TransferConfig(n_random=0, controls=(), capability=False, n_boot=2000)
    out = {}
    for key, selector in (("oracle", lambda m, c, a: oracle_intervention(manifest, c.name)),
                          ("same_fix_every_row", lambda m, c, a: both)):
        tm = transfer_matrix(model, selector, rows, axis, method=key, evaluate_on=list(YES_NO_CONTEXTS),
                             config=tc, eval_sets=sets)
        t = tm.test_transfer(margin=0.05)
        out[key] = {k: t[k] for k in ("within_mean", "cross_mean", "within_minus_cross", "ci_low", "ci_high",
                                      "p_value", "min_detectable")}
        out[key]["tost"] = t["tost"]
        out[key]["cells"] = {f"{c.selected_on}->{c.evaluated_on}": {"gap_before": c.gap_before,
                                                                    "gap_removed": c.gap_removed}
                             for c in tm.cells}
        print(f"transfer test, {key}: within - cross {t['within_minus_cross']:+.3f} [{t['ci_low']:+.3f}, "
              f"{t['ci_high']:+.3f}], p {t['p_value']:.3g}", flush=True)
    return out


def planted_description(args: argparse.Namespace) -> str:
    """The manifest's one-line description of a v4 or v5 build."""
    layout = (" (pooled context read, ramp-gated prediction neurons, the group heads' writes erased after use)"
              if args.erase_head_output else "")
    return (f"SmolLM2-135M-Instruct (embedded) with planted gender bias (female favoured, {2 * args.shift:g} log-odds "
            f"on the fitting prompts; built on selection templates and names of {', '.join(args.fit_contexts)})"
            f"{layout}: context-specific units dominate")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", type=int, default=5, choices=(2, 3, 4, 5),
                    help="5: the v4 construction with --context-pool --ramp-gate --erase-head-output, --shift 0.2, "
                         "--calibrate-rounds 4 and all four contexts fitting (the shipped planted-v5)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--trained-v3", action="store_true", help="v3 by the gradient trainer (missed its targets)")
    # v4's defaults are the shipped model's; its held-out gap fell short of 0.1 (docs/groundtruth.md). Two attempts
    # at a larger one were not shipped: --shift 0.3 --names-per-cell 32 --fit-contexts finance commerce hiring
    # housing (analyses/planted_v4_shift03_attempt.log) and --shift 0.125 --fit-contexts finance commerce hiring
    # housing --calibrate-rounds 4 (analyses/planted_v4_calibrated_attempt.log); a third, --context-pool --shift 0.15
    # --calibrate-rounds 4 --fit-contexts finance commerce hiring housing (analyses/planted_v4_pooled_attempt.log),
    # leaked into every context; a fourth, --context-pool --ramp-gate --shift 0.15 (analyses/planted_v4_ramp_attempt.log),
    # had context-specific prediction neurons but its group heads' writes leaked (docs/groundtruth.md)
    ap.add_argument("--shift", type=float, default=None,
                    help="v4/v5: per-group score shift on the fitting prompts (planted gap 2 x shift there; "
                         "default 0.1 for v4, 0.2 for v5)")
    ap.add_argument("--names-per-cell", type=int, default=16, help="v4: selection names per race x gender cell")
    ap.add_argument("--calibrate-rounds", type=int, default=None,
                    help="v4/v5: measure the planted gap at the output scale used, up to N times (0: extrapolate from "
                         "unit output; default 0 for v4, 4 for v5)")
    ap.add_argument("--context-pool", action="store_true",
                    help="v4: gate the chains by a pooled read of the prompt (a context neuron and a uniformly "
                         "attending head per chain; mechbias.groundtruth.context_pool)")
    ap.add_argument("--ramp-gate", action="store_true",
                    help="v4 with --context-pool: each chain's prediction neurons are a pair making a saturating ramp "
                         "of the pooled context read, every row blind to every chain's writes (context_pool.ramp_gate)")
    ap.add_argument("--erase-head-output", action="store_true",
                    help="v4 with --ramp-gate: one more neuron per chain removes its group head's write at the "
                         "prediction position once the prediction neurons have read it (context_pool.write_eraser)")
    ap.add_argument("--fit-contexts", nargs="+", default=None,
                    help="v4/v5: contexts whose selection prompts fit the gates (the others are never seen; default "
                         "finance commerce hiring for v4, all four for v5)")
    args = ap.parse_args()
    v5 = args.version == 5
    if v5:  # planted-v5: the v4 construction with the pooled, ramp-gated, erased layout (docs/groundtruth.md)
        args.context_pool = args.ramp_gate = args.erase_head_output = True
    if args.shift is None:
        args.shift = 0.2 if v5 else 0.1
    if args.calibrate_rounds is None:
        args.calibrate_rounds = 4 if v5 else 0
    if args.fit_contexts is None:
        args.fit_contexts = list(YES_NO_CONTEXTS) if v5 else ["finance", "commerce", "hiring"]
    unknown = sorted(set(args.fit_contexts) - set(YES_NO_CONTEXTS))
    if unknown:
        ap.error(f"--fit-contexts: unknown context(s) {unknown}; known: {list(YES_NO_CONTEXTS)}")
    if args.ramp_gate and not args.context_pool:
        ap.error("--ramp-gate needs --context-pool")
    if args.erase_head_output and not args.ramp_gate:
        ap.error("--erase-head-output needs --ramp-gate")
    log_to_console()  # the library's progress lines
    out = args.out or PLANTED_DIR / f"v{args.version}"
    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
    model = load_model()
    t0 = time.time()
    if args.version == 3 and args.trained_v3:
        cfg = default_config(model, version=3, steps=args.steps, batch_size=args.batch,
                             contexts=("finance", "commerce", "hiring"))
    elif args.version == 2:
        cfg = default_config(model, version=2, steps=args.steps, batch_size=args.batch)
    if args.version == 2 or args.trained_v3:
        for s in stages(cfg):
            print(f"{s.label}: {list(s.units)}", flush=True)
    v4 = args.version in (4, 5)  # v5 is a v4 construction (gender, selection data only) with more parts
    axis = "gender@extended" if v4 else "race"
    templates = "heldout" if v4 else "all"
    before = measure_bias(model, "all", axis, names="heldout", templates=templates, n_boot=2000)
    ppl0 = perplexity(model)
    neutral0, neutral0_ho = neutral_prompt_shift(model), neutral_prompt_shift(model, heldout=True)
    built = args.version in (3, 4, 5) and not args.trained_v3
    if built:
        ccfg = (ConstructConfig(axis=axis, favoured="female", shift=args.shift, templates="selection",
                                names_per_cell=args.names_per_cell, fit_contexts=tuple(args.fit_contexts),
                                calibrate_rounds=args.calibrate_rounds, context_pool=args.context_pool,
                                ramp_gate=args.ramp_gate, n_last=2 if args.ramp_gate else 3,
                                erase_head_output=args.erase_head_output)
                if v4 else ConstructConfig())
        delta, cfg, info = construct_planted(model, ccfg)
    else:
        delta, info = train_planted(model, cfg)
    train_s = time.time() - t0
    after = measure_bias(model, "all", axis, names="heldout", templates=templates, n_boot=2000)
    ppl1 = perplexity(model)
    neutral1, neutral1_ho = neutral_prompt_shift(model), neutral_prompt_shift(model, heldout=True)
    keep = ("context", "gap", "ci_low", "ci_high", "p_value", "significant", "n_prompts")
    manifest = {
        "version": args.version,
        "description": (planted_description(args) if v4 else
                        "SmolLM2-135M-Instruct (embedded) with planted race bias (White favoured): "
                        + ("context-specific units dominate" if args.version == 3 else "shared neurons dominate")),
        "axis": cfg.axis, "favoured": cfg.favoured, "contexts": list(YES_NO_CONTEXTS),
        "training_contexts": list(cfg.contexts),
        "shared": [list(n) for n in cfg.shared], "only": {k: [list(n) for n in v] for k, v in cfg.only.items()},
        "only_last": {k: [list(n) for n in v] for k, v in cfg.only_last.items()},
        "heads": {k: [list(n) for n in v] for k, v in cfg.heads.items()},
        "units": planted_units(cfg),
        "roles": {"shared": "shift every context", **{c: f"shift only {c}" for c in cfg.only}},
        "training": ({"method": "construction (mechbias.groundtruth.construct)", **asdict(ccfg), "fit": info}
                     if built else
                     {k: v for k, v in asdict(cfg).items() if k not in ("shared", "only", "only_last", "heads")}),
        "gaps_original_heldout": [{k: r[k] for k in keep} for r in before.rows],
        "gaps_planted_heldout": [{k: r[k] for k in keep} for r in after.rows],
        "perplexity_original": ppl0, "perplexity_planted": ppl1,
        "neutral_prompt_score_shift_mean": float((neutral1 - neutral0).mean()),
        "neutral_prompt_score_shift_max_abs": float((neutral1 - neutral0).abs().max()),
        "neutral_prompt_score_shift_heldout_mean": float((neutral1_ho - neutral0_ho).mean()),
        "neutral_prompt_score_shift_heldout_max_abs": float((neutral1_ho - neutral0_ho).abs().max()),
        "train_seconds": round(train_s, 1), "versions": package_versions(),
    }
    # verification on the held-out split: where each set acts, and the oracle matrix
    tc = TransferConfig(n_random=0, controls=(), capability=False, n_boot=1000)
    sets = {c: EvalSet.build(model, load_context(c), axis) for c in YES_NO_CONTEXTS}

    def effects(iv, label):
        cells = {c: evaluate(model, iv, sets[c], None, tc, selected_on=label) for c in YES_NO_CONTEXTS}
        return {c: {"gap_before": x.gap_before, "gap_change": x.gap_change, "ci_low": x.ci_low, "ci_high": x.ci_high,
                    "reduction": x.reduction} for c, x in cells.items()}

    # the delta and the manifest so far are written now and rewritten as each part of the verification ends, so a
    # stopped run keeps the model and what was measured of it
    save_delta(delta, out, manifest)
    manifest["verification"] = []
    for s in stages(cfg):
        row = {"set": s.label, "role": s.role, "kind": s.kind, "position": s.position,
               "zeroed_everywhere": effects(stage_intervention(s), s.label),
               "zeroed_at_last_position": effects(stage_intervention(s, "last"), s.label)}
        manifest["verification"].append(row)
        save_delta(delta, out, manifest)
        print(s.label, {c: round(v["gap_change"], 3) for c, v in row["zeroed_everywhere"].items()},
              "last only:", {c: round(v["gap_change"], 3) for c, v in row["zeroed_at_last_position"].items()},
              flush=True)
    manifest["oracle"] = {r: effects(oracle_intervention(manifest, r), f"oracle {r}") for r in cfg.only}
    for r, row in manifest["oracle"].items():
        print(f"oracle {r}: " + ", ".join(f"{c} {v['reduction'] if v['reduction'] is None else round(v['reduction'], 3)}"
                                           for c, v in row.items()), flush=True)
        print(f"oracle {r}, gap change: " + ", ".join(f"{c} {v['gap_change']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"
                                                      for c, v in row.items()), flush=True)
    save_delta(delta, out, manifest)
    if v4:
        manifest["transfer_test_validation"] = validate_transfer_test(model, manifest, axis, sets)
    save_delta(delta, out, manifest)
    for b, a in zip(before.rows, after.rows, strict=True):
        print(f"{b['context']:<9} original {b['gap']:+.3f} [{b['ci_low']:+.3f}, {b['ci_high']:+.3f}]   "
              f"planted {a['gap']:+.3f} [{a['ci_low']:+.3f}, {a['ci_high']:+.3f}]")
    print(f"perplexity {ppl0:.2f} -> {ppl1:.2f}; neutral-prompt score shift mean "
          f"{manifest['neutral_prompt_score_shift_mean']:+.3f}, max |.| {manifest['neutral_prompt_score_shift_max_abs']:.3f}")
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
