"""The study: the baseline, every registered method across the contexts, and one report.

The study is a list of steps: ``baseline``, one step per registered method and
study variant (:meth:`mechbias.methods.base.Method.study_configs`), and
``summary``. Each step writes its results to ``OUT/steps/<step>/`` and finishes
by writing ``summary.json``; a step whose ``summary.json`` exists is skipped on
the next run, so an interrupted study resumes from the last finished step
(``fresh=True`` recomputes everything). At the end ``OUT/report.md`` is written
from all step summaries, with the figures in ``OUT/figures/``.

A newly registered method appears here with no edit to this file.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.models import model_label
from ..core.results import atomic_savefig, atomic_write_json, atomic_write_text, markdown_table
from ..data.contexts import load_axis, load_contexts
from ..data.texts import selection_phase
from ..eval.metrics import measure_bias
from ..eval.transfer import EvalSet, TransferConfig
from ..methods.base import registered_methods
from ..viz.plotting import plot_methods_summary
from ..interventions.profile import unit_profile
from .workflow import run_method


@dataclass
class StudyConfig:
    contexts: tuple[str, ...] = field(default=("all",), metadata={"help": "contexts ('all' = the built-ins)"})
    axes: tuple[str, ...] = field(default=("race", "gender"), metadata={"help": "axes of the baseline"})
    axis: str = field(default="auto", metadata={
        "help": "axis of the method steps and transfer matrices; auto: chosen on the selection split (the axis "
                "with the most contexts whose selection-split gap is significant, then the larger mean |t|)"})
    seed: int = field(default=0, metadata={"help": "seed of splits, bootstrap and sampling"})
    n_boot: int = field(default=2000, metadata={"flag": "--boot", "help": "bootstrap replicates"})
    n_random: int = field(default=2, metadata={"flag": "--random", "help": "random-control draws per cell"})
    quick: bool = field(default=False, metadata={"help": "a small configuration (tests and smoke runs)"})
    methods: tuple[str, ...] | None = field(default=None, metadata={"help": "run only these methods (none: all "
                                                                            "registered)"})
    skip: tuple[str, ...] = field(default=(), metadata={"help": "step names to skip"})

    def __post_init__(self):
        self.contexts = tuple(c.name for c in load_contexts(list(self.contexts)))
        for a in (*self.axes, *([] if self.axis == "auto" else [self.axis])):
            load_axis(a)
        known = registered_methods()
        bad = [m for m in (self.methods or ()) if m not in known]
        if bad:
            raise ValueError(f"unknown methods {bad}; registered: {sorted(known)}")
        if self.quick and self.n_boot == 2000:
            self.n_boot = 300
        if self.quick and self.n_random == 2:
            self.n_random = 1


@dataclass
class Step:
    name: str
    title: str
    run: Callable  # (model, cfg, step_dir, shared) -> summary dict
    report: Callable  # (summary, rel_fig) -> markdown


# ----------------------------------------------------------------------------
# baseline
# ----------------------------------------------------------------------------

def _baseline_report(summary: dict, fig: Callable[[str], str]) -> str:
    r0 = summary["rows"][0]
    lines = [
        "Bias gap = mean over prompts of log P(favourable answer) - log P(unfavourable answer), group A minus group "
        "B (positive: group A is favoured). 95% CIs from a crossed bootstrap over names and templates. "
        f"{r0['n_templates']} templates x {r0['n_names_a'] + r0['n_names_b']} names per context.", "",
        "| context | axis | gap | 95% CI | p | effect size (SD of name means) | significant |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(f"| {r['context']} | {r['axis']} ({r['group_a']} - {r['group_b']}) | {r['gap']:+.3f} | "
                     f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {r['p_value']:.3f} | {r['effect_size']:+.2f} | "
                     f"{'yes' if r['significant'] else 'no'} |")
    lines += ["", f"![baseline bias]({fig('baseline_bias.png')})"]
    return "\n".join(lines)


def _baseline(model, cfg: StudyConfig, out: Path, shared: dict, log) -> dict:
    res = measure_bias(model, list(cfg.contexts), list(cfg.axes), n_boot=cfg.n_boot, seed=cfg.seed, progress=True)
    res.save(out / "result")
    atomic_savefig(res.plot(), out / "figures" / "baseline_bias.png")
    return {"rows": res.rows, "figures": ["baseline_bias.png"]}


# ----------------------------------------------------------------------------
# method steps
# ----------------------------------------------------------------------------

def _transfer_md(cells: list[dict], fig: Callable[[str], str], name: str) -> str:
    rows = [{"selected on": c["selected_on"], "evaluated on": c["evaluated_on"], "gap before": c["gap_before"],
             "gap change": c["gap_change"],
             "95% CI": f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]", "p (BH)": c.get("p_adjusted"),
             "random control": c.get("random_gap_change"), "reduction": c["reduction"],
             "Δppl": c.get("perplexity_change"), "components": c["n_components"]} for c in cells]
    return "\n".join([markdown_table(rows), "", f"![{name}]({fig(name)})"])


def _method_step(name: str, cls, config, extras: dict) -> Step:
    def run(model, cfg: StudyConfig, out: Path, shared: dict, log) -> dict:
        method = cls(config, seed=cfg.seed, log=log)
        tcfg = TransferConfig(n_random=cfg.n_random, n_boot=cfg.n_boot, seed=cfg.seed, **extras.get("transfer", {}))
        rows = list(cfg.contexts)[: extras.get("rows")] if extras.get("rows") else list(cfg.contexts)
        summary = run_method(model, method, rows, list(cfg.contexts), cfg.axis, tcfg, out, quick=cfg.quick,
                             eval_sets=_eval_sets(model, cfg, shared), analyze_kw=extras.get("analyze"), log=log,
                             fig_name=f"transfer_{name}.png", profile=_profile(model, shared))
        summary["title"] = extras.get("title", cls.title)
        return summary

    def report(summary: dict, fig) -> str:
        method = cls(config)
        text = method.report(summary.get("analysis", {}), fig)
        return "\n".join([text, "", "**Transfer** (intervention chosen on the row context's selection split; "
                          "evaluated on held-out names and templates of each column context; gap change = after - "
                          "before, 95% paired crossed-bootstrap CI; random control: the intervention's own random "
                          "draw of the same size):", "", _transfer_md(summary["transfer"], fig, summary["figures"][0])])

    return Step(name, extras.get("title", cls.title), run, report)


def _profile(model, shared: dict):
    """Unit sizes and ablation costs for matched controls, measured once (selection neutral texts)."""
    if "profile" not in shared:
        shared["profile"] = unit_profile(model)
    return shared["profile"]


def _eval_sets(model, cfg: StudyConfig, shared: dict) -> dict:
    """Held-out evaluation sets (and their unmodified scores), built once and shared by every method."""
    if "eval_sets" not in shared:
        shared["eval_sets"] = {c.name: EvalSet.build(model, c, cfg.axis, seed=cfg.seed)
                               for c in load_contexts(list(cfg.contexts))}
    return shared["eval_sets"]


# ----------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------

def _summary_report(summary: dict, fig) -> str:
    return "\n".join(["Mean change of the gap (after - before, held-out names and templates) on the diagonal "
                      "(selected and evaluated on the same context) and off it (another context), with the random "
                      "control and the capability cost (mean perplexity change on the neutral text). Means of "
                      "absolute changes, not of ratios.", "",
                      markdown_table(summary["rows"]), "", f"![methods]({fig('methods_summary.png')})"])


def _summary(steps: list[Step]):
    def run(model, cfg: StudyConfig, out: Path, shared: dict, log) -> dict:
        root = out.parent
        rows = []
        for st in steps:
            f = root / st.name / "summary.json"
            if not f.exists():
                continue
            s = json.loads(f.read_text())
            cells = s.get("transfer")
            if not cells:
                continue
            diag = [c for c in cells if c["selected_on"] == c["evaluated_on"]]
            off = [c for c in cells if c["selected_on"] != c["evaluated_on"]]

            def mean(xs, k):
                v = [x[k] for x in xs if x.get(k) is not None]
                return float(np.mean(v)) if v else float("nan")

            rows.append({"method": s.get("title", st.title), "diagonal": mean(diag, "gap_change"),
                         "off-diagonal": mean(off, "gap_change"), "random (diag)": mean(diag, "random_gap_change"),
                         "random (off)": mean(off, "random_gap_change"), "gap before (diag)": mean(diag, "gap_before"),
                         "Δppl": mean(cells, "perplexity_change"), "Δppl random": mean(cells, "random_perplexity_change"),
                         "diagonal cells with CI excluding 0":
                             f"{sum((c['ci_high'] < 0) or (c['ci_low'] > 0) for c in diag)}/{len(diag)}"})
        atomic_savefig(plot_methods_summary(rows, cfg.axis), out / "figures" / "methods_summary.png")
        return {"rows": rows, "figures": ["methods_summary.png"]}

    return run


def study_steps(cfg: StudyConfig) -> list[Step]:
    """The study's steps for this configuration, in order."""
    steps = [Step("baseline", "Baseline bias per context and axis", _baseline, _baseline_report)]
    for mname, cls in registered_methods().items():
        if cfg.methods is not None and mname not in cfg.methods:
            continue
        for step_name, config in cls.study_configs(cfg.quick).items():
            steps.append(_method_step(step_name, cls, config, cls.study_extras(step_name, cfg.quick)))
    steps.append(Step("summary", "The methods side by side", _summary(steps[1:]), _summary_report))
    return [s for s in steps if s.name not in cfg.skip]


