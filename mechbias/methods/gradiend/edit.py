"""Choosing a GRADIEND edit on the training context's selection split, and where the decoder puts it."""

from __future__ import annotations

from typing import Sequence

from ...data.contexts import load_context
from ...data.texts import neutral_texts
from ...eval.metrics import contrast_scores
from ...eval.transfer import Capability, EvalSet, TransferConfig, evaluate
from .train import GradiendResult

# ----------------------------------------------------------------------------
# choosing the edit
# ----------------------------------------------------------------------------

H_GRID = (-10, -2, -1, -0.8, -0.6, -0.4, -0.2, 0, 0.2, 0.4, 0.6, 0.8, 1, 2, 10)
ALPHA_GRID = tuple(s * a for a in (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5) for s in (-1, 1))


# The decoder's output has the scale of the captured gradients; on the embedded model its norm over
# all MLP weights is ~0.8, so the paper's alphas (<= 0.5) barely move the model. Measured on the
# embedded model: alpha 10 cut the commerce gender gap by ~80% at +0.8% perplexity; alpha 100
# destroyed it (perplexity x80). The default grid therefore spans four decades.
DEFAULT_ALPHAS = (-10.0, -1.0, -0.1, 0.1, 1.0, 10.0)


def choose_edit(model, res: GradiendResult, *, hs: Sequence[float] = (-1.0, 0.0, 1.0),
                alphas: Sequence[float] = DEFAULT_ALPHAS, max_ppl_increase: float = 0.05,
                neutral_max_texts: int = 6, n_names: int | None = None, seed: int = 0) -> dict:
    """Score every (h, α) on the training context's selection prompts (bias gap) and the neutral set
    (perplexity); choose the smallest |gap| whose perplexity rises by at most ``max_ppl_increase``
    (relative). The paper's full grid is ``H_GRID`` x ``ALPHA_GRID``."""
    ctx = load_context(res.context)
    prompts = ctx.prompts(res.axis, templates="selection", names="selection", seed=seed)
    if n_names is not None:
        keep = set(prompts.names[:: max(1, len(prompts.names) // n_names)])
        prompts = prompts.subset([i for i, p in enumerate(prompts) if p.person.name in keep])
    before, _, _, col_group = prompts.grid(contrast_scores(model, prompts))
    es = EvalSet(ctx.name, prompts, before, col_group)
    cap = Capability(model, neutral_texts(neutral_max_texts, split="selection"))
    tc = TransferConfig(n_random=0, n_boot=100, seed=seed)
    grid = []
    for h in hs:
        for a in alphas:
            cell = evaluate(model, res.edit_for(h, a), es, None, tc, capability=cap, selected_on=ctx.name)
            grid.append({"h": h, "alpha": a, "gap": cell.gap_after, "perplexity": cap.base + cell.perplexity_change})
    ok = [p for p in grid if p["perplexity"] <= cap.base * (1 + max_ppl_increase)]
    chosen = min(ok, key=lambda p: abs(p["gap"])) if ok else None
    gap0 = float(before[:, col_group == 0].mean() - before[:, col_group == 1].mean())
    out = {"gap_before": gap0, "perplexity_before": cap.base, "grid": grid, "chosen": chosen,
           "max_ppl_increase": max_ppl_increase}
    res.edit = out
    return out


def decoder_share(res: GradiendResult, neurons: Sequence[tuple[int, int]], model=None, h: float = 1.0) -> dict:
    """Share of the decoder update's squared norm that falls on the given MLP neurons
    (their gate/up rows and down column), against the share those entries have of all parameters."""
    dec = res.param_set.unflatten(res.model.decode(h))
    total = float(sum(float((v.double() ** 2).sum()) for v in dec.values()))
    hit, count, n_all = 0.0, 0, 0
    for name, v in dec.items():
        n_all += v.numel()
        parts = name.split(".")
        if "layers" not in parts:
            continue
        l = int(parts[parts.index("layers") + 1])
        idx = [i for ll, i in neurons if ll == l]
        if not idx:
            continue
        if "down_proj" in name:
            sub = v[:, idx]
        elif "gate_proj" in name or "up_proj" in name:
            sub = v[idx]
        else:
            continue
        hit += float((sub.double() ** 2).sum())
        count += sub.numel()
    return {"share": hit / total if total else float("nan"), "share_of_parameters": count / max(n_all, 1),
            "n_entries": count}
