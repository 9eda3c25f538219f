"""Exact activation patching: mechbias' batched engine vs. transformer_lens.patching helpers.

Same pairs, same metric (logit(positive) - logit(negative) at the last position,
mean over pairs), on the embedded model: the full residual layer x position
sweep and the all-heads sweep (hook_z, all positions), both denoising.
TransformerLens runs one forward per cell (batched over pairs); mechbias runs
every cell of a pair as rows of a few forward passes (rows start at their first
patched layer, positions before the first real difference reuse the base run's
KV cache, cells whose source and base activations are identical are exactly 0).

    python benchmarks/bench_patching.py [--pairs 4]
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--context", default="finance")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))

    from transformer_lens import patching as tlp

    from mechbias.core.models import load_model
    from mechbias.data.pairs import PromptPairs, make_pairs
    from mechbias.methods.patching import patch_sweep

    model = load_model()
    pairs = make_pairs(model, args.context, "race")
    # TransformerLens' helpers need one tensor: take pairs of the most common token length
    lengths = [len(t) for t in pairs.clean_tokens]
    L0 = max(set(lengths), key=lengths.count)
    idx = [i for i in range(len(pairs)) if lengths[i] == L0][: args.pairs]
    pairs = PromptPairs(pairs.context, pairs.axis, pairs.positive, pairs.negative, [pairs.clean[i] for i in idx],
                        [pairs.corrupt[i] for i in idx], [pairs.clean_tokens[i] for i in idx],
                        [pairs.corrupt_tokens[i] for i in idx])
    clean, corr = torch.stack(pairs.clean_tokens), torch.stack(pairs.corrupt_tokens)
    y, n = model.to_single_token(pairs.positive), model.to_single_token(pairs.negative)
    metric = lambda lg: (lg[:, -1, y] - lg[:, -1, n]).mean()
    print(f"embedded SmolLM2-135M-Instruct; {len(pairs)} race pairs of {L0} tokens ({args.context}); "
          f"{torch.get_num_threads()} thread(s)")
    # warm-up, not timed
    patch_sweep(model, pairs, "heads")
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    print(f"\n{'sweep':<28}{'cells':>7}{'TL s':>9}{'mechbias s':>12}{'ratio':>8}{'max |diff|':>12}")
    for name, comp, fn in [("residual layer x position", "resid_pre", tlp.get_act_patch_resid_pre),
                           ("all heads (hook_z, all pos)", "heads", tlp.get_act_patch_attn_head_out_all_pos)]:
        t = time.perf_counter()
        with torch.no_grad():
            ref = fn(model, corr, cache, metric).double()
        t_tl = time.perf_counter() - t
        t = time.perf_counter()
        res = patch_sweep(model, pairs, comp)
        t_mb = time.perf_counter() - t
        mine = torch.nanmean(res.values, 0)
        print(f"{name:<28}{ref.numel():>7}{t_tl:>9.1f}{t_mb:>12.1f}{t_tl / t_mb:>8.1f}{float((mine - ref).abs().max()):>12.2e}")


if __name__ == "__main__":
    main()
