"""Pruning selection (Breaking Down Bias): set differences of per-group scores, the
common-across-templates rule, and the ranked candidates a pruning intervention is cut from."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from ...core.params import linear_layers, named_params
from ...data.axes import load_axis
from ...data.contexts import Context
from ...data.pairs import make_pairs
from ...eval.metrics import favoured_group
from ...interventions.base import Intervention, maybe_apply
from ...interventions.units import HeadIntervention, NeuronIntervention
from ...interventions.weights import WeightMask
from ..base import MethodConfig
from ..patching.engine import patch_sweep
from .scores import Calibration, calibration_mode, head_stats, input_stats, neuron_stats, set_difference, split_norms

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

Unit = Literal["neuron", "weight", "head"]
Score = Literal["activation", "attribution", "signed_attribution", "attention", "patching"]
Select = Literal["setdiff", "difference", "sum", "greedy"]
UNITS: tuple[str, ...] = get_args(Unit)
SCORES: tuple[str, ...] = get_args(Score)
SELECTS: tuple[str, ...] = get_args(Select)
#: the paper's (p, q) per unit (neurons: the reproduction of its appendix)
DEFAULT_PQ = {"neuron": (0.40, 0.35), "weight": (0.15, 0.15), "head": (0.30, 0.10)}


def _target_index(model: TransformerBridge, ctx: Context, axis: str, target: str, seed: int) -> int:
    ax = load_axis(axis)
    if target == "both":
        return 0
    if target in ax.groups:
        return ax.groups.index(target)
    if target not in ("disfavoured", "favoured"):
        raise ValueError(f"target must be 'both', 'disfavoured', 'favoured' or a group of axis {axis}, not {target!r}")
    fav = favoured_group(model, ctx, ax, seed=seed)
    return 1 - fav if target == "disfavoured" else fav


# ----------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------

@dataclass
class PruneConfig(MethodConfig):
    """How components are scored and chosen (see :mod:`mechbias.methods.pruning`).

    ``p``, ``q``, ``score`` and ``select`` left at ``None`` take the unit's
    defaults when the config is made, so a config always says what runs.
    """

    unit: Unit = field(default="neuron", metadata={"help": "what is pruned"})
    k: int | None = field(default=100, metadata={"help": "prune the k best candidates (none: every candidate)"})
    p: float | None = field(default=None, metadata={"help": "top-p fraction for the target group (set difference); "
                                                            "default per unit"})
    q: float | None = field(default=None, metadata={"help": "top-q fraction for the other group; default per unit"})
    score: Score | None = field(default=None, metadata={
        "help": "neuron: activation | attribution | signed_attribution; head: attention | patching"})
    target: str = field(default="both", metadata={"help": "both | disfavoured | favoured | a group name"})
    head_mode: Literal["q", "z"] = field(default="q", metadata={
        "help": "head pruning: q = zero the query (uniform attention, the paper's code), z = zero the output"})
    select: Select | None = field(default=None, metadata={
        "help": "setdiff (neurons, weights: the paper) | difference (rank |S_A - S_B|) | sum (heads: one-shot "
                "ranking of S_A + S_B) | greedy (heads, the paper's code: k rounds, each pruning the "
                "highest-scoring head and re-scoring under it)"})
    calibration: Calibration = field(default="auto", metadata={
        "help": "Wanda calibration text: chat (each prompt in the chat template plus a sampled response, the "
                "paper's code), prompt (the prompt alone), auto (chat when the tokenizer has a template)"})
    name_attention: Literal["mean", "sum"] = field(default="mean", metadata={
        "help": "head score: attention to the name averaged over its tokens (the paper's code) or summed"})
    common: float | None = field(default=1.0, metadata={
        "help": "fraction of selection templates a component must be chosen in (none: pool the templates)"})
    seed: int = field(default=0, metadata={"help": "seed of the template and name splits"})

    def validate(self) -> None:
        p, q = DEFAULT_PQ[self.unit]
        self.p = p if self.p is None else self.p
        self.q = q if self.q is None else self.q
        if self.score is None:
            self.score = "attention" if self.unit == "head" else "activation"
        if self.unit == "head" and self.score == "activation":
            self.score = "attention"
        if self.select is None:
            self.select = "greedy" if self.unit == "head" and self.score == "attention" else (
                "sum" if self.unit == "head" else "setdiff")
        if self.select == "greedy" and (self.unit != "head" or self.score != "attention" or self.k is None):
            raise ValueError("select='greedy' runs k rounds of head attention scoring: it needs unit='head', "
                             "score='attention' and a number k (use select='sum' to rank every head at once)")
        ok = {"neuron": ("activation", "attribution", "signed_attribution"), "head": ("attention", "patching"),
              "weight": ("activation",)}[self.unit]
        if self.score not in ok:
            raise ValueError(f"score {self.score!r} does not apply to unit {self.unit!r}; choose from {ok}")
        if not (0 <= self.p <= 1 and 0 <= self.q <= 1):
            raise ValueError(f"p and q are fractions in [0, 1], got p={self.p}, q={self.q}")
        if self.common is not None and not 0 < self.common <= 1:
            raise ValueError(f"common is a fraction in (0, 1] or None (pool the templates), not {self.common}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1 or None, not {self.k}")


@dataclass
class Candidates:
    """Ranked candidate components of one selection (best first) and the target group."""

    unit: str
    items: list  # (layer, index) for neurons/heads; (param, flat index) for weights
    priority: list[float]
    target_group: str
    info: dict = field(default_factory=dict)

    def intervention(self, k: int | None, cfg: PruneConfig) -> Intervention:
        items = self.items if k is None else self.items[:k]
        label = f"{self.unit} pruning ({self.info.get('where', '')})"
        if self.unit == "neuron":
            return NeuronIntervention(items, factor=0.0, positions="all", label=label)
        if self.unit == "head":
            return HeadIntervention(items, mode=cfg.head_mode, label=label)
        masks: dict[str, list[int]] = {}
        for n, i in items:
            masks.setdefault(n, []).append(int(i))
        return WeightMask({n: torch.tensor(sorted(v), dtype=torch.long) for n, v in masks.items()}, label=label)


def _rank(mask: Tensor, diff: Tensor) -> list[tuple[int, int]]:
    idx = mask.nonzero()
    if len(idx) == 0:
        return []
    vals = diff[mask]
    order = vals.argsort(descending=True)
    return [(int(idx[o, 0]), int(idx[o, 1])) for o in order]


def candidates(model: TransformerBridge, ctx: Context, axis: str, cfg: PruneConfig, *, templates: Sequence[int] | str = "selection",
               names: str = "selection") -> Candidates:
    """Score on the given templates and names, apply the set difference (and the common-across-templates
    rule for several templates), and rank candidates."""
    ax = load_axis(axis)
    t_idx = ctx.template_split(templates, cfg.seed) if isinstance(templates, str) else list(templates)
    tgt = _target_index(model, ctx, axis, cfg.target, cfg.seed)
    oth = 1 - tgt
    info = {"where": f"{ctx.name}, templates {t_idx}", "target_group": ax.groups[tgt], "config": asdict(cfg)}
    per_template = cfg.common is not None and len(t_idx) > 1
    if cfg.p is None or cfg.q is None or cfg.score is None:
        raise ValueError("PruneConfig.validate() resolves p, q and score before candidates are scored")
    p_frac, q_frac, score_method = cfg.p, cfg.q, cfg.score
    need = math.ceil((cfg.common or 1.0) * len(t_idx) - 1e-9)  # templates a candidate must be selected in

    ps = ctx.prompts(ax, templates=t_idx, names=names, seed=cfg.seed)
    if cfg.unit == "head" and cfg.select == "greedy":
        return _greedy_candidates(model, ctx, ax, cfg, t_idx, names, info)
    if cfg.unit == "neuron":
        stats = neuron_stats(model, ps, method=score_method)
    elif cfg.unit == "head" and cfg.score != "patching":
        stats = head_stats(model, ps, reduce=cfg.name_attention)
    elif cfg.unit == "weight":
        calibration = calibration_mode(model, cfg.calibration)
        info["calibration"] = calibration
        stats = input_stats(model, ps, calibration=calibration, seed=cfg.seed)
    else:
        stats = None

    def score(ts):
        if stats is None:  # heads by patching effect
            return _head_patching_scores(model, ctx, ax, ts, names, cfg.seed)
        m = stats.mean(ts)
        if cfg.unit == "weight":
            return [split_norms(model, m[g]) for g in (0, 1)]
        return m.float()

    both = cfg.target == "both"
    if cfg.unit in ("neuron", "head"):
        pooled = score(t_idx)
        diff = pooled[tgt] - pooled[oth]
        if cfg.select == "difference":
            mag = diff.abs() if cfg.target == "both" else diff
            items = _rank(torch.ones_like(mag, dtype=torch.bool), mag)
            pr = [float(mag[l, i]) for l, i in items]
            return Candidates(cfg.unit, items, pr, "both" if cfg.target == "both" else ax.groups[tgt], info)
        if cfg.unit == "head" and cfg.select == "sum":
            total = pooled[0] + pooled[1]
            mask = torch.ones_like(total, dtype=torch.bool)
            if per_template:
                votes = torch.zeros_like(total)
                for t in t_idx:
                    s = score([t])
                    votes += set_difference(s[0] + s[1], torch.zeros_like(total), p_frac, 0.0).float()
                mask = votes >= need
            items = _rank(mask, total)
            pr = [float(total[l, i]) for l, i in items]
        else:
            if both:
                diff = diff.abs()

            def sd(sc):
                m = set_difference(sc[tgt], sc[oth], p_frac, q_frac)
                return m | set_difference(sc[oth], sc[tgt], p_frac, q_frac) if both else m

            mask = sd(pooled)
            if per_template:
                votes = torch.zeros_like(diff)
                for t in t_idx:
                    votes += sd(score([t])).float()
                mask = votes >= need
            items = _rank(mask, diff)
            pr = [float(diff[l, i]) for l, i in items]
        return Candidates(cfg.unit, items, pr, "both" if (both and cfg.select != "sum") else ax.groups[tgt], info)

    # weights (Wanda)
    norms = score(t_idx)
    params = named_params(model)
    per_t = [score([t]) for t in t_idx] if per_template else None
    witems: list[tuple[str, int]] = []
    wpr: list[float] = []
    for name, _, _, transposed in linear_layers(model):
        w = params[name].detach().abs().cpu()

        def s_of(nrm, g, name=name, transposed=transposed, w=w):
            n = nrm[g][name]
            return w * (n[:, None] if transposed else n[None, :])

        def sd_weights(a, b):
            m = set_difference(a, b, p_frac, q_frac)
            return m | set_difference(b, a, p_frac, q_frac) if both else m

        st, so = s_of(norms, tgt), s_of(norms, oth)
        mask = sd_weights(st, so)
        if per_t is not None:
            votes = torch.zeros_like(st)
            for nt in per_t:
                votes += sd_weights(s_of(nt, tgt), s_of(nt, oth)).float()
            mask = votes >= need
        flat = mask.flatten().nonzero().flatten()
        if len(flat):
            d = ((st - so) / st.mean().clamp_min(1e-12)).flatten()[flat]  # scale-free priority
            d = d.abs() if both else d
            witems += [(name, int(i)) for i in flat.tolist()]
            wpr += d.tolist()
    order = np.argsort(-np.asarray(wpr)) if wpr else np.zeros(0, dtype=int)
    return Candidates("weight", [witems[i] for i in order], [wpr[i] for i in order],
                      "both" if cfg.target == "both" else ax.groups[tgt], info)


def greedy_select(score, k: int) -> tuple[list[tuple[int, int]], list[float]]:
    """``k`` rounds; each takes the not-yet-chosen ``(layer, index)`` with the highest ``score(chosen)``
    (a ``[layers, units]`` tensor computed with the units chosen so far pruned). Returns the units in the
    order chosen and the score each had when chosen."""
    chosen: list[tuple[int, int]] = []
    got: list[float] = []
    for _ in range(k):
        s = score(list(chosen)).double().clone()
        for l, i in chosen:
            s[l, i] = -math.inf
        if not torch.isfinite(s).any():
            break
        flat = int(s.flatten().argmax())
        chosen.append((flat // s.shape[1], flat % s.shape[1]))
        got.append(float(s.flatten()[flat]))
    return chosen, got


def _greedy_candidates(model: TransformerBridge, ctx, ax, cfg: PruneConfig, t_idx, names, info) -> Candidates:
    """The Breaking Down Bias code's head selection: greedy rounds, each re-scored (attention of the last
    position to the name, both groups' prompts summed) with the heads chosen so far pruned; with several
    templates, one greedy list per template and the heads found in the most lists (ties: pooled one-shot
    score), as the paper's code takes the heads most common across its items; ``common`` (when set) also
    requires a head to be in at least that share of the lists."""

    def scorer(templates):
        ps = ctx.prompts(ax, templates=templates, names=names, seed=cfg.seed)

        def score(chosen):
            iv = HeadIntervention(chosen, mode=cfg.head_mode) if chosen else None
            with maybe_apply(iv, model):
                m = head_stats(model, ps, reduce=cfg.name_attention).mean().float()
            return m[0] + m[1]

        return score

    assert cfg.k is not None  # validated
    if len(t_idx) == 1:
        items, pr = greedy_select(scorer(t_idx), cfg.k)
        return Candidates("head", items, pr, "both", {**info, "rounds": len(items)})
    lists = [greedy_select(scorer([t]), cfg.k)[0] for t in t_idx]
    pooled = scorer(t_idx)([])
    votes: dict[tuple[int, int], int] = {}
    for lst in lists:
        for h in lst:
            votes[h] = votes.get(h, 0) + 1
    need = math.ceil(cfg.common * len(t_idx) - 1e-9) if cfg.common is not None else 1
    kept = [h for h in votes if votes[h] >= need]
    kept.sort(key=lambda h: (-votes[h], -float(pooled[h])))
    return Candidates("head", kept, [float(votes[h]) for h in kept], "both",
                      {**info, "rounds": cfg.k, "lists": [[list(h) for h in lst] for lst in lists]})


def _head_patching_scores(model: TransformerBridge, ctx, ax, templates, names, seed) -> Tensor:
    pairs = make_pairs(model, ctx, ax, templates=templates, names=names, seed=seed, max_pairs=12)
    eff = patch_sweep(model, pairs, "heads").mean_effect().abs().float()
    return torch.stack([eff, torch.zeros_like(eff)])


# ----------------------------------------------------------------------------
