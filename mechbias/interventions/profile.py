"""What matched controls match on: how large each unit is on neutral text, and what its ablation costs.

A random control that copies only the count of units per layer compares a
selection with near-inert units: on the embedded model IG² selects neuron
(28, 1095), whose mean |activation| x ||W_out row|| ranks first of 1536 in its
layer and whose ablation alone costs +4.7 perplexity, while uniform random
neurons of that layer cost about ±0.02. A :class:`UnitProfile`, measured once
per model on the **selection** half of the neutral texts, lets each
intervention type draw controls of the same size:

* neurons: per layer, mean |activation| x ||W_out row|| (magnitude), and on
  request the perplexity cost of zeroing one neuron (measured for candidates
  only, and cached);
* heads: per layer, the mean norm of the head's output ``z_h W_O,h``;
* weights: per linear layer, Wanda's ``||X_j||`` (so ``|W_ij| ||X_j||`` is each
  weight's score).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.hooks import hooked
from ..core.params import linear_layers, linear_weight_name, named_params, w_out_row_norms
from ..core.runner import length_buckets, sequence_nll
from ..core.sites import hook_name
from ..data.neutral import neutral_texts
from ..data.prompts import tokenize

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


class NoMatchedControl(ValueError):
    """A layer has too few unselected units to draw a matched control; the control is left out."""


@dataclass
class UnitProfile:
    """Unit sizes and ablation costs on the selection neutral texts, from which matched controls are drawn."""
    neuron_magnitude: Tensor  # [layers, d_mlp]
    head_norm: Tensor  # [layers, heads]
    input_norms: dict[str, Tensor]  # linear parameter name -> ||X_j|| per input dimension
    seqs: list = field(default_factory=list, repr=False)  # token ids of the texts (for ablation costs)
    base_nll: float = float("nan")
    n_tokens: int = 0
    neuron_costs: dict = field(default_factory=dict)  # (layer, neuron) -> perplexity change

    def neuron_cost(self, model: TransformerBridge, layer: int, neuron: int) -> float:
        """Perplexity change when this neuron alone is zeroed at every position (measured once, cached)."""
        key = (int(layer), int(neuron))
        if key not in self.neuron_costs:
            idx = torch.tensor([key[1]])

            def zero(act, hook):
                out = act.clone()
                out[..., idx] = 0.0
                return out

            with hooked(model, [(hook_name("post", key[0]), zero)]):
                nll, n = sequence_nll(model, self.seqs)
            self.neuron_costs[key] = float(np.exp(nll / n) - np.exp(self.base_nll / self.n_tokens))
        return self.neuron_costs[key]


def unit_profile(model: TransformerBridge, texts: list[str] | None = None, *, max_tokens: int = 2048) -> UnitProfile:
    """Measure a model's units on ``texts`` (default: the selection half of the neutral texts)."""
    texts = list(texts) if texts is not None else neutral_texts(split="selection")
    seqs = tokenize(model, texts)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    d_head = model.cfg.d_head
    params = named_params(model)
    w_o = []
    for l in range(L):
        w = params[linear_weight_name(model, l, "attn.o")].detach().float()
        w = w if w.shape[1] == H * d_head else w.T  # [d_model, H * d_head] whatever the layout
        w_o.append(w.reshape(w.shape[0], H, d_head))
    layers = linear_layers(model)
    act_sum = torch.zeros(L, model.cfg.d_mlp, dtype=torch.float64)
    head_sum = torch.zeros(L, H, dtype=torch.float64)
    sq: dict[str, Tensor] = {}
    tokens = 0
    with torch.no_grad():
        for bucket in length_buckets([len(s) for s in seqs], max_tokens):
            ids = torch.stack([seqs[i] for i in bucket]).to(model.cfg.device)
            tokens += ids.numel()
            seen: dict = {}
            fwd = [(hook_name("post", l), lambda a, hook, l=l, seen=seen: seen.__setitem__(("post", l), a.abs().sum((0, 1))))
                   for l in range(L)]
            fwd += [(hook_name("z", l), lambda z, hook, l=l, seen=seen: seen.__setitem__(
                ("z", l), torch.einsum("bphd,mhd->bphm", z.float(), w_o[l].to(z.device)).norm(dim=-1).sum((0, 1))))
                for l in range(L)]
            fwd += [(hook, lambda x, hook, n=name, seen=seen: seen.__setitem__(
                ("in", n), (x.reshape(x.shape[0] * x.shape[1], -1).double() ** 2).sum(0))) for name, hook, _, _ in layers]
            with hooked(model, fwd):
                model(ids)
            for l in range(L):
                act_sum[l] += seen[("post", l)].double().cpu()
                head_sum[l] += seen[("z", l)].double().cpu()
            for name, _, _, _ in layers:
                v = seen[("in", name)].cpu()
                sq[name] = sq[name] + v if name in sq else v
    magnitude = (act_sum / tokens) * torch.stack([w_out_row_norms(model, l).double() for l in range(L)])
    base_nll, n = sequence_nll(model, seqs)
    return UnitProfile(magnitude.float(), (head_sum / tokens).float(),
                       {k: (v / tokens).sqrt().float() for k, v in sq.items()}, seqs, base_nll, n)


