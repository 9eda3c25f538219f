"""The study: the baseline, every registered method across the contexts, and one report.

The study is a set of content-addressed jobs (:mod:`mechbias.apps.study_jobs`)
run by :func:`mechbias.apps.jobs.run_planners` on a local Ray runtime (one
worker per core), an existing Ray cluster (``--address``) or in-process
(``--workers 1``). Every finished job is kept in the job store (``OUT/jobs`` or
``--store``) and never computed twice: an interrupted study resumes job by job,
a second study reuses what it shares with the first, and a rerun with nothing
changed only reassembles the report. Each step writes ``OUT/steps/<step>/``
(``summary.json`` last); ``OUT/report.md`` and the interactive ``OUT/report.html`` are written from all of them.

The default answers the project's question quickly: finance vs. commerce, the methods at their default-study
settings (``Method.study_configs(quick, full=False)``); ``--full`` runs every context, variant and control.
A newly registered method appears here with no edit to this file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.models import model_label
from ..core.precision import Precision, check_precision
from ..core.results import (
    RUN_TRANSFER,
    RUN_TRANSFER_V1,
    atomic_savefig,
    atomic_write_json,
    atomic_write_text,
    run_summary_json,
)
from ..core.work import achieved_rate, matmul_peak, torch_threads
from ..eval.cells import TransferConfig
from ..eval.stats import benjamini_hochberg, mdd
from ..eval.transfer import TransferMatrix
from ..methods.base import StudyExtras, registered_methods
from ..viz.html import study_html
from ..viz.plotting import plot_methods_summary
from .executors import InProcess, RayExecutor
from .jobs import JobStore, RunReport, critical_path, data_fingerprint, model_fingerprint, run_planners
from .study_config import DEFAULT_CONTEXTS, StudyConfig  # noqa: F401 - part of this module's interface
from .study_jobs import (
    Shared,
    axis_planner,
    baseline_planner,
    choose_axis,  # noqa: F401 - part of this module's interface
    method_planner,
    model_meta,
)
from .study_report import baseline_report, crossfit_md, summary_report, summary_rows, transfer_md
from .workflow import write_method_outputs

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

_LOG = logging.getLogger(__name__)

@dataclass
class Step:
    """One step of the study: how it plans its jobs, writes its folder and reports."""
    name: str
    title: str
    plan: Callable  # (shared, cfg, model_meta) -> planner
    write: Callable  # (value, step_dir) -> summary dict
    report: Callable  # (summary, rel_fig) -> markdown
    config: Any = None  # a method step's method configuration


# ----------------------------------------------------------------------------
# baseline
# ----------------------------------------------------------------------------

def method_sections(step: Path, summary: dict) -> list[str]:
    """The interactive report's sections that a step's registered method renders itself (none for others)."""
    cls = registered_methods().get(summary.get("method", ""))
    return cls.html(step, summary) if cls is not None else []


def _baseline_step() -> Step:
    def plan(shared: Shared, cfg: StudyConfig, meta: dict):
        return baseline_planner(shared.salt, cfg.context_list, list(cfg.axes), cfg.seed, cfg.n_boot)

    def write(value: dict, out: Path) -> dict:
        _copy_tree(value["files"], out)
        return {"rows": value["rows"], "figures": value["figures"]}

    return Step("baseline", "Baseline bias per context and axis", plan, write, baseline_report)


def _copy_tree(src: Path, dst: Path) -> None:
    if Path(src).is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)


# ----------------------------------------------------------------------------
# method steps
# ----------------------------------------------------------------------------

def _method_step(name: str, cls, config, extras: StudyExtras) -> Step:
    title = extras.get("title", cls.title)

    def plan(shared: Shared, cfg: StudyConfig, meta: dict):
        tcfg = TransferConfig(n_random=cfg.draws, n_boot=cfg.n_boot, seed=cfg.seed, **extras.get("transfer", {}))
        rows = cfg.context_list[: extras.get("rows")] if extras.get("rows") else cfg.context_list
        return method_planner(shared, name, cls, config, tcfg, rows, cfg.context_list, quick=cfg.quick,
                              analyze_kw=extras.get("analyze") or {}, model_meta=meta,
                              crossfit_splits=cfg.crossfit or 0)

    def write(value: dict, out: Path) -> dict:
        _copy_tree(value["files"], out)
        run = write_method_outputs(cls.name, title, cls.summary, config.to_dict(), value["seed"],
                                   value["transfer"], value["selections"], value["analysis"], out,
                                   f"transfer_{name}.png", jobs=len(value.get("jobs", [])))
        record = run.record()
        if (cf := value.get("crossfit")) is not None:
            cf.save(out / "crossfit")
            record["crossfit"] = {"splits": cf.splits, "test": cf.test}
        return record

    def report(summary: dict, fig) -> str:
        method = cls(config)
        text = method.report(summary.get("analysis", {}), fig)
        return "\n".join([text, "", "**Transfer** (intervention chosen on the row context's selection split; "
                          "evaluated on held-out names and templates of each column context; gap change = after - "
                          "before, 95% paired crossed-bootstrap CI; random control: the intervention's own random "
                          "draw of the same size):", "", transfer_md(summary["cells"], fig, summary["figures"][0]),
                          *crossfit_md(summary.get("crossfit"))])

    return Step(name, title, plan, write, report, config)


# ----------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------

def study_steps(cfg: StudyConfig) -> list[Step]:
    """The study's method steps and the baseline, in order (the summary is written after them)."""
    steps = [_baseline_step()]
    for mname, cls in registered_methods().items():
        if cfg.methods is not None and mname not in cfg.methods:
            continue
        if not cfg.full and cfg.methods is None and not cls.in_default_study:
            continue
        for step_name, config in cls.study_configs(cfg.quick, full=cfg.full).items():
            auto: Precision = "fast" if step_name in cls.fast_study_steps else "exact"
            chosen: Precision = auto if cfg.precision == "auto" else check_precision(cfg.precision)
            config = dataclasses.replace(config, precision=chosen)
            steps.append(_method_step(step_name, cls, config, cls.study_extras(step_name, cfg.quick, full=cfg.full)))
    return [s for s in steps if s.name not in cfg.skip]


