"""Per-context pruning of neurons, weights and attention heads (Breaking Down Bias).

Ma, Salinas, Henderson, Nyarko, *Breaking Down Bias: On The Limits of
Generalizable Pruning Strategies* (FAccT 2025). Components are scored
separately on prompts with group-A and group-B names from a context's
selection split, and the pruned set is a **set difference**: the top-p% for
the *target* group minus the top-q% for the other group (components specific
to processing the target group's prompts). The paper's code builds both
one-sided versions (its "Black" version prunes Top(S_Black) \\ Top(S_White));
which side carries a bias is not known in advance, so the default here,
``target="both"``, prunes the union of the two set differences, ranked by
|S_A - S_B|; ``"disfavoured"``, ``"favoured"`` or a group name give one side.

Units:

* **neurons** (``blocks.{l}.mlp.hook_post``): score = mean |activation| over
  tokens x the L2 norm of the neuron's ``W_out`` row (``activation``), or
  |activation x d score / d activation| summed over positions (``attribution``);
  pruned by zeroing at all positions. Defaults p = 40%, q = 35% (the
  reproduction of the paper's appendix).
* **weights** (Wanda, as the authors' code): ``S_ij = |W_ij| * ||X_j||_2`` for
  every linear layer of every block (q, k, v, o, gate, up, down) with **each
  layer's true inputs** read at its TransformerLens hook (the released code
  fed layer-0 inputs to every layer, a bug); set difference per matrix with
  p = q = 15%; pruned by zeroing a copy-restored set of weights.
* **heads**: score = attention from the answer position to the name tokens
  (as the paper's code; group scores summed for selection), or |patching
  effect|; pruned by ``hook_q`` zeroing (uniform attention, the paper's code)
  or ``hook_z`` zeroing (output ablation). Outputs say which.

Generalization levels: L0 select on one template, evaluate on it with held-out
names; L1 select on the selection templates (components common to a fraction
of them), evaluate on held-out templates; L2 select on context A, evaluate on B.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .contexts import Context, PromptSet, fill, load_axis, load_context, tokenize
from .hooks import HeadIntervention, NeuronIntervention, WeightMask, hooked
from .models import frozen, named_params
from .results import Result, make_meta
from .runner import length_buckets

LINEARS = {  # bridge component -> hook whose value is the linear layer's input
    "attn.q": "blocks.{l}.attn.q.hook_in",
    "attn.k": "blocks.{l}.attn.k.hook_in",
    "attn.v": "blocks.{l}.attn.v.hook_in",
    "attn.o": "blocks.{l}.attn.o.hook_in",
    "mlp.gate": "blocks.{l}.mlp.gate.hook_in",
    "mlp.in": "blocks.{l}.mlp.in.hook_in",
    "mlp.out": "blocks.{l}.mlp.out.hook_in",
}


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

def _batches(model, prompts: PromptSet, max_tokens: int = 2048):
    seqs = tokenize(model, prompts.texts)
    groups = prompts.groups
    for bucket in length_buckets([len(s) for s in seqs], max_tokens):
        yield torch.stack([seqs[i] for i in bucket]).to(model.cfg.device), groups[bucket], bucket


def name_positions(model, prompt, template: str) -> list[int]:
    """Token positions (BOS included) covering the name in a filled template (every occurrence)."""
    pron = _pron(prompt.person)
    spans, pos = [], 0
    for piece in template.split("{name}")[:-1]:
        pos += len(piece.format(name=prompt.person.name, **pron))
        spans.append((pos, pos + len(prompt.person.name)))
        pos += len(prompt.person.name)
    offsets = model.tokenizer(prompt.text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    shift = len(model.to_tokens(prompt.text)[0]) - len(offsets)  # the prepended BOS
    return [i + shift for i, (a, b) in enumerate(offsets) if any(a < e and b > s for s, e in spans)]


def _pron(person):
    from .contexts import pronouns

    return pronouns(person.gender)


def set_difference(target: Tensor, other: Tensor, p: float, q: float) -> Tensor:
    """Boolean mask: in the top ``p`` fraction of ``target`` and not in the top ``q`` fraction of ``other``."""
    if target.shape != other.shape:
        raise ValueError("score tensors differ in shape")
    n = target.numel()
    kp, kq = int(round(p * n)), int(round(q * n))
    top_t = torch.zeros(n, dtype=torch.bool)
    top_o = torch.zeros(n, dtype=torch.bool)
    if kp > 0:
        top_t[target.flatten().topk(kp).indices] = True
    if kq > 0:
        top_o[other.flatten().topk(kq).indices] = True
    return (top_t & ~top_o).view(target.shape)


def _target_index(model, ctx: Context, axis: str, target: str, seed: int) -> int:
    ax = load_axis(axis)
    if target == "both":
        return 0
    if target in ax.groups:
        return ax.groups.index(target)
    from .ig2 import favoured_group

    cache = model.__dict__.setdefault("_mechbias_favoured", {})
    key = (ctx.name, ax.name, seed)
    if key not in cache:
        cache[key] = favoured_group(model, ctx, ax, seed=seed)
    fav = cache[key]
    if target == "disfavoured":
        return 1 - fav
    if target == "favoured":
        return fav
    raise ValueError(f"target must be 'disfavoured', 'favoured' or a group of axis {axis}, not {target!r}")


# ----------------------------------------------------------------------------
# scores: one pass over the prompts, sums kept per (template, group)
# ----------------------------------------------------------------------------

@dataclass
class GroupStats:
    """Sums of a per-prompt statistic and counts, per (template, group)."""

    sums: dict = field(default_factory=dict)    # (template, group) -> Tensor
    counts: dict = field(default_factory=dict)  # (template, group) -> float

    def add(self, key, value: Tensor, count: float) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.counts[key] = self.counts.get(key, 0.0) + count

    def mean(self, templates: Sequence[int] | None = None) -> Tensor:
        """``[2, ...]``: the statistic's mean for group A and B over the given templates."""
        out = []
        for g in (0, 1):
            keys = [k for k in self.sums if k[1] == g and (templates is None or k[0] in templates)]
            if not keys:
                raise ValueError(f"no prompts of group {g} in templates {templates}")
            out.append(sum(self.sums[k] for k in keys) / sum(self.counts[k] for k in keys))
        return torch.stack(out)

    @property
    def templates(self) -> list[int]:
        return sorted({k[0] for k in self.sums})