#: the caliper of matched controls, in standard deviations of the matched covariate (log size) within a layer
#: (the usual 0.2 SD rule of propensity matching)
CALIPER_SD = 0.2


def caliper_match(values: Float[Tensor, " units"], selected: list[int], rng: np.random.Generator, *, k: int = 5,
                  caliper_sd: float = CALIPER_SD) -> tuple[dict[int, int], list[int], float]:
    """For each selected index, one of the ``k`` unselected indices closest in log value **within a caliper**
    of ``caliper_sd`` standard deviations of the log values (drawn at random among them, without reuse).

    Returns ``(matches, unmatched, caliper)``: selected index -> its match, the selected indices that no
    unselected unit lies within the caliper of (a hub neuron far larger than every other, say: a property
    of the selection, the same in every draw), and the caliper in log units. A matchable unit whose
    candidates inside the caliper were all taken by earlier matches of the same draw gets the nearest
    untaken unit (rare; such draws are counted by the caller's balance)."""
    v = np.log(np.clip(values.double().numpy(), 1e-12, None))
    caliper = float(caliper_sd * v.std())
    sel = set(int(i) for i in selected)
    unselected = np.array([j for j in range(len(v)) if j not in sel], dtype=np.int64)
    unmatched = [int(i) for i in selected
                 if not len(unselected) or np.abs(v[unselected] - v[i]).min() > caliper]
    taken = set(sel)
    matches: dict[int, int] = {}
    for i in selected:
        if int(i) in unmatched:
            continue
        order = [int(j) for j in np.argsort(np.abs(v - v[i])) if int(j) not in taken]
        if not order:
            raise NoMatchedControl("not enough unselected units to draw a matched control")
        pool = [j for j in order[:k] if abs(v[j] - v[i]) <= caliper] or order[:1]
        j = int(rng.choice(pool))
        matches[int(i)] = j
        taken.add(j)
    return matches, unmatched, caliper


class MatchInfo(TypedDict, total=False):
    """What a matched control records (:func:`match_record`); ``matches_in_another_layer`` for heads, the
    last three for cost-matched neurons."""

    covariate: str
    caliper_sd: float
    caliper_log: Any
    unmatched: list
    n_matched_units: int
    n_draws: int
    balance_smd: float
    balance_note: str
    matches_in_another_layer: int
    candidates: str
    cost_sd: float
    kept_for_want_of_a_free_match: int


def match_record(covariate: str, caliper_log, unmatched: list, n_components: int, n_draws: int,
                 sel_logs: list[float], ctl_logs: list[float], scale: str, *,
                 matches_in_another_layer: int | None = None, candidates: str | None = None,
                 cost_sd: float | None = None, kept_for_want_of_a_free_match: int | None = None) -> MatchInfo:
    """What a matched control records (``match_info``): the covariate, the caliper, the unmatched units, and the
    balance: the mean covariate of the matched selected units minus their controls', in the SDs ``scale``
    names (at most the caliper by construction)."""
    info: MatchInfo = {"covariate": covariate, "caliper_sd": CALIPER_SD, "caliper_log": caliper_log,
                       "unmatched": unmatched, "n_matched_units": n_components - len(unmatched), "n_draws": n_draws}
    if matches_in_another_layer is not None:
        info["matches_in_another_layer"] = matches_in_another_layer
    if candidates is not None:
        info["candidates"], info["cost_sd"] = candidates, float(cost_sd or 0.0)
        info["kept_for_want_of_a_free_match"] = int(kept_for_want_of_a_free_match or 0)
    return {**info,
            "balance_smd": float(np.mean(sel_logs) - np.mean(ctl_logs)) if sel_logs else float("nan"),
            "balance_note": f"mean log covariate of the matched selected units minus their controls, in SDs of "
                            f"{scale} (|d| <= the caliper by construction)"}