SUMMARY_TITLE = "The methods side by side"

# ----------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------


def make_executor(model: TransformerBridge, cfg: StudyConfig, model_spec: dict | None):
    """In-process for one worker, else Ray (local runtime, or the cluster at ``cfg.address``)."""
    spec = model_spec or {"name": model_label(model)}
    if cfg.n_workers == 1 and not cfg.address:
        return InProcess(model, spec, threads=cfg.job_threads)
    gpus = 1.0 if next(model.parameters()).is_cuda else 0.0
    return RayExecutor(spec, cfg.n_workers, threads=cfg.job_threads, address=cfg.address, gpus_per_worker=gpus)


def study_salt(model: TransformerBridge, cfg: StudyConfig) -> str:
    """What every job depends on besides its parameters: the model's weights and the data files."""
    user_files = [c for c in cfg.context_list if Path(c).suffix in (".yaml", ".yml")]
    return hashlib.sha256(f"{model_fingerprint(model)}:{data_fingerprint(user_files)}".encode()).hexdigest()


@dataclass
class StudyResult:
    """What :func:`run_study` did.

    Args:
        out: the study folder (``report.md``, ``report.html``, ``steps/``, ``work.json``).
        ok: every job finished (``exit_code`` 0); otherwise the failed jobs are in ``out / "failed.json"``.
        failed: step name -> the labels of its failed jobs (empty when ``ok``).
        steps: the steps this run reported.
        work: jobs computed and reused, seconds by kind, the critical path (``work.json``; empty when the run
            stopped before the method steps).
    """

    out: Path
    ok: bool
    failed: dict[str, list[str]] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)
    work: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """The command line's exit status: 0 when every job finished, else 1."""
        return 0 if self.ok else 1


