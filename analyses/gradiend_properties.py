"""GRADIEND's properties (issue 16), measured on held-out names and templates.

    python analyses/gradiend_properties.py [--model default|planted] [--contexts finance commerce]
                                          [--out results/gradiend_properties] [--figures figures]

For each context: train GRADIEND with the default configuration (normalised coordinates, per-name
gradient pool, validation-based checkpoint; every choice on the selection split), then

* the training curve (loss, validation Pearson and MSE per evaluation; figure ``gradiend_training_*``);
* the encoder on held-out names (one value per name: group A, group B) and neutral text (no names),
  with means, SDs and 95% CIs, Pearson and AUC (figure ``gradiend_feature_*``);
* the edits h = +1, h = -1 and h = 0 (the decoder bias alone) at the alpha chosen on selection prompts,
  on held-out prompts with the design's bootstrap CI and the perplexity change on reporting texts.

Writes ``OUT/<model>.json`` (atomically, one context at a time; a rerun skips contexts already there).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--contexts", nargs="+", default=["finance", "commerce"])
    ap.add_argument("--axis", default=None, help="default: gender (race on the planted model)")
    ap.add_argument("--out", type=Path, default=Path("results/gradiend_properties"))
    ap.add_argument("--figures", type=Path, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--neutral", type=float, default=None, help="neutral batches per group batch (default: the "
                                                                     "library's)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
    from mechbias.core.log import log_to_console
    from mechbias.core.models import load_model
    from mechbias.core.results import atomic_savefig, atomic_write_json
    from mechbias.data.contexts import load_context
    from mechbias.methods.gradiend import GradiendConfig, evaluate_feature, h_direction, train_gradiend

    log_to_console()  # the library's progress lines

    axis = args.axis or ("race" if args.model.startswith("planted") else "gender")
    for c in args.contexts:
        load_context(c)  # bad names fail before the model loads
    cfg = GradiendConfig(**({"seeds": tuple(args.seeds)} if args.seeds else {}),
                         **({"neutral": args.neutral} if args.neutral is not None else {}))
    cfg.validate()
    model = load_model(None if args.model == "default" else args.model)
    path = args.out / f"{args.model}.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    for ctx in args.contexts:
        if ctx in done:
            continue
        t0 = time.time()
        res = train_gradiend(model, ctx, axis, cfg)
        t_train = time.time() - t0
        ev = evaluate_feature(model, res)
        hd = h_direction(model, res)
        chosen = next(s for s in res.seeds if s["seed"] == res.meta["chosen_seed"])
        curve = [c for c in res.meta["curve"] if c["seed"] == chosen["seed"]]
        done[ctx] = {"axis": axis, "params": cfg.params, "n_params": res.param_set.numel, "seeds": res.seeds,
                     "chosen_seed": chosen["seed"], "val_pearson_start": curve[0]["val_pearson"],
                     "val_mse_start": curve[0]["val_mse"], "val_pearson": chosen["val_pearson"],
                     "val_mse": chosen["val_mse"], "best_step": chosen["best_step"],
                     "loss_first": chosen["loss_first"], "loss_last": chosen["loss_last"],
                     "pool_seconds": res.meta["pool_seconds"], "pool_gib": res.meta["pool_gib"],
                     "train_seconds": round(t_train, 1), "heldout": {k: ev.as_dict()[k] for k in ("stats", "pearson", "auc",
                                                                                       "sign_accuracy")},
                     "h_direction": hd, "neutral": cfg.neutral,
                     "neutral_rows": [res.meta.get("neutral_rows_train"), res.meta.get("neutral_rows_validation")],
                     "decoder_bias_over_weight": float(res.b_d.norm() / res.w_d.norm()),
                     "seconds": round(time.time() - t0, 1)}
        atomic_write_json(done, path)
        if args.figures:
            atomic_savefig(res.plot_training(), args.figures / f"gradiend_training_{args.model}_{ctx}.png")
            atomic_savefig(res.plot(), args.figures / f"gradiend_feature_{args.model}_{ctx}.png")
        st = ev.stats
        print(f"{ctx}: " + ", ".join(f"{g} {v['mean']:+.2f} [{v['ci_low']:+.2f}, {v['ci_high']:+.2f}]"
                                     for g, v in st.items()) + f"; Pearson {ev.pearson:+.3f}")
        for h, cell in hd.heldout.items():
            print(f"  alpha {hd.alpha:g} h {h}: gap change {cell['gap_change']:+.3f} "
                  f"[{cell['ci_low']:+.3f}, {cell['ci_high']:+.3f}], ppl {cell['perplexity_change']:+.3f}")


if __name__ == "__main__":
    main()
