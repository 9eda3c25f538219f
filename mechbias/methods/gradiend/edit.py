"""Choosing a GRADIEND edit on the training context's selection split, and where the decoder puts it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

from ...core.results import Record
from ...data.axes import load_axis
from ...data.contexts import design_blocks, load_context
from ...data.neutral import neutral_texts
from ...eval.cells import Capability, EvalSet, TransferConfig, evaluate
from ...eval.metrics import contrast_scores
from ...eval.stats import grid_gap
from .train import GradiendResult

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

# ----------------------------------------------------------------------------
# choosing the edit
# ----------------------------------------------------------------------------

H_GRID = (-10, -2, -1, -0.8, -0.6, -0.4, -0.2, 0, 0.2, 0.4, 0.6, 0.8, 1, 2, 10)
ALPHA_GRID = tuple(s * a for a in (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5) for s in (-1, 1))


# The decoder writes raw gradient-space updates (its training coordinates are folded back), so alpha has
# the paper's meaning: the edit is alpha times a gradient-sized step. The default grid spans the upper
# part of the paper's alpha grid in both signs (GradiendConfig.alpha).
DEFAULT_ALPHAS = (-1.0, -0.3, -0.1, -0.03, 0.03, 0.1, 0.3, 1.0)


class GridPoint(TypedDict):
    """One (h, alpha) edit scored on the selection prompts and neutral texts."""

    h: float
    alpha: float
    gap: float
    perplexity: float


@dataclass
class EditChoice(Record):
    """The edit :func:`choose_edit` chose.

    Args:
        gap_before: the selection prompts' gap without an edit.
        perplexity_before: the selection neutral texts' perplexity without an edit.
        grid: every (h, alpha) scored.
        chosen: the point with the smallest ``|gap|`` within the perplexity limit (None: no point is within it).
        max_ppl_increase: that limit (relative).
    """

    gap_before: float
    perplexity_before: float
    grid: list[GridPoint]
    chosen: GridPoint | None
    max_ppl_increase: float


@dataclass
class DecoderShare(Record):
    """How much of the decoder update falls on given neurons (:func:`decoder_share`).

    Args:
        share: their share of the update's squared norm.
        share_of_parameters: their entries' share of all parameters (what a uniform update would give).
        n_entries: the number of those entries.
    """

    share: float
    share_of_parameters: float
    n_entries: int


@dataclass
class HDirection(Record):
    """Whether h sets the direction of the edit (:func:`h_direction`).

    Args:
        alpha: the alpha chosen on the selection split.
        selection_scan: per alpha, the selection gap changes of h = +1 and -1 and the perplexity rise.
        gap_before_heldout: the held-out gap without an edit.
        heldout: per h (``"+1"``, ``"-1"``, ``"+0"``), the held-out gap change with its CI and perplexity change.
        opposite_signs: h = +1 and h = -1 move the held-out gap in opposite directions.
        both_exclude_zero: both of their CIs exclude 0.
    """

    alpha: float
    selection_scan: list[dict[str, float]]
    gap_before_heldout: float
    heldout: dict[str, dict[str, float | None]]
    opposite_signs: bool
    both_exclude_zero: bool


def choose_edit(model: TransformerBridge, res: GradiendResult, *, hs: Sequence[float] = (-1.0, 0.0, 1.0),
                alphas: Sequence[float] = DEFAULT_ALPHAS, max_ppl_increase: float = 0.05,
                neutral_max_texts: int = 6, n_names: int | None = None, seed: int = 0,
                templates_per_name: int = 0) -> EditChoice:
    """Score every (h, α) on the training context's selection prompts (bias gap) and the neutral set
    (perplexity); choose the smallest absolute gap whose perplexity rises by at most ``max_ppl_increase``
    (relative). The paper's full grid is ``H_GRID`` x ``ALPHA_GRID``. ``templates_per_name`` > 0: each name
    meets about that many selection templates (the incomplete crossed design)."""
    ctx = load_context(res.context)
    people = load_axis(res.axis).split_people("selection", seed)
    if n_names is not None:
        people = people[:: max(1, len(people) // n_names)]
    prompts = ctx.prompts(res.axis, templates="selection", names=people, seed=seed,
                          blocks=design_blocks(ctx, "selection", templates_per_name, seed, people))
    # whole sequences, as EvalSet scores every edit (so an edit that changes nothing changes no score)
    before, _, _, col_group = prompts.grid(contrast_scores(model, prompts, share_prefix=False))
    es = EvalSet(ctx.name, prompts, before, col_group)
    cap = Capability(model, neutral_texts(neutral_max_texts, split="selection"))
    tc = TransferConfig(n_random=0, n_boot=100, seed=seed)
    grid: list[GridPoint] = []
    for h in hs:
        for a in alphas:
            cell = evaluate(model, res.edit_for(h, a), es, None, tc, capability=cap, selected_on=ctx.name)
            grid.append({"h": h, "alpha": a, "gap": cell.gap_after, "perplexity": cap.base + cell.perplexity_change})
    ok = [p for p in grid if p["perplexity"] <= cap.base * (1 + max_ppl_increase)]
    chosen = min(ok, key=lambda p: abs(p["gap"])) if ok else None
    gap0 = grid_gap(before, col_group)
    out = EditChoice(gap0, cap.base, grid, chosen, max_ppl_increase)
    res.edit = out.as_dict()  # saved with the result
    return out


def decoder_share(res: GradiendResult, neurons: Sequence[tuple[int, int]], model: TransformerBridge | None = None, h: float = 1.0
                  ) -> DecoderShare:
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
    return DecoderShare(hit / total if total else float("nan"), count / max(n_all, 1), count)


# ----------------------------------------------------------------------------
# does h set the direction of the edit?
# ----------------------------------------------------------------------------

H_ALPHAS = (0.003, 0.01, 0.03, 0.1, 0.3)


def _selection_gap(model: TransformerBridge, prompts, intervention=None) -> float:
    sc = contrast_scores(model, prompts, intervention=intervention)
    g = prompts.groups
    return float(sc[g == 0].mean() - sc[g == 1].mean())


def h_direction(model: TransformerBridge, res: GradiendResult, *, alphas: Sequence[float] = H_ALPHAS, n_boot: int = 1000,
                neutral_max_texts: int | None = 6, max_ppl_increase: float = 0.05, seed: int = 0) -> HDirection:
    """The edits h = +1, h = -1 and h = 0 (the decoder bias alone) at one alpha, on held-out prompts.

    alpha is chosen on the training context's selection prompts and selection neutral texts: among the
    ``alphas`` whose h = +1 and h = -1 edits raise selection perplexity by at most ``max_ppl_increase``
    (relative; the smallest alpha if none does), those where h = +1 and
    h = -1 move the selection gap in opposite directions, the one whose smaller absolute change is largest (the
    edit is still in its linear range there); if none, the one with the largest ``|change(+1) - change(-1)|``.
    Then each of the three edits is measured on the held-out names and templates with the design's
    bootstrap CI, and its perplexity change on the reporting neutral texts."""
    ctx = load_context(res.context)
    sel = ctx.prompts(res.axis, templates="selection", names="selection", seed=seed)
    g0 = _selection_gap(model, sel)
    sel_cap = Capability(model, neutral_texts(neutral_max_texts, split="selection")) if neutral_max_texts else None
    scan = []
    for a in alphas:
        eds = {h: res.edit_for(h, a) for h in (1.0, -1.0)}
        d = {h: _selection_gap(model, sel, e) - g0 for h, e in eds.items()}
        worst = max(sel_cap.change(e) for e in eds.values()) / sel_cap.base if sel_cap else 0.0
        scan.append({"alpha": a, "change_h+1": d[1.0], "change_h-1": d[-1.0], "selection_ppl_rise": worst})
    allowed = [s for s in scan if s["selection_ppl_rise"] <= max_ppl_increase] or scan[:1]
    opposite = [s for s in allowed if s["change_h+1"] * s["change_h-1"] < 0]
    if opposite:
        pick = max(opposite, key=lambda s: min(abs(s["change_h+1"]), abs(s["change_h-1"])))
    else:
        pick = max(allowed, key=lambda s: abs(s["change_h+1"] - s["change_h-1"]))
    a = pick["alpha"]
    ho = ctx.prompts(res.axis, templates="heldout", names="heldout", seed=seed)
    before, _, _, col_group = ho.grid(contrast_scores(model, ho, share_prefix=False))
    es = EvalSet(ctx.name, ho, before, col_group)
    cap = Capability(model, neutral_texts(neutral_max_texts, split="reporting")) if neutral_max_texts else None
    tc = TransferConfig(n_random=0, n_boot=n_boot, seed=seed)
    cells = {}
    for h in (1.0, -1.0, 0.0):
        c = evaluate(model, res.edit_for(h, a), es, None, tc, capability=cap, selected_on=ctx.name)
        cells[f"{h:+g}"] = {"gap_change": c.gap_change, "ci_low": c.ci_low, "ci_high": c.ci_high,
                            "perplexity_change": c.perplexity_change}
    up, down = cells["+1"], cells["-1"]
    return HDirection(a, scan, float(before[:, col_group == 0].mean() - before[:, col_group == 1].mean()), cells,
                      bool(up["gap_change"] * down["gap_change"] < 0),
                      bool(up["ci_low"] * up["ci_high"] > 0 and down["ci_low"] * down["ci_high"] > 0))
