"""IG² + BNS as a registered method: attribute on a context's selection split, select neurons with
the paper's rule, suppress them (BNS); the paper's verification runs on held-out units."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from ...core.results import atomic_savefig, markdown_table
from ...data.axes import load_axis
from ...data.contexts import Context
from ...eval.metrics import favoured_group
from ...viz.html import esc, load_tensor, svg_bars
from ...viz.method_figures import plot_overlap
from ..base import Method, MethodConfig, Selection, StudyExtras, register_method
from .attribution import Rule, run_ig2
from .inputs import contrast_units, demographic_units
from .thresholds import select_neurons, selection_overlap
from .verify import verify

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

Mode = Literal["contrast", "demographic", "demographic-single"]
Kind = Literal["prob", "abs_prob", "logprob", "logit"]
MODES: tuple[str, ...] = get_args(Mode)
KINDS: tuple[str, ...] = get_args(Kind)


@dataclass
class IG2Config(MethodConfig):
    """IG² + BNS settings (the ``mechbias ig2`` flags); the defaults are the paper's."""
    mode: Mode = field(default="contrast", metadata={
        "help": "units: contrast (name pairs on the context's templates), demographic (outcome-paired "
                "demographic-prediction prompts) or demographic-single (the paper's single prompts)"})
    pairs: int = field(default=6, metadata={"help": "name pairs per template (contrast mode)"})
    steps: int = field(default=20, metadata={"help": "integration steps m"})
    rule: Rule = field(default="left", metadata={"help": "integration rule"})
    kind: Kind = field(default="prob", metadata={"help": "gap G: prob = P(d1) - P(d2) (the authors' code)"})
    positions: Literal["all", "last"] = field(default="all", metadata={
        "help": "where BNS suppresses the neurons: every position or the prediction position"})
    min_per_bag: int = field(default=3, metadata={
        "help": "a neuron must be in at least this many of a bag's prompts (the authors' code: 3)"})
    verify_random: int = field(default=5, metadata={"help": "random-neuron draws in the paper's verification"})
    plain_ig: bool = field(default=True, metadata={"help": "also select with plain IG (for the verification)"})

    def validate(self) -> None:
        if self.steps < 1 or self.pairs < 1 or self.verify_random < 0 or self.min_per_bag < 1:
            raise ValueError("steps, pairs and min_per_bag must be >= 1 and verify_random >= 0")
        if self.mode == "contrast" and self.pairs < self.min_per_bag:
            raise ValueError(f"contrast mode puts {self.pairs} name pair(s) in a bag (one template), fewer than "
                             f"min_per_bag = {self.min_per_bag} prompts, so no neuron could be selected; use "
                             f"--pairs {self.min_per_bag} or more, or lower --min-per-bag")


