"""Ground truth: a planted-bias variant of a model, and the trainer that makes it.

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
finance and commerce chains (README, "Ground truth").
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from ..core.hooks import hooked
from ..core.models import PLANTED_DIR, load_delta, load_planted, planted_manifest, set_model_label, tiny_model
from ..core.results import atomic_save_tensors, atomic_write_json
from ..core.runner import length_buckets, map_last_logits
from ..core.sites import hook_name
from ..core.weights import PlantedDelta, attn_weights, frozen, head_rows, mlp_weights, w_out_row_norms
from ..data.axes import load_axis
from ..data.prompts import tokenize
from ..data.contexts import load_context
from ..data.texts import neutral_texts

DATA = PLANTED_DIR
__all__ = ["PlantConfig", "PlantedDelta", "Stage", "add_group_feature", "default_config", "least_used_heads",
           "least_used_neurons", "load_delta", "name_reading_heads", "load_planted", "mention_positions", "neutral_prompts",
           "planted_manifest", "planted_units", "save_delta", "stages", "tiny_planted_model", "train_planted"]


@dataclass
class PlantConfig:
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

def least_used_neurons(model, layers: Sequence[int], n: int, *, texts: Sequence[str] | None = None,
                       exclude: set | None = None) -> list[tuple[int, int]]:
    """The ``n`` neurons in ``layers`` with the smallest mean |activation| x ||W_out row|| on neutral text."""
    texts = list(texts) if texts is not None else neutral_texts(6, split="selection")
    exclude = exclude or set()
    acc = {l: torch.zeros(model.cfg.d_mlp, dtype=torch.float64) for l in layers}
    with torch.no_grad():
        for t in tokenize(model, texts):
            store: dict[int, Tensor] = {}
            fwd = [(hook_name("post", l), lambda a, hook, l=l: store.__setitem__(l, a[0].abs().mean(0)))
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


def least_used_heads(model, layers: Sequence[int], n: int, *, texts: Sequence[str] | None = None,
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
            fwd = [(hook_name("z", l), lambda z, hook, l=l: store.__setitem__(
                l, torch.einsum("phd,mhd->phm", z[0].float(), w_o[l]).norm(dim=-1).mean(0))) for l in layers]
            with hooked(model, fwd):
                model(t[None].to(model.cfg.device))
            for l in layers:
                acc[l] += store[l].double().cpu()
    cands = [(float(acc[l][h]), l, h) for l in layers for h in range(H) if (l, h) not in exclude]
    return _spread(cands, layers, n)


def name_reading_heads(model, layers: Sequence[int], n: int, context: str, *, axis: str = "race",
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
        for p, t in zip(items, tokenize(model, [p.text for p in items])):
            pos = mention_positions(model, p.text, p.person.name)
            store: dict[int, Tensor] = {}
            fwd = [(hook_name("pattern", l), lambda a, hook, l=l: store.__setitem__(l, a[0, :, -1, pos].sum(-1)))
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


def default_config(model, *, version: int = 3, axis: str = "race", favoured: str = "White", seed: int = 0,
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
    band = lambda a, b: list(range(int(a * L), max(int(b * L), int(a * L) + 1)))  # noqa: E731
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
_SLOTS = dict(name="my neighbour", pronoun="they", Pronoun="They", possessive="their", object="them")


def neutral_prompts(context, references: Sequence[str] = NEUTRAL_REFERENCES) -> list[str]:
    """A context's templates with a neutral reference instead of a name (no demographic content)."""
    ctx = load_context(context)
    out = []
    for ref in references:
        out += [t.format(**{**_SLOTS, "name": ref}) for t in ctx.templates]
    return out


def mention_positions(model, text: str, phrase: str) -> list[int]:
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


@dataclass
class _Example:
    tokens: Tensor
    context: str
    sign: float              # +1 group A, -1 group B, 0 no name (the score must not move)
    name_positions: list


def _examples(model, cfg: PlantConfig) -> list[_Example]:
    ax = load_axis(cfg.axis)
    fav = ax.groups.index(cfg.favoured)
    out = []
    for c in cfg.contexts:
        ps = load_context(c).prompts(ax, templates="all", names=cfg.names, seed=cfg.seed)
        for p, t in zip(ps, tokenize(model, ps.texts)):
            out.append(_Example(t, c, 1.0 if p.group == fav else -1.0, mention_positions(model, p.text, p.person.name)))
        ctx = load_context(c)
        for ref in NEUTRAL_REFERENCES:
            for tpl in ctx.templates:
                text = tpl.format(**{**_SLOTS, "name": ref})
                out.append(_Example(tokenize(model, [text])[0], c, 0.0, mention_positions(model, text, ref)))
    return out


