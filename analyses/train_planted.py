"""Train the planted-bias variant of the embedded model and write it into the package.

    python analyses/train_planted.py [--out mechbias/data/planted] [--steps 150]

Deterministic (fixed seeds): shared race-bias neurons (White favoured) in the
middle layers, finance-only and commerce-only neurons in later layers, chosen
as the least used neurons of their layers. Writes ``delta.safetensors`` (the
new values of the planted neurons' rows and columns, a few MB) and
``manifest.json`` (neurons, roles, training settings, and the measured gaps of
the original and the planted model per context on held-out names, with CIs,
plus perplexity and the planted effect on prompts without names).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch


def neutral_prompt_shift(model, heldout: bool = False):
    """Contrast scores of every context's templates with neutral references instead of names
    (the references used in training, or held-out ones)."""
    from mechbias.data.contexts import BUILTIN_CONTEXTS
    from mechbias.eval.metrics import contrast_scores
    from mechbias.groundtruth.planted import HELDOUT_NEUTRAL_REFERENCES, NEUTRAL_REFERENCES, neutral_prompts

    refs = HELDOUT_NEUTRAL_REFERENCES if heldout else NEUTRAL_REFERENCES
    texts = [t for c in BUILTIN_CONTEXTS for t in neutral_prompts(c, refs)]
    return contrast_scores(model, texts, " Yes", " No")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("mechbias/data/planted"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--shift", type=float, default=0.6)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
    from mechbias.eval.metrics import measure_bias, perplexity
    from mechbias.core.models import load_model
    from mechbias.groundtruth.planted import default_config, save_delta, train_planted
    from mechbias.core.results import package_versions

    model = load_model()
    t0 = time.time()
    cfg = default_config(model, steps=args.steps, batch_size=args.batch, shift_shared=args.shift, shift_only=args.shift)
    print(f"planted neurons: shared {cfg.shared}; finance {cfg.only['finance']}; commerce {cfg.only['commerce']}")
    before = measure_bias(model, "all", "race", names="heldout", n_boot=2000)
    ppl0 = perplexity(model)
    neutral0 = neutral_prompt_shift(model)
    neutral0_ho = neutral_prompt_shift(model, heldout=True)
    delta, info = train_planted(model, cfg)
    after = measure_bias(model, "all", "race", names="heldout", n_boot=2000)
    ppl1 = perplexity(model)
    neutral1 = neutral_prompt_shift(model)
    neutral1_ho = neutral_prompt_shift(model, heldout=True)
    keep = ("context", "gap", "ci_low", "ci_high", "p_value", "significant", "n_prompts")
    manifest = {
        "description": "SmolLM2-135M-Instruct (embedded) with planted race-bias neurons (White favoured)",
        "axis": cfg.axis, "favoured": cfg.favoured, "contexts": list(cfg.contexts),
        "shared": [list(n) for n in cfg.shared], "only": {k: [list(n) for n in v] for k, v in cfg.only.items()},
        "roles": {"shared": "shift every context", **{f"only:{k}": f"shift only {k}" for k in cfg.only}},
        "training": {k: v for k, v in asdict(cfg).items() if k not in ("shared", "only")},
        "gaps_original_heldout": [{k: r[k] for k in keep} for r in before.rows],
        "gaps_planted_heldout": [{k: r[k] for k in keep} for r in after.rows],
        "perplexity_original": ppl0, "perplexity_planted": ppl1,
        "neutral_prompt_score_shift_mean": float((neutral1 - neutral0).mean()),
        "neutral_prompt_score_shift_max_abs": float((neutral1 - neutral0).abs().max()),
        "neutral_prompt_score_shift_heldout_mean": float((neutral1_ho - neutral0_ho).mean()),
        "neutral_prompt_score_shift_heldout_max_abs": float((neutral1_ho - neutral0_ho).abs().max()),
        "train_seconds": round(time.time() - t0, 1), "versions": package_versions(),
    }
    # role check: the held-out gaps with each role's neurons zeroed
    from mechbias.interventions.units import NeuronIntervention

    roles = {"shared": cfg.shared, **{f"only:{k}": v for k, v in cfg.only.items()}}
    manifest["role_check"] = {}
    for role, neurons in roles.items():
        r = measure_bias(model, "all", "race", names="heldout", n_boot=500, intervention=NeuronIntervention(neurons))
        manifest["role_check"][role] = {row["context"]: row["gap"] for row in r.rows}
        print(f"gap with {role} neurons zeroed: " + ", ".join(f"{k} {v:+.2f}" for k, v in
                                                               manifest["role_check"][role].items()))
    save_delta(delta, args.out, manifest)
    for b, a in zip(before.rows, after.rows):
        print(f"{b['context']:<9} original {b['gap']:+.3f} [{b['ci_low']:+.3f}, {b['ci_high']:+.3f}]   "
              f"planted {a['gap']:+.3f} [{a['ci_low']:+.3f}, {a['ci_high']:+.3f}]")
    print(f"perplexity {ppl0:.2f} -> {ppl1:.2f}; neutral-prompt score shift mean "
          f"{manifest['neutral_prompt_score_shift_mean']:+.3f}, max |.| {manifest['neutral_prompt_score_shift_max_abs']:.3f}")
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
