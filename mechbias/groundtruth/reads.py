"""What the planted-model construction (:mod:`mechbias.groundtruth.construct`) reads from the native model: its
prompts as items, activations and answer-score gradients at every position, the rows its probes are fitted
on, and the answer scores it calibrates with."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.hooks import hooked
from ..core.params import mlp_weights
from ..core.runner import capture_all, length_buckets, map_last_logits
from ..core.sites import hook_name
from ..data.axes import load_axis, stable_hash
from ..data.contexts import load_context
from ..data.neutral import neutral_texts
from ..data.prompts import tokenize
from .linalg import calibrate_scales
from .planted import NEUTRAL_REFERENCES, mention_positions, neutral_prompts

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

_LOG = logging.getLogger(__name__)

__all__ = ["Item", "answer_scores", "at_last", "calibrate_output", "capture", "construction_items", "first_per_cell",
           "gate_target", "group_means", "name_fold", "score_gradients", "stack_rows"]


def first_per_cell(people: Sequence, n: int, seed: int = 0) -> list:
    """The first ``n`` people of each race x gender cell, ordered by the hash of their name (the construction's
    ``names_per_cell``), in their original order."""
    cells: dict = {}
    for p in people:
        cells.setdefault((p.race, p.gender), []).append(p)
    keep = {id(q) for members in cells.values() for q in sorted(members, key=lambda q: stable_hash(seed, q.name))[:n]}
    return [p for p in people if id(p) in keep]


@dataclass
class Item:
    """One prompt (or neutral text) the construction reads, with its group sign and the name's token positions."""
    tokens: Tensor
    context: str          # a context name, or "neutral" for neutral text
    sign: float           # +1 group A, -1 group B, 0 no name
    name_positions: list
    name: str = ""
    template: int = -1    # the template index of a prompt (-1: a neutral-reference prompt or neutral text)


def capture(model: TransformerBridge, items: list[Item], points: Sequence[tuple[str, int]]) -> dict[tuple[str, int], list[Tensor]]:
    """Activations at every position of every item, per hook point: ``{(point, layer): [tensor [pos, ...]]}``."""
    acts = capture_all(model, [it.tokens for it in items], [hook_name(p, l) for p, l in points], max_tokens=4096)
    return {(p, l): acts[hook_name(p, l)] for p, l in points}


def score_gradients(model: TransformerBridge, items: list[Item], points: Sequence[tuple[str, int]], pos_id: int, neg_id: int,
                 max_tokens: int = 2048) -> dict[tuple[str, int], list[Tensor]]:
    """Gradient of each item's answer score (logit[pos] - logit[neg] at the last position) with respect to the
    activation at each hook point, every position: ``{(point, layer): [tensor [pos, d]]}``. Parameters are
    frozen for the call (their ``requires_grad`` is restored)."""
    out: dict = {pl: [None] * len(items) for pl in points}
    params = list(model.parameters())
    req = [q.requires_grad for q in params]
    for q in params:
        q.requires_grad_(False)
    try:
        for bucket in length_buckets([len(it.tokens) for it in items], max_tokens):
            ids = torch.stack([items[i].tokens for i in bucket]).to(model.cfg.device)
            deltas: dict = {}

            def add(a, hook, key, deltas=deltas):
                deltas[key] = torch.zeros_like(a, requires_grad=True)
                return a + deltas[key]
            fwd = [(hook_name(p, l), lambda a, hook, key=(p, l): add(a, hook, key)) for p, l in points]
            with torch.enable_grad(), hooked(model, fwd):
                logits = model(ids)
                score = (logits[:, -1, pos_id] - logits[:, -1, neg_id]).sum()
                grads = torch.autograd.grad(score, [deltas[pl] for pl in points])
            for r, i in enumerate(bucket):
                for pl, g in zip(points, grads, strict=True):
                    out[pl][i] = g[r].detach().float().cpu()
    finally:
        for q, r_ in zip(params, req, strict=True):
            q.requires_grad_(r_)
    return out


def at_last(it: Item, p: int) -> bool:
    """Whether position ``p`` is the prediction position of a prompt that names a person's context."""
    return p == len(it.tokens) - 1 and it.context != "neutral"


def gate_target(c: str, it: Item, p: int) -> float | None:
    """Target of context ``c``'s gate: +1 at the prediction position of ``c``'s prompts, -1 at the others' and
    at neutral or every third position, else not fitted."""
    if at_last(it, p):
        return 1.0 if it.context == c else -1.0
    return -1.0 if it.context == "neutral" or p % 3 == 0 else None


def stack_rows(feats: list[Tensor], items: list[Item], select: Callable[[Item, int], float | None]):
    """Stack per-position features where ``select(item, position)`` gives a target (None: skip)."""
    X, y = [], []
    for f, it in zip(feats, items, strict=True):
        for p in range(1, len(it.tokens)):
            t = select(it, p)
            if t is not None:
                X.append(f[p])
                y.append(t)
    return torch.stack(X), torch.tensor(y, dtype=torch.float64)


