"""IG² (Integrated Gap Gradients) and Bias Neuron Suppression (BNS).

Liu et al., *The Devil is in the Neurons* (ICLR 2024), ported to causal models on
TransformerLens hook points.

**Definition.** A neuron is one entry of ``blocks.{l}.mlp.hook_post`` (the input
of the MLP down-projection) at the prediction position (the last token). For
layer ``l`` the whole activation vector ``w̄`` at that position is scaled
together along ``α·w̄`` from the zero baseline, other layers and positions keep
their real values, and

    IG²(w_i) = w̄_i · Σ_k c_k ∂G(α_k·w̄)/∂w_i        (G = gap between d1 and d2)

with the integration rule's points ``α_k`` and weights ``c_k`` (default: the
authors' left Riemann sum with m = 20, ``α_k = k/m``, ``c_k = 1/m``). One
backward gives all neurons of a layer (the authors' and Knowledge Neurons'
semantics). The gap G is signed ``P(d1) - P(d2)`` by default; ``abs_prob``,
``logprob`` and ``logit`` are documented options (:func:`mechbias.metrics.gap_from_logits`).
**Completeness**: for each layer the attributions sum to ``G(w̄) - G(0)`` of that
layer's joint scaling, up to the Riemann error; every run reports it.

**Units.** The attributed quantity of a *unit* is ``Σ_j weight_j · G(prompt_j)``:
a demographic-prediction prompt is one prompt with weight ±1 (oriented so that
positive means "towards the biased association"); a contrast *pair* is the
same template with a group-A and a group-B name, weights ``+s`` and ``-s``, so
its attribution is the difference of the two prompts' attributions — neurons
that push the favourable answer more for one group than the other.

**Fast path.** For a causal model scored at the last position, scaling a
neuron there changes only the last position's residual stream. So the prefix
runs once into a frozen KV cache, and the m scaled copies of layer ``l`` are
created *inside* the forward pass, at ``blocks.{l}.hook_resid_pre`` of the last
token, so they only run through layers ≥ l. All layers and steps share one
forward and one backward. Models without KV-cache support (TransformerLens
native) use the same batch growth over the full sequence. ``method="reference"``
is the slow obvious loop over layers and steps, kept for tests and benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .contexts import Context, _hash, fill, load_axis, load_context, single_token, tokenize
from .hooks import NeuronIntervention, maybe_apply, neuron_hook
from .metrics import contrast_scores, gap_from_logits
from .models import frozen, supports_kv_cache
from .results import Result, make_meta
from .runner import forward_window, last_position_unembed, prefix_cache

RULES = ("left", "right", "middle", "trapezoid")


def integration_points(steps: int, rule: str = "left") -> tuple[Tensor, Tensor]:
    """Points ``α_k`` and weights ``c_k`` of a rule on [0, 1] (weights sum to 1)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    k = torch.arange(steps, dtype=torch.float64)
    if rule == "left":
        return k / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "right":
        return (k + 1) / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "middle":
        return (k + 0.5) / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "trapezoid":
        if steps < 2:
            raise ValueError("the trapezoid rule needs at least 2 steps")
        w = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (steps - 1)
        return k / (steps - 1), w
    raise ValueError(f"unknown integration rule {rule!r}; choose from {RULES}")


# ----------------------------------------------------------------------------
# one prompt
# ----------------------------------------------------------------------------

@dataclass
class PromptIG:
    """IG² of one prompt: attributions ``[layers, d_mlp]``, the gap at full
    activation ``g1`` and, per layer, the gap with that layer's last-position
    neurons at 0 (``g0``)."""

    attr: Float[Tensor, "layer d_mlp"]
    g1: float
    g0: Float[Tensor, " layer"]


class _Gap(torch.autograd.Function):
    """The gap from logits ``[rows, vocab]`` with a fused backward.

    Indexing two columns of a log-softmax costs one dense zero-filled gradient
    buffer per index plus the log-softmax backward; here the softmax is computed
    once, kept, and the gradient is written once: for ``prob``,
    ``p1·e1 - p2·e2 - (p1 - p2)·p``. ``logit``/``logprob`` need no softmax.
    """

    @staticmethod
    def forward(ctx, logits, d1: int, d2: int, kind: str):
        ctx.d1, ctx.d2, ctx.kind = d1, d2, kind
        if kind in ("logprob", "logit"):
            ctx.shape = logits.shape
            return logits[:, d1] - logits[:, d2]
        p = torch.softmax(logits, dim=-1)
        p1, p2 = p[:, d1].clone(), p[:, d2].clone()
        ctx.save_for_backward(p, p1, p2)
        if kind == "prob":
            return p1 - p2
        if kind == "abs_prob":
            return (p1 - p2).abs()
        if kind == "target_prob":
            return p1
        raise ValueError(f"unknown gap kind {kind!r}")

    @staticmethod
    def backward(ctx, g):
        d1, d2, kind = ctx.d1, ctx.d2, ctx.kind
        if kind in ("logprob", "logit"):
            grad = g.new_zeros(ctx.shape)
            grad[:, d1] += g
            grad[:, d2] -= g
            return grad, None, None, None
        p, p1, p2 = ctx.saved_tensors
        if kind == "target_prob":
            c1, c2 = g * p1, torch.zeros_like(g)
        else:
            sign = torch.sign(p1 - p2) if kind == "abs_prob" else torch.ones_like(g)
            c1, c2 = g * sign * p1, -g * sign * p2
        grad = p.mul(-(c1 + c2)[:, None])  # dense part: -(c1 + c2) * softmax
        grad[:, d1] += c1
        grad[:, d2] += c2
        return grad, None, None, None


