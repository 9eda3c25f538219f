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
    seed: int = 0
    n_boot: int = 2000
    quick: bool = False


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
        "over names and templates. All 10 templates x 64 names per context.",
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
# driver
# ----------------------------------------------------------------------------

def run_study(args) -> int:
    import torch

    from .cli import _setup

    out: Path = args.out
    contexts = args.contexts if args.contexts != ["all"] else None
    from .contexts import load_contexts

    cfg = StudyConfig(contexts=[c.name for c in load_contexts(contexts)], seed=args.seed, n_boot=args.boot,
                      quick=args.quick)
    t0 = time.time()
    model, _ = _setup(args)
    shared: dict = {}
    timings = {}
    for st in STEPS:
        step_dir = out / "steps" / st.name
        done = step_dir / "summary.json"
        if done.exists() and not args.fresh:
            print(f"[study] {st.name}: finished earlier, skipped", file=sys.stderr)
            timings[st.name] = json.loads(done.read_text()).get("seconds")
            continue
        print(f"[study] {st.name}: {st.title} ...", file=sys.stderr)
        t = time.time()
        summary = st.run(model, cfg, step_dir, shared)
        summary["seconds"] = round(time.time() - t, 1)
        timings[st.name] = summary["seconds"]
        atomic_write_json(summary, done)
        print(f"[study] {st.name}: done in {summary['seconds']:.1f} s", file=sys.stderr)
    write_report(out, cfg, timings, figures=getattr(args, "figures", None), total=time.time() - t0)
    print(f"[study] report: {out / 'report.md'} (total {time.time() - t0:.0f} s)", file=sys.stderr)
    del torch
    return 0


def write_report(out: Path, cfg: StudyConfig, timings: dict, figures: Path | None = None, total: float = 0) -> Path:
    """Assemble ``report.md`` from the finished steps; copy figures next to it (and to ``figures``)."""
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        "# mechbias study report",
        "",
        f"Model: embedded SmolLM2-135M-Instruct unless stated. Contexts: {', '.join(cfg.contexts)}. "
        f"Axes: {', '.join(cfg.axes)}. Seed {cfg.seed}, {cfg.n_boot} bootstrap replicates"
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
