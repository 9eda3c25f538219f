"""Per-context pruning (Breaking Down Bias) as a registered method, with its study variants."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ...core.results import atomic_savefig, markdown_table
from ...data.contexts import Context
from ...viz.html import svg_curve
from ...viz.plotting import plot_curves
from ..base import Method, Selection, StudyExtras, register_method
from .levels import generalization_levels, pruning_curve
from .ranking import PruneConfig, candidates

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


@register_method
class Pruning(Method):
    """Pruning of neurons, Wanda weights or heads as a registered method."""
    name = "prune"
    title = "Pruning"
    summary = ("Components scored separately on group-A and group-B prompts of the context's selection split; the "
               "set difference of the top fractions (both sides), kept if chosen in every selection template; zeroed.")
    Config = PruneConfig
    config: PruneConfig
    fast_study_steps = ("prune_neuron_paper",)  # benchmarks/precision.py: 1.7x faster, Jaccard 0.89 with float32

    #: study variants: step name -> (title, config overrides, extras)
    VARIANTS: ClassVar[dict[str, tuple[str, dict, dict]]] = {
        "prune_neuron_paper": ("Neuron pruning (paper scoring)", dict(unit="neuron", k=None, score="activation"), {}),
        "prune_neuron_attr": ("Neuron pruning (signed attribution)",
                              dict(unit="neuron", k=50, score="signed_attribution", select="difference", common=None),
                              {"levels": True, "curve": (5, 20, 80), "generation": True}),
        "prune_weight": ("Weight pruning (Wanda)", dict(unit="weight", k=None), {}),
        "prune_head": ("Head pruning (attention to the name, greedy)", dict(unit="head", k=10, head_mode="q",
                                                                             common=None),
                       {"curve": (2, 5, 10)}),
    }

    def _cfg(self) -> PruneConfig:
        return dataclasses.replace(self.config, seed=self.seed)

    def select(self, model: TransformerBridge, context: Context, axis: str) -> Selection:
        cfg = self._cfg()
        cand = candidates(model, context, axis, cfg)
        iv = cand.intervention(cfg.k, cfg)
        summary = {"config": cfg.to_dict(), "n_candidates": len(cand.items), "target_group": cand.target_group,
                   "head_ablation": ("hook_q zeroing (uniform attention)" if cfg.head_mode == "q"
                                     else "hook_z zeroing (output ablation)") if cfg.unit == "head" else None}
        return Selection(context.name, axis, iv, {}, summary)

    def analyze(self, model: TransformerBridge, axis: str, out: Path, *, quick: bool = False, levels: bool = False,
                curve: tuple = (), transfer=None, eval_sets: dict | None = None, n_boot: int = 1000, **kw
                ) -> dict[str, Any]:
        cfg = self._cfg()
        summary: dict = {"config": cfg.to_dict(), "figures": []}
        contexts = list(self.selections)
        if levels and contexts:
            lv = generalization_levels(model, contexts, axis, cfg, n_random=1, max_l0_templates=1 if quick else 2,
                                       n_boot=n_boot, transfer=transfer)
            lv.save(out / "levels")
            summary["levels"] = [{k: r[k] for k in ("context", "level", "template", "gap_before", "gap_change",
                                                     "ci_low", "ci_high", "reduction", "random_gap_change")} for r in lv.rows]
        if curve and contexts and not quick:
            ks = [k for k in curve if cfg.k is None or k <= cfg.k] or list(curve)
            cv = pruning_curve(model, contexts[0], axis, cfg, ks, n_boot=n_boot,
                               eval_set=(eval_sets or {}).get(contexts[0]))
            cv.save(out / "curve")
            fig = f"curve_{cfg.unit}_{cfg.score}.png"
            atomic_savefig(plot_curves([cv]), out / "figures" / fig)
            summary["figures"].append(fig)
            summary["curve"] = cv.rows
        return summary

    @classmethod
    def html(cls, step: Path, summary: dict) -> list[str]:
        """The pruning curve (bias change against the number of pruned components), one point per k."""
        rows = (summary.get("analysis") or {}).get("curve") or []
        if not rows:
            return []
        xs = [float(r.get("k", r.get("n_components", i))) for i, r in enumerate(rows)]
        ys = [float(r.get("gap_change", 0.0)) for r in rows]
        tips = [json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                            if not isinstance(v, (dict, list))}, indent=1) for r in rows]
        return ["<h3>Pruning curve</h3>" + svg_curve(xs, ys, tips, xlabel="pruned components", ylabel="gap change")]

    def report(self, summary: dict, fig) -> str:
        lines = [f"{self.summary}", "", f"Settings: `{summary.get('config')}`.", ""]
        if summary.get("levels"):
            lines += ["Generalization levels (L0: selected on one selection template, evaluated on it with held-out "
                      "names; L1/L2 from the transfer matrix):", "", markdown_table(summary["levels"]), ""]
        lines += [f"![{f}]({fig(f)})" for f in summary.get("figures", [])]
        return "\n".join(lines)

    @classmethod
    def study_configs(cls, quick: bool = False, full: bool = True) -> dict[str, PruneConfig]:
        # the default study runs the paper's per-context neuron pruning; --full runs every variant
        names = list(cls.VARIANTS) if full else ["prune_neuron_paper"]
        return {name: PruneConfig(**cls.VARIANTS[name][1]) for name in names}

    @classmethod
    def study_extras(cls, step: str, quick: bool = False, full: bool = True) -> StudyExtras:
        """Extra analyses of a study variant (levels, curve) and its generation-metric setting."""
        extras = dict(cls.VARIANTS[step][2])
        gen = extras.pop("generation", False)
        transfer = {"generation": 2 if quick else 6, "generation_tokens": 3 if quick else 6,
                    "generation_names": 2 if quick else 6} if gen else {}
        return {"analyze": extras, "transfer": transfer, "title": cls.VARIANTS[step][0]}
