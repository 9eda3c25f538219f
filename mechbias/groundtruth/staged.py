"""The staged trainer of planted-bias units (:mod:`mechbias.groundtruth.planted` holds the layouts and
the choice of units), and the tiny synthetic world the tests plant a bias in.

Each stage overwrites its units (neurons: ``W_gate``/``W_in`` rows and ``W_out`` column; heads: query rows
and output columns), warm-starts them with a two-point fit, and trains them (every other weight frozen) so
the contrast score moves by the stage's shift for group-A and group-B names in its contexts only, with a
penalty on output away from the unit's position and a KL penalty to the original model on neutral text.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..core.hooks import hooked
from ..core.models import set_model_label
from ..core.params import attn_weights, frozen, head_rows, mlp_weights
from ..core.results import atomic_save_tensors, atomic_write_json
from ..core.runner import length_buckets, map_last_logits
from ..core.sites import hook_name
from ..core.testing import tiny_model
from ..data.axes import load_axis
from ..data.contexts import load_context
from ..data.neutral import neutral_texts
from ..data.prompts import tokenize
from .delta import PlantedDelta
from .planted import NEUTRAL_REFERENCES, NEUTRAL_SLOTS, PlantConfig, Stage, mention_positions, stages

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

_LOG = logging.getLogger(__name__)

__all__ = ["add_group_feature", "save_delta", "tiny_planted_model", "train_planted"]


@dataclass
class _Example:
    tokens: Tensor
    context: str
    sign: float              # +1 group A, -1 group B, 0 no name (the score must not move)
    name_positions: list


def _examples(model: TransformerBridge, cfg: PlantConfig) -> list[_Example]:
    ax = load_axis(cfg.axis)
    fav = ax.groups.index(cfg.favoured)
    out = []
    for c in cfg.contexts:
        ctx = load_context(c)
        templates = cfg.templates if isinstance(cfg.templates, str) else list(cfg.templates)
        ps = ctx.prompts(ax, templates=templates, names=cfg.names, seed=cfg.seed)
        for p, t in zip(ps, tokenize(model, ps.texts), strict=True):
            out.append(_Example(t, c, 1.0 if p.group == fav else -1.0, mention_positions(model, p.text, p.person.name)))
        for ref in NEUTRAL_REFERENCES:
            for tpl in (ctx.templates[k] for k in sorted({q.template for q in ps})):
                text = tpl.format(**{**NEUTRAL_SLOTS, "name": ref})
                out.append(_Example(tokenize(model, [text])[0], c, 0.0, mention_positions(model, text, ref)))
    return out


def train_planted(model: TransformerBridge, cfg: PlantConfig, *, progress: bool = True) -> tuple[PlantedDelta, dict]:
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
                _LOG.info(f"[plant] {stage.label} step {step}: mse {parts['mse']:.4f} kl {parts['kl']:.4f} "
                    f"off-position {parts['off']:.4f}")
            history.append({"stage": stage.label, "step": step, **parts})
        if progress:
            _LOG.info(f"[plant] {stage.label}: {time.time() - t0:.0f} s")
    return PlantedDelta.capture(model, neurons, heads), {"history": history, "base_scores": base_scores.tolist()}


def _warm_start(model: TransformerBridge, stage: Stage, examples: list[_Example], rng: torch.Generator, max_examples: int = 240) -> None:
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
            fwd = [(hook_name("in:mlp.gate", l), lambda a, hook, l=l, store=store: store.__setitem__(l, a[0].float()))
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


def _scores(model: TransformerBridge, seqs, pos_id, neg_id) -> Tensor:
    return map_last_logits(model, seqs, lambda lg: lg[:, -1, pos_id] - lg[:, -1, neg_id]).double()


def _slots(model: TransformerBridge, stage: Stage) -> list[tuple[Any, int, Tensor]]:
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
        for (w, dim, idx), v in zip(slots, leaves, strict=True):
            w.index_copy_(dim, idx, v.detach().to(w.dtype))


def _output_norms(model: TransformerBridge, stage: Stage, store: dict) -> Tensor:
    """Squared norm of the stage's units' summed output, per batch row and position ``[b, p]``."""
    total: Tensor | None = None
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
    if total is None:
        raise ValueError(f"stage {stage.label} has no units")
    return (total ** 2).sum(-1)


def _loss(model: TransformerBridge, stage: Stage, batch: list[_Example], target, pos_id, neg_id, neutral, neutral_ref, slots, leaves,
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
                fwd = [(hook_name(point, l), lambda a, hook, l=l, store=store: store.__setitem__(l, a)) for l in layers]
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
            for (w, dim, idx), v in zip(slots, leaves, strict=True):
                v.grad = w.grad.index_select(dim, idx).detach().clone().to(v.dtype)
        finally:
            for w in weights.values():
                w.grad = None
    return {"mse": mse_total / max(n, 1), "kl": float(kl.detach()), "off": off_total / max(n, 1)}


def save_delta(delta: PlantedDelta, folder: Path, manifest: dict) -> None:
    """Write a planted delta and its manifest (what :func:`mechbias.groundtruth.delta.load_delta` reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(delta.tensors(), folder / "delta.safetensors")
    atomic_write_json(manifest, folder / "manifest.json")


# ----------------------------------------------------------------------------
# a tiny synthetic world (tests)
# ----------------------------------------------------------------------------

def add_group_feature(model: TransformerBridge, axis: str = "race", scale: float = 1.0, seed: int = 0) -> None:
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
                      names="selection", templates=tuple(range(10)))  # the contexts' first ten (the model's v1 vocabulary)
    train_planted(model, cfg, progress=False)
    set_model_label(model, f"tiny-planted-seed{seed}")
    return model, cfg