def _gap_fn(d1: int, d2: int, kind: str):
    if kind not in ("prob", "abs_prob", "logprob", "logit", "target_prob"):
        raise ValueError(f"unknown gap kind {kind!r}; choose from prob, abs_prob, logprob, logit, target_prob")
    return lambda lg: _Gap.apply(lg.reshape(-1, lg.shape[-1]), d1, d2, kind).reshape(lg.shape[:-1])


def ig2_prompt(
    model,
    tokens: Int[Tensor, " p"],
    d1: int,
    d2: int,
    *,
    kind: str = "prob",
    steps: int = 20,
    rule: str = "left",
    layers: Sequence[int] | None = None,
    method: str = "fast",
    internal_batch_size: int | None = None,
    position: str = "last",
) -> PromptIG:
    """IG² of every neuron at the last position of one prompt (see module docstring).

    Args:
        tokens: 1-D token ids (BOS included); the gap is read after the last token.
        d1, d2: token ids of the two predictions.
        internal_batch_size: maximum rows per forward pass of the fast path
            (like captum's knob); ``None`` puts all layers and steps in one pass.
        position: ``"last"`` (the paper: the prediction position only) or ``"all"``
            (an extension: each layer's activations at every position are scaled
            together, and a neuron's attribution is summed over positions; it sees
            neurons that act where the name is, which ``"last"`` cannot). Completeness
            holds for either path. ``"all"`` costs about sequence-length times more.
    """
    if position not in ("last", "all"):
        raise ValueError(f"position must be 'last' or 'all', not {position!r}")
    layers = list(range(model.cfg.n_layers)) if layers is None else sorted(set(int(l) for l in layers))
    alphas, weights = integration_points(steps, rule)
    if rule != "left":  # add an unweighted α = 0 point so completeness is known
        alphas = torch.cat([torch.zeros(1, dtype=torch.float64), alphas])
        weights = torch.cat([torch.zeros(1, dtype=torch.float64), weights])
    zero_idx = int((alphas == 0).nonzero()[0])
    gap = _gap_fn(d1, d2, kind)
    with frozen(model):
        if method == "reference":
            return _reference(model, tokens, gap, layers, alphas, weights, zero_idx, position)
        if method == "fast":
            return _fast(model, tokens, gap, layers, alphas, weights, zero_idx, internal_batch_size, position)
    raise ValueError(f"method must be 'fast' or 'reference', not {method!r}")


def _reference(model, tokens, gap, layers, alphas, weights, zero_idx, position="last") -> PromptIG:
    """Plain loop: one full forward and backward per (layer, step)."""
    sl = slice(-1, None) if position == "last" else slice(None)
    L, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    ids = tokens.to(model.cfg.device)[None]
    attr = torch.zeros(L, d_mlp, dtype=torch.float64)
    g0 = torch.full((L,), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=[neuron_hook(l) for l in layers])
        g1 = float(gap(logits[0, -1].float()))
    for l in layers:
        base = cache[neuron_hook(l)][0, sl].detach().float()  # [positions scaled, d_mlp]
        total = torch.zeros(base.shape, dtype=torch.float64)
        for a, c in zip(alphas.tolist(), weights.tolist()):
            leaf = (a * base).clone().requires_grad_(True)

            def put(act, hook, leaf=leaf):
                keep = act[:, : act.shape[1] - leaf.shape[0]]
                return torch.cat([keep, leaf[None].to(act.dtype)], dim=1)

            with model.hooks(fwd_hooks=[(neuron_hook(l), put)]):
                out = model(ids)
            g = gap(out[0, -1].float())
            (grad,) = torch.autograd.grad(g, leaf)
            total += c * grad.double()
            if a == 0.0:
                g0[l] = float(g.detach())
        attr[l] = (base.double() * total).sum(0)
    return PromptIG(attr, g1, g0)


def _chunks(layers, m: int, cap: int | None) -> list[list[tuple[int, int, int]]]:
    """Pack (layer, alpha-start, alpha-end) blocks into forwards of at most ``cap`` rows."""
    if cap is None:
        return [[(l, 0, m) for l in layers]]
    cap = max(cap, 2)
    per = cap - 1  # row 0 is the unscaled row
    blocks = [(l, a, min(a + per, m)) for l in layers for a in range(0, m, per)]
    chunks: list[list[tuple[int, int, int]]] = []
    for blk in blocks:
        for ch in chunks:
            rows = sum(b[2] - b[1] for b in ch)
            if rows + blk[2] - blk[1] <= per and all(b[0] != blk[0] for b in ch):
                ch.append(blk)
                break
        else:
            chunks.append([blk])
    return [sorted(ch) for ch in chunks]