def _accumulate(model, prompts: PromptSet, per_row, *, grad: bool = False) -> GroupStats:
    """Run every prompt once; ``per_row(ids) -> ([b, ...] stats, [b] counts)`` is added per (template, group)."""
    stats = GroupStats()
    tpl = [p.template for p in prompts]
    for ids, groups, rows in _batches(model, prompts):
        vals, counts = per_row(ids)
        for b, r in enumerate(rows):
            stats.add((tpl[r], int(groups[b])), vals[b].double().cpu(), float(counts[b]))
    return stats


def neuron_stats(model, prompts: PromptSet, *, method: str = "activation") -> GroupStats:
    """Per (template, group): sums of neuron scores ``[n_layers, d_mlp]`` over prompts.

    ``activation``: mean |activation| over positions x ||W_out row||;
    ``attribution``: |sum over positions of activation x d(score)/d(activation)|;
    ``signed_attribution``: the same without the absolute value. Magnitude scores
    miss components that matter for both groups with opposite signs (a neuron
    that pushes group A up and group B down is in both top sets, so the set
    difference drops it); the signed score keeps them apart.
    """
    L = model.cfg.n_layers
    if method == "activation":
        w_out_norm = torch.stack([_w_out_row_norms(model, l) for l in range(L)]).double()  # [L, d]

        def per_row(ids):
            acc = {}
            fwd = [(f"blocks.{l}.mlp.hook_post", lambda a, hook, l=l: acc.__setitem__(l, a.abs().mean(1)))
                   for l in range(L)]
            with torch.no_grad(), hooked(model, fwd):
                model(ids)
            vals = torch.stack([acc[l].double().cpu() for l in range(L)], 1) * w_out_norm[None]
            return vals, torch.ones(len(ids))

        return _accumulate(model, prompts, per_row)
    if method in ("attribution", "signed_attribution"):
        signed = method == "signed_attribution"
        pos = model.to_single_token(prompts.positive)
        neg = model.to_single_token(prompts.negative)

        def per_row(ids):
            acts, grads = {}, {}
            fwd = [("hook_embed", lambda x, hook: x.detach().requires_grad_(True))]
            fwd += [(f"blocks.{l}.mlp.hook_post", lambda x, hook, l=l: acts.__setitem__(l, x.detach()))
                    for l in range(L)]
            bwd = [(f"blocks.{l}.mlp.hook_post", lambda g, hook, l=l: grads.__setitem__(l, g.detach()))
                   for l in range(L)]
            with frozen(model), hooked(model, fwd, bwd):
                lg = model(ids)
                (lg[:, -1, pos] - lg[:, -1, neg]).sum().backward()
            contrib = [(acts[l] * grads[l]).sum(1).double().cpu() for l in range(L)]
            vals = torch.stack(contrib if signed else [c.abs() for c in contrib], 1)
            return vals, torch.ones(len(ids))

        return _accumulate(model, prompts, per_row)
    raise ValueError(f"neuron score method must be 'activation', 'attribution' or 'signed_attribution', "
                     f"not {method!r}")