def name_fold(name: str) -> int:
    """A fixed fold (0 or 1) per name, from a hash of its letters (no dependence on the order of prompts)."""
    return sum(map(ord, name)) % 2


def group_means(values: Float[Tensor, " n"], signs: Float[Tensor, " n"]) -> tuple[float, float]:
    """Mean of ``values`` over group A rows (sign > 0) and over group B rows (sign < 0)."""
    return float(values[signs > 0].mean()), float(values[signs < 0].mean())


def answer_scores(model: TransformerBridge, items: list[Item], pos_id: int, neg_id: int) -> Float[Tensor, " n"]:
    """Each item's answer score, logit[pos] - logit[neg] at the last position, in float64."""
    return map_last_logits(model, [it.tokens for it in items], lambda lg: lg[:, -1, pos_id] - lg[:, -1, neg_id]).double()


def calibrate_output(model: TransformerBridge, last: dict[str, list], answer: Float[Tensor, " d"], named: list[Item],
                     signs: Float[Tensor, " n"], scores_off: Float[Tensor, " n"], pos_id: int, neg_id: int, target: float,
                     rounds: int, tol: float, stats: dict) -> None:
    """Set each planted context's output scale (its prediction neurons ``last[c]`` write ``scale * answer``) so that
    the planted gap measured on its fitting prompts (``named``; ``scores_off``: their scores with the output at 0)
    is ``target`` (:func:`~mechbias.groundtruth.linalg.calibrate_scales`, from ``stats["last_{c}_scale"]``).
    Writes the scales into the model and ``stats``."""
    on_idx = {c: [k for k, it in enumerate(named) if it.context == c] for c in last}
    sub_idx = sorted(k for v in on_idx.values() for k in v)
    sub_items = [named[k] for k in sub_idx]
    off = scores_off[sub_idx]

    def write(scales: dict[str, float]) -> None:
        with torch.no_grad():
            for c, kap in scales.items():
                for l, i in last[c]:
                    mlp_weights(model, l)[2][:, i] = (kap * answer).to(mlp_weights(model, l)[2])

    def measure(scales: dict[str, float]) -> dict[str, float]:
        write(scales)
        d = answer_scores(model, sub_items, pos_id, neg_id) - off
        out = {}
        for c in last:
            rows = [sub_idx.index(k) for k in on_idx[c]]
            da, db = group_means(d[rows], signs[on_idx[c]])
            out[c] = da - db
        return out

    kappas, history = calibrate_scales(measure, {c: stats[f"last_{c}_scale"] for c in last}, target, rounds, tol)
    write(kappas)
    stats["calibration"] = history
    for c in last:
        stats[f"last_{c}_scale"] = kappas[c]
        _LOG.info(f"[construct] {c}: planted gap on the fitting prompts per round "
                  + ", ".join(f"{r['measured'][c]:+.4f}" for r in history) + f"; output norm {kappas[c]:.3f}")
    final = history[-1]["measured"]
    if any(abs(final[c] - target) > tol * target for c in last):
        _LOG.warning(f"[construct] the output scale did not converge in {rounds} rounds: {final}")


def construction_items(model: TransformerBridge, axis: str, favoured: str, contexts: Sequence[str], *, names: str = "selection",
                       templates: str | Sequence[int] = "all", names_per_cell: int | None = None, neutral_tokens: int = 96,
                       seed: int = 0) -> list[Item]:
    """The prompts the construction reads, as items: every ``templates`` x ``names`` prompt of ``contexts`` (at most
    ``names_per_cell`` names per cell; sign +1 for the ``favoured`` group, -1 otherwise), the same templates with a
    neutral reference instead of a name (sign 0), and the first ``neutral_tokens`` tokens of 8 neutral paragraphs
    (context ``"neutral"``)."""
    ax = load_axis(axis)
    fav = ax.groups.index(favoured)
    out = []
    people = ax.split_people(names, seed)
    if names_per_cell is not None:
        people = first_per_cell(people, names_per_cell, seed)
    for c in contexts:
        ctx = load_context(c)
        ps = ctx.prompts(ax, templates=templates, names=people, seed=seed)
        for p, t in zip(ps, tokenize(model, ps.texts), strict=True):
            out.append(Item(t, c, 1.0 if p.group == fav else -1.0, mention_positions(model, p.text, p.person.name),
                            p.person.name, p.template))
        # the neutral-reference prompts (no name) of the same templates only: before 2026-12-07 they were read
        # for every template, held-out ones included (the shipped v4 was built so; docs/groundtruth.md)
        keep = ctx.template_split(templates) if isinstance(templates, str) else list(templates)
        for ref in NEUTRAL_REFERENCES:
            for k, text in enumerate(neutral_prompts(c, (ref,))):
                if k in keep:
                    out.append(Item(tokenize(model, [text])[0], c, 0.0, mention_positions(model, text, ref), "", k))
    for t in tokenize(model, neutral_texts(8, split="selection")):
        out.append(Item(t[:neutral_tokens], "neutral", 0.0, []))
    return out