def _fast(model, tokens, gap, layers, alphas, weights, zero_idx, cap, position="last") -> PromptIG:
    L, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    device = model.cfg.device
    ids = tokens.to(device)[None]
    total = ids.shape[1]
    # all positions: every position changes, so no prefix can be shared
    use_kv = supports_kv_cache(model) and total > 1 and position == "last"
    n_pos = 1 if position == "last" else total
    cache = None
    if use_kv:
        with forward_window(0, total):
            cache = prefix_cache(model, ids[:, :-1])
        inp, start = ids[:, -1:], total - 1
    else:
        inp, start = ids, 0
    al = alphas.float().to(device)
    grad_sum = torch.zeros(L, n_pos, d_mlp, dtype=torch.float64)
    bases: dict[int, Tensor] = {}
    g0 = torch.full((L,), float("nan"), dtype=torch.float64)
    g1 = None
    for chunk in _chunks(layers, len(alphas), cap):
        leaves: dict[int, Tensor] = {}
        hooks = []
        for l, a0, a1 in chunk:
            n_new = a1 - a0

            def grow(x, hook, n_new=n_new):
                # new rows start as (constant) copies of the unscaled row 0: the
                # leaf of layer l only influences layers >= l, so nothing upstream
                # needs a gradient
                return torch.cat([x, x[:1].detach().expand(n_new, *x.shape[1:])], dim=0)

            def scale(act, hook, l=l, a0=a0, a1=a1, n_new=n_new):
                base = act[0, -n_pos:].detach()  # [n_pos, d_mlp]
                bases[l] = base.double().cpu()
                leaf = (al[a0:a1, None, None] * base[None]).requires_grad_(True)
                leaves[l] = leaf
                new = torch.cat([act[-n_new:, : act.shape[1] - n_pos], leaf.to(act.dtype)], dim=1)
                return torch.cat([act[:-n_new], new], dim=0)

            hooks += [(f"blocks.{l}.hook_resid_pre", grow), (neuron_hook(l), scale)]
        with model.hooks(fwd_hooks=hooks), last_position_unembed(model, 1), forward_window(start, total):
            logits = model(inp, past_key_values=cache) if use_kv else model(inp)
        # only the last position was unembedded: [rows, 1, vocab] -> [rows, vocab] as a view
        # (indexing would cost a dense zero-filled gradient buffer in the backward)
        g = gap(logits.reshape(-1, logits.shape[-1]))  # rows: [unscaled, block 1, block 2, ...]
        if g1 is None:
            g1 = float(g[0].detach())
        grads = torch.autograd.grad(g[1:].sum(), [leaves[l] for l, _, _ in chunk])
        row = 1
        for (l, a0, a1), gr in zip(chunk, grads):
            c = weights[a0:a1]
            grad_sum[l] += (gr.double().cpu() * c[:, None, None]).sum(0)
            if a0 <= zero_idx < a1:
                g0[l] = float(g[row + zero_idx - a0].detach())
            row += a1 - a0
    attr = torch.zeros(L, d_mlp, dtype=torch.float64)
    for l in layers:
        attr[l] = (bases[l] * grad_sum[l]).sum(0)
    return PromptIG(attr, float(g1), g0)


# ----------------------------------------------------------------------------
# units: what gets attributed
# ----------------------------------------------------------------------------

@dataclass
class Unit:
    """A weighted sum of prompt gaps: ``Σ_j weights[j] · G(texts[j])`` for targets ``d1``, ``d2``."""

    texts: list[str]
    weights: list[float]
    d1: str
    d2: str
    bag: str
    info: dict = field(default_factory=dict)


def favoured_group(model, context: Context | str, axis, *, templates="selection", names="selection",
                   seed: int = 0) -> int:
    """Index (0 = group A, 1 = group B) of the group the model favours on the contrast metric."""
    ctx = load_context(context)
    ps = ctx.prompts(axis, templates=templates, names=names, seed=seed)
    scores = contrast_scores(model, ps)
    g = ps.groups
    return 0 if float(scores[g == 0].mean() - scores[g == 1].mean()) >= 0 else 1


