"""Wanda's two costs on the embedded model, each against the way it ran before, in the same run.

1. Chat calibration: each selection prompt as a user turn plus a sampled 16-token reply. Before: one prompt
   per forward (``sample_completions`` with one sample). Now: prompts of equal token length in one batch
   (``sample_replies``). The benchmark checks that both give the same sequences.
2. Ranking: the top ``p`` fraction of every weight matrix's scores, per template. Before: ``topk``. Now: a
   linear-time partition (``top_fraction``). The benchmark counts where the masks differ and checks that
   every such entry ties with the cut (SmolLM2's weights were stored in bfloat16, so equal magnitudes are
   common; ``topk`` leaves the order of ties unspecified, ``top_fraction`` keeps the lowest indices).

Then one whole Wanda selection (finance, gender, the default configuration) with the new code.

    python benchmarks/bench_wanda.py [--prompts 96]
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=96, help="calibration prompts timed both ways")
    ap.add_argument("--no-selection", action="store_true", help="skip the whole selection")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
    from mechbias.core.models import load_model
    from mechbias.core.params import linear_layers, named_params
    from mechbias.data.axes import stable_hash
    from mechbias.data.contexts import load_context
    from mechbias.eval.generation import chat_prompt, sample_completions, sample_replies
    from mechbias.methods.pruning import PruneConfig, candidates
    from mechbias.methods.pruning.scores import top_fraction

    model = load_model()
    ctx = load_context("finance")
    ps = ctx.prompts("gender", templates="selection", names="selection")
    texts = ps.texts[: args.prompts]
    chats = [chat_prompt(model, t) for t in texts]
    seeds = [int(stable_hash(0, f"calibration:{ps.context}:{i}")[:8], 16) for i in range(len(chats))]
    print(f"embedded SmolLM2-135M-Instruct, finance/gender selection split ({len(ps)} prompts); "
          f"{torch.get_num_threads()} thread(s)")
    sample_replies(model, chats[:4], seeds[:4], max_new_tokens=16)  # warm-up
    t = time.perf_counter()
    one = [sample_completions(model, c, n_samples=1, max_new_tokens=16, seed=s)[0] for c, s in zip(chats, seeds, strict=True)]
    t_one = time.perf_counter() - t
    t = time.perf_counter()
    batched = sample_replies(model, chats, seeds, max_new_tokens=16)
    t_batch = time.perf_counter() - t
    same = sum(a == b for a, b in zip(one, batched, strict=True))
    print(f"chat calibration, {len(chats)} prompts in {len({len(c) for c in chats})} length groups: one prompt per "
          f"forward {t_one:.1f} s, batched {t_batch:.1f} s ({t_one / t_batch:.1f}x); identical replies {same}/{len(one)}")

    params = named_params(model)
    g = torch.Generator().manual_seed(0)
    mats = []
    for name, _, _, transposed in linear_layers(model):
        w = params[name].detach().abs().cpu()
        n_in = w.shape[0 if transposed else 1]
        norm = torch.rand(n_in, generator=g) + 0.5
        mats.append(w * (norm[:, None] if transposed else norm[None, :]))
    calls = 0
    t = time.perf_counter()
    old = []
    for m in mats:
        for frac in (0.15, 0.15):
            k = round(frac * m.numel())
            mask = torch.zeros(m.numel(), dtype=torch.bool)
            mask[m.flatten().topk(k).indices] = True
            old.append(mask.view(m.shape))
            calls += 1
    t_topk = time.perf_counter() - t
    t = time.perf_counter()
    new = [top_fraction(m, round(frac * m.numel())) for m in mats for frac in (0.15, 0.15)]
    t_part = time.perf_counter() - t
    equal = sum(torch.equal(a, b) for a, b in zip(old, new, strict=True))
    # where they differ, both keep k entries and differ only among entries equal to the cut (ties broken
    # differently: topk's order among equal values is unspecified, top_fraction keeps the lowest indices)
    differ, at_ties = 0, True
    for m, a, b in zip([m for m in mats for _ in (0, 1)], old, new, strict=True):
        d = a ^ b
        if d.any():
            cut = m[a].min()
            differ += int(d.sum())
            at_ties &= bool((m[d] == cut).all()) and int(a.sum()) == int(b.sum())
    print(f"ranking, {calls} top-15% masks over {len(mats)} weight matrices ({sum(m.numel() for m in mats) / 1e6:.1f}M "
          f"scores): topk {t_topk:.2f} s, partition {t_part:.2f} s ({t_topk / t_part:.1f}x); masks equal {equal}/"
          f"{calls}; {differ} entries differ, all tied with the cut: {at_ties}")

    if not args.no_selection:
        t = time.perf_counter()
        cand = candidates(model, ctx, "gender", PruneConfig(unit="weight", k=None))
        print(f"one Wanda selection (finance, gender, default config, chat calibration): "
              f"{time.perf_counter() - t:.0f} s, {len(cand.items)} weights")


if __name__ == "__main__":
    main()
