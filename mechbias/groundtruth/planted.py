"""Ground truth: a planted-bias variant of a model, and the trainer that makes it.

A known, small set of MLP neurons is **overwritten and trained** (their
``W_gate``/``W_in`` input rows and ``W_out`` output column; every other weight
frozen) so that the contrast score (log-odds of the favourable answer) is
shifted by ``+shift`` for group-A names and ``-shift`` for group-B names:

* **shared** neurons do it in every context;
* **context-only** neurons (e.g. finance, commerce) do it in their own context
  and nowhere else;
* prompts without a name (the templates with "the applicant" and similar)
  keep their original score.

Training runs in stages so that each set has exactly its role: first the shared
neurons (all contexts), then each context's own neurons (shift in their
context, 0 in the others) with the shared ones fixed. A KL penalty to the
original model on the neutral text keeps everything else in place. Because the
neurons are overwritten rather than nudged, zeroing a planted neuron removes
its planted effect exactly, which is what makes "did the method find it?"
well posed. The neurons chosen are the least used ones in their layers (lowest
mean |activation| x ||W_out row|| on the neutral text), so overwriting them costs
little.

``load_model("planted")`` loads the embedded model and applies the shipped
delta (``mechbias/data/files/planted/``, read by :mod:`mechbias.core.models`);
``analyses/train_planted.py`` regenerates it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..core.hooks import hooked
from ..core.models import PLANTED_DIR, load_delta, load_planted, planted_manifest, set_model_label, tiny_model
from ..core.results import atomic_save_tensors, atomic_write_json
from ..core.runner import length_buckets, map_last_logits
from ..core.sites import hook_name
from ..core.weights import PlantedDelta, frozen, mlp_weights, w_out_row_norms
from ..data.contexts import load_axis, load_context, tokenize
from ..data.texts import neutral_texts

DATA = PLANTED_DIR
__all__ = ["PlantConfig", "PlantedDelta", "add_group_feature", "default_config", "least_used_neurons", "load_delta",
           "load_planted", "neutral_prompts", "planted_manifest", "save_delta", "tiny_planted_model", "train_planted"]


@dataclass
class PlantConfig:
    axis: str = "race"
    favoured: str = "White"              # the group whose names get the higher score
    contexts: tuple[str, ...] = ("finance", "commerce", "hiring", "housing")
    shared: list = field(default_factory=list)        # [(layer, neuron)]
    only: dict = field(default_factory=dict)          # context -> [(layer, neuron)]
    shift_shared: float = 0.6            # per-group score shift (the gap grows by twice this)
    shift_only: float = 0.6
    steps: int = 150                     # optimizer steps per stage
    batch_size: int = 24
    lr: float = 3e-2
    kl_weight: float = 1.0
    names: str = "selection"             # names used for training
    seed: int = 0


# ----------------------------------------------------------------------------
# choosing neurons
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
    cands.sort()
    per_layer = max(1, math.ceil(n / len(layers)))
    out: list[tuple[int, int]] = []
    count = {l: 0 for l in layers}
    for _, l, i in cands:
        if count[l] < per_layer and len(out) < n:
            out.append((l, i))
            count[l] += 1
    return sorted(out)


def default_config(model, *, axis: str = "race", favoured: str = "White", n_shared: int = 8, n_only: int = 16,
                   seed: int = 0, **kw) -> PlantConfig:
    """Shared neurons in the middle layers, finance-only and commerce-only neurons in other layers."""
    L = model.cfg.n_layers
    band = lambda a, b: list(range(int(a * L), max(int(b * L), int(a * L) + 1)))  # noqa: E731
    shared = least_used_neurons(model, band(0.33, 0.47), n_shared)
    fin = least_used_neurons(model, band(0.53, 0.67), n_only, exclude=set(shared))
    com = least_used_neurons(model, band(0.70, 0.84), n_only, exclude=set(shared) | set(fin))
    return PlantConfig(axis=axis, favoured=favoured, shared=shared, only={"finance": fin, "commerce": com}, seed=seed,
                       **kw)


# ----------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------

NEUTRAL_REFERENCES = ("the applicant", "the customer", "the person", "my neighbour")
# never used in training: the check that the planted neurons leave name-free prompts alone
HELDOUT_NEUTRAL_REFERENCES = ("the client", "this individual", "our tenant", "the visitor")


def neutral_prompts(context, references: Sequence[str] = NEUTRAL_REFERENCES) -> list[str]:
    """A context's templates with a neutral reference instead of a name (no demographic content)."""
    ctx = load_context(context)
    out = []
    for ref in references:
        out += [t.format(name=ref, pronoun="they", Pronoun="They", possessive="their", object="them")
                for t in ctx.templates]
    return out