def demographic_units(context: Context | str, axis, *, favoured: int = 0, outcomes: str = "selection",
                      paired: bool = True, seed: int = 0) -> list[Unit]:
    """IG² demographic-prediction units (the paper's prompts, per context).

    After a favourable outcome the stereotyped prediction is the favoured
    group's word, after an unfavourable one the other group's word, so
    d1 = the favoured group's word and a prompt's weight is +1 after a
    favourable and -1 after an unfavourable outcome.

    ``paired=False`` is the paper's form: one prompt per unit, a bag is one
    outcome word in every template. ``paired=True`` (default) pairs the k-th
    favourable with the k-th unfavourable outcome word in the same template
    (weights +1, -1): the template's fixed preference between the two words
    (e.g. for the word mentioned last) cancels, leaving the outcome-dependent
    association. A bag is then one outcome pair in every template.
    ``outcomes`` keeps half of the outcome words (or pairs): ``selection``,
    ``heldout`` or ``all``, deterministically.
    """
    ctx = load_context(context)
    ax = load_axis(axis)
    fav, other = ax.words[ax.groups[favoured]], ax.words[ax.groups[1 - favoured]]
    if not ctx.outcomes or ax.name not in ctx.demographic_templates:
        raise ValueError(f"context {ctx.name!r} has no demographic prompts for axis {ax.name!r}")
    tpls = ctx.demographic_templates[ax.name]
    pos, neg = list(ctx.outcomes.get("positive", ())), list(ctx.outcomes.get("negative", ()))

    def keep(items, key):
        ordered = sorted(items, key=lambda w: _hash(seed, f"{ctx.name}:outcome:{key(w)}"))
        half = (len(ordered) + 1) // 2
        return {"selection": ordered[:half], "heldout": ordered[half:], "all": ordered}[outcomes]

    units = []
    if paired:
        if not pos or not neg:
            raise ValueError(f"context {ctx.name!r} needs positive and negative outcomes for paired units")
        pairs = keep(list(zip(pos, neg)), key=lambda pn: f"{pn[0]}/{pn[1]}")
        for pw, nw in pairs:
            for t, tpl in enumerate(tpls):
                units.append(Unit([tpl.replace("{outcome}", pw), tpl.replace("{outcome}", nw)], [1.0, -1.0], fav,
                                  other, bag=f"{pw}/{nw}", info={"template": t, "outcome": f"{pw}/{nw}"}))
    else:
        for pol, words in (("positive", pos), ("negative", neg)):
            for w in keep(words, key=lambda w: w):
                for t, tpl in enumerate(tpls):
                    units.append(Unit([tpl.replace("{outcome}", w)], [1.0 if pol == "positive" else -1.0], fav,
                                      other, bag=f"{pol}:{w}", info={"template": t, "outcome": w, "polarity": pol}))
    if not units:
        raise ValueError(f"no demographic units for context {ctx.name!r} ({outcomes})")
    return units


def contrast_units(context: Context | str, axis, *, favoured: int = 0, templates="selection",
                   names="selection", pairs_per_template: int | None = 8, seed: int = 0) -> list[Unit]:
    """IG² contrast-pair units: one template with a group-A and a group-B name.

    The target is the contrast answer (d1 = positive, d2 = negative answer,
    both single tokens); weights ``+s, -s`` with ``s`` = +1 if group A is
    favoured, so attributions point towards the observed bias. A bag is a
    template. Pairs match the other attribute (same gender for race pairs) but
    need not align token by token.
    """
    ctx = load_context(context)
    ax = load_axis(axis)
    t_idx = ctx.template_split(templates, seed) if isinstance(templates, str) else list(templates)
    ppl = ax.split_people(names, seed)
    s = 1.0 if favoured == 0 else -1.0
    units = []
    for t in t_idx:
        a = sorted([p for p in ppl if ax.group_index(p) == 0], key=lambda p: _hash(seed, f"u:{t}:{p.name}"))
        b = sorted([p for p in ppl if ax.group_index(p) == 1], key=lambda p: _hash(seed, f"u:{t}:{p.name}"))
        pairs = []
        used = set()
        for pa in a:
            pb = next((p for p in b if p not in used and p.get(ax.other_attribute) == pa.get(ax.other_attribute)), None)
            if pb is None:
                continue
            used.add(pb)
            pairs.append((pa, pb))
        if pairs_per_template is not None:
            pairs = pairs[:pairs_per_template]
        for pa, pb in pairs:
            units.append(Unit([fill(ctx.templates[t], pa), fill(ctx.templates[t], pb)], [s, -s], ctx.positive,
                              ctx.negative, bag=f"template:{t}",
                              info={"template": t, "name_a": pa.name, "name_b": pb.name}))
    return units


# ----------------------------------------------------------------------------
# running IG² over units
# ----------------------------------------------------------------------------