def neuron_scores(model, prompts: PromptSet, *, method: str = "activation") -> Tensor:
    """Per-group neuron scores ``[2, n_layers, d_mlp]`` (group A, group B), pooled over templates."""
    return neuron_stats(model, prompts, method=method).mean().float()


def _w_out_row_norms(model, l: int) -> Tensor:
    w = model.blocks[l].mlp.out.original_component.weight  # nn.Linear: [d_model, d_mlp]
    if w.shape[0] == model.cfg.d_mlp and w.shape[1] != model.cfg.d_mlp:  # Conv1D layout [d_mlp, d_model]
        return w.detach().norm(dim=1).cpu()
    return w.detach().norm(dim=0).cpu()


def head_stats(model, prompts: PromptSet) -> GroupStats:
    """Per (template, group): sums of the attention from the last position to the name tokens, ``[L, H]``."""
    L = model.cfg.n_layers
    ctx = load_context(prompts.context)
    name_pos = {p.text: name_positions(model, p, ctx.templates[p.template]) for p in prompts}
    texts = prompts.texts
    state = {}

    def per_row(ids):
        att = {}
        fwd = [(f"blocks.{l}.attn.hook_pattern", lambda pat, hook, l=l: att.__setitem__(l, pat[:, :, -1, :]))
               for l in range(L)]
        with torch.no_grad(), hooked(model, fwd):
            model(ids)
        rows = state["rows"]
        vals = torch.stack([torch.stack([att[l][b][:, name_pos[texts[r]]].sum(-1) for l in range(L)])
                            for b, r in enumerate(rows)])
        return vals, torch.ones(len(ids))

    stats = GroupStats()
    tpl = [p.template for p in prompts]
    for ids, groups, rows in _batches(model, prompts):
        state["rows"] = rows
        vals, counts = per_row(ids)
        for b, r in enumerate(rows):
            stats.add((tpl[r], int(groups[b])), vals[b].double().cpu(), float(counts[b]))
    return stats


def head_scores(model, prompts: PromptSet) -> Tensor:
    """Per-group attention from the last position to the name tokens, ``[2, n_layers, n_heads]``."""
    return head_stats(model, prompts).mean().float()


def linear_layers(model) -> list[tuple[str, str, int, bool]]:
    """(parameter name, input hook, layer, transposed) for every linear layer in every block."""
    ids = {id(p): n for n, p in named_params(model).items()}
    out = []
    for l in range(model.cfg.n_layers):
        for comp, hook in LINEARS.items():
            mod = model.blocks[l]
            for part in comp.split("."):
                mod = getattr(mod, part, None)
                if mod is None:
                    break
            if mod is None or getattr(mod, "original_component", None) is None:
                continue
            w = mod.original_component.weight
            transposed = type(mod.original_component).__name__ == "Conv1D"
            out.append((ids[id(w)], hook.format(l=l), l, transposed))
    return out


