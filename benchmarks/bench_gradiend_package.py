"""GRADIEND trained by mechbias and by the official ``gradiend`` package, side by side (issue 16).

Both train on the same texts: the finance/gender feature texts of mechbias (selection templates;
training names and validation names as mechbias splits them; held-out templates and names as the
package's ``test`` split; :func:`mechbias.methods.gradiend.package.package_frame`), on the same parameters,
from a local model folder written by ``mechbias export`` (no hub access). The package runs its own
trainer (``TextPredictionTrainer``: source = factual, target = diff, learning rate 1e-5, batch 32, one
seed: the paper's defaults) and its own encoder evaluation; its trained encoder/decoder is then read out
(``from_package``; exactness tested in tests/test_gradiend_package.py) and scored by the same mechbias code
as mechbias' own features: held-out encoder values per name and on neutral text (``evaluate_feature``)
and the h = +1 / -1 / 0 edits (``h_direction``, alpha chosen on selection prompts).

    python benchmarks/bench_gradiend_package.py [--model tiny|default] [--steps 60] [--out results/...json]

The package's rows get one filler token after the text (``package_frame``'s ``FILLER``) so that it
learns the same prediction as mechbias (the token after the whole text): gradiend 0.2.3 otherwise puts
a decoder-only label on the text's last token, which Hugging Face's causal loss shifts to the position
before it (measured in the test). Run-time settings that do not change what the package computes
(``package_speed``): texts padded to 48 tokens instead of 256, the tokenizer's vocabulary cached (it is
rebuilt on every row, 49 ms each). Measured on the tiny model before them: 203 s for 3 steps.
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
    ap.add_argument("--lr", type=float, default=1e-5, help="the package's learning rate (its default, 1e-5)")
    ap.add_argument("--out", type=Path, default=Path("results/bench_gradiend_package.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
    from gradiend import TextPredictionTrainer, TrainingArguments
    from gradiend.trainer.text.prediction import dataset as gradiend_dataset
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    from mechbias.apps.export import export_model
    from mechbias.core.models import load_model
    from mechbias.core.params import named_params
    from mechbias.core.testing import tiny_model
    from mechbias.data.axes import load_axis
    from mechbias.methods.gradiend import GradiendConfig, evaluate_feature, h_direction, param_set, train_gradiend
    from mechbias.methods.gradiend.package import from_package, oriented, package_frame, package_speed, selection_sign

    model = tiny_model(arch="llama", seed=0, tokenizer="smollm2") if args.model == "tiny" else load_model()
    params = "mlp" if args.model == "tiny" else "down-late"
    ps = param_set(model, params)
    ax = load_axis("gender")
    work = Path(tempfile.mkdtemp(prefix="gradiend_pkg_"))
    folder = work / "model"
    export_model(model, None, folder)
    df = package_frame(model, "finance", "gender")

    # --- the package ---
    t0 = time.time()
    targs = TrainingArguments(train_batch_size=32, eval_steps=10, max_steps=args.steps, num_train_epochs=1000,
                              learning_rate=args.lr, experiment_dir=str(work / "run"), source="factual",
                              target="diff", params=ps.names, max_seeds=1)
    with package_speed(gradiend_dataset.TextTrainingDataset, TokenizersBackend):
        tr = TextPredictionTrainer(model=str(folder), data=df, target_classes=list(ax.groups), args=targs)
        tr.train()
        pkg_seconds = time.time() - t0
        enc = tr.evaluate_encoder()
    live = named_params(model)
    g = tr.get_model().gradiend
    pkg = from_package(g, ps, "finance", "gender", param_sizes={n: live[n].numel() for n in g.param_map})
    pkg = oriented(pkg, selection_sign(model, pkg, df))  # the package may encode male as -1
    ev_pkg = evaluate_feature(model, pkg)
    hd_pkg = h_direction(model, pkg)

    # --- mechbias ---
    t0 = time.time()
    ours = train_gradiend(model, "finance", "gender", GradiendConfig(params=params), progress=False)
    ours_seconds = time.time() - t0
    ev_ours = evaluate_feature(model, ours)
    hd_ours = h_direction(model, ours)

    def row(name, ev, hd, seconds):
        st = ev.stats
        return {"trainer": name, "seconds": round(seconds, 1), "pearson": ev.pearson, "auc": ev.auc,
                "male": st["male"]["mean"], "female": st["female"]["mean"], "neutral": st["neutral"]["mean"],
                "neutral_ci": [st["neutral"]["ci_low"], st["neutral"]["ci_high"]], "alpha": hd.alpha,
                "h+1": hd.heldout["+1"], "h-1": hd.heldout["-1"], "h0": hd.heldout["+0"]}

    out = {"model": args.model, "package_lr": args.lr, "params": params, "n_params": ps.numel, "steps": args.steps,
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