# ----------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------

def choose_axis(model, contexts, axes, *, seed: int = 0, n_boot: int = 1000) -> dict:
    """The axis with the most contexts whose gap on the **selection** split (selection templates x selection
    names) has a 95% CI excluding 0; ties broken by the larger mean |gap / se|. No held-out prompt is read."""
    rows = []
    with selection_phase("axis choice"):
        for a in axes:
            res = measure_bias(model, list(contexts), a, templates="selection", names="selection", n_boot=n_boot,
                               seed=seed)
            sig = sum(1 for r in res.rows if r["ci_low"] > 0 or r["ci_high"] < 0)
            t = float(np.mean([abs(r["gap"]) / max((r["ci_high"] - r["ci_low"]) / 3.92, 1e-12) for r in res.rows]))
            rows.append({"axis": a, "significant_contexts": sig, "mean_abs_t": t,
                         "gaps": {r["context"]: [r["gap"], r["ci_low"], r["ci_high"]] for r in res.rows}})
    best = max(rows, key=lambda r: (r["significant_contexts"], r["mean_abs_t"]))
    return {"axis": best["axis"], "rule": "most contexts with a significant selection-split gap, then mean |t|",
            "candidates": rows}


def resolve_axis(model, cfg: StudyConfig, out: Path, say: Callable[[str], None]) -> str:
    """``--axis auto``: choose on the selection split once and keep the choice (``axis_choice.json``) for
    resumed runs."""
    path = out / "axis_choice.json"
    if path.exists():
        choice = json.loads(path.read_text())
    else:
        choice = choose_axis(model, cfg.contexts, cfg.axes, seed=cfg.seed, n_boot=min(cfg.n_boot, 1000))
        atomic_write_json(choice, path)
    say(f"axis chosen on the selection split: {choice['axis']} "
        + ", ".join(f"{r['axis']}: {r['significant_contexts']} significant" for r in choice["candidates"]))
    return choice["axis"]