def train_planted(model, cfg: PlantConfig, *, progress: bool = True, log=print) -> tuple[PlantedDelta, dict]:
    """Overwrite and train the planted units of ``model`` in place. Returns the delta and a training log."""
    plan = stages(cfg)
    neurons = [u for s in plan if s.kind == "neuron" for u in s.units]
    heads = [u for s in plan if s.kind == "head" for u in s.units]
    if len(set(neurons)) != len(neurons) or len(set(heads)) != len(heads):
        raise ValueError("a unit is planted twice")
    rng = torch.Generator().manual_seed(cfg.seed)
    pos_id = model.to_single_token(load_context(cfg.contexts[0]).positive)
    neg_id = model.to_single_token(load_context(cfg.contexts[0]).negative)
    device = model.cfg.device
    # 1. overwrite: neurons get small random input rows and a zero output column, heads a zero output
    #    (their query rows start as they were); every planted unit starts silent
    with torch.no_grad():
        for l, i in neurons:
            g, u, o = mlp_weights(model, l)
            g[i] = torch.randn(g.shape[1], generator=rng).to(g) * 0.05
            u[i] = torch.randn(u.shape[1], generator=rng).to(u) * 0.05
            o[:, i] = 0.0
        for l, h in heads:
            attn_weights(model, l)[1][:, head_rows(torch.tensor([h]), model.cfg.d_head)] = 0.0
    examples = _examples(model, cfg)
    # KL anchor: the first kl_tokens tokens of each selection paragraph (a full paragraph per step would
    # cost as much as the batch itself)
    neutral = [t[: cfg.kl_tokens] for t in tokenize(model, neutral_texts(8, split="selection"))]
    with torch.no_grad():  # reference: the model with the planted units silent (= original minus those units)
        base_scores = _scores(model, [e.tokens for e in examples], pos_id, neg_id)
        neutral_ref = [model(t[None].to(device)).log_softmax(-1).detach() for t in neutral]
    history = []
    for stage in plan:
        t0 = time.time()
        # targets: previous stages' effect stays as it is, this stage adds its shift
        with torch.no_grad():
            cur = _scores(model, [e.tokens for e in examples], pos_id, neg_id)
        target = torch.tensor([float(cur[k]) + e.sign * stage.shift[e.context] for k, e in enumerate(examples)])
        if stage.kind == "neuron" and cfg.warm_start:
            _warm_start(model, stage, examples, rng)
        slots = _slots(model, stage)
        leaves = [w.detach().index_select(dim, idx).clone().requires_grad_(True) for w, dim, idx in slots]
        opt = torch.optim.Adam(leaves, lr=cfg.lr if stage.kind == "neuron" else cfg.lr_head)
        order = torch.randperm(len(examples), generator=rng)
        for step in range(cfg.steps):
            k0 = (step * cfg.batch_size) % len(order)
            batch = order[k0 : k0 + cfg.batch_size]
            if len(batch) < 2:
                batch = order[: cfg.batch_size]
            opt.zero_grad()
            parts = _loss(model, stage, [examples[i] for i in batch.tolist()], target[batch], pos_id, neg_id,
                          neutral[step % len(neutral)], neutral_ref[step % len(neutral)], slots, leaves, cfg)
            opt.step()
            _write(slots, leaves)
            if progress and (step % 25 == 0 or step == cfg.steps - 1):
                log(f"[plant] {stage.label} step {step}: mse {parts['mse']:.4f} kl {parts['kl']:.4f} "
                    f"off-position {parts['off']:.4f}")
            history.append({"stage": stage.label, "step": step, **parts})
        if progress:
            log(f"[plant] {stage.label}: {time.time() - t0:.0f} s")
    return PlantedDelta.capture(model, neurons, heads), {"history": history, "base_scores": base_scores.tolist()}