def cost_match(model: TransformerBridge, profile: UnitProfile, neurons: dict[int, list[int]], n_draws: int, seed: int, *,
               k: int = 8, caliper_sd: float = CALIPER_SD) -> tuple[list[dict[int, list[int]]], MatchInfo]:
    """Draws of neurons matched to ``neurons`` on **ablation cost**, within a caliper.

    Each selected neuron's candidates are the ``k`` unselected neurons of its layer closest in log magnitude;
    the ablation cost of each (the perplexity change when it alone is zeroed, :meth:`UnitProfile.neuron_cost`)
    is measured once. The caliper is ``caliper_sd`` SDs of the candidates' costs (the neurons a match is drawn
    from). A selected neuron with no candidate inside its caliper (a hub whose ablation costs far more than
    every neighbour) is **unmatched** and enters each draw as itself, as in :func:`caliper_match`; every other
    neuron gets a candidate drawn at random among those inside the caliper, without reuse within a draw. Where
    earlier matches of the same draw took all of them, the neuron enters that draw as itself too (counted in
    ``kept_for_want_of_a_free_match``), so no drawn neuron lies outside its caliper.

    Returns:
        ``(draws, info)``: one ``{layer: [neurons]}`` per draw, and the :func:`match_record` of the matching
        (covariate, caliper, unmatched neurons, balance in SDs of the candidates' costs).
    """
    pools: dict[tuple[int, int], list[int]] = {}
    cost: dict[tuple[int, int], float] = {}
    for layer, idx in neurons.items():
        mag = np.log(np.clip(profile.neuron_magnitude[layer].double().numpy(), 1e-12, None))
        sel = set(int(i) for i in idx)
        for i in idx:
            pool = [int(j) for j in np.argsort(np.abs(mag - mag[i]), kind="stable") if int(j) not in sel][:k]
            if not pool:
                raise NoMatchedControl("not enough unselected neurons to draw a cost-matched control")
            pools[(layer, int(i))] = pool
            for u in [int(i), *pool]:
                if (layer, u) not in cost:
                    cost[(layer, u)] = float(profile.neuron_cost(model, layer, u))
    cand = sorted({(layer, j) for (layer, _), pool in pools.items() for j in pool})
    sd = float(np.std([cost[c] for c in cand])) or 1.0
    caliper = caliper_sd * sd
    unmatched = [[layer, i] for (layer, i), pool in pools.items()
                 if min(abs(cost[(layer, j)] - cost[(layer, i)]) for j in pool) > caliper]
    skip = {tuple(u) for u in unmatched}
    draws: list[dict[int, list[int]]] = []
    sel_z, ctl_z = [], []
    crowded = 0
    for d in range(n_draws):
        rng = np.random.default_rng(seed + 307 * (d + 1))
        drawn: dict[int, list[int]] = {}
        for layer, idx in neurons.items():
            taken = set(int(i) for i in idx)
            chosen = []
            for i in idx:
                key = (layer, int(i))
                if key in skip:
                    chosen.append(int(i))
                    continue
                inside = [j for j in pools[key] if j not in taken and abs(cost[(layer, j)] - cost[key]) <= caliper]
                if not inside:  # its candidates inside the caliper went to earlier matches of this draw
                    chosen.append(int(i))
                    crowded += 1
                    continue
                j = int(rng.choice(inside))
                chosen.append(j)
                taken.add(j)
                sel_z.append(cost[key] / sd)
                ctl_z.append(cost[(layer, j)] / sd)
            drawn[layer] = chosen
        draws.append(drawn)
    n_units = sum(len(v) for v in neurons.values())
    info = match_record("ablation cost (perplexity change on the selection neutral texts)", caliper, unmatched,
                        n_units, n_draws, sel_z, ctl_z, "the candidates' costs",
                        candidates=f"the {k} unselected neurons of the layer closest in log magnitude",
                        cost_sd=sd, kept_for_want_of_a_free_match=crowded)
    return draws, info
