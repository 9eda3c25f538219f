"""The bias report card: standard benchmarks, perplexity and lm-eval tasks, unmodified vs. under an intervention.

``mechbias card --intervention DIR --crows F --stereoset F --bbq F ... --winobias-pro F --winobias-anti F
--tasks T ... --out DIR`` writes ``card.json`` (every metric, subset and interval), ``card.md`` (a headline
table in the layout of bias-bench / GRADIEND tables: one row for the unmodified model, one under the
intervention, one for the paired difference; then a table per benchmark) and ``card.png`` (the paired
differences with their CIs). Every file is read and checked before the model loads.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.families import is_masked_lm
from ..core.results import Record, atomic_savefig, atomic_write_json, atomic_write_text, make_meta
from ..data.neutral import neutral_texts
from ..eval.bench import (
    BenchResult,
    bbq_score,
    crows_bench,
    read_bbq,
    read_stereoset,
    read_winobias,
    stereoset_score,
    winobias_score,
)
from ..eval.bench.bbq import sample_bbq
from ..eval.bench.common import Outcomes, metric_rows, score
from ..eval.bench.packaged import REGISTRY, resolve
from ..eval.crows import read_pairs
from ..eval.metrics import token_nll
from ..interventions.base import Intervention
from ..viz.card_figure import plot_card
from .lm_eval_model import check_tasks, task_bench

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

_LOG = logging.getLogger(__name__)

# (benchmark, metric, subset, column label) of the headline table, in bias-bench order
HEADLINE = (("StereoSet", "SS", "all", "SS"), ("StereoSet", "LMS", "all", "LMS"), ("StereoSet", "ICAT", "all", "ICAT"),
            ("CrowS-Pairs", "score", "all", "CrowS"),
            ("BBQ", "accuracy", "ambig", "BBQ acc amb"), ("BBQ", "bias score", "ambig", "BBQ bias amb"),
            ("BBQ", "accuracy", "disambig", "BBQ acc dis"), ("BBQ", "bias score", "disambig", "BBQ bias dis"),
            ("WinoBias", "pro - anti", "all", "WinoBias pro-anti"), ("Perplexity", "perplexity", "all", "PPL"))


@dataclass
class CardInputs:
    """The benchmark files and tasks a report card scores (each optional)."""
    crows: Path | None = None
    stereoset: Path | None = None
    bbq: list[Path] = field(default_factory=list)
    winobias_pro: Path | None = None
    winobias_anti: Path | None = None
    tasks: list[str] = field(default_factory=list)
    include_path: Path | None = None
    limit: int | None = None
    perplexity: bool = True
    #: BBQ rows whose bias target cannot be told are left out (and counted), not an error: set for the packaged file
    bbq_skip_unresolved: bool = False
    #: score a seeded subsample of about this many BBQ rows, whole scenarios, stratified (None: every row)
    bbq_sample: int | None = None
    bbq_sample_seed: int = 0

    def __post_init__(self) -> None:
        # the word "registry" names the file shipped in a registry package (mechbias.eval.bench.packaged)
        self.stereoset = resolve("stereoset", self.stereoset)
        if [str(b) for b in self.bbq] == [REGISTRY]:
            self.bbq_skip_unresolved = True
        self.bbq = [p for b in self.bbq if (p := resolve("bbq", b)) is not None]

    def check(self) -> None:
        """Read every file (format errors surface here, before a model loads)."""
        if self.crows:
            read_pairs(self.crows)
        if self.stereoset:
            read_stereoset(self.stereoset)
        if self.bbq:
            rows = read_bbq(self.bbq, skip_unresolved=self.bbq_skip_unresolved)
            if self.bbq_sample is not None:
                sample_bbq(rows, self.bbq_sample, self.bbq_sample_seed)
        elif self.bbq_sample is not None:
            raise ValueError("a BBQ sample size was given without BBQ files (--bbq)")
        if (self.winobias_pro is None) != (self.winobias_anti is None):
            raise ValueError("WinoBias needs both --winobias-pro and --winobias-anti (aligned files)")
        if self.winobias_pro and self.winobias_anti:
            read_winobias(self.winobias_pro, self.winobias_anti)
        if self.tasks:
            check_tasks(self.tasks, self.include_path)
        if not (self.crows or self.stereoset or self.bbq or self.winobias_pro or self.tasks or self.perplexity):
            raise ValueError("nothing to measure: pass at least one benchmark file, --tasks, or keep perplexity")


def _ppl(o: Outcomes, idx: np.ndarray) -> float:
    return float(np.exp(o["nll"][idx].sum() / o["n"][idx].sum()))


def perplexity_bench(model: TransformerBridge, intervention: Intervention | None, *, n_boot: int, seed: int) -> BenchResult:
    """Perplexity on the reporting neutral texts; intervals resample paragraphs."""
    texts = neutral_texts(split="reporting")

    def run(m) -> Outcomes:
        per = [token_nll(m, [t]) for t in texts]
        return {"nll": np.array([a for a, _ in per]), "n": np.array([b for _, b in per], dtype=float)}

    base, after = score(model, intervention, run)
    rows = metric_rows("Perplexity", {"perplexity": (_ppl, "ppl")}, base, after, np.arange(len(texts)),
                       {"all": np.arange(len(texts))}, n_boot=n_boot, seed=seed)
    return BenchResult("Perplexity", rows, [], {"texts": f"{len(texts)} reporting neutral paragraphs"})


@dataclass
class Card(Record):
    """A report card (:func:`run_card`): what ``card.json`` holds.

    Args:
        intervention: the intervention scored (None: the unmodified model only).
        benchmarks: each benchmark's rows (unmodified, intervention, paired difference with CIs).
        meta: versions, model, settings.
    """

    intervention: str | None
    benchmarks: list[BenchResult]
    meta: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"intervention": self.intervention, "benchmarks": [r.as_dict() for r in self.benchmarks],
                "meta": self.meta}

    def headline(self) -> list[dict]:
        """The headline cells (:func:`headline`)."""
        return headline(self.benchmarks)


def run_card(model: TransformerBridge, intervention: Intervention | None, inputs: CardInputs, out: Path, *, n_boot: int = 2000,
             seed: int = 0) -> Card:
    """Score the model with and without ``intervention`` on every input, write the card to ``out`` and return it."""
    inputs.check()
    if is_masked_lm(model):
        causal_only = [n for n, on in (("BBQ", inputs.bbq), ("WinoBias", inputs.winobias_pro),
                                       ("lm-eval tasks", inputs.tasks)) if on]
        if causal_only:
            raise ValueError(f"{', '.join(causal_only)}: scored for causal models only; this is a masked LM "
                             "(StereoSet and CrowS-Pairs score masked LMs the papers' way)")
        if inputs.perplexity:
            _LOG.info("card: perplexity skipped (not defined for a masked LM)")
            inputs = dataclasses.replace(inputs, perplexity=False)
    results: list[BenchResult] = []
    kw: dict[str, Any] = {"intervention": intervention, "n_boot": n_boot, "seed": seed}
    steps: list[tuple[str, Callable[[], BenchResult]]] = []
    if (stereoset := inputs.stereoset) is not None:
        steps.append(("StereoSet", lambda: stereoset_score(model, stereoset, **kw)))
    if (crows := inputs.crows) is not None:
        steps.append(("CrowS-Pairs", lambda: crows_bench(model, crows, **kw)))
    if inputs.bbq:
        steps.append(("BBQ", lambda: bbq_score(model, inputs.bbq, skip_unresolved=inputs.bbq_skip_unresolved,
                                                    sample=inputs.bbq_sample, sample_seed=inputs.bbq_sample_seed,
                                                    **kw)))
    if (pro := inputs.winobias_pro) is not None and (anti := inputs.winobias_anti) is not None:
        steps.append(("WinoBias", lambda: winobias_score(model, pro, anti, **kw)))
    if inputs.perplexity:
        steps.append(("Perplexity", lambda: perplexity_bench(model, intervention, n_boot=n_boot, seed=seed)))
    if inputs.tasks:
        steps.append(("lm-eval", lambda: task_bench(model, intervention, inputs.tasks, inputs.include_path,
                                                    limit=inputs.limit, n_boot=n_boot, seed=seed)))
    for name, fn in steps:
        _LOG.info(f"card: {name}")
        results.append(fn())
    card = Card(intervention.describe() if intervention else None, results,
                make_meta(model, n_boot=n_boot, seed=seed, intervention=intervention.describe() if intervention else None))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(card.as_dict(), out / "card.json")
    head = headline(results)
    atomic_write_text(card_markdown(card, head, results), out / "card.md")
    atomic_savefig(plot_card(head), out / "card.png")
    return card


def headline(results: list[BenchResult]) -> list[dict]:
    """The headline cells present in ``results``, in table order (lm-eval task metrics last)."""
    rows = []
    for res in results:
        for r in res.rows:
            label = next((lab for b, m, s, lab in HEADLINE if (b, m, s) == (r.benchmark, r.metric, r.subset)), None)
            if label is None and r.benchmark.startswith("lm-eval"):
                label = f"{r.subset} {r.metric}"
            if label is not None:
                rows.append({"label": label, **r.as_dict()})
    order = {lab: k for k, (*_, lab) in enumerate(HEADLINE)}
    return sorted(rows, key=lambda r: order.get(r["label"], len(order)))


def _fmt(v, ci=None) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    s = f"{v:.2f}"
    if ci is not None and all(c is not None and np.isfinite(c) for c in ci):
        s += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return s


def card_markdown(card: Card, head: list[dict], results: list[BenchResult]) -> str:
    """The report card as Markdown: the headline rows, then every benchmark's metrics with paired CIs."""
    lines = ["# Bias report card", "",
             f"Intervention: {card.intervention or 'none (unmodified model only)'}", "",
             "Point estimates with 95% cluster-bootstrap intervals; the difference row is intervention - "
             "unmodified, paired (the same resamples for both); per-benchmark tables add its bootstrap p and the "
             "Benjamini-Hochberg p (headline subsets one family, breakdowns by category or type another). SS 50, CrowS 50, BBQ bias 0 and WinoBias pro-anti "
             "0 mean no measured bias; LMS and ICAT: higher is better.", ""]
    labels = [h["label"] for h in head]
    lines.append("| model | " + " | ".join(labels) + " |")
    lines.append("|---" * (len(labels) + 1) + "|")
    lines.append("| unmodified | " + " | ".join(_fmt(h["unmodified"], h["unmodified_ci"]) for h in head) + " |")
    if card.intervention:
        lines.append("| intervention | " + " | ".join(_fmt(h["intervention"], h["intervention_ci"]) for h in head)
                     + " |")
        lines.append("| difference | " + " | ".join(_fmt(h["difference"], h["difference_ci"]) for h in head) + " |")
    for res in results:
        lines += ["", f"## {res.benchmark}", ""]
        if smp := res.meta.get("sample"):
            lines += [f"A seeded sample: {smp['rows']:,} of {smp['of']:,} rows ({smp['unit']}; seed {smp['seed']}).",
                      ""]
        lines += ["| metric | subset | items (clusters) | unmodified | intervention "
                  "| difference | p (BH) |", "|---|---|---|---|---|---|---|"]
        for r in res.rows:
            p = "-" if r.difference_p is None else f"{r.difference_p:.3f} ({r.difference_p_adjusted:.3f})"
            lines.append(f"| {r.metric} | {r.subset} | {r.n_items} ({r.n_clusters}) | "
                         f"{_fmt(r.unmodified, r.unmodified_ci)} | {_fmt(r.intervention, r.intervention_ci)} | "
                         f"{_fmt(r.difference, r.difference_ci)} | {p} |")
    return "\n".join(lines) + "\n"
