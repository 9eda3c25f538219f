"""GRADIEND trained by mechbias and by the official ``gradiend`` package, side by side (issue 16).

Both train on the same texts: the finance/gender feature texts of mechbias (selection templates;
training names and validation names as mechbias splits them; held-out templates and names as the
package's ``test`` split), on the same parameters, from a local model folder (no hub access). The
package runs its own trainer (``TextPredictionTrainer``: source = factual, target = diff, the paper's
defaults) and its own encoder evaluation; its trained encoder/decoder is then read out (weights in its
parameter order, mapped to ours by name) and scored by the same mechbias code as mechbias' own feature:
held-out encoder values per name and on neutral text (``evaluate_feature``) and the h = +1 / -1 / 0 edits
(``h_direction``).

    python benchmarks/bench_gradiend_package.py [--model tiny|default] [--steps 60] [--out results/...json]

Status: written in the stop that added neutral training data; its package half ran offline on the tiny
model but was stopped for time (~110 s per 3-step epoch at one thread), so no numbers from it are in the
README yet.

Set-up notes (measured here): the package pads every text to the tokenizer's ``model_max_length``
(``padding="max_length"``); the local folder's tokenizer gets ``model_max_length = 64`` (our texts are
under 40 tokens) so the package does not run 2048-token forwards for 25-token texts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=["tiny", "default"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3, help="the package's learning rate (raw coordinates)")
    ap.add_argument("--out", type=Path, default=Path("results/bench_gradiend_package.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
    import pandas as pd
    from gradiend import TextPredictionTrainer, TrainingArguments

    from mechbias.apps.export import export_model
    from mechbias.core.models import load_model, tiny_model
    from mechbias.core.weights import named_params
    from mechbias.data.contexts import load_axis
    from mechbias.methods.gradiend import (GradiendConfig, GradiendResult, evaluate_feature,
                                           feature_texts, h_direction, param_set, train_gradiend)
    from mechbias.methods.gradiend.pool import validation_names

    model = tiny_model(arch="llama", seed=0, tokenizer="smollm2") if args.model == "tiny" else load_model()
    params = "mlp" if args.model == "tiny" else "down-late"
    ps = param_set(model, params)
    ax = load_axis("gender")
    work = Path(tempfile.mkdtemp(prefix="gradiend_pkg_"))
    folder = work / "model"
    export_model(model, None, folder)
    cfg_path = folder / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc["model_max_length"] = 64
    cfg_path.write_text(json.dumps(tc))

    val = validation_names(ax, 0)
    rows = []
    for split, which in (("train", "selection"), ("test", "heldout")):
        for t in feature_texts(model, "finance", "gender", templates=which, names=which):
            s = split if split == "test" else ("validation" if t.name in val else "train")
            rows.append({"masked": t.text + "[MASK]", "label": model.tokenizer.decode([t.factual]),
                         "label_class": ax.groups[t.group], "alternative": model.tokenizer.decode([t.counterfactual]),
                         "alternative_class": ax.groups[1 - t.group], "split": s})
    df = pd.DataFrame(rows)

    # --- the package ---
    t0 = time.time()
    targs = TrainingArguments(train_batch_size=32, eval_steps=10, max_steps=args.steps, num_train_epochs=1000,
                              learning_rate=args.lr, experiment_dir=str(work / "run"), source="factual",
                              target="diff", params=ps.names)
    tr = TextPredictionTrainer(model=str(folder), data=df, target_classes=list(ax.groups), args=targs)
    tr.train()
    pkg_seconds = time.time() - t0
    enc = tr.evaluate_encoder()
    mwg = tr.get_model()
    g = mwg.gradiend
    live = named_params(model)
    if any(spec.get("repr") != "all" for spec in g.param_map.values()):
        raise ValueError("the package's parameter map is not dense ('all'); cannot read it out")
    w_e = g.encoder[0].linear.weight.detach().reshape(-1).float()
    b_e = g.encoder[0].linear.bias.detach().reshape(-1).float()
    w_d = g.decoder[0].linear.weight.detach().reshape(-1).float()
    b_d = g.decoder[0].linear.bias.detach().reshape(-1).float()
    offsets, lo = {}, 0
    for n in g.param_map:  # the package's order; its names are the Hugging Face names, as ours
        k = int(live[n].numel())
        offsets[n] = (lo, lo + k)
        lo += k
    if lo != w_e.numel():
        raise ValueError(f"the package's encoder has {w_e.numel()} inputs, its parameter map {lo}")
    pick = torch.cat([torch.arange(*offsets[n]) for n in ps.names])
    pkg = GradiendResult("finance", "gender", ps.names, [list(s) for s in ps.shapes], w_e[pick].clone(), b_e.clone(),
                         w_d[pick].clone(), b_d[pick].clone(), meta={"source": "gradiend package"})
    if float(evaluate_feature(model, pkg)["pearson"]) < 0:  # the package orients female positive
        gm = pkg.model
        gm.flip()
        pkg = GradiendResult("finance", "gender", ps.names, [list(s) for s in ps.shapes], gm.w_e, torch.tensor([gm.b_e]),
                             gm.w_d, gm.b_d, meta=pkg.meta)
    ev_pkg = evaluate_feature(model, pkg)
    hd_pkg = h_direction(model, pkg)

    # --- mechbias ---
    t0 = time.time()
    ours = train_gradiend(model, "finance", "gender", GradiendConfig(params=params), progress=False)
    ours_seconds = time.time() - t0
    ev_ours = evaluate_feature(model, ours)
    hd_ours = h_direction(model, ours)

    def row(name, ev, hd, seconds):
        st = ev["stats"]
        return {"trainer": name, "seconds": round(seconds, 1), "pearson": ev["pearson"], "auc": ev["auc"],
                "male": st["male"]["mean"], "female": st["female"]["mean"], "neutral": st["neutral"]["mean"],
                "neutral_ci": [st["neutral"]["ci_low"], st["neutral"]["ci_high"]], "alpha": hd["alpha"],
                "h+1": hd["heldout"]["+1"], "h-1": hd["heldout"]["-1"], "h0": hd["heldout"]["+0"]}

    out = {"model": args.model, "params": params, "n_params": ps.numel, "steps": args.steps,
           "package_encoder_eval": {k: v for k, v in enc.items() if isinstance(v, (int, float, str))},
           "rows": [row("gradiend package", ev_pkg, hd_pkg, pkg_seconds),
                    row("mechbias", ev_ours, hd_ours, ours_seconds)]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=float))
    for r in out["rows"]:
        print(f"{r['trainer']:>17}: {r['seconds']:.0f} s, Pearson {r['pearson']:+.3f}, male {r['male']:+.2f}, "
              f"female {r['female']:+.2f}, neutral {r['neutral']:+.2f}; alpha {r['alpha']:g}: "
              + ", ".join(f"{h} {r[h]['gap_change']:+.3f} [{r[h]['ci_low']:+.3f}, {r[h]['ci_high']:+.3f}]"
                          for h in ("h+1", "h-1", "h0")))
    print("package's own encoder evaluation (test split, per text):", out["package_encoder_eval"])
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
