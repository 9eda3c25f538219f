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

**Masked LMs** (the paper's setting: BERT at ``[MASK]``): the prediction position is the prompt's
mask (:func:`mechbias.core.runner.readout_ids` inserts one after a prompt without one); neurons are
read and scaled there, every position runs (no prefix can be shared in a bidirectional model) and
the result's config says ``path = "exact"``.

**Fast path.** For a causal model scored at the last position, scaling a
neuron there changes only the last position's residual stream. So the prefix
runs once into a frozen KV cache, and the m scaled copies of layer ``l`` are
created *inside* the forward pass, at ``blocks.{l}.hook_resid_pre`` of the last
token, so they only run through layers ≥ l. All layers and steps share one
forward and one backward. The rows attend over the frozen prefix without a copy
of it per row and head (:mod:`mechbias.core.prefix_attention`, self-checked). Models without KV-cache support (TransformerLens
native) use the same batch growth over the full sequence. ``method="reference"``
is the slow obvious loop over layers and steps, kept for tests and benchmarks.
Units live in :mod:`.units`, selection in :mod:`.selection`, the paper's
verification in :mod:`.verify`, and the registered method in :mod:`.method`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ...core.families import is_masked_lm
from ...core.fastpath import position_unembed, prefix_cache, use_kv_cache, use_prefix_attention
from ...core.hooks import hooked, run_with_cache
from ...core.params import frozen
from ...core.prefix_attention import prefix_attention
from ...core.results import Result, make_meta
from ...core.runner import readout_ids
from ...core.sites import hook_name
from ...core.window import forward_window, readout_position
from ...data.prompts import single_token, tokenize
from ...viz.method_figures import plot_attribution
from .inputs import Unit

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

Rule = Literal["left", "right", "middle", "trapezoid", "gauss"]
RULES: tuple[str, ...] = get_args(Rule)


def integration_points(steps: int, rule: str = "left") -> tuple[Tensor, Tensor]:
    """Points ``α_k`` and weights ``c_k`` of a rule on [0, 1] (weights sum to 1).

    ``left`` is the authors' rule. ``gauss`` is Gauss–Legendre (numpy's nodes mapped from [-1, 1]): exact for
    polynomials of degree ``2·steps - 1``, so a smooth path integral needs far fewer points; its nodes are
    interior, so α = 0 is added by the caller only to read ``G(0)``, with weight 0."""
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
    if rule == "gauss":
        nodes, wts = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy((nodes + 1) / 2), torch.from_numpy(wts / 2)
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


def gap_fn(d1: int, d2: int, kind: str):
    """The demographic gap of logits as a function, by ``kind`` (``prob``, ``abs_prob``, ``logprob``, ``logit``, ``target_prob``)."""
    if kind not in ("prob", "abs_prob", "logprob", "logit", "target_prob"):
        raise ValueError(f"unknown gap kind {kind!r}; choose from prob, abs_prob, logprob, logit, target_prob")
    return lambda lg: _Gap.apply(lg.reshape(-1, lg.shape[-1]), d1, d2, kind).reshape(lg.shape[:-1])


def ig2_prompt(
    model: TransformerBridge,
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
    """IG² of every neuron at the prediction position of one prompt (see module docstring).

    Args:
        model: the model.
        tokens: 1-D token ids (BOS included); the gap is read after the last token (a masked LM: at the
            prompt's mask, inserted after the text when it has none).
        d1: token id of the first prediction.
        d2: token id of the second prediction.
        kind: the gap (:func:`gap_fn`): ``"prob"`` is the paper's probability difference.
        steps: Riemann steps of the path integral (the paper: 20).
        rule: the Riemann rule: ``"left"`` (the authors' code), ``"right"``, ``"middle"``, ``"trapezoid"``, ``"gauss"`` (Gauss–Legendre).
        layers: the layers attributed (default all).
        method: ``"fast"`` (all layers and steps in batched passes) or ``"reference"`` (the slow obvious loop over layers and steps).
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
    tokens, at = readout_ids(model, tokens)
    layers = list(range(model.cfg.n_layers)) if layers is None else sorted(set(int(l) for l in layers))
    alphas, weights = integration_points(steps, rule)
    if rule != "left":  # add an unweighted α = 0 point so completeness is known
        alphas = torch.cat([torch.zeros(1, dtype=torch.float64), alphas])
        weights = torch.cat([torch.zeros(1, dtype=torch.float64), weights])
    zero_idx = int((alphas == 0).nonzero()[0])
    gap = gap_fn(d1, d2, kind)
    with frozen(model):
        if method == "reference":
            return _reference(model, tokens, gap, layers, alphas, weights, zero_idx, position, at)
        if method == "fast":
            return _fast(model, tokens, gap, layers, alphas, weights, zero_idx, internal_batch_size, position, at)
    raise ValueError(f"method must be 'fast' or 'reference', not {method!r}")


def _reference(model: TransformerBridge, tokens, gap, layers, alphas, weights, zero_idx, position="last", at=-1) -> PromptIG:
    """Plain loop: one full forward and backward per (layer, step)."""
    at = at % len(tokens)
    sl = slice(at, at + 1) if position == "last" else slice(None)
    L, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    ids = tokens.to(model.cfg.device)[None]
    attr = torch.zeros(L, d_mlp, dtype=torch.float64)
    g0 = torch.full((L,), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        logits, cache = run_with_cache(model, ids, [hook_name("post", l) for l in layers])
        g1 = float(gap(logits[0, at].float()))
    for l in layers:
        base = cache[hook_name("post", l)][0, sl].detach().float()  # [positions scaled, d_mlp]
        total = torch.zeros(base.shape, dtype=torch.float64)
        for a, c in zip(alphas.tolist(), weights.tolist(), strict=True):
            leaf = (a * base).clone().requires_grad_(True)

            def put(act, hook, leaf=leaf):
                start = sl.start or 0
                return torch.cat([act[:, :start], leaf[None].to(act.dtype), act[:, start + leaf.shape[0]:]], dim=1)

            with hooked(model, [(hook_name("post", l), put)]):
                out = model(ids)
            g = gap(out[0, at].float())
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


def _fast(model: TransformerBridge, tokens, gap, layers, alphas, weights, zero_idx, cap, position="last", at=-1) -> PromptIG:
    L, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    device = model.cfg.device
    ids = tokens.to(device)[None]
    total = ids.shape[1]
    at = at % total
    # all positions: every position changes, so no prefix can be shared; nor in a bidirectional model
    use_kv = use_kv_cache(model) and total > 1 and position == "last" and at == total - 1 \
        and not is_masked_lm(model)
    n_pos = 1 if position == "last" else total
    cache = None
    if use_kv:
        with forward_window(0, total):
            cache = prefix_cache(model, ids[:, :-1])
        inp, start = ids[:, -1:], total - 1
    else:
        inp, start = ids, 0
    lo = at - start if position == "last" else 0  # first scaled position, in the current call
    al = alphas.float().to(device)
    grad_sum = torch.zeros(L, n_pos, d_mlp, dtype=torch.float64)
    bases: dict[int, Tensor] = {}
    g0 = torch.full((L,), float("nan"), dtype=torch.float64)
    g1: float | None = None
    for chunk in _chunks(layers, len(alphas), cap):
        leaves: dict[int, Tensor] = {}
        hooks: list = []
        for l, a0, a1 in chunk:
            n_new = a1 - a0

            def grow(x, hook, n_new=n_new):
                # new rows start as (constant) copies of the unscaled row 0: the
                # leaf of layer l only influences layers >= l, so nothing upstream
                # needs a gradient
                return torch.cat([x, x[:1].detach().expand(n_new, *x.shape[1:])], dim=0)

            def scale(act, hook, l=l, a0=a0, a1=a1, n_new=n_new, leaves=leaves):
                base = act[0, lo : lo + n_pos].detach()  # [n_pos, d_mlp]
                bases[l] = base.double().cpu()
                leaf = (al[a0:a1, None, None] * base[None]).requires_grad_(True)
                leaves[l] = leaf
                new = torch.cat([act[-n_new:, :lo], leaf.to(act.dtype), act[-n_new:, lo + n_pos:]], dim=1)
                return torch.cat([act[:-n_new], new], dim=0)

            hooks += [(hook_name("resid_pre", l), grow), (hook_name("post", l), scale)]
        with hooked(model, hooks), position_unembed(model, at - start), forward_window(start, total), \
                readout_position(at), prefix_attention(use_kv and use_prefix_attention(model)):
            logits = model(inp, past_key_values=cache) if use_kv else model(inp)
        # only the prediction position was unembedded: [rows, 1, vocab] -> [rows, vocab] as a view
        # (indexing would cost a dense zero-filled gradient buffer in the backward)
        g = gap(logits.reshape(-1, logits.shape[-1]))  # rows: [unscaled, block 1, block 2, ...]
        if g1 is None:
            g1 = float(g[0].detach())
        grads = torch.autograd.grad(g[1:].sum(), [leaves[l] for l, _, _ in chunk])
        row = 1
        for (l, a0, a1), gr in zip(chunk, grads, strict=True):
            c = weights[a0:a1]
            grad_sum[l] += (gr.double().cpu() * c[:, None, None]).sum(0)
            if a0 <= zero_idx < a1:
                g0[l] = float(g[row + zero_idx - a0].detach())
            row += a1 - a0
    attr = torch.zeros(L, d_mlp, dtype=torch.float64)
    for l in layers:
        attr[l] = (bases[l] * grad_sum[l]).sum(0)
    return PromptIG(attr, float(g1 if g1 is not None else float('nan')), g0)


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

    def aggregate(self) -> Float[Tensor, "layer d_mlp"]:
        """Mean attribution over units, ``[n_layers, d_mlp]``."""
        return self.attributions.mean(0)

    def top(self, k: int = 20) -> list[tuple[int, int, float]]:
        """The k neurons with the largest mean attribution: ``(layer, neuron, score)``."""
        agg = self.aggregate()
        vals, idx = agg.flatten().topk(k)
        d = agg.shape[1]
        return [(int(i) // d, int(i) % d, float(v)) for v, i in zip(vals, idx, strict=True)]

    def completeness_error(self) -> Float[Tensor, " layer"]:
        """Per layer: ``mean |sum(attr) - ΔG| / mean |ΔG|`` over units (relative error)."""
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

    def plot(self, selection=None):
        """Attributions per layer; ``selection`` (a :class:`~.selection.NeuronSelection`) is marked."""
        return plot_attribution(self, selection)


def run_ig2(
    model: TransformerBridge,
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
        for t, w in zip(u.texts, u.weights, strict=True):
            r = memo[(t, u.d1, u.d2)]
            attrs[k] += (w * r.attr).float()
            comp[k, :, 0] += w * r.attr.sum(1)
            comp[k, :, 1] += w * (r.g1 - r.g0)
    if method == "reference":
        path = "reference"
    elif is_masked_lm(model) or position == "all" or not use_kv_cache(model):
        path = "exact"  # every position runs (masked LM: at the mask)
    else:
        path = "fast"  # frozen prefix, scaled copies created inside the forward
    config = {"kind": kind, "steps": steps, "rule": rule, "method": method, "path": path,
              "layers": list(layers) if layers is not None else None, "position": position}
    meta = make_meta(model, n_prompts=len(todo))
    return IG2Result(attrs, comp, [{"texts": u.texts, "weights": u.weights, "d1": u.d1, "d2": u.d2, "bag": u.bag,
                                    **u.info} for u in units], config, meta)