def input_stats(model, prompts: PromptSet) -> GroupStats:
    """Per (template, group): sums over tokens of x_j^2 for the true input of every linear layer,
    concatenated in the order of :func:`linear_layers` (counts are tokens)."""
    layers = linear_layers(model)

    def per_row(ids):
        seen = {}
        fwd = [(hook, lambda x, hook, n=name: seen.__setitem__(n, (x.reshape(x.shape[0], x.shape[1], -1).double() ** 2)
                                                               .sum(1).cpu()))
               for name, hook, _, _ in layers]
        with torch.no_grad(), hooked(model, fwd):
            model(ids)
        return torch.cat([seen[n] for n, _, _, _ in layers], 1), torch.full((len(ids),), float(ids.shape[1]))

    return _accumulate(model, prompts, per_row)


def split_norms(model, flat: Tensor) -> dict[str, Tensor]:
    """Cut a concatenated vector of mean squares back into per-layer ``||X_j||`` (sqrt of the mean)."""
    out, i = {}, 0
    params = named_params(model)
    for name, _, _, transposed in linear_layers(model):
        n_in = params[name].shape[0 if transposed else 1]
        out[name] = flat[i : i + n_in].sqrt().float()
        i += n_in
    return out


def input_norms(model, prompts: PromptSet) -> list[dict[str, Tensor]]:
    """Per group: for each linear layer, ``sqrt(mean over tokens of x_j^2)`` of its true input."""
    m = input_stats(model, prompts).mean()
    return [split_norms(model, m[g]) for g in (0, 1)]


def wanda_scores(model, norms: dict[str, Tensor]) -> dict[str, Tensor]:
    """``|W| * ||X||`` per weight, for every linear layer (computed on demand; large)."""
    params = named_params(model)
    out = {}
    for name, _, _, transposed in linear_layers(model):
        w = params[name].detach().abs().cpu()
        n = norms[name]
        out[name] = w * (n[:, None] if transposed else n[None, :])
    return out


# ----------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------

@dataclass
class PruneConfig:
    """How components are scored and chosen (see the module docstring)."""

    unit: str = "neuron"           # neuron | weight | head
    k: int | None = 100            # keep the k best candidates (None: the whole set difference)
    p: float | None = None         # top-p fraction for the target group (default per unit)
    q: float | None = None         # top-q fraction for the other group (default per unit)
    score: str = "activation"      # neuron: activation | attribution | signed_attribution; head: attention | patching
    target: str = "both"           # both | disfavoured | favoured | a group name
    head_mode: str = "q"           # q (uniform attention, the paper's code) | z (output ablation)
    select: str | None = None      # setdiff (paper) | difference (rank |S_A - S_B|) | sum (heads, paper code)
    common: float | None = 1.0     # fraction of selection templates a component must be chosen in (L1)
    seed: int = 0

    def resolved(self) -> "PruneConfig":
        d = asdict(self)
        defaults = {"neuron": (0.40, 0.35), "weight": (0.15, 0.15), "head": (0.30, 0.10)}
        if self.unit not in defaults:
            raise ValueError(f"unit must be neuron, weight or head, not {self.unit!r}")
        p, q = defaults[self.unit]
        d["p"] = self.p if self.p is not None else p
        d["q"] = self.q if self.q is not None else q
        if self.unit == "head" and self.score == "activation":
            d["score"] = "attention"
        if d["select"] is None:
            d["select"] = "sum" if self.unit == "head" else "setdiff"
        if d["select"] not in ("setdiff", "difference", "sum"):
            raise ValueError(f"select must be setdiff, difference or sum, not {d['select']!r}")
        return PruneConfig(**d)


@dataclass
class Candidates:
    """Ranked candidate components of one selection (best first) and the target group."""

    unit: str
    items: list  # (layer, index) for neurons/heads; (param, flat index) for weights
    priority: list[float]
    target_group: str
    info: dict = field(default_factory=dict)

    def intervention(self, k: int | None, cfg: PruneConfig) -> "object":
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