def run_study(model, cfg: StudyConfig, out: Path, *, figures: Path | None = None, fresh: bool = False,
              log: Callable[[str], None] | None = None) -> int:
    say = log or (lambda s: None)
    out = Path(out)
    t0 = time.time()
    shared: dict = {}
    timings: dict = {}
    ran_any = False
    if cfg.axis == "auto":
        cfg.axis = resolve_axis(model, cfg, out, say)
    steps = study_steps(cfg)
    atomic_write_json(asdict(cfg), out / "study_config.json")
    for st in steps:
        step_dir = out / "steps" / st.name
        done = step_dir / "summary.json"
        stale = st.name == "summary" and ran_any  # the comparison must include steps rerun now
        if done.exists() and not fresh and not stale:
            say(f"{st.name}: finished earlier, skipped")
            timings[st.name] = json.loads(done.read_text()).get("seconds")
            continue
        say(f"{st.name}: {st.title} ...")
        t = time.time()
        summary = st.run(model, cfg, step_dir, shared, say)
        ran_any = True
        summary["seconds"] = round(time.time() - t, 1)
        timings[st.name] = summary["seconds"]
        atomic_write_json(summary, done)
        say(f"{st.name}: done in {summary['seconds']:.1f} s")
    write_report(out, cfg, steps, timings, figures=figures, total=time.time() - t0, model=model_label(model))
    say(f"report: {out / 'report.md'} (total {time.time() - t0:.0f} s)")
    return 0


def write_report(out: Path, cfg: StudyConfig, steps: list[Step], timings: dict, figures: Path | None = None,
                 total: float = 0, model: str = "smollm2-135m-instruct") -> Path:
    """Assemble ``report.md`` from the finished steps; copy figures next to it (and to ``figures``)."""
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    parts = ["# mechbias study report", "",
             f"Model: {model}. Contexts: {', '.join(cfg.contexts)}. Baseline axes: {', '.join(cfg.axes)}; methods and "
             f"transfer matrices on the {cfg.axis} axis. Seed {cfg.seed}, {cfg.n_boot} bootstrap replicates, "
             f"{cfg.n_random} random-control draws per cell{' (quick configuration)' if cfg.quick else ''}.", ""]
    for st in steps:
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
        parts += [f"## {summary.get('title', st.title)}", "", st.report(summary, lambda f: f"figures/{f}"), ""]
    parts += ["## Step times", "", "| step | seconds |", "|---|---|"]
    parts += [f"| {k} | {v} |" for k, v in timings.items()]
    parts += [f"| total (this run, incl. loading) | {total:.0f} |", ""]
    return atomic_write_text("\n".join(parts), out / "report.md")
