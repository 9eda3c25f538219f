"""Interventions on model units: MLP neurons and attention heads, by hook."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from ..core.params import linear_slot
from ..core.sites import Site
from ..core.window import local_positions
from .base import (
    Intervention,
    NotFoldable,
    Overlap,
    as_layer_dict,
    check_positions,
    jaccard,
    register_intervention,
)
from .profile import CALIPER_SD, UnitProfile, caliper_match, cost_match, match_record

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


def scale_hook(index: Int[Tensor, " k"], factor: float, positions, head_axis: bool):
    """Hook multiplying ``act[:, pos, index]`` (``act[:, pos, head, :]`` for heads) by ``factor``."""

    def hook(act, hook):
        local = local_positions(positions, act.shape[1])
        pos: slice | Tensor
        if isinstance(local, list):
            if not local:
                return None
            pos = torch.tensor(local, dtype=torch.long, device=act.device)[:, None]
        else:
            pos = local
        idx = index.to(act.device)
        sel = (slice(None), pos, idx[None, :] if not isinstance(pos, slice) else idx)
        out = act.clone()
        out[sel] = act[sel] * factor if factor != 0 else 0.0
        return out

    return hook


def _fold_scale(model: TransformerBridge, params: dict[str, Tensor], layer: int, component: str, index: Tensor, factor: float,
                side: str) -> None:
    """Multiply the ``index`` inputs (``side="in"``) or outputs (``side="out"``, with the bias) of a linear layer
    by ``factor``: a hook scaling that layer's input (or output) units at every position, written as weights."""
    try:
        w, b, transposed = linear_slot(model, layer, component)
    except ValueError as err:
        raise NotFoldable(str(err)) from err
    dim = (0 if transposed else 1) if side == "in" else (1 if transposed else 0)
    params[w].index_copy_(dim, index, params[w].index_select(dim, index) * factor)
    if side == "out" and b is not None:
        params[b][index] = params[b][index] * factor


def _need_all_positions(iv: Intervention) -> None:
    if str(iv.positions) != "all":
        raise NotFoldable(f"{iv.describe()}: it acts at {iv.positions} positions only, and a weight change acts at "
                          "every position")


def _check(items: dict[int, list[int]], n_layers: int, size: int, what: str) -> None:
    for l, idx in items.items():
        if not 0 <= l < n_layers:
            raise ValueError(f"{what} layer {l} is outside 0..{n_layers - 1}")
        if idx and not (min(idx) >= 0 and max(idx) < size):
            raise ValueError(f"{what} index out of range 0..{size - 1} in layer {l}")


def random_per_layer(items: dict[int, list[int]], size: int, rng: np.random.Generator,
                      exclude_selected: bool = True) -> dict[int, list[int]]:
    """The same number of units per layer, drawn uniformly (excluding the selected ones when possible)."""
    out = {}
    for l, idx in items.items():
        pool = np.setdiff1d(np.arange(size), idx) if exclude_selected else np.arange(size)
        if len(pool) < len(idx):
            pool = np.arange(size)
        out[l] = sorted(int(i) for i in rng.choice(pool, size=len(idx), replace=False))
    return out