def run_study(model: TransformerBridge, cfg: StudyConfig, out: Path, *, figures: Path | None = None, fresh: bool = False,
              model_spec: dict | None = None, executor=None,
              progress: bool = True) -> StudyResult:
    """Run (or resume) the study: every configured method through the transfer engine, as content-addressed jobs.

    Args:
        model: the model (workers load their own copy from ``model_spec``).
        cfg: the :class:`StudyConfig`.
        out: the study folder; finished steps there are reused.
        figures: also copy the figures into this folder.
        fresh: ignore finished steps and recompute.
        model_spec: ``{"name": ..., "kwargs": {...}}``, how Ray workers load the model; by default the
            model's label, which is a :func:`~mechbias.load_model` name for built-in models.
        executor: where jobs run (in-process or Ray); default from the config's workers.
        progress: show a progress bar.

    Returns:
        A :class:`StudyResult` (``.ok`` is False when some jobs failed; they are listed in ``OUT/failed.json``).
    """
    say = _LOG.info
    out = Path(out)
    t0 = time.time()
    store_root = Path(cfg.store) if cfg.store else out / "jobs"
    if fresh:
        for p in (out / "steps", out / "axis_choice.json", *([store_root] if not cfg.store else [])):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    store = JobStore(store_root)
    salt = study_salt(model, cfg)
    own_executor = executor is None
    ex = executor or make_executor(model, cfg, model_spec)
    runs: list[RunReport] = []
    early = RunReport({}, {})  # what ran before the method steps (the axis choice and the baseline beside it)
    try:
        if cfg.axis == "auto":
            path = out / "axis_choice.json"
            # reused only for the same model, data, contexts, axes and seed (it was once reused for any of them)
            choice_key = {"salt": salt, "contexts": cfg.context_list, "axes": list(cfg.axes), "seed": cfg.seed}
            choice = None
            if path.exists():
                try:
                    saved = json.loads(path.read_text())
                except ValueError:
                    saved = {}
                if isinstance(saved, dict) and saved.get("key") == choice_key:
                    choice = saved
            if choice is None:
                # the baseline does not depend on the axis: it runs beside the axis choice, on the worker the
                # choice leaves free
                first = {"axis": axis_planner(salt, cfg.context_list, list(cfg.axes), cfg.seed, min(cfg.n_boot, 1000))}
                if "baseline" not in cfg.skip:
                    first["baseline"] = _baseline_step().plan(Shared(salt, cfg.context_list, "", cfg.seed), cfg, {})
                rep = run_planners(first, store, ex, progress=progress)
                runs.append(rep)
                if not rep.ok:
                    return StudyResult(out, False, _failed(out, [rep], say))
                early = rep
                choice = {**rep.values["axis"], "key": choice_key}
                atomic_write_json(choice, path)
            cfg.axis = choice["axis"]
            say(f"axis chosen on the selection split: {choice['axis']} "
                + ", ".join(f"{r['axis']}: {r['significant_contexts']} significant" for r in choice["candidates"]))
        steps = study_steps(cfg)
        atomic_write_json(asdict(cfg), out / "study_config.json")
        shared = Shared(salt, cfg.context_list, cfg.axis, cfg.seed)
        meta = model_meta(model)
        say(f"{len(steps)} steps on {ex.workers} worker(s), {cfg.job_threads} torch thread(s) per job; "
            f"job store {store.root}")
        rep = run_planners({st.name: st.plan(shared, cfg, meta) for st in steps if st.name not in early.values},
                           store, ex, progress=progress)
        runs.append(rep)
        rep = early.merged(rep)
    finally:
        if own_executor:
            ex.close()
    # the methods' transfer tests are read as one family: their detectable differences at the
    # Benjamini-Hochberg-consistent level 0.05 / m (m = the number of transfer tests)
    tests = [v["transfer"].transfer_test for v in rep.values.values()
             if isinstance(v, dict) and isinstance(v.get("transfer"), TransferMatrix)
             and v["transfer"].transfer_test.get("within_minus_cross") is not None]
    for t in tests:
        t.update(family_size=len(tests), alpha_bh=0.05 / len(tests),
                 min_detectable_bh=mdd(t["se"], t["df"], 0.05 / len(tests)))
    for p_adj, t in zip(benjamini_hochberg([t["p_value"] for t in tests]), tests, strict=True):
        t["p_adjusted"] = p_adj
    # gatekeeping over the family: a method's transfer is read only where its within-context removal survives
    # Benjamini-Hochberg across the methods
    for p_adj, t in zip(benjamini_hochberg([t["within_p_value"] for t in tests]), tests, strict=True):
        t["within_p_adjusted"] = p_adj
        t["gated"] = bool(p_adj < 0.05)
        if t["gated"]:
            t.pop("gate_note", None)
        else:
            t["gate_note"] = "no within-context effect to transfer (within-context removal does not survive BH)"
    for st in steps:
        if st.name not in rep.values:
            continue
        value = rep.values[st.name]
        value.setdefault("seed", cfg.seed)
        step_dir = out / "steps" / st.name
        summary = st.write(value, step_dir)
        summary["jobs"] = len(value.get("jobs", []))
        atomic_write_json(summary, step_dir / "summary.json")
    # the steps of this run: the report shows these alone, not a stale step an earlier configuration left
    atomic_write_json({"steps": [st.name for st in steps if st.name in rep.values] + ["summary"]},
                      out / "steps" / "index.json")
    numbers: list[dict] = []
    rows = summary_rows(out, steps, numbers)
    atomic_savefig(plot_methods_summary(numbers, cfg.axis),
                   out / "steps" / "summary" / "figures" / "methods_summary.png")
    atomic_write_json({"rows": rows, "figures": ["methods_summary.png"]}, out / "steps" / "summary" / "summary.json")
    work = {"computed_now": rep.computed, "reused": rep.reused, "seconds_by_kind_now": rep.job_seconds,
            "workers": ex.workers, "threads_per_job": cfg.job_threads, "wall_seconds": round(time.time() - t0, 1),
            **critical_path(store, rep)}
    with torch_threads(cfg.job_threads):
        work["matmul_peak"] = matmul_peak()  # the chip's rate at a job's thread count, measured in this run
    work.update(achieved_rate(work))
    atomic_write_json(work, out / "work.json")
    write_report(out, cfg, steps, work, figures=figures, model_name=model_label(model))
    atomic_write_text(study_html(out, sections=method_sections), out / "report.html")
    say(f"jobs: {rep.computed} computed, {rep.reused} reused; report: {out / 'report.md'} and report.html "
        f"(total {time.time() - t0:.0f} s)")
    if work["jobs_by_other_code"]:
        say(f"warning: {work['jobs_by_other_code']} of {work['jobs']} jobs were computed by other versions of "
            "mechbias's code (report.md, Work): results may mix code versions")
    reported = [st.name for st in steps if st.name in rep.values]
    if not rep.ok:
        return StudyResult(out, False, _failed(out, runs, say), reported, work)
    failed = out / "failed.json"
    if failed.exists():
        failed.unlink()
    return StudyResult(out, True, {}, reported, work)


