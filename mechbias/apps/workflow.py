"""One method run, as the CLI and the study both do it: select on each row context, evaluate the
transfer matrix, run the method's own analyses, and write everything to a folder.

:func:`run_method_jobs` (what every method command runs) is a one-step study in-process: the study's own
jobs (:func:`~mechbias.apps.study_jobs.method_planner`), kept in ``OUT/jobs``, so an interrupted command
resumes where it stopped and its cells are the study's. In a notebook, the in-process engine
(:func:`~mechbias.eval.transfer.transfer_matrix` on a method instance) computes the same cells without a store
(``tests/test_study.py`` compares the two)."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from ..core.models import model_label
from ..core.results import atomic_savefig, atomic_write_json
from ..data.contexts import Context, load_contexts
from ..eval.cells import TransferConfig
from ..eval.transfer import TransferMatrix
from ..interventions.base import model_identity
from ..methods.base import Method, MethodConfig
from .executors import InProcess
from .jobs import JobStore, data_fingerprint, model_fingerprint, run_planners
from .study_jobs import Shared, method_planner, model_meta


def short_cells(tm: TransferMatrix) -> list[dict]:
    """The cells of a transfer matrix without per-draw lists (what summaries and reports show)."""
    keep = ("selected_on", "evaluated_on", "level", "gap_before", "gap_before_ci", "gap_after", "gap_change", "ci_low",
            "ci_high", "p_value", "p_adjusted", "min_detectable", "gap_removed", "reduction", "reduction_ci_low",
            "reduction_ci_high", "random_gap_change", "random_ci_low", "random_ci_high", "random_gap_removed",
            "random_reduction", "perplexity_change", "random_perplexity_change", "n_components")
    return [{k: c.get(k) for k in keep} for c in tm.cells]


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
               "figures": [fig, *list(analysis.get("figures", []))]}
    atomic_write_json(summary, out / f"{name}.json")
    return summary


def context_ref(given: str | Context) -> str:
    """How a job names a context: a built-in by its name, a user's YAML file by its absolute path (a job loads
    it from there; its bytes enter the job keys through the salt)."""
    if isinstance(given, Context):
        return given.name
    path = Path(str(given))
    return str(path.resolve()) if path.suffix in (".yaml", ".yml") or path.exists() else str(given)


def context_refs(given: Sequence[str | Context]) -> list[str]:
    """:func:`context_ref` of each, with ``"all"`` standing for every built-in context."""
    out: list[str] = []
    for x in given:
        out += [c.name for c in load_contexts("all")] if str(x) == "all" else [context_ref(x)]
    return list(dict.fromkeys(out))


def run_method_jobs(model, cls: type[Method], config: MethodConfig, select_on: Sequence[str], evaluate_on: Sequence[str],
                    axis: str, tcfg: TransferConfig, out: Path, *, seed: int = 0, quick: bool = False,
                    analyze_kw: dict | None = None,
                    progress: bool = False) -> dict:
    """Run ``cls`` with ``config`` as a one-step study in-process (the study's jobs, its job store in
    ``OUT/jobs``: rerun the same command on the same ``--out`` after an interruption and only the missing jobs
    run), then write the transfer matrix, selections, interventions, figure and summary
    (:func:`write_method_outputs`). Returns the method summary."""
    out = Path(out)
    rows, cols = context_refs(select_on), context_refs(evaluate_on)
    user_files = sorted(r for r in {*rows, *cols} if Path(r).suffix in (".yaml", ".yml"))
    salt = hashlib.sha256(f"{model_fingerprint(model)}:{data_fingerprint(user_files)}".encode()).hexdigest()
    shared = Shared(salt, list(dict.fromkeys(rows + cols)), axis, seed)
    planner = method_planner(shared, cls.name, cls, config, tcfg, rows, cols, quick=quick,
                             analyze_kw=analyze_kw or {}, model_meta=model_meta(model))
    executor = InProcess(model, {"name": model_label(model)}, reraise=True)
    store_dir, fresh = out / "jobs", not out.exists()
    try:
        rep = run_planners({cls.name: planner}, JobStore(store_dir), executor, progress=progress)
    except BaseException:
        # a first run that failed before any job finished leaves nothing behind; otherwise its finished jobs stay
        # for the rerun to resume from
        if fresh and not any(store_dir.glob("*/*/job.json")):
            shutil.rmtree(out, ignore_errors=True)
        raise
    value = rep.values[cls.name]
    origin = model_identity(model)  # saved in each intervention.json: applying it to another model is refused
    for sel in value["selections"].values():
        sel.intervention.origin = origin
    for iv in value["transfer"].interventions.values():
        iv.origin = origin
    if Path(value["files"]).is_dir():
        shutil.copytree(value["files"], out, dirs_exist_ok=True)
    return write_method_outputs(cls.name, cls.title, cls.summary, config.to_dict(), seed, value["transfer"],
                                value["selections"], value["analysis"], out, f"transfer_{cls.name}_{axis}.png")