@register_intervention
@dataclass
class NeuronIntervention(Intervention):
    """Zero or scale MLP neurons (the ``post`` site, ``blocks.{l}.mlp.hook_post``).

    Args:
        neurons: ``(layer, neuron)`` pairs.
        factor: ``0`` suppresses (BNS / neuron pruning), ``2`` amplifies.
        positions: ``"all"``, ``"last"`` (the prediction position) or a list of absolute positions.
        label: a name for tables and figures.
    """

    neurons: Any  # {layer: [index, ...]} or [(layer, index), ...]; normalised to the dict form
    factor: float = 0.0
    positions: Any = "all"
    label: str = ""
    kind: ClassVar[str] = "neurons"

    def __post_init__(self):
        self.neurons = as_layer_dict(self.neurons)

    @property
    def n_components(self) -> int:
        return sum(len(v) for v in self.neurons.values())

    @property
    def sites(self) -> list[Site]:
        return [Site(l, "post", tuple(idx), self.positions) for l, idx in self.neurons.items()]

    def validate(self, model: TransformerBridge) -> None:
        _check(self.neurons, model.cfg.n_layers, model.cfg.d_mlp, "neuron")
        check_positions(self.positions, model)

    def overlap(self, other: Intervention) -> Overlap | None:
        return jaccard(set(self.as_pairs()), set(other.as_pairs())) if isinstance(other, NeuronIntervention) else None

    def hooks(self, model: TransformerBridge):
        self.validate(model)
        return [(s, scale_hook(torch.tensor(s.index, dtype=torch.long), self.factor, self.positions, head_axis=False))
                for s in self.sites]

    def fold(self, model: TransformerBridge, params: dict[str, Tensor]) -> None:
        """Scale (zero) the neurons' columns of the down-projection: ``W_out (f * a) = (f * W_out[:, i]) a``."""
        self.validate(model)
        self.check_foldable()
        for l, idx in self.neurons.items():
            _fold_scale(model, params, l, "mlp.out", torch.tensor(idx, dtype=torch.long), self.factor, "in")

    def check_foldable(self) -> None:
        _need_all_positions(self)

    def random_like(self, model: TransformerBridge, seed: int) -> NeuronIntervention:
        """The same number of neurons in each layer, drawn uniformly from the unselected ones."""
        out = random_per_layer(self.neurons, model.cfg.d_mlp, np.random.default_rng(seed))
        return NeuronIntervention(out, self.factor, self.positions, label="random neurons")

    def controls(self, model: TransformerBridge, n: int, seed: int, *, profile: UnitProfile | None = None,
                 kinds: tuple[str, ...] = ("random",)) -> dict[str, list[Intervention]]:
        """``random`` (uniform per layer), ``matched`` (per layer, among the 5 unselected neurons closest in
        mean ``|activation| x ||W_out row||``, within a caliper) and ``matched_cost`` (:func:`cost_match`: per
        layer, among the 8 closest in magnitude, one whose own ablation cost lies within a caliper of the
        selected neuron's; ``n`` draws, the costs measured once on the selection neutral texts)."""
        out = super().controls(model, n, seed, profile=profile, kinds=kinds)
        if profile is None:
            return out
        if "matched" in kinds and n > 0:
            draws: list[Intervention] = []
            sel_logs, ctl_logs, unmatched, calipers = [], [], [], {}
            for k in range(n):
                rng = np.random.default_rng(seed + 211 * (k + 1))
                drawn: dict[int, list[int]] = {}
                for l, idx in self.neurons.items():
                    mags = profile.neuron_magnitude[l]
                    matches, missing, calipers[l] = caliper_match(mags, idx, rng)
                    # a unit with no match inside the caliper (a hub) enters the control as itself: both arms
                    # carry it, and the comparison tests the matched units alone
                    drawn[l] = [matches.get(i, i) for i in idx]
                    logs = np.log(np.clip(mags.double().numpy(), 1e-12, None))
                    sd = float(logs.std()) or 1.0  # balance in units of the layer's SD (the caliper's unit)
                    sel_logs += [logs[i] / sd for i in matches]
                    ctl_logs += [logs[j] / sd for j in matches.values()]
                    if k == 0:
                        unmatched += [[int(l), int(i)] for i in missing]
                draws.append(NeuronIntervention(drawn, self.factor, self.positions,
                                                label="neurons matched on magnitude (caliper 0.2 SD of log "
                                                      "magnitude; unmatched units kept as themselves)"))
            info = match_record("log(mean |activation| x ||W_out row||)",
                                {str(l): c for l, c in calipers.items()}, unmatched, self.n_components, n,
                                sel_logs, ctl_logs, "the layer's log magnitudes")
            for d in draws:
                d.match_info = info
            out["matched"] = draws
            if unmatched:
                alone: dict[int, list[int]] = {}
                for l, i in unmatched:
                    alone.setdefault(l, []).append(i)
                only = NeuronIntervention(alone, self.factor, self.positions,
                                          label="the selection's unmatched units alone")
                only.match_info = info
                out["unmatched_only"] = [only]
        if "matched_cost" in kinds and n > 0:
            cost_draws, cost_info = cost_match(model, profile, self.neurons, n, seed)
            out["matched_cost"] = []
            for drawn_cost in cost_draws:
                d = NeuronIntervention(drawn_cost, self.factor, self.positions,
                                       label="neurons matched on ablation cost (caliper 0.2 SD of the candidates' "
                                             "costs; unmatched units kept as themselves)")
                d.match_info = cost_info
                out["matched_cost"].append(d)
        return out

    def describe(self) -> str:
        op = "zero" if self.factor == 0 else f"x{self.factor:g}"
        return f"{op} {self.n_components} MLP neurons at {self.positions} positions"

    def to_dict(self):
        return {"neurons": {str(k): v for k, v in self.neurons.items()}, "factor": self.factor,
                "positions": self.positions, "label": self.label}

    @classmethod
    def from_dict(cls, d, tensors):
        return cls(neurons={int(k): v for k, v in d["neurons"].items()}, factor=d.get("factor", 0.0),
                   positions=d.get("positions", "all"), label=d.get("label", ""))

    def as_pairs(self) -> list[tuple[int, int]]:
        return [(l, i) for l, idx in self.neurons.items() for i in idx]