@register_method
class IG2(Method):
    """IG² + Bias Neuron Suppression as a registered method: attribute, select neurons, suppress them."""
    name = "ig2"
    title = "IG² + BNS"
    summary = ("IG² attributions of MLP neurons on name pairs of the context's selection templates, the paper's "
               "selection (per prompt >= 0.2 max, per bag >= 70% adapted and >= 3 prompts, per relation >= 10%), "
               "suppressed (x0).")
    Config = IG2Config
    config: IG2Config

    def _units(self, ctx: Context | str, axis: str, fav: int, split: str):
        c = self.config
        if c.mode == "contrast":
            return contrast_units(ctx, axis, favoured=fav, templates=split, names=split,
                                  pairs_per_template=c.pairs, seed=self.seed)
        return demographic_units(ctx, axis, favoured=fav, outcomes=split, paired=c.mode == "demographic",
                                 seed=self.seed)

    def select(self, model: TransformerBridge, context: Context, axis: str) -> Selection:
        c = self.config
        ax = load_axis(axis)
        fav = favoured_group(model, context, ax, seed=self.seed)
        units = self._units(context, ax.name, fav, "selection")
        res = run_ig2(model, units, kind=c.kind, steps=c.steps, rule=c.rule, progress=True)
        sel = select_neurons(res, min_per_bag=c.min_per_bag)
        artifacts: dict[str, Any] = {"attributions": res, "selection": sel}
        if c.plain_ig:
            plain = run_ig2(model, units, kind="target_prob", steps=c.steps, rule=c.rule, progress=True)
            artifacts["selection_plain_ig"] = select_neurons(plain, min_per_bag=c.min_per_bag)
        for r in artifacts.values():
            r.meta.update(context=context.name, axis=ax.name, **c.to_dict())
        err = res.completeness_error()
        summary = {"favoured_group": ax.groups[fav], "n_units": len(units),
                   "completeness_error_per_layer": [float(x) for x in err],
                   "completeness_error_median": float(err.median()), "selected_neurons": sel.neurons,
                   "n_selected": len(sel), "selection_thresholds": sel.thresholds}
        iv = sel.intervention(0.0, c.positions, f"BNS {context.name}/{ax.name}")
        return Selection(context.name, ax.name, iv, artifacts, summary)

    def analyze(self, model: TransformerBridge, axis: str, out: Path, *, quick: bool = False, verify_units: bool = True,
                **kw) -> dict[str, Any]:
        """The paper's verification on held-out units, per context (``verify_units=False`` skips it: the default
        study's setting); overlap of selections between contexts."""
        c = self.config
        rows: list[dict] = []
        comp: list[float] = []
        comp0: list[float] = []
        figures: list[str] = []
        for name, s in self.selections.items():
            fav = load_axis(axis).groups.index(s.summary["favoured_group"])
            sel = s.artifacts["selection"]
            plain = s.artifacts.get("selection_plain_ig")
            err = np.asarray(s.summary["completeness_error_per_layer"])
            comp.append(float(np.median(err)))
            comp0.append(float(err[0]))
            if len(sel) and verify_units:
                held = self._units(name, axis, fav, "heldout")
                v = verify(model, sel, held, ig_selection=plain, kind=c.kind, positions=c.positions,
                           n_random=c.verify_random, seed=self.seed)
                v.save(out / f"verification_{name}")
                rows += [{"context": name, **{k: r[k] for k in r if k != "random_draws"}} for r in v.rows]
            if not figures:
                atomic_savefig(s.artifacts["attributions"].plot(sel), out / "figures" / "ig2_attributions.png")
                figures.append("ig2_attributions.png")
        summary: dict[str, Any] = {"verification": rows, "completeness_median": float(np.median(comp)) if comp else None,
                   "completeness_layer0": float(np.median(comp0)) if comp0 else None,
                   "n_selected": {k: len(s.artifacts["selection"]) for k, s in self.selections.items()}}
        if len(self.selections) > 1:
            ov = selection_overlap({k: s.artifacts["selection"] for k, s in self.selections.items()},
                                   model.cfg.d_mlp, seed=self.seed)
            atomic_savefig(plot_overlap(ov, f"Overlap of IG²-selected neurons between contexts ({axis})"),
                           out / "figures" / "ig2_overlap.png")
            figures.append("ig2_overlap.png")
            summary["overlap"] = ov.to_dict(orient="records")
        summary["figures"] = figures
        return summary

    @classmethod
    def html(cls, step: Path, summary: dict) -> list[str]:
        """Per selection row: the IG² attribution summed per layer, with the selected neurons in each tooltip."""
        out = []
        for ctx in summary.get("selections", {}):
            attr = load_tensor(step / "selections" / ctx / "attributions", "attributions")  # [prompts, L, neurons]
            if attr is None:
                continue
            per_layer = np.abs(attr).sum(axis=(0, 2)) / attr.shape[0]
            chosen = summary["selections"][ctx].get("selected_neurons", [])
            tips = [f"layer {l}: mean over prompts of sum |IG2| = {v:.4g}\nselected neurons here: "
                    f"{[n for (ll, n) in chosen if ll == l] or 'none'}" for l, v in enumerate(per_layer)]
            out.append(f"<h3>IG² attribution per layer ({esc(ctx)})</h3>"
                       + svg_bars(per_layer.tolist(), [str(i) for i in range(len(per_layer))], tips,
                                  ylabel="sum |IG²| per prompt"))
        return out

    def report(self, summary: dict, fig) -> str:
        parts = [f"{self.summary} Verification on held-out names and templates: change of the attributed gap "
                 "when the selected neurons are suppressed (x0) or amplified (x2), against random neurons from "
                 "the same layers (absolute change with a templates x names 95% CI; relative only where the gap "
                 "before is clearly non-zero).", ""]
        if summary.get("verification"):
            parts += [markdown_table([{**{k: r[k] for k in ("context", "neurons", "operation", "n_neurons",
                                                            "gap_before", "change", "ci_low", "ci_high")},
                                       "relative": "not estimable" if r["relative_change"] is None else
                                       f"{r['relative_change']:+.0%} [{r['relative_ci_low']:+.0%}, "
                                       f"{r['relative_ci_high']:+.0%}]",
                                       "minus random": (f"{r['minus_random']['estimate']:+.3f} "
                                                        f"[{r['minus_random']['ci_low']:+.3f}, "
                                                        f"{r['minus_random']['ci_high']:+.3f}]")
                                       if "minus_random" in r else ""}
                                      for r in summary["verification"]]), ""]
        if summary.get("completeness_median") is not None:
            parts += [f"Median per-layer completeness error of IG² (m = {self.config.steps}, {self.config.rule} "
                      f"rule): {summary['completeness_median']:.3f}; layer 0: {summary['completeness_layer0']:.2f}.",
                      ""]
        parts += [f"![{f}]({fig(f)})" for f in summary.get("figures", [])]
        return "\n".join(parts)

    @classmethod
    def study_extras(cls, step: str, quick: bool = False, full: bool = True) -> StudyExtras:
        # IG² selects few neurons, so their controls can be matched on single-unit ablation cost too; measuring
        # each candidate's cost is the default study's most expensive control (393 of its 546 s), so --full has it
        controls = ("random", "matched", "matched_cost") if full else ("random", "matched")
        # the paper's verification on held-out units (144 s on 20 units, 3x that on the 60 of the 30-template
        # contexts) is an analysis of IG² itself, not of transfer: --full and `mechbias ig2` run it
        return {"title": cls.title, "analyze": {} if full else {"verify_units": False},
                "transfer": {"controls": controls}}

    @classmethod
    def study_configs(cls, quick: bool = False, full: bool = True) -> dict[str, IG2Config]:
        # 3 pairs per template (the fewest a bag of min_per_bag = 3 allows) on the 15 selection templates: 45 units
        return {"ig2": IG2Config(pairs=4 if full and not quick else 3, steps=4 if quick else 20, plain_ig=False,
                                 verify_random=1 if quick else 2)}
