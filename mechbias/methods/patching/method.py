"""Activation patching as a registered method: the heads whose denoising patch moves the contrast
score most on a context's selection pairs are ablated (``hook_z``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from ...core.results import atomic_savefig, markdown_table
from ...core.sites import Site
from ...data.contexts import Context
from ...data.pairs import make_pairs
from ...interventions.units import HeadIntervention
from ...viz.html import esc, load_tensor, svg_heatmap
from ...viz.method_figures import plot_correlation_matrix, plot_layer_profiles
from ..base import Method, MethodConfig, Selection, register_method
from .atp import atp_agreement, attribution_patch
from .engine import Sweep, compare_contexts, patch_set, patch_sweep

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

Direction = Literal["denoise", "noise"]
DIRECTIONS: tuple[str, ...] = get_args(Direction)


@dataclass
class PatchingConfig(MethodConfig):
    """Activation and attribution patching settings (the ``mechbias patch`` flags)."""
    pairs: int = field(default=6, metadata={"help": "equal-token-length name pairs of the selection split"})
    top_heads: int = field(default=5, metadata={"help": "heads ablated: the top-k by |patching effect|"})
    direction: Direction = field(default="denoise", metadata={"help": "patching direction of the head sweep"})
    components: tuple[Sweep, ...] = field(default=("resid_pre", "heads"), metadata={
        "help": "sweeps to run and save (heads is always run: it selects the heads)"})
    atp: bool = field(default=True, metadata={"help": "attribution patching and its agreement with exact patching"})

    def validate(self) -> None:
        if self.pairs < 1 or self.top_heads < 1:
            raise ValueError("pairs and top_heads must be >= 1")


@register_method
class Patching(Method):
    """Patching as a registered method: sweep heads, rank them and ablate the top ones."""
    name = "patch"
    title = "Patching-selected heads"
    summary = ("Exact activation patching of every head (hook_z) on equal-length name pairs of the context's "
               "selection split; the top heads by |effect| are zeroed (hook_z).")
    Config = PatchingConfig
    config: PatchingConfig

    def select(self, model: TransformerBridge, context: Context, axis: str) -> Selection:
        c = self.config
        pairs = make_pairs(model, context, axis, templates="selection", names="selection", max_pairs=c.pairs,
                           seed=self.seed)
        comps = list(dict.fromkeys(["heads", *c.components]))
        sweeps = {k: patch_sweep(model, pairs, k, direction=c.direction, progress=True) for k in comps}
        top = sweeps["heads"].top(c.top_heads)
        heads = [(t["layer"], t["head"]) for t in top]
        artifacts: dict[str, Any] = {f"sweep_{k}": r for k, r in sweeps.items()}
        summary = {"n_pairs": len(pairs), "clean_group": pairs.axis.groups[0], "direction": c.direction,
                   "ld_clean_mean": float(sweeps["heads"].ld_clean.mean()),
                   "ld_corrupt_mean": float(sweeps["heads"].ld_corrupt.mean()),
                   "top": {k: r.top(10) for k, r in sweeps.items()}, "top_heads": top,
                   "layer_profile": {k: [float(x) for x in r.layer_profile()] for k, r in sweeps.items()}}
        if c.atp:
            atp_comps = [k for k in ("resid_pre", "attn_out", "mlp_out", "heads") if k in sweeps]
            atp = attribution_patch(model, pairs, direction=c.direction, components=tuple(atp_comps))
            artifacts["atp"] = atp
            summary["atp_agreement"] = [atp_agreement(atp, sweeps[k], k).as_dict() for k in atp_comps]
        sets = []
        for d in DIRECTIONS:  # the chosen heads patched together, both directions
            r = patch_set(model, pairs, [Site(l, "z", (h,)) for l, h in heads], direction=d)
            sets.append({"set": f"top {c.top_heads} heads of the {c.direction} sweep", "heads": [list(h) for h in heads],
                         **r.summary()})
        summary["set_patching"] = sets
        iv = HeadIntervention(heads, mode="z", label=f"patching-selected heads {context.name}/{axis}")
        return Selection(context.name, axis, iv, artifacts, summary)

    def analyze(self, model: TransformerBridge, axis: str, out: Path, *, quick: bool = False, **kw) -> dict[str, Any]:
        figures: list[str] = []
        rows: list[dict] = []
        first = next(iter(self.selections.values()), None)
        if first is not None and "sweep_resid_pre" in first.artifacts:
            atomic_savefig(first.artifacts["sweep_resid_pre"].plot(), out / "figures" / "patch_resid.png")
            figures.append("patch_resid.png")
        heads = {k: s.artifacts["sweep_heads"] for k, s in self.selections.items()}
        profiles = {k: s.summary["layer_profile"]["heads"] for k, s in self.selections.items()}
        if heads:
            atomic_savefig(plot_layer_profiles(profiles, f"Strongest head per layer ({self.config.direction}, {axis})"),
                           out / "figures" / "patch_layer_profiles.png")
            figures.append("patch_layer_profiles.png")
        summary: dict = {}
        if len(heads) > 1:
            corr = compare_contexts(heads)
            atomic_savefig(plot_correlation_matrix(corr, "Rank correlation of head effects between contexts"),
                           out / "figures" / "patch_head_correlation.png")
            figures.append("patch_head_correlation.png")
            summary["head_correlation"] = corr.to_dict(orient="records")
        for k, s in self.selections.items():
            for a in s.summary.get("atp_agreement", []):
                rows.append({"context": k, "component": a["component"], "AtP Spearman": a["spearman"],
                             **{x: a[x] for x in a if x.startswith("recall")}})
        summary.update(agreement=rows, figures=figures,
                       set_patching=[{"context": k, **{x: r[x] for x in ("direction", "effect", "ci_low", "ci_high",
                                                                         "normalized")}}
                                     for k, s in self.selections.items() for r in s.summary["set_patching"]])
        return summary

    @classmethod
    def html(cls, step: Path, summary: dict) -> list[str]:
        """Per selection row: the head sweep's mean effect on the logit difference as a layer x head heatmap."""
        out = []
        for ctx in summary.get("selections", {}):
            folder = step / "selections" / ctx / "sweep_heads"
            vals = load_tensor(folder, "values")  # [pairs, layers, heads]: the patched metric
            if vals is None:
                continue
            direction = json.loads((folder / "result.json").read_text()).get("direction", "denoise")
            base = load_tensor(folder, "ld_corrupt" if direction == "denoise" else "ld_clean")
            if base is None:
                continue
            eff = vals - base[:, None, None]  # patched minus unpatched, per pair
            mean = eff.mean(0)
            sd = eff.std(0, ddof=1) if eff.shape[0] > 1 else np.zeros(eff.shape[1:])
            out.append(f"<h3>Head patching ({esc(direction)}): mean effect on the logit difference over "
                       f"{eff.shape[0]} pairs ({esc(ctx)})</h3>"
                       + svg_heatmap(mean, "layer", "head",
                                     lambda i, j, mean=mean, sd=sd: f"layer {i}, head {j}\nmean effect "
                                                                    f"{mean[i, j]:+.4f}\nsd over pairs {sd[i, j]:.4f}"))
        return out

    def report(self, summary: dict, fig) -> str:
        parts = [f"{self.summary} Clean = group A's name, corrupted = the other group's name of the same token "
                 "length; effect on logit(positive) - logit(negative).", ""]
        parts += [f"![{f}]({fig(f)})" for f in summary.get("figures", [])]
        if summary.get("agreement"):
            parts += ["", "Attribution patching against exact patching (Spearman over cells, recall of the exact "
                      "top-k):", "", markdown_table(summary["agreement"])]
        if summary.get("set_patching"):
            parts += ["", "The chosen heads patched together:", "", markdown_table(summary["set_patching"])]
        return "\n".join(parts)

    @classmethod
    def study_configs(cls, quick: bool = False, full: bool = True) -> dict[str, PatchingConfig]:
        # the residual-stream sweep only draws a figure (the heads' sweep selects), so the default study skips it
        return {"patching": PatchingConfig(pairs=2 if quick else 6,
                                           components=("resid_pre", "heads") if full and not quick else ("heads",))}