@register_intervention
@dataclass
class HeadIntervention(Intervention):
    """Ablate attention heads.

    ``mode="z"``: zero the head's output at ``hook_z`` (true output ablation). ``mode="q"``: zero its query
    at ``hook_q``; the attention logits become 0, so attention over the causal prefix is uniform and the head
    outputs the mean of its values (the Breaking Down Bias code's "head pruning").

    Args:
        heads: ``(layer, head)`` pairs.
        mode: ``"z"`` or ``"q"``.
        factor: multiply instead of zeroing (``0`` ablates).
        positions: ``"all"``, ``"last"`` or a list of absolute positions.
        label: a name for tables and figures.
    """

    heads: Any  # {layer: [head, ...]} or [(layer, head), ...]; normalised to the dict form
    mode: str = "z"
    factor: float = 0.0
    positions: Any = "all"
    label: str = ""
    kind: ClassVar[str] = "heads"

    def __post_init__(self):
        self.heads = as_layer_dict(self.heads)
        if self.mode not in ("z", "q"):
            raise ValueError(f"head ablation mode must be 'z' or 'q', not {self.mode!r}")

    @property
    def n_components(self) -> int:
        return sum(len(v) for v in self.heads.values())

    @property
    def sites(self) -> list[Site]:
        return [Site(l, self.mode, tuple(idx), self.positions) for l, idx in self.heads.items()]

    def validate(self, model: TransformerBridge) -> None:
        _check(self.heads, model.cfg.n_layers, model.cfg.n_heads, "head")
        check_positions(self.positions, model)

    def overlap(self, other: Intervention) -> Overlap | None:
        return jaccard(set(self.as_pairs()), set(other.as_pairs())) if isinstance(other, HeadIntervention) else None

    def hooks(self, model: TransformerBridge):
        self.validate(model)
        return [(s, scale_hook(torch.tensor(s.index, dtype=torch.long), self.factor, self.positions, head_axis=True))
                for s in self.sites]

    def fold(self, model: TransformerBridge, params: dict[str, Tensor]) -> None:
        """``z``: scale the head's input columns of the output projection; ``q``: scale its query rows and query
        bias (the rotary embedding is linear, so a zero query stays zero)."""
        self.validate(model)
        self.check_foldable()
        dh = model.cfg.d_head
        for l, heads in self.heads.items():
            idx = torch.tensor([h * dh + k for h in heads for k in range(dh)], dtype=torch.long)
            if self.mode == "z":
                _fold_scale(model, params, l, "attn.o", idx, self.factor, "in")
            else:
                _fold_scale(model, params, l, "attn.q", idx, self.factor, "out")

    def check_foldable(self) -> None:
        _need_all_positions(self)

    def random_like(self, model: TransformerBridge, seed: int) -> HeadIntervention:
        """The same number of heads in each layer, drawn uniformly from the unselected ones."""
        out = random_per_layer(self.heads, model.cfg.n_heads, np.random.default_rng(seed))
        return HeadIntervention(out, self.mode, self.factor, self.positions, label="random heads")

    def controls(self, model: TransformerBridge, n: int, seed: int, *, profile: UnitProfile | None = None,
                 kinds: tuple[str, ...] = ("random",)) -> dict[str, list[Intervention]]:
        """``random`` (uniform per layer) and ``matched``: each selected head replaced by an unselected head of
        similar mean output norm ``||z_h W_O,h||``, within a caliper of 0.2 SD of the log norms of all heads:
        one of the 2 closest in its own layer when one lies inside the caliper, else one of the 2 closest in any
        layer (a layer holds few heads), else none (the head enters the control as itself, both arms carry it,
        and it is listed as unmatched). ``match_info`` reports the caliper, the balance (mean log norm of the
        matched selected heads minus their controls, in SDs) and how many matches left their layer."""
        out = super().controls(model, n, seed, profile=profile, kinds=kinds)
        if profile is None or "matched" not in kinds or n <= 0:
            return out
        norms = profile.head_norm.double()
        logs = np.log(np.clip(norms.numpy(), 1e-12, None))
        sd = float(logs.std()) or 1.0
        caliper = CALIPER_SD * sd
        selected = set(self.as_pairs())
        flat = [(l, h) for l in range(logs.shape[0]) for h in range(logs.shape[1]) if (l, h) not in selected]
        draws: list[Intervention] = []
        unmatched: list[list[int]] = []
        sel_logs, ctl_logs, moved = [], [], 0
        for k in range(n):
            rng = np.random.default_rng(seed + 211 * (k + 1))
            taken: set = set()
            drawn: dict[int, list[int]] = {}
            for l, h in self.as_pairs():
                v = logs[l, h]
                near = sorted(((abs(logs[a, b] - v), a, b) for a, b in flat if (a, b) not in taken),
                              key=lambda t: t[0])
                same = [(a, b) for d, a, b in near if a == l and d <= caliper][:2]
                anywhere = [(a, b) for d, a, b in near if d <= caliper][:2]
                pool = same or anywhere
                if not pool:
                    drawn.setdefault(l, []).append(h)
                    if k == 0:
                        unmatched.append([int(l), int(h)])
                    continue
                a, b = pool[int(rng.integers(len(pool)))]
                taken.add((a, b))
                drawn.setdefault(a, []).append(b)
                sel_logs.append(v / sd)
                ctl_logs.append(logs[a, b] / sd)
                moved += int(a != l)
            draws.append(HeadIntervention(drawn, self.mode, self.factor, self.positions,
                                          label="heads matched on output norm (caliper 0.2 SD of log norm)"))
        info = match_record("log(mean ||z_h W_O,h||)", caliper, unmatched, self.n_components, n, sel_logs,
                            ctl_logs, "all heads' log norms", matches_in_another_layer=moved)
        for d in draws:
            d.match_info = info
        out["matched"] = draws
        return out

    def describe(self) -> str:
        what = "output (hook_z)" if self.mode == "z" else "query (hook_q, uniform attention)"
        return f"ablate {self.n_components} attention heads by zeroing their {what}"

    def to_dict(self):
        return {"heads": {str(k): v for k, v in self.heads.items()}, "mode": self.mode,
                "factor": self.factor, "positions": self.positions, "label": self.label}

    @classmethod
    def from_dict(cls, d, tensors):
        return cls(heads={int(k): v for k, v in d["heads"].items()}, mode=d.get("mode", "z"),
                   factor=d.get("factor", 0.0), positions=d.get("positions", "all"), label=d.get("label", ""))

    def as_pairs(self) -> list[tuple[int, int]]:
        return [(l, h) for l, idx in self.heads.items() for h in idx]