def candidates(model, ctx: Context, axis: str, cfg: PruneConfig, *, templates: Sequence[int] | str = "selection",
               names: str = "selection") -> Candidates:
    """Score on the given templates and names, apply the set difference (and the common-across-templates
    rule for several templates), and rank candidates."""
    cfg = cfg.resolved()
    ax = load_axis(axis)
    t_idx = ctx.template_split(templates, cfg.seed) if isinstance(templates, str) else list(templates)
    tgt = _target_index(model, ctx, axis, cfg.target, cfg.seed)
    oth = 1 - tgt
    info = {"where": f"{ctx.name}, templates {t_idx}", "target_group": ax.groups[tgt], "config": asdict(cfg)}
    per_template = cfg.common is not None and len(t_idx) > 1

    ps = ctx.prompts(ax, templates=t_idx, names=names, seed=cfg.seed)
    if cfg.unit == "neuron":
        stats = neuron_stats(model, ps, method=cfg.score)
    elif cfg.unit == "head" and cfg.score != "patching":
        stats = head_stats(model, ps)
    elif cfg.unit == "weight":
        stats = input_stats(model, ps)
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
                    votes += set_difference(s[0] + s[1], torch.zeros_like(total), cfg.p, 0.0).float()
                mask = votes >= math.ceil(cfg.common * len(t_idx) - 1e-9)
            items = _rank(mask, total)
            pr = [float(total[l, i]) for l, i in items]
        else:
            if both:
                diff = diff.abs()

            def sd(sc):
                m = set_difference(sc[tgt], sc[oth], cfg.p, cfg.q)
                return m | set_difference(sc[oth], sc[tgt], cfg.p, cfg.q) if both else m

            mask = sd(pooled)
            if per_template:
                votes = torch.zeros_like(diff)
                for t in t_idx:
                    votes += sd(score([t])).float()
                mask = votes >= math.ceil(cfg.common * len(t_idx) - 1e-9)
            items = _rank(mask, diff)
            pr = [float(diff[l, i]) for l, i in items]
        return Candidates(cfg.unit, items, pr, "both" if (both and cfg.select != "sum") else ax.groups[tgt], info)

    # weights (Wanda)
    norms = score(t_idx)
    params = named_params(model)
    per_t = [score([t]) for t in t_idx] if per_template else None
    items, pr = [], []
    for name, _, _, transposed in linear_layers(model):
        w = params[name].detach().abs().cpu()

        def s_of(nrm, g):
            n = nrm[g][name]
            return w * (n[:, None] if transposed else n[None, :])

        def sd(a, b):
            m = set_difference(a, b, cfg.p, cfg.q)
            return m | set_difference(b, a, cfg.p, cfg.q) if both else m

        st, so = s_of(norms, tgt), s_of(norms, oth)
        mask = sd(st, so)
        if per_t is not None:
            votes = torch.zeros_like(st)
            for nt in per_t:
                votes += sd(s_of(nt, tgt), s_of(nt, oth)).float()
            mask = votes >= math.ceil(cfg.common * len(t_idx) - 1e-9)
        flat = mask.flatten().nonzero().flatten()
        if len(flat):
            d = ((st - so) / st.mean().clamp_min(1e-12)).flatten()[flat]  # scale-free priority
            d = d.abs() if both else d
            items += [(name, int(i)) for i in flat.tolist()]
            pr += d.tolist()
    order = np.argsort(-np.asarray(pr)) if pr else []
    return Candidates("weight", [items[i] for i in order], [pr[i] for i in order],
                      "both" if cfg.target == "both" else ax.groups[tgt], info)


def _head_patching_scores(model, ctx, ax, templates, names, seed) -> Tensor:
    from .contexts import make_pairs
    from .patching import patch_sweep

    pairs = make_pairs(model, ctx, ax, templates=templates, names=names, seed=seed, max_pairs=12)
    eff = patch_sweep(model, pairs, "heads").mean_effect().abs().float()
    return torch.stack([eff, torch.zeros_like(eff)])


def pruning_selector(cfg: PruneConfig):
    """A transfer-engine selector: prune on a context's selection split (L1 selection)."""

    def select(model, ctx: Context, axis: str):
        c = candidates(model, ctx, axis, cfg)
        return c.intervention(cfg.k, cfg.resolved())

    return select


# ----------------------------------------------------------------------------
# levels and curves
# ----------------------------------------------------------------------------

@dataclass
class LevelsResult(Result):
    """Bias reduction at generalization levels L0, L1, L2 per context (with random controls)."""

    unit: str
    axis: str
    rows: list[dict]
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    result_type = "pruning_levels"

    def plot(self, ax=None):
        from .plotting import plot_levels

        return plot_levels(self, ax=ax)


