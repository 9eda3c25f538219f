"""GRADIEND as a registered method: train the one-neuron feature on a context's selection split,
choose the edit (h, α) there, and apply it as a weight edit."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...core.results import atomic_savefig, markdown_table
from ...data.contexts import Context
from ...interventions.base import Identity
from ...viz.method_figures import plot_gradiend_grid
from ..base import Method, Selection, StudyExtras, register_method
from .edit import choose_edit
from .gradients import param_set
from .pool import gradient_pool
from .train import GradiendConfig, evaluate_feature, train_gradiend

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


@register_method
class Gradiend(Method):
    """GRADIEND as a registered method: train the feature on a context, choose the weight edit on its selection split."""
    name = "gradiend"
    title = "GRADIEND"
    summary = ("A one-neuron encoder-decoder trained on gradients of factual vs counterfactual group words on the "
               "context's selection split; the weight edit θ + α·dec(h) with the smallest |gap| on selection "
               "prompts within the perplexity limit.")
    Config = GradiendConfig
    config: GradiendConfig
    # its training is the default study's longest selection (330 s per row, on the critical path) and its chosen
    # edit on the embedded model is h = 0 (no change), so it runs in --full, like steering
    in_default_study = False

    def select(self, model: TransformerBridge, context: Context, axis: str) -> Selection:
        cfg = dataclasses.replace(self.config, seed=self.seed)
        pool = gradient_pool(model, context, axis, param_set(model, cfg.params, cfg.layers), seed=cfg.seed,
                             max_gib=cfg.max_pool_gib, neutral=cfg.neutral > 0,
                             templates_per_name=cfg.texts_per_name)
        res = train_gradiend(model, context, axis, cfg, pool=pool)
        ch = choose_edit(model, res, hs=cfg.h, alphas=cfg.alpha, max_ppl_increase=cfg.max_ppl_increase,
                         neutral_max_texts=cfg.edit_texts, n_names=cfg.edit_names, seed=self.seed,
                         templates_per_name=cfg.texts_per_name)
        iv = Identity() if ch.chosen is None else res.edit_for(ch.chosen["h"], ch.chosen["alpha"])
        summary = {"seeds": res.seeds, "chosen_edit": ch.chosen, "gap_before": ch.gap_before,
                   "perplexity_before": ch.perplexity_before, "n_params": res.param_set.numel}
        artifacts = {"gradiend": res}
        controls: dict = {}
        if ch.chosen is not None:
            h, alpha = ch.chosen["h"], ch.chosen["alpha"]
            # the decoder bias alone: what the edit does without the learned feature value
            controls["h0_decoder_bias"] = [res.edit_for(0.0, alpha, label="GRADIEND h=0 (decoder bias alone)")]
            if cfg.shuffled_control:
                shuffled = train_gradiend(model, context, axis, cfg, shuffle_labels=True, pool=pool,
                                          progress=False)
                artifacts["gradiend_shuffled"] = shuffled
                controls["shuffled_labels"] = [shuffled.edit_for(h, alpha, label="GRADIEND trained on shuffled labels")]
        del pool  # the per-name gradients are not kept with the selection
        return Selection(context.name, axis, iv, artifacts, summary, controls)

    def analyze(self, model: TransformerBridge, axis: str, out: Path, *, quick: bool = False, **kw) -> dict[str, Any]:
        """The feature on held-out names and templates (group A, group B, neutral texts)."""
        cfg = self.config
        feats: list[dict] = []
        figures: list[str] = []
        for name, s in self.selections.items():
            res = s.artifacts["gradiend"]
            ev = evaluate_feature(model, res, n_names=8 if quick else None, n_neutral=2 if quick else 8,
                                  split_seed=self.seed)
            res.save(out / f"gradiend_{name}")
            atomic_savefig(res.plot(), out / "figures" / f"gradiend_feature_{name}.png")
            atomic_savefig(res.plot_training(), out / "figures" / f"gradiend_training_{name}.png")
            atomic_savefig(plot_gradiend_grid(res), out / "figures" / f"gradiend_grid_{name}.png")
            figures += [f"gradiend_training_{name}.png", f"gradiend_feature_{name}.png", f"gradiend_grid_{name}.png"]
            chosen = next(x for x in res.seeds if x["seed"] == res.meta.get("chosen_seed"))
            curve = [c for c in res.meta.get("curve", []) if c["seed"] == chosen["seed"]]
            feats.append({"context": name, "chosen_seed": chosen["seed"],
                          "val_pearson_start": abs(curve[0]["val_pearson"]) if curve else None,
                          "val_pearson": abs(chosen["val_pearson"]), "best_step": chosen["best_step"],
                          "steps_run": chosen["steps_run"], "loss_first": chosen["loss_first"],
                          "loss_last": chosen["loss_last"], "auc": ev.auc, "sign_accuracy": ev.sign_accuracy,
                          "pearson": ev.pearson, "stats": ev.stats, "chosen": res.edit.get("chosen"),
                          "gap_before": res.edit.get("gap_before"), "pool_seconds": res.meta.get("pool_seconds"),
                          "train_seconds": res.meta.get("train_seconds"), "pool_gib": res.meta.get("pool_gib")})
        return {"params": cfg.params, "n_params": param_set(model, cfg.params, cfg.layers).numel, "steps": cfg.steps,
                "batch": cfg.batch_texts, "lr": cfg.lr, "normalize": cfg.normalize, "features": feats,
                "figures": figures}

    def report(self, summary: dict, fig) -> str:
        rows = [{"trained on": r["context"], "val |Pearson| start -> kept": f"{r.get('val_pearson_start') or 0:.2f} -> "
                 f"{r['val_pearson']:.2f}", "kept step / run": f"{r.get('best_step')}/{r.get('steps_run')}",
                 "group A h": r["stats"][next(iter(r["stats"]))]["mean"], "group B h": r["stats"][list(r["stats"])[1]]["mean"],
                 "neutral h": r["stats"].get("neutral", {}).get("mean"),
                 "held-out AUC": r.get("auc"), "held-out sign accuracy": r["sign_accuracy"],
                 "held-out Pearson": r["pearson"], "chosen h": (r["chosen"] or {}).get("h"),
                 "chosen alpha": (r["chosen"] or {}).get("alpha")} for r in summary.get("features", [])]
        return "\n".join([f"GRADIEND on {summary.get('params')} ({summary.get('n_params', 0):,} parameters), "
                          f"{summary.get('steps')} steps of batches of {summary.get('batch')} texts, lr "
                          f"{summary.get('lr')}.", "", markdown_table(rows), ""]
                         + [f"![{f}]({fig(f)})" for f in summary.get("figures", [])])

    @classmethod
    def study_configs(cls, quick: bool = False, full: bool = True) -> dict[str, GradiendConfig]:
        # the default study trains one seed (early stopping on the validation names keeps its best checkpoint);
        # --full trains three and keeps the best on validation
        return {"gradiend": GradiendConfig(steps=20 if quick else 400, seeds=(0, 1, 2) if full and not quick else (0,),
                                           edit_names=8 if quick else 16, edit_texts=4 if quick else 6,
                                           shuffled_control=not quick)}

    @classmethod
    def study_extras(cls, step: str, quick: bool = False, full: bool = True) -> StudyExtras:
        return {"title": "GRADIEND feature and weight edit", "analyze": {}, "transfer": {},
                "rows": 1 if quick else 2}
