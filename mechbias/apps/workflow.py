"""One method run, as the CLI and the study both do it: select on each row context, evaluate the
transfer matrix, run the method's own analyses, and write everything to a folder.

:func:`run_method_jobs` (what every method command runs) is a one-step study in-process: the study's own
jobs (:func:`~mechbias.apps.study_jobs.method_planner`), kept in ``OUT/jobs``, so an interrupted command
resumes where it stopped and its cells are the study's. In a notebook, the in-process engine
(:func:`~mechbias.eval.transfer.transfer_matrix` on a method instance) computes the same cells without a store
(``tests/test_study.py`` compares the two)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.models import model_label
from ..core.results import (
    RUN_INTERVENTIONS,
    RUN_SELECTIONS,
    RUN_SUMMARY,
    RUN_TRANSFER,
    RUN_TRANSFER_V1,
    atomic_savefig,
    atomic_write_json,
)
from ..data.contexts import Context, load_contexts
from ..eval.cells import TransferConfig
from ..eval.transfer import TransferMatrix
from ..interventions.base import load_intervention, model_identity
from ..methods.base import Method, MethodConfig
from .executors import InProcess
from .jobs import JobStore, data_fingerprint, model_fingerprint, run_planners
from .study_jobs import Shared, method_planner, model_meta

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

#: the folder layout of one method run (a method command's ``--out``, each study step); see :class:`MethodRun`
LAYOUT = 2
SUMMARY, TRANSFER, INTERVENTIONS, SELECTIONS = RUN_SUMMARY, RUN_TRANSFER, RUN_INTERVENTIONS, RUN_SELECTIONS


def short_cells(tm: TransferMatrix) -> list[dict]:
    """The cells of a transfer matrix without per-draw lists (what summaries and reports show)."""
    keep = ("selected_on", "evaluated_on", "level", "gap_before", "gap_before_ci", "gap_after", "gap_change", "ci_low",
            "ci_high", "p_value", "p_adjusted", "min_detectable", "gap_removed", "reduction", "reduction_ci_low",
            "reduction_ci_high", "random_gap_change", "random_ci_low", "random_ci_high", "random_gap_removed",
            "random_reduction", "perplexity_change", "random_perplexity_change", "n_components")
    return [{k: c.get(k) for k in keep} for c in tm.cells]


@dataclass
class MethodRun:
    """One method run, as its folder holds it (``LAYOUT`` 2: each cell and each intervention once).

    The folder::

        summary.json                  what ran and what it chose: method, title, config, seed, per row the
                                      intervention's description and the method's numbers, the analysis, figures
                                      (no cells: they are in transfer/)
        transfer/                     the TransferMatrix (result.json: every cell with its controls, the transfer
                                      test, row overlaps, baseline; tensors.safetensors: the score grids)
        interventions/<context>/      the intervention selected on each row context (what ``apply``, ``card``,
                                      ``export`` and ``mechbias-lm-eval`` take)
        selections/<context>/         the method's intermediate results on that context (attributions, sweeps,
                                      training curves) and selection.json
        figures/

    Folders written before layout 2 (``transfer_result/``, ``transfer.json``, ``<method>.json``,
    ``intervention/``) are read by :func:`load_run` too.

    Args:
        method: the registry name.
        title: the method's title (a study step's own title where it has one).
        description: one paragraph on what the method does.
        axis: the axis.
        config: the method's configuration.
        seed: the seed.
        transfer: the transfer matrix, with the interventions by row.
        selections: per row context, the intervention's description and the method's numbers.
        analysis: the method's own analyses (:meth:`~mechbias.methods.base.Method.analyze`).
        figures: the figure files under ``figures/``.
        jobs: how many jobs computed it (0 where unknown).
    """

    method: str
    title: str
    description: str
    axis: str
    config: dict
    seed: int
    transfer: TransferMatrix
    selections: dict[str, dict]
    analysis: dict = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    jobs: int = 0

    def record(self) -> dict[str, Any]:
        """What ``summary.json`` holds."""
        return {"layout": LAYOUT, "method": self.method, "title": self.title, "description": self.description,
                "axis": self.axis, "config": self.config, "seed": self.seed, "selections": self.selections,
                "analysis": self.analysis, "figures": self.figures, "jobs": self.jobs,
                "files": {"transfer": TRANSFER, "interventions": f"{INTERVENTIONS}/<context>",
                          "selections": f"{SELECTIONS}/<context>"}}

    def cells(self) -> list[dict]:
        """The cells without per-draw lists (:func:`short_cells`)."""
        return short_cells(self.transfer)

    def save(self, out: Path) -> Path:
        """Write the run under ``out`` (``summary.json`` last: a folder with one is complete)."""
        out = Path(out)
        _write_transfer(self.transfer, out)
        atomic_write_json(self.record(), out / SUMMARY)
        return out


def _write_transfer(tm: TransferMatrix, out: Path) -> None:
    tm.save(out / TRANSFER, interventions=False)
    for ctx, iv in tm.interventions.items():
        iv.save(out / INTERVENTIONS / ctx)


def load_run(folder: str | Path) -> MethodRun:
    """Read a method run's folder: the current layout (:class:`MethodRun`) or the one before it
    (``transfer_result/``, ``<method>.json`` or ``summary.json``, ``intervention/``).

    Args:
        folder: a method command's ``--out`` or a study step (``OUT/steps/<step>``).

    Returns:
        The run: what ran and chose, and the transfer matrix with its interventions by row.

    Raises:
        FileNotFoundError: ``folder`` holds no finished method run (the message names the layout looked for).
    """
    folder = Path(folder)
    summary_path = folder / SUMMARY
    if (folder / TRANSFER / "result.json").exists() and summary_path.exists():
        s = json.loads(summary_path.read_text())
        tm = TransferMatrix.load(folder / TRANSFER)
        ivs = folder / INTERVENTIONS
        tm.interventions = {p.name: load_intervention(p) for p in sorted(ivs.iterdir())
                            if (p / "intervention.json").exists()} if ivs.is_dir() else {}
    elif (folder / RUN_TRANSFER_V1 / "result.json").exists():  # layout 1 (before issue 37)
        candidates = [summary_path, *sorted(folder.glob("*.json"))]
        s = next((d for d in (json.loads(p.read_text()) for p in candidates if p.exists())
                  if isinstance(d, dict) and "method" in d and "selections" in d), {})
        tm = TransferMatrix.load(folder / RUN_TRANSFER_V1)
    else:
        raise FileNotFoundError(
            f"{folder} holds no finished method run: expected {SUMMARY} and {TRANSFER}/result.json (cells), "
            f"{INTERVENTIONS}/<context>/ and {SELECTIONS}/<context>/ (or, from before layout 2, "
            "transfer_result/ and transfer.json)")
    return MethodRun(method=s.get("method", tm.method), title=s.get("title", tm.method),
                     description=s.get("description", ""), axis=s.get("axis", tm.axis), config=s.get("config", {}),
                     seed=int(s.get("seed", 0)), transfer=tm, selections=s.get("selections", {}),
                     analysis=s.get("analysis") or {}, figures=list(s.get("figures", [])), jobs=int(s.get("jobs", 0)))


def write_method_outputs(name: str, title: str, description: str, config: dict, seed: int, tm: TransferMatrix,
                         selections: dict, analysis: dict | None, out: Path, fig: str, *,
                         analyze: Callable[[], dict] | None = None, jobs: int = 0) -> MethodRun:
    """Write a method's run under ``out`` in the :class:`MethodRun` layout: transfer matrix, interventions,
    selections, figure and summary (``analyze``, if given, is called after the transfer results are on disk
    and gives the analysis)."""
    out = Path(out)
    for ctx, sel in selections.items():
        sel.save(out / SELECTIONS / ctx, intervention=False)
        tm.interventions.setdefault(ctx, sel.intervention)
    run = MethodRun(method=name, title=title, description=description, axis=tm.axis, config=config, seed=seed,
                    transfer=tm, selections={}, analysis={}, figures=[fig], jobs=jobs)
    _write_transfer(tm, out)
    atomic_savefig(tm.plot(title=f"{title}: cross-context transfer ({tm.axis})"), out / "figures" / fig)
    if analyze is not None:
        analysis = analyze()
    run.analysis = analysis or {}
    run.selections = {k: {"intervention": s.intervention.describe(), "n_components": s.intervention.n_components,
                          **s.summary} for k, s in selections.items()}
    run.figures = [fig, *list(run.analysis.get("figures", []))]
    atomic_write_json(run.record(), out / SUMMARY)
    return run


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


def run_method_jobs(model: TransformerBridge, cls: type[Method], config: MethodConfig, select_on: Sequence[str], evaluate_on: Sequence[str],
                    axis: str, tcfg: TransferConfig, out: Path, *, seed: int = 0, quick: bool = False,
                    analyze_kw: dict | None = None,
                    progress: bool = False) -> MethodRun:
    """Run ``cls`` with ``config`` as a one-step study in-process (the study's jobs, its job store in
    ``OUT/jobs``: rerun the same command on the same ``--out`` after an interruption and only the missing jobs
    run), then write the transfer matrix, selections, interventions, figure and summary
    (:func:`write_method_outputs`). Returns the run."""
    out = Path(out)
    rows, cols = context_refs(select_on), context_refs(evaluate_on)
    user_files = sorted(r for r in {*rows, *cols} if Path(r).suffix in (".yaml", ".yml"))
    salt = hashlib.sha256(f"{model_fingerprint(model)}:{data_fingerprint(user_files)}".encode()).hexdigest()
    shared = Shared(salt, list(dict.fromkeys(rows + cols)), axis, seed, tcfg.templates_per_name)
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
