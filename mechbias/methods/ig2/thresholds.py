"""IG² neuron selection: the paper's three thresholds, a top-k alternative, a capability guard, overlap."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from jaxtyping import Int
from torch import Tensor

from ...core.results import Result
from ...data.neutral import neutral_texts
from ...eval.metrics import perplexity
from ...interventions.base import as_layer_dict
from ...interventions.units import NeuronIntervention, random_per_layer
from ...viz.method_figures import plot_layer_histogram
from .attribution import IG2Result

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

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

    def without(self, neurons: Sequence[tuple[int, int]], reason: str = "excluded") -> NeuronSelection:
        """A copy without the given neurons (recorded in ``thresholds``)."""
        drop = {(int(l), int(i)) for l, i in neurons}
        kept = [[l, i] for l, i in self.as_pairs() if (l, i) not in drop]
        th = {**self.thresholds, reason: sorted([list(n) for n in drop & set(self.as_pairs())])}
        return NeuronSelection(kept, dict(self.per_bag), th, self.n_layers, self.d_mlp, dict(self.meta))

    def layer_histogram(self) -> Int[np.ndarray, " layer"]:
        """How many selected neurons each layer holds."""
        h = np.zeros(self.n_layers, dtype=int)
        for l, _ in self.neurons:
            h[l] += 1
        return h

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.neurons, columns=["layer", "neuron"])

    def plot(self, ax=None):
        return plot_layer_histogram(self.layer_histogram(), ax=ax, title=f"{len(self)} selected neurons")


def _prompt_sets(attrs: Tensor, frac: float) -> list[set[int]]:
    out = []
    for a in attrs:
        flat = a.flatten()
        mx = float(flat.max())
        out.append(set((flat >= frac * mx).nonzero().flatten().tolist()) if mx > 0 else set())
    return out


def neuron_costs(model: TransformerBridge, selection: NeuronSelection | Sequence[tuple[int, int]], *,
                 texts: Sequence[str] | None = None, max_texts: int | None = None) -> dict[tuple[int, int], float]:
    """Perplexity change on the neutral texts when each neuron alone is zeroed (all positions).

    IG² can select "hub" neurons that matter for everything (on the embedded model one neuron,
    (28, 1095), is selected in every context and costs +4.7 perplexity alone); use with
    :func:`capability_guard` to drop them before suppression."""
    pairs = selection.as_pairs() if isinstance(selection, NeuronSelection) else [(int(l), int(i)) for l, i in selection]
    texts = list(texts) if texts is not None else neutral_texts(max_texts, split="selection")
    base = perplexity(model, texts)
    return {n: perplexity(model, texts, intervention=NeuronIntervention([n])) - base for n in pairs}


def capability_guard(model: TransformerBridge, selection: NeuronSelection, max_ppl_increase: float = 0.5, *,
                     costs: dict[tuple[int, int], float] | None = None, **kw) -> NeuronSelection:
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
    min_per_bag: int = 3,
    per_relation: float = 0.1,
    adapt: bool = True,
    target_per_bag: tuple[float, float] = (2, 5),
    max_rounds: int = 6,
    step: float = 0.05,
) -> NeuronSelection:
    """The paper's selection: per prompt ≥ ``per_prompt`` × max; per bag in ≥ ``per_bag`` of its
    prompts and in at least ``min_per_bag`` of them (the authors' code: 3; a bag with fewer prompts
    selects nothing), the share adapted by ±``step`` for up to ``max_rounds`` rounds so bags hold
    ``target_per_bag`` neurons on average; per relation in ≥ ``per_relation`` of the bags (with fewer
    than 10 bags and the default 10%, one bag suffices: a union)."""
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
            need = max(1, min_per_bag, math.ceil(th * len(idx) - 1e-9))
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
         "min_per_bag": min_per_bag,
         "per_relation": per_relation, "adapt_rounds": rounds, "n_bags": len(bags)},
        L, d, dict(result.meta),
    )


def top_k_selection(result: IG2Result, k: int) -> NeuronSelection:
    """The k neurons with the largest mean attribution (a simpler alternative)."""
    L, d = result.attributions.shape[1:]
    return NeuronSelection([[l, i] for l, i, _ in result.top(k)], {}, {"top_k": k}, L, d, dict(result.meta))


def _random_pairs(pairs: set, d_mlp: int, seed: int) -> set:
    """Random neurons with the same per-layer counts (no exclusion: a chance baseline, not a control)."""
    drawn = random_per_layer(as_layer_dict(pairs), d_mlp, np.random.default_rng(seed), exclude_selected=False)
    return {(l, i) for l, idx in drawn.items() for i in idx}


def selection_overlap(selections: dict[str, NeuronSelection], d_mlp: int, *, n_draws: int = 200, seed: int = 0):
    """Jaccard overlap of selected neuron sets between contexts, with a chance baseline.

    The chance value of a cell is the mean Jaccard of random sets with the same
    per-layer counts as the two selections (``n_draws`` draws).
    Returns a DataFrame with ``a``, ``b``, ``jaccard``, ``chance``, ``n_a``, ``n_b``.
    """
    import pandas as pd

    names = list(selections)
    rows = []
    for _i, a in enumerate(names):
        for b in names:
            sa, sb = set(selections[a].as_pairs()), set(selections[b].as_pairs())
            j = len(sa & sb) / len(sa | sb) if sa | sb else float("nan")
            ch = []
            for k in range(n_draws if a != b else 0):
                ra = _random_pairs(sa, d_mlp, seed + 2 * k)
                rb = _random_pairs(sb, d_mlp, seed + 2 * k + 1)
                ch.append(len(ra & rb) / len(ra | rb) if ra | rb else float("nan"))
            rows.append({"a": a, "b": b, "jaccard": j, "chance": float(np.nanmean(ch)) if ch else 1.0,
                         "n_a": len(sa), "n_b": len(sb), "shared": len(sa & sb)})
    return pd.DataFrame(rows)