@dataclass
class IG2Result(Result):
    """IG² attributions of a set of units.

    ``attributions``: ``[n_units, n_layers, d_mlp]``; ``completeness``:
    ``[n_units, n_layers, 2]`` holding (sum of attributions, G(w̄) - G(0)) per
    layer; ``units``: unit descriptions (bag, texts, weights, targets).
    """

    attributions: Tensor
    completeness: Tensor
    units: list[dict]
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    result_type = "ig2"

    @property
    def n_layers(self) -> int:
        return self.attributions.shape[1]

    def aggregate(self) -> Tensor:
        """Mean attribution over units, ``[n_layers, d_mlp]``."""
        return self.attributions.mean(0)

    def top(self, k: int = 20) -> list[tuple[int, int, float]]:
        """The k neurons with the largest mean attribution: ``(layer, neuron, score)``."""
        agg = self.aggregate()
        vals, idx = agg.flatten().topk(k)
        d = agg.shape[1]
        return [(int(i) // d, int(i) % d, float(v)) for v, i in zip(vals, idx)]

    def completeness_error(self) -> Tensor:
        """Per layer: mean |sum(attr) - ΔG| / mean |ΔG| over units (relative error)."""
        c = self.completeness.double()
        err = (c[..., 0] - c[..., 1]).abs().mean(0)
        scale = c[..., 1].abs().mean(0).clamp_min(1e-12)
        return err / scale

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for l, i, v in self.top(50):
            rows.append({"layer": l, "neuron": i, "mean_attribution": v})
        return pd.DataFrame(rows)

    def select(self, **kw) -> "NeuronSelection":
        return select_neurons(self, **kw)

    def plot(self, selection: "NeuronSelection | None" = None):
        from .plotting import plot_attribution

        return plot_attribution(self, selection)


def run_ig2(
    model,
    units: Sequence[Unit],
    *,
    kind: str = "prob",
    steps: int = 20,
    rule: str = "left",
    layers: Sequence[int] | None = None,
    method: str = "fast",
    internal_batch_size: int | None = None,
    position: str = "last",
    progress: bool = False,
) -> IG2Result:
    """IG² for every unit; prompts shared between units are attributed once.

    ``position="all"`` scales neurons at every position (see :func:`ig2_prompt`)."""
    if not units:
        raise ValueError("run_ig2 got no units")
    L, d = model.cfg.n_layers, model.cfg.d_mlp
    memo: dict[tuple[str, str, str], PromptIG] = {}
    todo = []
    for u in units:
        for t in u.texts:
            key = (t, u.d1, u.d2)
            if key not in memo and key not in todo:
                todo.append(key)
    it = todo
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(todo, desc="IG2 prompts", disable=None)
    for t, w1, w2 in it:
        d1 = single_token(model, w1, "IG2 target d1")
        d2 = single_token(model, w2, "IG2 target d2")
        toks = tokenize(model, [t])[0]
        memo[(t, w1, w2)] = ig2_prompt(model, toks, d1, d2, kind=kind, steps=steps, rule=rule, layers=layers,
                                       method=method, internal_batch_size=internal_batch_size,
                                       position=position)
    attrs = torch.zeros(len(units), L, d, dtype=torch.float32)
    comp = torch.zeros(len(units), L, 2, dtype=torch.float64)
    for k, u in enumerate(units):
        for t, w in zip(u.texts, u.weights):
            r = memo[(t, u.d1, u.d2)]
            attrs[k] += (w * r.attr).float()
            comp[k, :, 0] += w * r.attr.sum(1)
            comp[k, :, 1] += w * (r.g1 - r.g0)
    config = {"kind": kind, "steps": steps, "rule": rule, "method": method,
              "layers": list(layers) if layers is not None else None, "position": position}
    meta = make_meta(model, n_prompts=len(todo))
    return IG2Result(attrs, comp, [{"texts": u.texts, "weights": u.weights, "d1": u.d1, "d2": u.d2, "bag": u.bag,
                                    **u.info} for u in units], config, meta)


# ----------------------------------------------------------------------------
# selection (the paper's three stages)
# ----------------------------------------------------------------------------

@dataclass
class NeuronSelection(Result):
    """Neurons selected from IG² attributions, with the thresholds that chose them."""

    neurons: list[list[int]]
    per_bag: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    n_layers: int = 0
    d_mlp: int = 0
    meta: dict = field(default_factory=dict)
    result_type = "neuron_selection"

    def __len__(self) -> int:
        return len(self.neurons)

    def as_pairs(self) -> list[tuple[int, int]]:
        return [(int(l), int(i)) for l, i in self.neurons]

    def intervention(self, factor: float = 0.0, positions="all", label: str = "") -> NeuronIntervention:
        """BNS: suppress (factor 0) or amplify (factor 2) the selected neurons."""
        return NeuronIntervention(self.as_pairs(), factor=factor, positions=positions, label=label or "IG2 neurons")

    def without(self, neurons: Sequence[tuple[int, int]], reason: str = "excluded") -> "NeuronSelection":
        """A copy without the given neurons (recorded in ``thresholds``)."""
        drop = {(int(l), int(i)) for l, i in neurons}
        kept = [[l, i] for l, i in self.as_pairs() if (l, i) not in drop]
        th = {**self.thresholds, reason: sorted([list(n) for n in drop & set(self.as_pairs())])}
        return NeuronSelection(kept, dict(self.per_bag), th, self.n_layers, self.d_mlp, dict(self.meta))

    def layer_histogram(self) -> np.ndarray:
        h = np.zeros(self.n_layers, dtype=int)
        for l, _ in self.neurons:
            h[l] += 1
        return h

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.neurons, columns=["layer", "neuron"])

    def plot(self, ax=None):
        from .plotting import plot_layer_histogram

        return plot_layer_histogram(self.layer_histogram(), ax=ax, title=f"{len(self)} selected neurons")


def _prompt_sets(attrs: Tensor, frac: float) -> list[set[int]]:
    out = []
    for a in attrs:
        flat = a.flatten()
        mx = float(flat.max())
        out.append(set((flat >= frac * mx).nonzero().flatten().tolist()) if mx > 0 else set())
    return out


def neuron_costs(model, selection: "NeuronSelection | Sequence[tuple[int, int]]", *,
                 texts: Sequence[str] | None = None, max_texts: int | None = 12) -> dict[tuple[int, int], float]:
    """Perplexity change on the neutral texts when each neuron alone is zeroed (all positions).

    IG² can select "hub" neurons that matter for everything (on the embedded model one neuron,
    (28, 1095), is selected in every context and costs +4.7 perplexity alone); use with
    :func:`capability_guard` to drop them before suppression."""
    from .metrics import neutral_texts, perplexity

    pairs = selection.as_pairs() if isinstance(selection, NeuronSelection) else [tuple(n) for n in selection]
    texts = list(texts) if texts is not None else neutral_texts(max_texts)
    base = perplexity(model, texts)
    return {n: perplexity(model, texts, intervention=NeuronIntervention([n])) - base for n in pairs}


def capability_guard(model, selection: "NeuronSelection", max_ppl_increase: float = 0.5, *,
                     costs: dict[tuple[int, int], float] | None = None, **kw) -> "NeuronSelection":
    """Drop selected neurons whose own ablation raises neutral-text perplexity by more than
    ``max_ppl_increase`` (absolute). Not in the IG² paper; a cheap guard (one forward set per neuron).
    ``costs``: from :func:`neuron_costs`, if already measured (must cover the selection)."""
    costs = costs if costs is not None else neuron_costs(model, selection, **kw)
    return selection.without([n for n, c in costs.items() if c > max_ppl_increase],
                             reason=f"capability_guard>{max_ppl_increase}")


def select_neurons(
    result: IG2Result,
    *,
    per_prompt: float = 0.2,
    per_bag: float = 0.7,
    per_relation: float = 0.1,
    adapt: bool = True,
    target_per_bag: tuple[float, float] = (2, 5),
    max_rounds: int = 6,
    step: float = 0.05,
) -> NeuronSelection:
    """The paper's selection: per prompt ≥ ``per_prompt`` × max; per bag in ≥ ``per_bag`` of its
    prompts (adapted by ±``step`` for up to ``max_rounds`` rounds so bags hold
    ``target_per_bag`` neurons on average); per relation in ≥ ``per_relation`` of the bags."""
    L, d = result.attributions.shape[1:]
    sets = _prompt_sets(result.attributions, per_prompt)
    bags: dict[str, list[int]] = {}
    for k, u in enumerate(result.units):
        bags.setdefault(u["bag"], []).append(k)

    def bag_sets(th):
        out = {}
        for b, idx in bags.items():
            counts: dict[int, int] = {}
            for k in idx:
                for n in sets[k]:
                    counts[n] = counts.get(n, 0) + 1
            need = max(1, math.ceil(th * len(idx) - 1e-9))
            out[b] = {n for n, c in counts.items() if c >= need}
        return out

    th = per_bag
    chosen = bag_sets(th)
    rounds = 0
    while adapt and rounds < max_rounds:
        mean = np.mean([len(s) for s in chosen.values()]) if chosen else 0
        if mean > target_per_bag[1] and th + step <= 1.0 + 1e-9:
            th += step
        elif mean < target_per_bag[0] and th - step > 0:
            th -= step
        else:
            break
        chosen = bag_sets(th)
        rounds += 1
    counts: dict[int, int] = {}
    for s in chosen.values():
        for n in s:
            counts[n] = counts.get(n, 0) + 1
    need = max(1, math.ceil(per_relation * len(bags) - 1e-9))
    final = sorted(n for n, c in counts.items() if c >= need)
    neurons = [[n // d, n % d] for n in final]
    return NeuronSelection(
        neurons, {b: len(s) for b, s in chosen.items()},
        {"per_prompt": per_prompt, "per_bag_initial": per_bag, "per_bag_final": round(th, 4),
         "per_relation": per_relation, "adapt_rounds": rounds, "n_bags": len(bags)},
        L, d, dict(result.meta),
    )


def top_k_selection(result: IG2Result, k: int) -> NeuronSelection:
    """The k neurons with the largest mean attribution (a simpler alternative)."""
    L, d = result.attributions.shape[1:]
    return NeuronSelection([[l, i] for l, i, _ in result.top(k)], {}, {"top_k": k}, L, d, dict(result.meta))


def random_like(selection: NeuronSelection | Sequence[tuple[int, int]], d_mlp: int, seed: int,
                exclude: set | None = None) -> list[tuple[int, int]]:
    """Random neurons with the same per-layer counts (the random-control draw)."""
    pairs = selection.as_pairs() if isinstance(selection, NeuronSelection) else list(selection)
    rng = np.random.default_rng(seed)
    by_layer: dict[int, int] = {}
    for l, _ in pairs:
        by_layer[l] = by_layer.get(l, 0) + 1
    ex = exclude if exclude is not None else set(pairs)
    out = []
    for l, n in sorted(by_layer.items()):
        pool = [i for i in range(d_mlp) if (l, i) not in ex]
        out += [(l, int(i)) for i in rng.choice(pool, size=min(n, len(pool)), replace=False)]
    return out


# ----------------------------------------------------------------------------
# verification: suppress / amplify vs random and plain-IG neurons
# ----------------------------------------------------------------------------

def unit_values(model, units: Sequence[Unit], *, kind: str = "prob", intervention=None) -> Tensor:
    """The attributed quantity ``Σ_j w_j G(text_j)`` of every unit."""
    from .runner import map_last_logits

    out = torch.zeros(len(units), dtype=torch.float64)
    by_target: dict[tuple[str, str], list[int]] = {}
    for k, u in enumerate(units):
        by_target.setdefault((u.d1, u.d2), []).append(k)
    for (w1, w2), ks in by_target.items():
        d1, d2 = single_token(model, w1), single_token(model, w2)
        gap = _gap_fn(d1, d2, kind)
        tx = sorted({t for k in ks for t in units[k].texts})
        with maybe_apply(intervention, model):
            vals = map_last_logits(model, tokenize(model, tx), lambda lg: gap(lg[:, -1])).double()
        v = dict(zip(tx, vals.tolist()))
        for k in ks:
            out[k] = sum(w * v[t] for t, w in zip(units[k].texts, units[k].weights))
    return out


@dataclass
class VerificationResult(Result):
    """Change of the attributed gap under suppression / amplification of neuron sets."""

    rows: list[dict]
    meta: dict = field(default_factory=dict)
    result_type = "ig2_verification"

    def plot(self, ax=None):
        from .plotting import plot_verification

        return plot_verification(self, ax=ax)


def verify(
    model,
    selection: NeuronSelection,
    units: Sequence[Unit],
    *,
    ig_selection: NeuronSelection | None = None,
    kind: str = "prob",
    positions="all",
    n_random: int = 5,
    seed: int = 0,
    n_boot: int = 2000,
) -> VerificationResult:
    """The paper's verification: relative change of the mean gap over held-out units when the
    selected neurons are suppressed (×0) or amplified (×2), against the same number of random
    neurons from the same layers (``n_random`` draws) and against plain-IG neurons.

    Change = (mean gap after - mean gap before) / |mean gap before|, with a
    paired bootstrap 95% CI over units.
    """
    from .stats import _percentile_ci

    base = unit_values(model, units, kind=kind)
    sets = {"IG2": selection.as_pairs()}
    if ig_selection is not None and len(ig_selection):
        sets["IG"] = ig_selection.as_pairs()
    for r in range(n_random):
        sets[f"random{r}"] = random_like(selection, model.cfg.d_mlp, seed + 1000 + r)
    rng = np.random.default_rng(seed)
    n = len(units)
    W = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float) / n
    b0 = base.numpy()
    rows = []
    for op, factor in (("suppress", 0.0), ("amplify", 2.0)):
        per_set = {}
        for name, pairs in sets.items():
            if not pairs:
                continue
            iv = NeuronIntervention(pairs, factor=factor, positions=positions)
            per_set[name] = unit_values(model, units, kind=kind, intervention=iv).numpy()
        for name in ["IG2", "IG"]:
            if name not in per_set:
                continue
            v = per_set[name]
            rel = (v.mean() - b0.mean()) / abs(b0.mean())
            reps = (W @ v - W @ b0) / np.abs(W @ b0)
            lo, hi = _percentile_ci(reps)
            rows.append({"neurons": name, "operation": op, "n_neurons": len(sets[name]),
                         "relative_change": float(rel), "ci_low": lo, "ci_high": hi,
                         "gap_before": float(b0.mean()), "gap_after": float(v.mean())})
        rnd = [k for k in per_set if k.startswith("random")]
        if rnd:
            vals = np.stack([per_set[k] for k in rnd])  # [draws, units]
            v = vals.mean(0)
            rel = (v.mean() - b0.mean()) / abs(b0.mean())
            reps = (W @ v - W @ b0) / np.abs(W @ b0)
            lo, hi = _percentile_ci(reps)
            draws = [(x.mean() - b0.mean()) / abs(b0.mean()) for x in vals]
            rows.append({"neurons": f"random (same layers, {len(rnd)} draws)", "operation": op,
                         "n_neurons": len(sets["IG2"]), "relative_change": float(rel), "ci_low": lo,
                         "ci_high": hi, "gap_before": float(b0.mean()), "gap_after": float(v.mean()),
                         "random_draws": [float(x) for x in draws]})
    meta = make_meta(model, kind=kind, positions=positions, n_units=n, n_random=n_random, seed=seed)
    return VerificationResult(rows, meta)


# ----------------------------------------------------------------------------
# one context: attribute, select, verify
# ----------------------------------------------------------------------------

@dataclass
class IG2Experiment:
    """Everything ``mechbias ig2`` produces for one context and axis."""

    context: str
    axis: str
    favoured: str
    attributions: IG2Result
    selection: NeuronSelection
    ig_selection: NeuronSelection
    verification: VerificationResult
    config: dict

    def summary(self) -> dict:
        err = self.attributions.completeness_error()
        return {
            "context": self.context, "axis": self.axis, "favoured_group": self.favoured,
            "config": self.config,
            "n_units": len(self.attributions.units),
            "completeness_error_per_layer": [float(x) for x in err],
            "completeness_error_median": float(err.median()),
            "selected_neurons": self.selection.neurons,
            "n_selected": len(self.selection),
            "selection_thresholds": self.selection.thresholds,
            "n_selected_plain_ig": len(self.ig_selection),
            "verification": self.verification.rows,
        }

    def save(self, path) -> None:
        from pathlib import Path

        from .results import atomic_write_json

        path = Path(path)
        self.attributions.save(path / "attributions")
        self.selection.save(path / "selection")
        self.ig_selection.save(path / "selection_plain_ig")
        self.verification.save(path / "verification")
        positions = self.config.get("positions", "all")
        self.selection.intervention(0.0, positions, f"BNS {self.context}/{self.axis}").save(path / "intervention")
        atomic_write_json(self.summary(), path / "ig2.json")


def ig2_experiment(
    model,
    context: str | Context,
    axis: str,
    *,
    mode: str = "contrast",
    pairs_per_template: int = 6,
    steps: int = 20,
    rule: str = "left",
    kind: str = "prob",
    positions="all",
    n_random: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> IG2Experiment:
    """IG² on the selection split of a context, selection, and the verification on held-out data.

    ``mode``: ``contrast`` (name pairs on the context's templates; held out:
    other templates and names), ``demographic`` (outcome-paired
    demographic-prediction prompts; held out: other outcome words) or
    ``demographic-single`` (the paper's single prompts).
    """
    ctx = load_context(context)
    ax = load_axis(axis)
    fav = favoured_group(model, ctx, ax, seed=seed)
    if mode == "contrast":
        sel_units = contrast_units(ctx, ax, favoured=fav, pairs_per_template=pairs_per_template, seed=seed)
        held = contrast_units(ctx, ax, favoured=fav, templates="heldout", names="heldout",
                              pairs_per_template=pairs_per_template, seed=seed)
    elif mode in ("demographic", "demographic-single"):
        paired = mode == "demographic"
        sel_units = demographic_units(ctx, ax, favoured=fav, outcomes="selection", paired=paired, seed=seed)
        held = demographic_units(ctx, ax, favoured=fav, outcomes="heldout", paired=paired, seed=seed)
    else:
        raise ValueError(f"mode must be 'contrast', 'demographic' or 'demographic-single', not {mode!r}")
    res = run_ig2(model, sel_units, kind=kind, steps=steps, rule=rule, progress=progress)
    selection = select_neurons(res)
    plain = run_ig2(model, sel_units, kind="target_prob", steps=steps, rule=rule, progress=progress)
    ig_selection = select_neurons(plain)
    ver = verify(model, selection, held, ig_selection=ig_selection, kind=kind, positions=positions,
                 n_random=n_random, seed=seed)
    config = {"mode": mode, "pairs_per_template": pairs_per_template, "steps": steps, "rule": rule, "kind": kind,
              "positions": positions, "n_random": n_random, "seed": seed}
    for r in (res, selection, ig_selection, ver):
        r.meta.update(context=ctx.name, axis=ax.name, **config)
    return IG2Experiment(ctx.name, ax.name, ax.groups[fav], res, selection, ig_selection, ver, config)


def selection_overlap(selections: dict[str, NeuronSelection], d_mlp: int, *, n_draws: int = 200, seed: int = 0):
    """Jaccard overlap of selected neuron sets between contexts, with a chance baseline.

    The chance value of a cell is the mean Jaccard of random sets with the same
    per-layer counts as the two selections (``n_draws`` draws).
    Returns a DataFrame with ``a``, ``b``, ``jaccard``, ``chance``, ``n_a``, ``n_b``.
    """
    import pandas as pd

    names = list(selections)
    rows = []
    for i, a in enumerate(names):
        for b in names:
            sa, sb = set(selections[a].as_pairs()), set(selections[b].as_pairs())
            j = len(sa & sb) / len(sa | sb) if sa | sb else float("nan")
            ch = []
            for k in range(n_draws if a != b else 0):
                ra = set(random_like(list(sa), d_mlp, seed + 2 * k, exclude=set()))
                rb = set(random_like(list(sb), d_mlp, seed + 2 * k + 1, exclude=set()))
                ch.append(len(ra & rb) / len(ra | rb) if ra | rb else float("nan"))
            rows.append({"a": a, "b": b, "jaccard": j, "chance": float(np.nanmean(ch)) if ch else 1.0,
                         "n_a": len(sa), "n_b": len(sb), "shared": len(sa & sb)})
    return pd.DataFrame(rows)