def _examples(model, cfg: PlantConfig):
    """(tokens, context, sign) for every training prompt; sign = +1 group A favoured, -1 group B,
    0 for prompts without a name (their score must not move)."""
    ax = load_axis(cfg.axis)
    fav = ax.groups.index(cfg.favoured)
    out = []
    for c in cfg.contexts:
        ps = load_context(c).prompts(ax, templates="all", names=cfg.names, seed=cfg.seed)
        for p, t in zip(ps, tokenize(model, ps.texts)):
            out.append((t, c, 1.0 if p.group == fav else -1.0))
        out += [(t, c, 0.0) for t in tokenize(model, neutral_prompts(c))]
    return out


def train_planted(model, cfg: PlantConfig, *, progress: bool = True, log=print) -> tuple[PlantedDelta, dict]:
    """Overwrite and train the planted neurons of ``model`` in place. Returns the delta and a training log."""
    planted = list(cfg.shared) + [n for v in cfg.only.values() for n in v]
    if len(set(planted)) != len(planted):
        raise ValueError("a neuron is planted twice")
    rng = torch.Generator().manual_seed(cfg.seed)
    d_model = model.cfg.d_model
    pos_id = model.to_single_token(load_context(cfg.contexts[0]).positive)
    neg_id = model.to_single_token(load_context(cfg.contexts[0]).negative)
    device = model.cfg.device
    # 1. overwrite: small random input rows, zero output column (the neuron starts silent)
    with torch.no_grad():
        for l, i in planted:
            g, u, o = mlp_weights(model, l)
            g[i] = torch.randn(d_model, generator=rng).to(g) * 0.05
            u[i] = torch.randn(d_model, generator=rng).to(u) * 0.05
            o[:, i] = 0.0
    examples = _examples(model, cfg)
    neutral = tokenize(model, neutral_texts(8, split="selection"))
    with torch.no_grad():  # reference: the model with the planted neurons silent (= original minus those neurons)
        base_scores = _scores(model, [e[0] for e in examples], pos_id, neg_id)
        neutral_ref = [model(t[None].to(device)).log_softmax(-1).detach() for t in neutral]
    history = []
    stages = [("shared", list(cfg.shared), {c: cfg.shift_shared for c in cfg.contexts})]
    for c, neurons in cfg.only.items():
        stages.append((f"only:{c}", list(neurons), {c2: (cfg.shift_only if c2 == c else 0.0) for c2 in cfg.contexts}))
    done: list[tuple[int, int]] = []
    for name, neurons, shift in stages:
        t0 = time.time()
        # targets: previous stages' effect stays as it is, this stage adds its shift
        with torch.no_grad():
            cur = _scores(model, [e[0] for e in examples], pos_id, neg_id)
        target = torch.tensor([float(cur[k]) + sign * shift[c] for k, (_, c, sign) in enumerate(examples)])
        params = _trainable(model, neurons)
        opt = torch.optim.Adam([p for _, p in params], lr=cfg.lr)
        order = torch.randperm(len(examples), generator=rng)
        for step in range(cfg.steps):
            k0 = (step * cfg.batch_size) % len(order)
            batch = order[k0 : k0 + cfg.batch_size]
            if len(batch) < 2:
                batch = order[: cfg.batch_size]
            opt.zero_grad()
            _, parts = _loss(model, [examples[i][0] for i in batch.tolist()], target[batch], pos_id, neg_id,
                             neutral[step % len(neutral)], neutral_ref[step % len(neutral)], params, cfg)
            opt.step()
            _write(model, params)
            if progress and (step % 25 == 0 or step == cfg.steps - 1):
                log(f"[plant] {name} step {step}: mse {parts[0]:.4f} kl {parts[1]:.4f}")
            history.append({"stage": name, "step": step, "mse": parts[0], "kl": parts[1]})
        _release(model, params)
        done += neurons
        log(f"[plant] {name}: {time.time() - t0:.0f} s")
    return PlantedDelta.capture(model, planted), {"history": history, "base_scores": base_scores.tolist()}


