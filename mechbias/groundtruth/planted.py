"""Ground truth: a planted-bias variant of a model (layouts, unit choice; the trainer that makes it is
:mod:`mechbias.groundtruth.staged`).

A known, small set of units is **overwritten and trained** (every other weight
frozen) so that the contrast score (log-odds of the favourable answer) is
shifted by ``+shift`` for group-A names and ``-shift`` for group-B names, in
the contexts a unit is planted for and nowhere else. Three kinds of unit:

* **name-position neurons** (MLP neurons: ``W_gate``/``W_in`` rows and
  ``W_out`` column) that act where the name is written;
* **prediction-position neurons** that act only at the last position, where
  the answer is predicted (they read what attention has moved there);
* **attention heads** (their query rows and output columns; keys and values
  are shared with other heads under grouped-query attention and stay as they
  are) that read the name from the last position and write the shift there.

A penalty on a unit's output outside its position (``position_weight``) makes
the position part of its role; the manifest verifies it by ablating each unit
set at its own position and elsewhere. Sets are either **shared** (every
context) or **context-only** (their context, and a score left unchanged in the
others); prompts without a name (the templates with "the applicant" and
similar) keep their original score.

Training runs in stages so that each set has exactly its role: first the
shared set, then each context's sets in turn, with the earlier ones fixed. A
KL penalty to the original model on neutral text keeps everything else in
place. Because the units are overwritten rather than nudged, zeroing a planted
unit removes its planted effect exactly, which is what makes "did the method
find it?" well posed. The units chosen are the least used ones of their layers
(neurons: mean |activation| x ||W_out row||; heads: mean output norm, on the
selection half of the neutral text), so overwriting them costs little.

``load_model("planted")`` (= ``"planted-v2"``) loads the embedded model with the
shipped v2 delta (name-position neurons; shared ones carry most of every
context's gap). ``analyses/train_planted.py --version 3 --trained-v3`` trains the v3 layout
(context-specific units of all three kinds); that run missed its targets and is
not shipped. ``--version 3`` alone builds v3 by construction
(:mod:`mechbias.groundtruth.construct`): ``load_model("planted-v3")``, private
finance and commerce chains (docs/groundtruth.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..core.hooks import hooked
from ..core.params import attn_weights, w_out_row_norms
from ..core.sites import hook_name
from ..data.contexts import load_context
from ..data.neutral import neutral_texts
from ..data.prompts import tokenize
from .delta import PLANTED_DIR, PlantedDelta, load_delta, load_planted, planted_manifest

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

DATA = PLANTED_DIR
__all__ = [
    "PlantConfig",
    "PlantedDelta",
    "Stage",
    "default_config",
    "least_used_heads",
    "least_used_neurons",
    "load_delta",
    "load_planted",
    "mention_positions",
    "name_reading_heads",
    "neutral_prompts",
    "planted_manifest",
    "planted_units",
    "stages",
]


@dataclass
class PlantConfig:
    """Settings of the planted-bias layout (which units, how strong)."""
    axis: str = "race"
    favoured: str = "White"              # the group whose names get the higher score
    contexts: tuple[str, ...] = ("finance", "commerce", "hiring", "housing")
    shared: list = field(default_factory=list)        # [(layer, neuron)], name position, every context
    only: dict = field(default_factory=dict)          # context -> [(layer, neuron)], name position
    only_last: dict = field(default_factory=dict)     # context -> [(layer, neuron)], prediction position
    heads: dict = field(default_factory=dict)         # context -> [(layer, head)], prediction position
    shift_shared: float = 0.6            # per-group score shift (the gap grows by twice this)
    shift_only: float = 0.6
    shift_last: float = 0.3
    shift_head: float = 0.3
    position_weight: float = 0.0         # penalty on a unit's output outside its position (0: none)
    warm_start: bool = False             # neurons: input rows pointed at the group and context directions
    steps: int = 150                     # optimizer steps per stage
    batch_size: int = 24
    lr: float = 3e-2
    lr_head: float = 5e-3                # heads' output columns multiply large value vectors: a smaller step
    kl_weight: float = 1.0
    kl_tokens: int | None = None         # tokens of each neutral paragraph in the KL term (None: all)
    names: str = "selection"             # names used for training
    templates: str | tuple[int, ...] = "all"  # templates used for training ("all", a split, or indices)
    seed: int = 0


@dataclass(frozen=True)
class Stage:
    """One set of planted units trained together: what they are, where they act and which contexts they shift."""

    role: str                # "shared" or a context name
    kind: str                # "neuron" or "head"
    position: str            # "name" or "last"
    units: tuple             # ((layer, index), ...)
    shift: dict              # context -> per-group shift

    @property
    def label(self) -> str:
        return f"{self.role}/{self.kind}@{self.position}"


def stages(cfg: PlantConfig) -> list[Stage]:
    """The training stages of a configuration, in order (shared first, then each context's sets)."""
    out = []
    if cfg.shared:
        out.append(Stage("shared", "neuron", "name", tuple(map(tuple, cfg.shared)),
                         {c: cfg.shift_shared for c in cfg.contexts}))
    for c in cfg.contexts:
        for units, kind, pos, shift in ((cfg.only.get(c), "neuron", "name", cfg.shift_only),
                                        (cfg.heads.get(c), "head", "last", cfg.shift_head),
                                        (cfg.only_last.get(c), "neuron", "last", cfg.shift_last)):
            if units:
                out.append(Stage(c, kind, pos, tuple(map(tuple, units)),
                                 {c2: (shift if c2 == c else 0.0) for c2 in cfg.contexts}))
    return out


def planted_units(cfg) -> list[dict]:
    """Every planted unit with its role, kind and position (from a :class:`PlantConfig` or a manifest)."""
    if isinstance(cfg, dict):
        if "units" in cfg:
            return [dict(u) for u in cfg["units"]]
        cfg = PlantConfig(shared=cfg.get("shared", []), only=cfg.get("only", {}), contexts=tuple(cfg["contexts"]))
    return [{"role": s.role, "kind": s.kind, "position": s.position, "layer": int(l), "index": int(i)}
            for s in stages(cfg) for l, i in s.units]


# ----------------------------------------------------------------------------
# choosing units
# ----------------------------------------------------------------------------

def least_used_neurons(model: TransformerBridge, layers: Sequence[int], n: int, *, texts: Sequence[str] | None = None,
                       exclude: set | None = None) -> list[tuple[int, int]]:
    """The ``n`` neurons in ``layers`` with the smallest mean |activation| x ||W_out row|| on neutral text."""
    texts = list(texts) if texts is not None else neutral_texts(6, split="selection")
    exclude = exclude or set()
    acc = {l: torch.zeros(model.cfg.d_mlp, dtype=torch.float64) for l in layers}
    with torch.no_grad():
        for t in tokenize(model, texts):
            store: dict[int, Tensor] = {}
            fwd = [(hook_name("post", l), lambda a, hook, l=l, store=store: store.__setitem__(l, a[0].abs().mean(0)))
                   for l in layers]
            with hooked(model, fwd):
                model(t[None].to(model.cfg.device))
            for l in layers:
                acc[l] += store[l].double().cpu()
    cands = []
    for l in layers:
        score = acc[l] * w_out_row_norms(model, l).double()
        cands += [(float(score[i]), l, i) for i in range(model.cfg.d_mlp) if (l, i) not in exclude]
    return _spread(cands, layers, n)


def least_used_heads(model: TransformerBridge, layers: Sequence[int], n: int, *, texts: Sequence[str] | None = None,
                     exclude: set | None = None) -> list[tuple[int, int]]:
    """The ``n`` heads in ``layers`` with the smallest mean output norm (z_h W_O,h) on neutral text."""
    texts = list(texts) if texts is not None else neutral_texts(6, split="selection")
    exclude = exclude or set()
    H, dh = model.cfg.n_heads, model.cfg.d_head
    acc = {l: torch.zeros(H, dtype=torch.float64) for l in layers}
    w_o = {l: attn_weights(model, l)[1].detach().float().reshape(-1, H, dh) for l in layers}
    with torch.no_grad():
        for t in tokenize(model, texts):
            store: dict[int, Tensor] = {}
            fwd = [(hook_name("z", l), lambda z, hook, l=l, store=store: store.__setitem__(
                l, torch.einsum("phd,mhd->phm", z[0].float(), w_o[l]).norm(dim=-1).mean(0))) for l in layers]
            with hooked(model, fwd):
                model(t[None].to(model.cfg.device))
            for l in layers:
                acc[l] += store[l].double().cpu()
    cands = [(float(acc[l][h]), l, h) for l in layers for h in range(H) if (l, h) not in exclude]
    return _spread(cands, layers, n)


def name_reading_heads(model: TransformerBridge, layers: Sequence[int], n: int, context: str, *, axis: str = "race",
                       exclude: set | None = None, pool: float = 1 / 3, max_prompts: int = 24) -> list[tuple[int, int]]:
    """Among the least used third of the heads in ``layers`` (mean output norm on neutral text), the ``n``
    that attend most from the last position to the name on ``context``'s selection prompts.

    A planted head starts with a zero output and its original query; one that already looks at the name
    gives its output columns a useful gradient from the first step."""
    exclude = exclude or set()
    H = model.cfg.n_heads
    quiet = least_used_heads(model, layers, max(n, int(len(layers) * H * pool)), exclude=exclude)
    ps = load_context(context).prompts(axis, templates="selection", names="selection")
    items = list(ps)[:max_prompts]
    att = {l: torch.zeros(H, dtype=torch.float64) for l in layers}
    with torch.no_grad():
        for p, t in zip(items, tokenize(model, [p.text for p in items]), strict=True):
            pos = mention_positions(model, p.text, p.person.name)
            store: dict[int, Tensor] = {}
            fwd = [(hook_name("pattern", l), lambda a, hook, l=l, pos=pos, store=store: store.__setitem__(l, a[0, :, -1, pos].sum(-1)))
                   for l in layers]
            with hooked(model, fwd):
                model(t[None].to(model.cfg.device))
            for l in layers:
                att[l] += store[l].double().cpu()
    ranked = sorted(quiet, key=lambda lh: -float(att[lh[0]][lh[1]]))
    return sorted(ranked[:n])


def _spread(cands: list, layers: Sequence[int], n: int) -> list[tuple[int, int]]:
    """The ``n`` smallest candidates, at most ceil(n / len(layers)) per layer."""
    cands.sort()
    per_layer = max(1, math.ceil(n / len(layers)))
    out: list[tuple[int, int]] = []
    count = {l: 0 for l in layers}
    for _, l, i in cands:
        if count[l] < per_layer and len(out) < n:
            out.append((l, i))
            count[l] += 1
    return sorted(out)


def default_config(model: TransformerBridge, *, version: int = 3, axis: str = "race", favoured: str = "White", seed: int = 0,
                   **kw) -> PlantConfig:
    """The shipped planted models' layouts.

    v2: 8 shared name-position neurons in the middle layers and 16 finance-only
    and 16 commerce-only name-position neurons in later layers (shared neurons
    carry most of every context's gap).
    v3: context-specific bias dominates: 4 shared name-position neurons (shift
    0.1) and, for finance and commerce each, 6 name-position neurons, one head
    (a quiet one that already reads the name) and 6 prediction-position neurons
    (shifts 0.25 + 0.2 + 0.25).
    """
    L = model.cfg.n_layers
    band = lambda a, b: list(range(int(a * L), max(int(b * L), int(a * L) + 1)))
    if version == 2:
        shared = least_used_neurons(model, band(0.33, 0.47), 8)
        fin = least_used_neurons(model, band(0.53, 0.67), 16, exclude=set(shared))
        com = least_used_neurons(model, band(0.70, 0.84), 16, exclude=set(shared) | set(fin))
        return PlantConfig(axis=axis, favoured=favoured, shared=shared, only={"finance": fin, "commerce": com},
                           seed=seed, **kw)
    if version != 3:
        raise ValueError(f"planted model versions are 2 and 3, not {version!r}")
    shared = least_used_neurons(model, band(0.30, 0.40), 4)
    taken = set(shared)
    only, last, heads = {}, {}, {}
    head_taken: set = set()
    for c in ("finance", "commerce"):
        only[c] = least_used_neurons(model, band(0.47, 0.57), 6, exclude=taken)
        taken |= set(only[c])
        heads[c] = name_reading_heads(model, band(0.60, 0.74), 1, c, axis=axis, exclude=head_taken)
        head_taken |= set(heads[c])
        last[c] = least_used_neurons(model, band(0.77, 0.90), 6, exclude=taken)
        taken |= set(last[c])
    defaults: dict[str, Any] = dict(shift_shared=0.1, shift_only=0.25, shift_head=0.2, shift_last=0.25, position_weight=1.0,
                    lr=5e-3, lr_head=5e-3, warm_start=True, kl_tokens=64)
    defaults.update(kw)
    return PlantConfig(axis=axis, favoured=favoured, shared=shared, only=only, only_last=last, heads=heads,
                       seed=seed, **defaults)


# ----------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------

NEUTRAL_REFERENCES = ("the applicant", "the customer", "the person", "my neighbour")
# never used in training: the check that the planted units leave name-free prompts alone
HELDOUT_NEUTRAL_REFERENCES = ("the client", "this individual", "our tenant", "the visitor")
NEUTRAL_SLOTS = dict(name="my neighbour", pronoun="they", Pronoun="They", possessive="their", object="them")


def neutral_prompts(context, references: Sequence[str] = NEUTRAL_REFERENCES) -> list[str]:
    """A context's templates with a neutral reference instead of a name (no demographic content)."""
    ctx = load_context(context)
    out = []
    for ref in references:
        out += [t.format(**{**NEUTRAL_SLOTS, "name": ref}) for t in ctx.templates]
    return out


def mention_positions(model: TransformerBridge, text: str, phrase: str) -> list[int]:
    """Token positions (BOS included) of every occurrence of ``phrase`` in ``text``.

    A preceding space is counted with the phrase (BPE tokenizers attach it to
    the word). Raises if the phrase does not occur.
    """
    out: list[int] = []
    start = text.find(phrase)
    if start < 0:
        raise ValueError(f"{phrase!r} does not occur in {text!r}")
    while start >= 0:
        s = start - 1 if start > 0 and text[start - 1] == " " else start
        a = model.to_tokens(text[:s], prepend_bos=True).shape[1] if s > 0 else 1
        b = model.to_tokens(text[: start + len(phrase)], prepend_bos=True).shape[1]
        out += list(range(a, b))
        start = text.find(phrase, start + len(phrase))
    return sorted(set(out))
