"""One method run, as the CLI and the study both do it: select on each row context, evaluate the
transfer matrix, run the method's own analyses, and write everything to a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..core.results import atomic_savefig, atomic_write_json
from ..eval.transfer import EvalSet, TransferConfig, TransferMatrix, transfer_matrix
from ..interventions.profile import UnitProfile
from ..methods.base import Method


def short_cells(tm: TransferMatrix) -> list[dict]:
    """The cells of a transfer matrix without per-draw lists (what summaries and reports show)."""
    keep = ("selected_on", "evaluated_on", "level", "gap_before", "gap_before_ci", "gap_after", "gap_change", "ci_low",
            "ci_high", "p_value", "p_adjusted", "min_detectable", "gap_removed", "reduction", "reduction_ci_low",
            "reduction_ci_high", "random_gap_change", "random_ci_low", "random_ci_high", "random_gap_removed",
            "random_reduction", "perplexity_change", "random_perplexity_change", "n_components")
    return [{k: c.get(k) for k in keep} for c in tm.cells]


def run_method(model, method: Method, select_on: Sequence[str], evaluate_on: Sequence[str], axis: str,
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
    tm.save(out / "transfer_result")
    for name, sel in method.selections.items():
        sel.save(out / "selections" / name)
        sel.intervention.save(out / "intervention" if len(method.selections) == 1 else out / "intervention" / name)
    atomic_write_json({"method": method.name, "title": method.title, "axis": axis, "config": method.config.to_dict(),
                       "transfer_config": tm.config, "cells": tm.records(), "transfer_test": tm.transfer_test,
                       "rows": tm.row_info,
                       "baseline": tm.baseline, "meta": tm.meta}, out / "transfer.json")
    fig = fig_name or f"transfer_{method.name}_{axis}.png"
    atomic_savefig(tm.plot(title=f"{method.title}: cross-context transfer ({axis})"), out / "figures" / fig)
    analysis = method.analyze(model, axis, out, quick=quick, transfer=tm, eval_sets=eval_sets,
                              n_boot=min(tcfg.n_boot, 1000), **(analyze_kw or {}))
    summary = {"method": method.name, "title": method.title, "description": method.summary, "axis": axis,
               "config": method.config.to_dict(), "seed": method.seed,
               "selections": {k: {"intervention": s.intervention.describe(), "n_components": s.intervention.n_components,
                                  **s.summary} for k, s in method.selections.items()},
               "analysis": analysis, "transfer": short_cells(tm), "transfer_test": tm.transfer_test,
               "rows": tm.row_info,
               "figures": [fig] + list(analysis.get("figures", []))}
    atomic_write_json(summary, out / f"{method.name}.json")
    return summary
