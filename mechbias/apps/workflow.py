"""One method run, as the CLI and the study both do it: select on each row context, evaluate the
transfer matrix, run the method's own analyses, and write everything to a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..core.results import atomic_savefig, atomic_write_json
from ..data.contexts import Context
from ..eval.cells import EvalSet, TransferConfig
from ..eval.transfer import TransferMatrix, transfer_matrix
from ..interventions.base import model_identity
from ..interventions.profile import UnitProfile
from ..methods.base import Method


def short_cells(tm: TransferMatrix) -> list[dict]:
    """The cells of a transfer matrix without per-draw lists (what summaries and reports show)."""
    keep = ("selected_on", "evaluated_on", "level", "gap_before", "gap_before_ci", "gap_after", "gap_change", "ci_low",
            "ci_high", "p_value", "p_adjusted", "min_detectable", "gap_removed", "reduction", "reduction_ci_low",
            "reduction_ci_high", "random_gap_change", "random_ci_low", "random_ci_high", "random_gap_removed",
            "random_reduction", "perplexity_change", "random_perplexity_change", "n_components")
    return [{k: c.get(k) for k in keep} for c in tm.cells]


def run_method(model, method: Method, select_on: Sequence[str | Context], evaluate_on: Sequence[str | Context],
               axis: str,
               tcfg: TransferConfig, out: Path, *, quick: bool = False, eval_sets: dict[str, EvalSet] | None = None,
               analyze_kw: dict | None = None, log: Callable[[str], None] | None = None,
               fig_name: str | None = None, profile: UnitProfile | None = None) -> dict:
    """Run ``method`` and write ``OUT/transfer.json``, ``OUT/<method>.json``, the selections, the interventions
    (``OUT/intervention`` for one row context, ``OUT/intervention/<context>`` for several) and figures.
    Returns the method summary (also in ``<method>.json``)."""
    out = Path(out)
    say = log or (lambda s: None)
    tm = transfer_matrix(model, method, list(select_on), axis, method=method.title, eval_contexts=list(evaluate_on),
                         config=tcfg, eval_sets=eval_sets, profile=profile, log=say)
    fig = fig_name or f"transfer_{method.name}_{axis}.png"
    origin = model_identity(model)  # saved in each intervention.json: applying it to another model is refused
    for sel in method.selections.values():
        sel.intervention.origin = origin
    for iv in tm.interventions.values():
        iv.origin = origin
    return write_method_outputs(method.name, method.title, method.summary, method.config.to_dict(), method.seed,
                                tm, method.selections, None, out, fig,
                                analyze=lambda: method.analyze(model, axis, out, quick=quick, transfer=tm,
                                                               eval_sets=eval_sets, n_boot=min(tcfg.n_boot, 1000),
                                                               **(analyze_kw or {})))


def write_method_outputs(name: str, title: str, description: str, config: dict, seed: int, tm: TransferMatrix,
                         selections: dict, analysis: dict | None, out: Path, fig: str, *,
                         analyze: Callable[[], dict] | None = None) -> dict:
    """Write a method's transfer matrix, selections, interventions, figure and summary under ``out``
    (``analyze``, if given, is called after the transfer results are on disk and gives the analysis)."""
    out = Path(out)
    tm.save(out / "transfer_result")
    for ctx, sel in selections.items():
        sel.save(out / "selections" / ctx)
        sel.intervention.save(out / "intervention" if len(selections) == 1 else out / "intervention" / ctx)
    atomic_write_json({"method": name, "title": title, "axis": tm.axis, "config": config,
                       "transfer_config": tm.config, "cells": tm.records(), "transfer_test": tm.transfer_test,
                       "rows": tm.row_info, "baseline": tm.baseline, "meta": tm.meta}, out / "transfer.json")
    atomic_savefig(tm.plot(title=f"{title}: cross-context transfer ({tm.axis})"), out / "figures" / fig)
    if analyze is not None:
        analysis = analyze()
    analysis = analysis or {}
    summary = {"method": name, "title": title, "description": description, "axis": tm.axis,
               "config": config, "seed": seed,
               "selections": {k: {"intervention": s.intervention.describe(), "n_components": s.intervention.n_components,
                                  **s.summary} for k, s in selections.items()},
               "analysis": analysis, "transfer": short_cells(tm), "transfer_test": tm.transfer_test,
               "rows": tm.row_info,
               "figures": [fig] + list(analysis.get("figures", []))}
    atomic_write_json(summary, out / f"{name}.json")
    return summary