def _warm_start(model, stage: Stage, examples: list[_Example], rng: torch.Generator, max_examples: int = 240) -> None:
    """Point a neuron stage's input rows at the signal it has to carry (deterministic; training refines it).

    At the stage's position (the name's tokens, averaged, or the last token), on the MLP input of each layer:
    the up row reads the group direction (mean group A - mean group B over the contexts the stage shifts),
    scaled so that the two group means give +1 and -1; the gate row reads the context direction (those
    contexts at the stage's position minus the mean of the other contexts and name-free prompts there and of
    the other positions) so that it opens (+3) where the stage acts and closes (-3) elsewhere. Both use the
    mean of the two points as a second direction to place the offset (the MLP has no bias). A zero output column and random inputs would start at a saddle: the gradient of the output
    column is the correlation of the activation with the group, which is 0 for random rows.
    """
    on = {c for c, v in stage.shift.items() if v != 0.0}
    pick = torch.randperm(len(examples), generator=rng)[:max_examples].tolist()
    chosen = [examples[i] for i in pick]
    layers = sorted({l for l, _ in stage.units})
    feats: dict[int, list[Tensor]] = {l: [] for l in layers}
    elsewhere: dict[int, list[Tensor]] = {l: [] for l in layers}  # the other positions of the same prompts
    with torch.no_grad():
        for e in chosen:
            store: dict[int, Tensor] = {}
            fwd = [(hook_name("in:mlp.gate", l), lambda a, hook, l=l: store.__setitem__(l, a[0].float()))
                   for l in layers]
            with hooked(model, fwd):
                model(e.tokens[None].to(model.cfg.device))
            target = e.name_positions if stage.position == "name" else [len(e.tokens) - 1]
            rest = [p for p in range(1, len(e.tokens)) if p not in target]
            for l in layers:
                feats[l].append(store[l][target].mean(0).cpu())
                elsewhere[l].append(store[l][rest].mean(0).cpu())
    sign = torch.tensor([e.sign for e in chosen])
    active = torch.tensor([e.context in on and e.sign != 0 for e in chosen])
    for l in layers:
        X = torch.stack(feats[l]).double()
        a_mean, b_mean = X[active & (sign > 0)].mean(0), X[active & (sign < 0)].mean(0)
        off = [torch.stack(elsewhere[l]).double().mean(0)] + ([X[~active].mean(0)] if (~active).any() else [])
        on_mean, off_mean = X[active].mean(0), torch.stack(off).mean(0)
        up = _two_point_row(a_mean, b_mean, 1.0, -1.0)
        gate = _two_point_row(on_mean, off_mean, 3.0, -3.0)
        g, u, _ = mlp_weights(model, l)
        with torch.no_grad():
            for ll, i in stage.units:
                if ll == l:
                    noise = torch.randn(2, X.shape[1], generator=rng).double()
                    g[i] = (gate + 0.02 * gate.norm() / X.shape[1] ** 0.5 * noise[0]).to(g)
                    u[i] = (up + 0.02 * up.norm() / X.shape[1] ** 0.5 * noise[1]).to(u)


def _two_point_row(p: Tensor, q: Tensor, at_p: float, at_q: float) -> Tensor:
    """A row w in span(p - q, p + q) with w . p = at_p and w . q = at_q."""
    basis = torch.stack([p - q, p + q])                      # [2, d]
    A = torch.stack([basis @ p, basis @ q])                  # A[i, j] = basis_j . (p, q)_i
    coef = torch.linalg.solve(A, torch.tensor([at_p, at_q], dtype=p.dtype))
    return coef @ basis


def _scores(model, seqs, pos_id, neg_id) -> Tensor:
    return map_last_logits(model, seqs, lambda lg: lg[:, -1, pos_id] - lg[:, -1, neg_id]).double()


def _slots(model, stage: Stage) -> list[tuple[Any, int, Tensor]]:
    """(weight, dim, index) of every slice holding the stage's trainable values."""
    out = []
    for l in sorted({l for l, _ in stage.units}):
        idx = torch.tensor(sorted(i for ll, i in stage.units if ll == l))
        if stage.kind == "neuron":
            g, u, o = mlp_weights(model, l)
            out += [(g, 0, idx), (u, 0, idx), (o, 1, idx)]
        else:
            q, o = attn_weights(model, l)
            rows = head_rows(idx, model.cfg.d_head)
            out += [(q, 0, rows), (o, 1, rows)]
    return out


def _write(slots, leaves) -> None:
    """Copy the leaf values into the model's weights."""
    with torch.no_grad():
        for (w, dim, idx), v in zip(slots, leaves):
            w.index_copy_(dim, idx, v.detach().to(w.dtype))


def _output_norms(model, stage: Stage, store: dict) -> Tensor:
    """Squared norm of the stage's units' summed output, per batch row and position ``[b, p]``."""
    total = None
    for l in sorted({l for l, _ in stage.units}):
        idx = torch.tensor(sorted(i for ll, i in stage.units if ll == l))
        if stage.kind == "neuron":
            o = mlp_weights(model, l)[2]
            out = store[l][..., idx] @ o[:, idx].T                         # [b, p, d_model]
        else:
            o = attn_weights(model, l)[1]
            rows = head_rows(idx, model.cfg.d_head)
            z = store[l][:, :, idx].flatten(2)                              # [b, p, n * d_head]
            out = z @ o[:, rows].T
        total = out if total is None else total + out
    return (total ** 2).sum(-1)


