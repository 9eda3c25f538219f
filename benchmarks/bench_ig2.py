"""IG² speed: mechbias' fast path vs. captum vs. the plain-loop reference, on the embedded model.

All three compute the same quantity: IG² of every neuron (30 layers x 1536) at
the last position of one prompt, gap P(d1) - P(d2), left Riemann sum, m = 20.
captum's ``LayerIntegratedGradients`` runs on the input of the MLP
down-projection (``blocks.{l}.mlp.out``, i.e. ``hook_post``): the forward takes a
gate that zeroes the last position of that input at the baseline, so captum
integrates from a zero activation at the prediction position to the real one,
exactly IG²'s path. Prints seconds per prompt, ratios, and max |difference|.

    python benchmarks/bench_ig2.py [--prompts 1] [--reference-layers 30]
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reference-layers", type=int, default=None,
                    help="run the plain loop on this many layers only (its time is scaled to all layers)")
    ap.add_argument("--skip-captum", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from mechbias.core.models import load_model
    from mechbias.core.params import frozen
    from mechbias.data.contexts import load_context
    from mechbias.eval.metrics import gap_from_logits
    from mechbias.methods.ig2 import ig2_prompt

    model = load_model()
    L = model.cfg.n_layers
    texts = load_context("finance").prompts("race", templates=[0, 1, 2, 3], names="heldout").texts[: args.prompts]
    d1, d2 = model.to_single_token(" Yes"), model.to_single_token(" No")
    print(f"model: embedded SmolLM2-135M-Instruct, {L} layers x {model.cfg.d_mlp} neurons, m = {args.steps}, "
          f"{args.prompts} prompt(s) of ~{model.to_tokens(texts[0]).shape[1]} tokens, {torch.get_num_threads()} threads")

    def captum_ig2(toks, layers):
        from captum.attr import LayerIntegratedGradients

        ids = toks[None]
        out = torch.zeros(L, model.cfg.d_mlp, dtype=torch.float64)
        with frozen(model):
            for l in layers:
                def forward(gate, ids, l=l):
                    def hook(act, hook):
                        return torch.cat([act[:, :-1], act[:, -1:] * gate[:, :, None]], dim=1)

                    with model.hooks(fwd_hooks=[(f"blocks.{l}.mlp.hook_post", hook)]):
                        logits = model(ids.expand(gate.shape[0], -1))
                    return gap_from_logits(logits[:, -1], d1, d2, "prob")

                # the Hugging Face down_proj module: its input is hook_post
                lig = LayerIntegratedGradients(forward, model.blocks[l].mlp.out.original_component)
                a = lig.attribute(torch.ones(1, 1), baselines=torch.zeros(1, 1), additional_forward_args=(ids,),
                                  n_steps=args.steps, method="riemann_left", attribute_to_layer_input=True,
                                  internal_batch_size=args.steps)
                out[l] = a[0, -1].double()
        return out

    # warm-up (first calls pay for allocations and lazy initialisation), not timed
    warm = model.to_tokens(texts[0])[0]
    ig2_prompt(model, warm, d1, d2, steps=args.steps)
    ig2_prompt(model, warm, d1, d2, steps=args.steps, layers=[L - 1], method="reference")
    if not args.skip_captum:
        captum_ig2(warm, [L - 1])

    times = {"mechbias fast": 0.0, "captum LIG": 0.0, "plain loop": 0.0}
    diffs = {"captum LIG": 0.0, "plain loop": 0.0}
    for text in texts:
        toks = model.to_tokens(text)[0]
        t = time.perf_counter()
        fast = ig2_prompt(model, toks, d1, d2, steps=args.steps)
        times["mechbias fast"] += time.perf_counter() - t

        if not args.skip_captum:
            t = time.perf_counter()
            cap = captum_ig2(toks, range(L))
            times["captum LIG"] += time.perf_counter() - t
            diffs["captum LIG"] = max(diffs["captum LIG"], float((cap - fast.attr).abs().max()))

        layers = list(range(L)) if args.reference_layers is None else list(range(0, L, max(1, L // args.reference_layers)))[: args.reference_layers]
        t = time.perf_counter()
        ref = ig2_prompt(model, toks, d1, d2, steps=args.steps, layers=layers, method="reference")
        times["plain loop"] += (time.perf_counter() - t) * L / len(layers)
        diffs["plain loop"] = max(diffs["plain loop"], float((ref.attr[layers] - fast.attr[layers]).abs().max()))

    n = len(texts)
    scale = float(fast.attr.abs().max())
    print(f"\n{'method':<16}{'s / prompt':>12}{'x slower than fast':>22}{'max |diff| vs fast':>22}")
    for k, v in times.items():
        if v == 0:
            continue
        d = "" if k == "mechbias fast" else f"{diffs[k]:.2e}"
        print(f"{k:<16}{v / n:>12.2f}{v / times['mechbias fast']:>22.1f}{d:>22}")
    print(f"(largest |attribution| {scale:.2e}; plain-loop time "
          f"{'measured on all layers' if args.reference_layers is None else f'extrapolated from {args.reference_layers} layers'})")


if __name__ == "__main__":
    main()