def generalization_levels(
    model,
    contexts: Sequence[str],
    axis: str,
    cfg: PruneConfig,
    *,
    n_random: int = 2,
    n_boot: int = 1000,
    max_l0_templates: int | None = 3,
    transfer=None,
    progress: bool = False,
) -> LevelsResult:
    """L0 (one selection template, held-out names), L1 (held-out templates) and L2 (other contexts).

    ``transfer``: an existing :class:`TransferMatrix` for the same unit and
    config provides L1 (its diagonal) and L2 (its off-diagonal mean).
    """
    from .stats import paired_reduction
    from .transfer import EvalSet, random_control

    rows = []
    for name in contexts:
        ctx = load_context(name)
        sel = ctx.template_split("selection", cfg.seed)[: max_l0_templates]
        for t in sel:
            cand = candidates(model, ctx, axis, cfg, templates=[t])
            iv = cand.intervention(cfg.k, cfg.resolved())
            es = EvalSet.build(model, ctx, axis, templates=[t], names="heldout", seed=cfg.seed)
            red = paired_reduction(es.before, es.scores(model, iv), es.col_group, n_boot=n_boot, seed=cfg.seed)
            rand = [es.scores(model, random_control(iv, model, cfg.seed + 101 * (k + 1))) for k in range(n_random)]
            rr = paired_reduction(es.before, torch.stack(rand).mean(0), es.col_group, n_boot=n_boot,
                                  seed=cfg.seed) if rand else None
            rows.append({"context": ctx.name, "level": "L0", "template": t, "evaluated_on": ctx.name,
                         "n_components": iv.n_components, "reduction": red.reduction, "ci_low": red.ci_low,
                         "ci_high": red.ci_high, "gap_before": red.gap_before,
                         "random_reduction": rr.reduction if rr else float("nan")})
        if transfer is not None:
            for c in transfer.cells:
                if c["selected_on"] == ctx.name:
                    rows.append({"context": ctx.name, "level": c["level"], "template": None,
                                 "evaluated_on": c["evaluated_on"], "n_components": c["n_components"],
                                 "reduction": c["reduction"], "ci_low": c["ci_low"], "ci_high": c["ci_high"],
                                 "gap_before": c["gap_before"], "random_reduction": c.get("random_reduction")})
    meta = make_meta(model, unit=cfg.unit, axis=axis)
    return LevelsResult(cfg.unit, axis, rows, asdict(cfg), meta)


@dataclass
class PruningCurve(Result):
    """Bias (held-out) and capability against the number of pruned components."""

    unit: str
    context: str
    axis: str
    rows: list[dict]
    meta: dict = field(default_factory=dict)
    result_type = "pruning_curve"

    def plot(self, ax=None):
        from .plotting import plot_curves

        return plot_curves([self])


def pruning_curve(model, context: str, axis: str, cfg: PruneConfig, ks: Sequence[int], *, n_random: int = 1,
                  neutral_max_texts: int | None = 12, n_boot: int = 1000, eval_set=None) -> PruningCurve:
    """Held-out bias reduction and perplexity change for the top-k candidates, for each k."""
    from .metrics import neutral_texts, perplexity
    from .stats import paired_reduction
    from .transfer import EvalSet, random_control

    ctx = load_context(context)
    cand = candidates(model, ctx, axis, cfg)
    es = eval_set or EvalSet.build(model, ctx, axis, seed=cfg.seed)
    texts = neutral_texts(neutral_max_texts)
    ppl0 = perplexity(model, texts)
    rows = []
    for k in ks:
        iv = cand.intervention(k, cfg.resolved())
        red = paired_reduction(es.before, es.scores(model, iv), es.col_group, n_boot=n_boot, seed=cfg.seed)
        row = {"k": k, "n_components": iv.n_components, "reduction": red.reduction, "ci_low": red.ci_low,
               "ci_high": red.ci_high, "perplexity_change": perplexity(model, texts, intervention=iv) - ppl0}
        if n_random:
            ctl = random_control(iv, model, cfg.seed + 13)
            rr = paired_reduction(es.before, es.scores(model, ctl), es.col_group, n_boot=n_boot, seed=cfg.seed)
            row.update(random_reduction=rr.reduction,
                       random_perplexity_change=perplexity(model, texts, intervention=ctl) - ppl0)
        rows.append(row)
    return PruningCurve(cfg.unit, ctx.name, axis, rows, make_meta(model, config=asdict(cfg)))