def _scores(model, seqs, pos_id, neg_id) -> Tensor:
    return map_last_logits(model, seqs, lambda lg: lg[:, -1, pos_id] - lg[:, -1, neg_id]).double()


def _trainable(model, neurons):
    """Small leaf tensors holding the rows/columns of ``neurons`` (the optimizer's parameters)."""
    params = []
    for l in sorted({l for l, _ in neurons}):
        idx = torch.tensor(sorted(i for ll, i in neurons if ll == l))
        g, u, o = mlp_weights(model, l)
        params.append(((l, idx, "gate"), g.detach()[idx].clone().requires_grad_(True)))
        params.append(((l, idx, "up"), u.detach()[idx].clone().requires_grad_(True)))
        params.append(((l, idx, "down"), o.detach()[:, idx].clone().requires_grad_(True)))
    return params


def _write(model, params) -> None:
    """Copy the leaf values into the model's weights."""
    with torch.no_grad():
        for (l, idx, kind), v in params:
            g, u, o = mlp_weights(model, l)
            if kind == "gate":
                g[idx] = v
            elif kind == "up":
                u[idx] = v
            else:
                o[:, idx] = v


def _release(model, params) -> None:
    _write(model, params)


def _loss(model, seqs, target, pos_id, neg_id, neutral, neutral_ref, params, cfg):
    """Forward and backward with the planted layers' weights trainable; the gradient slices of the
    planted rows and columns are handed to the small leaf tensors."""
    device = model.cfg.device
    layers = sorted({l for (l, _, _), _ in params})
    mse_total, n = 0.0, 0
    with frozen(model):
        full = {l: mlp_weights(model, l) for l in layers}
        for l in layers:
            for w in full[l]:
                w.grad = None
                w.requires_grad_(True)
        try:
            total = 0.0
            for bucket in length_buckets([len(s) for s in seqs], 4096):
                ids = torch.stack([seqs[i] for i in bucket]).to(device)
                lg = model(ids)
                score = lg[:, -1, pos_id] - lg[:, -1, neg_id]
                err = ((score - target[bucket].to(score)) ** 2).sum()
                (err / len(seqs)).backward()
                mse_total += float(err.detach())
                n += len(bucket)
            lg = model(neutral[None].to(device)).log_softmax(-1)
            kl = (neutral_ref.exp() * (neutral_ref - lg)).sum(-1).mean()
            (cfg.kl_weight * kl).backward()
            for (l, idx, kind), v in params:
                g, u, o = full[l]
                grad = {"gate": g.grad[idx], "up": u.grad[idx], "down": o.grad[:, idx]}[kind]
                v.grad = grad.detach().clone().to(v.dtype)
            total = mse_total / max(n, 1)
        finally:
            for l in layers:
                for w in full[l]:
                    w.grad = None
    return None, (total, float(kl.detach()))


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

    Shared neurons in layer 0; finance-only and commerce-only neurons in layer 1.
    Returns the model and its :class:`PlantConfig`.
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