def _loss(model, stage: Stage, batch: list[_Example], target, pos_id, neg_id, neutral, neutral_ref, slots, leaves,
          cfg) -> dict:
    """Forward and backward with the stage's weights trainable; the gradient slices of the planted rows and
    columns are handed to the small leaf tensors."""
    device = model.cfg.device
    weights = {id(w): w for w, _, _ in slots}
    point = "post" if stage.kind == "neuron" else "z"
    layers = sorted({l for l, _ in stage.units})
    mse_total, off_total, n = 0.0, 0.0, 0
    with frozen(model):
        for w in weights.values():
            w.grad = None
            w.requires_grad_(True)
        try:
            for bucket in length_buckets([len(e.tokens) for e in batch], 4096):
                ids = torch.stack([batch[i].tokens for i in bucket]).to(device)
                store: dict = {}
                fwd = [(hook_name(point, l), lambda a, hook, l=l: store.__setitem__(l, a)) for l in layers]
                with hooked(model, fwd):
                    lg = model(ids)
                score = lg[:, -1, pos_id] - lg[:, -1, neg_id]
                err = ((score - target[bucket].to(score)) ** 2).sum()
                loss = err / len(batch)
                if cfg.position_weight > 0:
                    allowed = torch.zeros(ids.shape, dtype=torch.bool, device=device)
                    for r, i in enumerate(bucket):
                        if stage.position == "name":
                            allowed[r, batch[i].name_positions] = True
                        else:
                            allowed[r, -1] = True
                    norms = _output_norms(model, stage, store)
                    off = (norms * (~allowed)).sum() / (~allowed).sum().clamp(min=1)
                    loss = loss + cfg.position_weight * off * len(bucket) / len(batch)
                    off_total += float(off.detach()) * len(bucket)
                loss.backward()
                mse_total += float(err.detach())
                n += len(bucket)
            lg = model(neutral[None].to(device)).log_softmax(-1)
            kl = (neutral_ref.exp() * (neutral_ref - lg)).sum(-1).mean()
            (cfg.kl_weight * kl).backward()
            for (w, dim, idx), v in zip(slots, leaves):
                v.grad = w.grad.index_select(dim, idx).detach().clone().to(v.dtype)
        finally:
            for w in weights.values():
                w.grad = None
    return {"mse": mse_total / max(n, 1), "kl": float(kl.detach()), "off": off_total / max(n, 1)}


def save_delta(delta: PlantedDelta, folder: Path, manifest: dict) -> None:
    """Write a planted delta and its manifest (what :func:`mechbias.core.models.load_delta` reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(delta.tensors(), folder / "delta.safetensors")
    atomic_write_json(manifest, folder / "manifest.json")


# ----------------------------------------------------------------------------
# a tiny synthetic world (tests)
# ----------------------------------------------------------------------------

def add_group_feature(model, axis: str = "race", scale: float = 1.0, seed: int = 0) -> None:
    """Give each group's name tokens a shared embedding direction (in place).

    A random model has no notion of which names belong together; real models
    do. Adding ``+v`` to the embeddings of group-A name tokens and ``-v`` to
    group-B ones (``v`` random, norm ``scale`` x the mean embedding norm) makes
    the group linearly readable, so a planted bias can generalize to held-out
    names.
    """
    ax = load_axis(axis)
    emb = model.embed.original_component.weight
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(emb.shape[1], generator=g)
    v = v / v.norm() * float(emb.detach().norm(dim=1).mean()) * scale
    with torch.no_grad():
        for p in ax.people:
            ids = model.to_tokens(" " + p.name, prepend_bos=False)[0]
            sign = 1.0 if ax.group_index(p) == 0 else -1.0
            for t in ids.tolist():
                emb[t] += sign * v.to(emb.dtype)


def tiny_planted_model(seed: int = 0, steps: int = 120, shift: float = 1.0):
    """A 2-layer tiny Llama with a group feature and a planted race bias (White favoured).

    Shared neurons in layer 0 carry as much as the finance-only and commerce-only neurons of layer 1 (the v2
    layout; the v3 layout is only trained on the embedded model: on this model its staged training takes
    minutes). Returns the model and its :class:`PlantConfig`.
    """
    model = tiny_model(arch="llama", seed=seed, n_layers=2, d_model=64, d_mlp=128)
    add_group_feature(model, "race", scale=1.0, seed=seed)
    cfg = PlantConfig(contexts=("finance", "commerce", "hiring"), shared=[(0, 5), (0, 9), (0, 40)],
                      only={"finance": [(1, 3), (1, 7), (1, 60)], "commerce": [(1, 11), (1, 20), (1, 90)]},
                      steps=steps, batch_size=32, lr=3e-2, shift_shared=shift, shift_only=shift, seed=seed,
                      names="selection")
    train_planted(model, cfg, progress=False)
    set_model_label(model, f"tiny-planted-seed{seed}")
    return model, cfg