def _failed(out: Path, runs: list[RunReport], say) -> dict[str, list[str]]:
    failed = {k: v for r in runs for k, v in r.failed.items()}
    atomic_write_json(failed, out / "failed.json")
    for step, jobs in failed.items():
        for j in jobs:
            last = (j["error"] or "").strip().splitlines()[-1:] or [""]
            say(f"FAILED {step}: {j['label']}: {last[0]}")
    say(f"{sum(len(v) for v in failed.values())} job(s) failed in {len(failed)} step(s); the others are saved. "
        f"Details: {out / 'failed.json'} and the job store's _errors/")
    return {step: [j["label"] for j in jobs] for step, jobs in failed.items()}


def write_report(out: Path, cfg: StudyConfig, steps: list[Step], work: dict, figures: Path | None = None,
                 model_name: str = "smollm2-135m-instruct") -> Path:
    """Assemble ``report.md`` from the finished steps; copy figures next to it (and to ``figures``)."""
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    parts = ["# mechbias study report", "",
             f"Model: {model_name}. Contexts: {', '.join(cfg.context_list)}. Baseline axes: {', '.join(cfg.axes)}; methods and "
             f"transfer matrices on the {cfg.axis} axis. Seed {cfg.seed}, {cfg.n_boot} bootstrap replicates, "
             f"{cfg.n_random} draws per control and cell"
             f"{' (full study)' if cfg.full else ' (default study; --full for every context and variant)'}"
             f"{' (quick configuration)' if cfg.quick else ''}.", ""]
    summary_step = Step("summary", SUMMARY_TITLE, lambda *a: None, lambda *a: {}, summary_report)
    for st in [*steps, summary_step]:
        done = out / "steps" / st.name / "summary.json"
        if not done.exists():
            continue
        summary = json.loads(done.read_text())
        if any((done.parent / sub / "result.json").exists() for sub in (RUN_TRANSFER, RUN_TRANSFER_V1)):
            summary = run_summary_json(done.parent)  # a method step: its cells from its transfer matrix
        for f in summary.get("figures", []):
            src = out / "steps" / st.name / "figures" / f
            if src.exists():
                shutil.copyfile(src, fig_dir / f)
                if figures is not None:
                    Path(figures).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, Path(figures) / f)
        parts += [f"## {summary.get('title', st.title)}", "", st.report(summary, lambda f: f"figures/{f}"), ""]
    parts += ["## Work", "",
              f"{work['computed_now']} jobs computed in this run, {work['reused']} reused from the job store; "
              f"{work['workers']} worker(s), {work['threads_per_job']} torch thread(s) per job; wall time of this run "
              f"{work['wall_seconds']:.0f} s (including model loading). Total work of the study "
              f"{work['total_work_seconds']:.0f} s; critical path {work['critical_path_seconds']:.0f} s "
              "(the least wall time on unlimited workers)."
              + (f" The jobs computed now ran from the first start to the last finish in "
                 f"{work['jobs_span_seconds']:.0f} s: the workers were busy "
                 f"{100 * work['total_work_seconds'] / (work['workers'] * work['jobs_span_seconds']):.0f}% of it."
                 if work.get("jobs_span_seconds") and not work.get("reused") else "")
              + (f" **{work['jobs_by_other_code']} of the {work['jobs']} jobs were computed by other versions of "
                 "mechbias's code** (code fingerprints and counts: "
                 + ", ".join(f"{k}: {v}" for k, v in work["jobs_by_code"].items())
                 + f"; this run: {work['code']}); a change that alters results must bump its job kind's version, "
                 "or run with a fresh store." if work.get("jobs_by_other_code") else "")
              + (f" Matrix-product work {work['total_tflop']:.1f} TFLOP, {work['achieved_gflops']:.0f} GFLOP/s per job "
                 f"on average: {100 * work['fraction_of_fp32_peak']:.0f}% of a {work['threads_per_job']}-thread "
                 f"float32 matmul's {work['matmul_peak']['float32_gflops']:.0f} GFLOP/s and "
                 f"{100 * work['fraction_of_bf16_peak']:.0f}% of bfloat16's "
                 f"{work['matmul_peak']['bfloat16_gflops']:.0f} GFLOP/s (measured in this run)."
                 if work.get("achieved_gflops") else ""), "",
              "| job kind | jobs | seconds (sum) | seconds (longest) | TFLOP |", "|---|---|---|---|---|"]
    parts += [f"| {k} | {v['jobs']} | {v['seconds']} | {v['max']} | {v.get('tflop', '')} |"
              for k, v in work["by_kind"].items()]
    parts += [""]
    return atomic_write_text("\n".join(parts), out / "report.md")
