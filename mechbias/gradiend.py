"""GRADIEND on TransformerLens: gradient capture, a one-neuron feature, and weight edits.

Drechsel & Herbold, *GRADIEND: Feature Learning within Neural Networks
Exemplified through Biases* (arXiv 2502.01406), for causal models.

**Texts.** For a context and axis, each filled template (its question, without
``Answer:``) is followed by a short *feature suffix* whose next token reveals
the group: gender ``" Afterwards, {name} said that"`` -> `` he``/`` she``;
race ``" Is {name} White or Black? {name} is"`` -> `` White``/`` Black`` (the
order of the two words alternates between templates). The *factual* target is
the name's group word, the *counterfactual* target the other group's word.
Neutral texts (no demographic content) are prefixes of the neutral set with
their real next token.

**Gradients.** The gradient of the next-token loss for the target, with
respect to a selectable parameter set (default: every MLP weight matrix, about
80 M parameters in the embedded model), averaged over a batch of texts that
share a class (the paper's batches of 32). Parameters are the bridge's live
leaves (:func:`mechbias.models.named_params`); ``tl_parameters()`` views are not
leaves and ``torch.func.functional_call`` is unsafe on the bridge, so neither is
used. Gradients are flattened to float32 in the parameter order of
:class:`ParamSet` and never more than one batch's pair is held.

**Model.** ``h = tanh(w_e . g + b_e)`` (one scalar), ``ĝ = h w_d + b_d``; input
the factual gradient, target factual - counterfactual, MSE loss, AdamW
(lr 1e-5 as the paper; its Llama runs used 1e-4). Gradients of this small model
are computed in closed form and the AdamW update is applied in chunks, so no
n-sized gradient buffers exist; the Adam moments are kept in bfloat16 (a
deviation, to keep training on all MLP weights within about 4 GiB). Several
seeds; the one with the best |Pearson(h, group)| on a validation split is kept,
and its sign is normalized so that group A encodes positive.

**Edit.** ``θ' = θ + α · dec(h)`` over a grid of (h, α); each point is scored by
the gap on the training context's selection prompts and the perplexity on the
neutral set; the chosen point has the smallest |gap| among points whose
perplexity rises by at most ``max_ppl_increase``. The edit is a
:class:`mechbias.hooks.WeightEdit` (applied to the model only inside
``apply``; restored exactly).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .contexts import Context, Person, fill, load_axis, load_context, single_token, tokenize
from .hooks import WeightEdit
from .models import frozen, named_params
from .results import Result, make_meta
from .runner import length_buckets

FEATURE_SUFFIX = {
    "gender": (" Afterwards, {name} said that", None),
    "race": (" Is {name} White or Black? {name} is", " Is {name} Black or White? {name} is"),
}


# ----------------------------------------------------------------------------
# texts
# ----------------------------------------------------------------------------

@dataclass
class FeatureText:
    text: str
    group: int          # 0 = group A, 1 = group B, -1 = neutral
    factual: int        # token id of the factual next token
    counterfactual: int  # token id of the other group's word (= factual for neutral texts)
    template: int = -1
    name: str = ""


def feature_texts(model, context: Context | str, axis: str, *, templates: str | Sequence[int] = "selection",
                  names: str = "selection", seed: int = 0) -> list[FeatureText]:
    """Factual/counterfactual texts for one context and axis (see the module docstring)."""
    ctx = load_context(context)
    ax = load_axis(axis)
    if ax.name not in FEATURE_SUFFIX:
        raise ValueError(f"no GRADIEND feature prompt for axis {ax.name!r}")
    words = [single_token(model, ax.words[g], f"{ax.name} word") for g in ax.groups]
    t_idx = ctx.template_split(templates, seed) if isinstance(templates, str) else list(templates)
    out = []
    for t in t_idx:
        question = ctx.templates[t].rsplit(" Answer:", 1)[0]
        suffix = FEATURE_SUFFIX[ax.name][t % 2] or FEATURE_SUFFIX[ax.name][0]
        for p in ax.split_people(names, seed):
            g = ax.group_index(p)
            out.append(FeatureText(fill(question + suffix, p), g, words[g], words[1 - g], t, p.name))
    return out


def neutral_feature_texts(model, n: int = 24, length: int = 18) -> list[FeatureText]:
    """Prefixes of the neutral paragraphs; the target is the real next token."""
    from .metrics import neutral_texts

    out = []
    for para in neutral_texts():
        ids = model.to_tokens(para)[0]
        for start in range(length, len(ids) - 1, 2 * length):
            prefix = model.to_string(ids[1:start]) if hasattr(model, "to_string") else None
            if prefix is None:
                continue
            nxt = int(ids[start])
            out.append(FeatureText(prefix, -1, nxt, nxt))
            if len(out) >= n:
                return out
    return out


# ----------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------

@dataclass
class ParamSet:
    """An ordered set of parameters (clean names) and their shapes."""

    names: list[str]
    shapes: list[tuple[int, ...]]

    @property
    def numel(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))

    def offsets(self) -> list[tuple[str, int, int]]:
        out, i = [], 0
        for n, s in zip(self.names, self.shapes):
            k = math.prod(s)
            out.append((n, i, i + k))
            i += k
        return out

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: flat[a:b].view(s) for (n, a, b), s in zip(self.offsets(), self.shapes)}


def param_set(model, which: str | Sequence[str] = "mlp", layers: Sequence[int] | None = None) -> ParamSet:
    """Parameters for GRADIEND: ``mlp`` (gate, up and down matrices), ``down`` (W_out only), ``attn``
    (q, k, v, o), ``mlp+attn``, or an explicit list of names; optionally restricted to ``layers``."""
    params = named_params(model)
    if not isinstance(which, str):
        names = list(which)
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"unknown parameters {missing[:3]}")
    else:
        comps = {"mlp": ["mlp.gate", "mlp.in", "mlp.out"], "down": ["mlp.out"],
                 "attn": ["attn.q", "attn.k", "attn.v", "attn.o"],
                 "mlp+attn": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.in", "mlp.out"]}
        if which not in comps:
            raise ValueError(f"parameter set must be one of {sorted(comps)} or a list of names, not {which!r}")
        ids = {id(p): n for n, p in params.items()}
        names = []
        for l in (range(model.cfg.n_layers) if layers is None else layers):
            for comp in comps[which]:
                mod = model.blocks[l]
                for part in comp.split("."):
                    mod = getattr(mod, part)
                names.append(ids[id(mod.original_component.weight)])
    return ParamSet(names, [tuple(params[n].shape) for n in names])


def batch_gradient(model, ps: ParamSet, texts: Sequence[str], targets: Sequence[int], *,
                   max_tokens: int = 2048, out: Tensor | None = None) -> Tensor:
    """Flattened float32 gradient of the mean next-token loss of ``targets`` after ``texts``.

    Autograd accumulates straight into one flat buffer (each parameter's
    ``.grad`` is a view of it), so no second copy of the gradient is made.
    ``out`` reuses a buffer of ``ps.numel`` floats.
    """
    if len(texts) != len(targets) or not texts:
        raise ValueError("batch_gradient needs as many targets as texts (and at least one)")
    from .runner import last_position_unembed

    params = named_params(model)
    plist = [params[n] for n in ps.names]
    if any(p.dtype != torch.float32 for p in plist):
        raise ValueError("GRADIEND gradient capture expects float32 parameters")
    flat = out if out is not None else torch.empty(ps.numel, dtype=torch.float32)
    flat.zero_()
    seqs = tokenize(model, texts)
    tg = torch.tensor(list(targets))
    device = model.cfg.device
    with frozen(model):
        for p, (_, a, b) in zip(plist, ps.offsets()):
            p.requires_grad_(True)
            p.grad = flat[a:b].view(p.shape)
        try:
            for bucket in length_buckets([len(s) for s in seqs], max_tokens):
                ids = torch.stack([seqs[i] for i in bucket]).to(device)
                with last_position_unembed(model, 1):
                    lg = model(ids)[:, -1].float()
                loss = torch.nn.functional.cross_entropy(lg, tg[bucket].to(device), reduction="sum") / len(texts)
                loss.backward()
        finally:
            for p in plist:
                p.grad = None
    return flat


def batch_gradient_pair(model, ps: ParamSet, texts: Sequence[str], factual: Sequence[int],
                        counterfactual: Sequence[int], *, out_f: Tensor, out_t: Tensor,
                        max_tokens: int = 160) -> tuple[Tensor, Tensor]:
    """The factual gradient and the target (factual - counterfactual gradient) from one forward.

    ``CE(factual) - CE(counterfactual) = logit(counterfactual) - logit(factual)``
    (the normalizer cancels), so the target is the gradient of that logit
    difference: one forward with the graph kept, then two backward passes.
    Texts run in micro-batches of at most ``max_tokens`` tokens (gradients
    accumulate), which bounds activation memory while the GRADIEND weights and
    optimizer state are resident.
    """
    from .runner import last_position_unembed

    params = named_params(model)
    plist = [params[n] for n in ps.names]
    seqs = tokenize(model, texts)
    f = torch.tensor(list(factual))
    c = torch.tensor(list(counterfactual))
    device = model.cfg.device
    out_f.zero_()
    out_t.zero_()
    with frozen(model):
        for p in plist:
            p.requires_grad_(True)
        try:
            for bucket in length_buckets([len(s) for s in seqs], max_tokens):
                ids = torch.stack([seqs[i] for i in bucket]).to(device)
                with last_position_unembed(model, 1):
                    lg = model(ids)[:, -1].float()
                fb, cb = f[bucket].to(device), c[bucket].to(device)
                loss_f = torch.nn.functional.cross_entropy(lg, fb, reduction="sum") / len(texts)
                diff = (lg.gather(1, cb[:, None]) - lg.gather(1, fb[:, None])).sum() / len(texts)
                for p, (_, a, b) in zip(plist, ps.offsets()):
                    p.grad = out_f[a:b].view(p.shape)
                loss_f.backward(retain_graph=True)
                for p, (_, a, b) in zip(plist, ps.offsets()):
                    p.grad = out_t[a:b].view(p.shape)
                diff.backward()
        finally:
            for p in plist:
                p.grad = None
    return out_f, out_t


def _trim() -> None:
    """Return memory freed by a forward/backward to the OS (glibc keeps it otherwise), so the
    GRADIEND weights and optimizer state, allocated next, do not stack on top of it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------
# the one-neuron model
# ----------------------------------------------------------------------------

class GradiendModel:
    """``h = tanh(w_e . g + b_e)``, ``ĝ = h w_d + b_d``, stored as flat float32 tensors."""

    def __init__(self, n: int, seed: int = 0, decoder_factor: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(n)  # torch.nn.Linear's default for a 1 x n layer
        self.w_e = torch.empty(n).uniform_(-bound, bound, generator=g)  # in place: no n-sized temporaries
        self.b_e = float(torch.empty(1).uniform_(-bound, bound, generator=g))
        x = float(self.w_e.abs().max()) * decoder_factor  # the paper's decoder init range
        self.w_d = torch.empty(n).uniform_(-x, x, generator=g)
        self.b_d = torch.empty(n).uniform_(-x, x, generator=g)
        self.n = n

    def encode(self, g: Tensor, chunk: int = 1 << 22) -> float:
        if g.dtype == torch.float32:
            z = float(torch.dot(self.w_e, g))
        else:  # e.g. float16 gradients streamed from disk: convert chunk by chunk
            z = sum(float(torch.dot(self.w_e[a:a + chunk], g[a:a + chunk].float())) for a in range(0, self.n, chunk))
        return math.tanh(z + self.b_e)

    def decode(self, h: float) -> Tensor:
        return self.w_d * h + self.b_d

    def state(self) -> dict[str, Tensor]:
        return {"w_e": self.w_e, "b_e": torch.tensor([self.b_e]), "w_d": self.w_d, "b_d": self.b_d}

    @classmethod
    def from_state(cls, d: dict[str, Tensor]) -> "GradiendModel":
        m = cls.__new__(cls)
        m.w_e, m.b_e, m.w_d, m.b_d = d["w_e"], float(d["b_e"][0]), d["w_d"], d["b_d"]
        m.n = len(m.w_e)
        return m

    def flip(self) -> None:
        """Negate the encoding (h -> -h) without changing the decoder's output for a given input."""
        self.w_e.neg_()  # in place: no second copy of n-sized vectors
        self.w_d.neg_()
        self.b_e = -self.b_e


class _AdamW:
    """AdamW on the GRADIEND model with closed-form gradients, chunked; moments in bfloat16."""

    def __init__(self, model: GradiendModel, lr: float, weight_decay: float = 1e-2, betas=(0.9, 0.999),
                 eps: float = 1e-8, chunk: int = 1 << 20, moment_dtype: torch.dtype = torch.bfloat16):
        self.m, self.lr, self.wd, self.b1, self.b2, self.eps, self.chunk = model, lr, weight_decay, *betas, eps, chunk
        n = model.n
        self.dtype = moment_dtype
        self.state = {k: (torch.zeros(n, dtype=moment_dtype), torch.zeros(n, dtype=moment_dtype))
                      for k in ("w_e", "w_d", "b_d")}
        self.state_be = [0.0, 0.0]
        self.t = 0

    def _update(self, name: str, param: Tensor, grad_fn, a: int, b: int) -> None:
        m, v = self.state[name]
        g = grad_fn(a, b)
        mc = m[a:b].float().mul_(self.b1).add_(g, alpha=1 - self.b1)
        vc = v[a:b].float().mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        m[a:b] = mc.to(self.dtype)
        v[a:b] = vc.to(self.dtype)
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        p = param[a:b]
        p.mul_(1 - self.lr * self.wd)
        p.addcdiv_(mc / bc1, (vc / bc2).sqrt_().add_(self.eps), value=-self.lr)

    def step(self, g: Tensor, target: Tensor) -> float:
        """One step on (input ``g``, target ``target``); returns the MSE before the step."""
        M, n = self.m, self.m.n
        self.t += 1
        z = float(torch.dot(M.w_e, g)) + M.b_e
        h = math.tanh(z)
        # pass 1: residual statistics (loss and dL/dh) without storing the residual
        loss, dh = 0.0, 0.0
        for a in range(0, n, self.chunk):
            b = min(a + self.chunk, n)
            r = M.w_d[a:b] * h + M.b_d[a:b] - target[a:b]
            loss += float(r.pow(2).sum())
            dh += float(torch.dot(M.w_d[a:b], r))
        loss /= n
        dh *= 2.0 / n
        dz = dh * (1 - h * h)
        # pass 2: updates (the residual is recomputed chunk by chunk from the pre-step weights)
        for a in range(0, n, self.chunk):
            b = min(a + self.chunk, n)
            r = M.w_d[a:b] * h + M.b_d[a:b] - target[a:b]
            self._update("w_d", M.w_d, lambda a_, b_, r=r: r * (2.0 * h / n), a, b)
            self._update("b_d", M.b_d, lambda a_, b_, r=r: r * (2.0 / n), a, b)
            self._update("w_e", M.w_e, lambda a_, b_: g[a_:b_] * dz, a, b)
        mb, vb = self.state_be
        mb = self.b1 * mb + (1 - self.b1) * dz
        vb = self.b2 * vb + (1 - self.b2) * dz * dz
        self.state_be = [mb, vb]
        M.b_e = M.b_e * (1 - self.lr * self.wd) - self.lr * (mb / (1 - self.b1 ** self.t)) / (
            math.sqrt(vb / (1 - self.b2 ** self.t)) + self.eps)
        return loss


# ----------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------

@dataclass
class GradiendConfig:
    params: str = "mlp"             # mlp | down | attn | mlp+attn
    layers: list | None = None
    steps: int = 60                 # optimizer steps (each: one factual and one counterfactual batch gradient)
    batch_texts: int = 16           # texts averaged per gradient (the paper: 32)
    lr: float = 1e-5
    weight_decay: float = 1e-2
    seeds: tuple = (0, 1, 2)
    val_batches: int = 8            # validation batches (held-out names) for seed selection
    seed: int = 0


@dataclass
class GradiendResult(Result):
    """A trained GRADIEND feature: the encoder/decoder, its training log and feature evaluation."""

    context: str
    axis: str
    param_names: list[str]
    param_shapes: list[list[int]]
    w_e: Tensor
    b_e: Tensor
    w_d: Tensor
    b_d: Tensor
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)
    edit: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    result_type = "gradiend"

    @property
    def model(self) -> GradiendModel:
        return GradiendModel.from_state({"w_e": self.w_e, "b_e": self.b_e, "w_d": self.w_d, "b_d": self.b_d})

    @property
    def param_set(self) -> ParamSet:
        return ParamSet(list(self.param_names), [tuple(s) for s in self.param_shapes])

    def edit_for(self, h: float, alpha: float, label: str = "") -> WeightEdit:
        """The weight edit ``α · dec(h)`` as a :class:`WeightEdit`."""
        deltas = self.param_set.unflatten(self.model.decode(h))
        return WeightEdit({k: v.clone() for k, v in deltas.items()}, scale=alpha,
                          label=label or f"GRADIEND {self.context}/{self.axis} h={h:g} alpha={alpha:g}")

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.evaluation.get("values", []))

    def plot(self):
        from .plotting import plot_gradiend_feature

        return plot_gradiend_feature(self)


def train_gradiend(model, context: Context | str, axis: str = "gender", cfg: GradiendConfig | None = None, *,
                   progress: bool = True, log=print) -> GradiendResult:
    """Train GRADIEND on a context's selection split; pick the best seed on held-out names."""
    cfg = cfg or GradiendConfig()
    ctx = load_context(context)
    ax = load_axis(axis)
    ps = param_set(model, cfg.params, cfg.layers)
    train = feature_texts(model, ctx, ax, templates="selection", names="selection", seed=cfg.seed)
    val = feature_texts(model, ctx, ax, templates="selection", names="heldout", seed=cfg.seed)
    by_group = {g: [t for t in train if t.group == g] for g in (0, 1)}
    rng = np.random.default_rng(cfg.seed)

    def batch(pool):
        idx = rng.choice(len(pool), size=min(cfg.batch_texts, len(pool)), replace=False)
        return [pool[i] for i in idx]

    # a fixed validation set of class batches, kept on disk in float16 (one gradient in memory at a time)
    import tempfile

    val_by = {g: [t for t in val if t.group == g] for g in (0, 1)}
    val_dir = tempfile.TemporaryDirectory(prefix="mechbias-gradiend-")
    buf = torch.empty(ps.numel, dtype=torch.float32)
    buf2 = torch.empty(ps.numel, dtype=torch.float32)
    val_labels = []
    for k in range(cfg.val_batches):
        g = k % 2
        b = [val_by[g][i] for i in rng.choice(len(val_by[g]), size=min(cfg.batch_texts, len(val_by[g])), replace=False)]
        torch.save(batch_gradient(model, ps, [t.text for t in b], [t.factual for t in b], out=buf).half(),
                   Path(val_dir.name) / f"{k}.pt")
        # (half of the buffer's size on disk; read back one at a time)
        val_labels.append(g)

    _trim()

    def val_encodings(gm):
        return np.array([gm.encode(torch.load(Path(val_dir.name) / f"{k}.pt")) for k in range(len(val_labels))])

    best, seeds_info, history = None, [], []
    for seed in cfg.seeds:
        t0 = time.time()
        gm = GradiendModel(ps.numel, seed=seed)
        opt = _AdamW(gm, cfg.lr, cfg.weight_decay)
        for step in range(cfg.steps):
            g = step % 2
            b = batch(by_group[g])
            gf, target = batch_gradient_pair(model, ps, [t.text for t in b], [t.factual for t in b],
                                             [t.counterfactual for t in b], out_f=buf, out_t=buf2)
            _trim()
            loss = opt.step(gf, target)
            history.append({"seed": seed, "step": step, "loss": loss})
            if progress and (step % 10 == 0 or step == cfg.steps - 1):
                log(f"[gradiend] seed {seed} step {step}: mse {loss:.3e}")
        del opt  # free the optimizer state before anything else is allocated
        _trim()
        hs = val_encodings(gm)
        labels = np.array([1.0 if g == 0 else -1.0 for g in val_labels])
        corr = float(np.corrcoef(hs, labels)[0, 1]) if np.std(hs) > 0 else 0.0
        seeds_info.append({"seed": seed, "val_pearson": corr, "seconds": round(time.time() - t0, 1)})
        log(f"[gradiend] seed {seed}: validation Pearson(h, group A) = {corr:+.3f} ({time.time() - t0:.0f} s)")
        if best is None or abs(corr) > abs(best[1]):
            best = (gm, corr, seed)
    val_dir.cleanup()
    del buf, buf2
    gm, corr, seed = best
    if corr < 0:
        gm.flip()
    res = GradiendResult(ctx.name, ax.name, ps.names, [list(s) for s in ps.shapes], gm.w_e, torch.tensor([gm.b_e]),
                         gm.w_d, gm.b_d, asdict(cfg), history, seeds_info,
                         meta=make_meta(model, context=ctx.name, axis=ax.name, chosen_seed=seed,
                                        group_a=ax.groups[0]))
    return res


# ----------------------------------------------------------------------------
# evaluation of the feature
# ----------------------------------------------------------------------------

def evaluate_feature(model, res: GradiendResult, *, batch_texts: int = 8, n_batches: int = 6,
                     n_neutral: int = 6, seed: int = 1) -> dict:
    """Encoder values on held-out names and templates (group A, group B) and neutral texts."""
    ps = res.param_set
    gm = res.model
    texts = feature_texts(model, res.context, res.axis, templates="heldout", names="heldout")
    rng = np.random.default_rng(seed)
    values = []
    for g in (0, 1):
        pool = [t for t in texts if t.group == g]
        for _ in range(n_batches):
            b = [pool[i] for i in rng.choice(len(pool), size=min(batch_texts, len(pool)), replace=False)]
            h = gm.encode(batch_gradient(model, ps, [t.text for t in b], [t.factual for t in b]))
            values.append({"group": load_axis(res.axis).groups[g], "label": 1 if g == 0 else -1, "h": h})
    neutral = neutral_feature_texts(model, n=n_neutral * batch_texts)
    for k in range(n_neutral):
        b = neutral[k * batch_texts:(k + 1) * batch_texts]
        if not b:
            break
        h = gm.encode(batch_gradient(model, ps, [t.text for t in b], [t.factual for t in b]))
        values.append({"group": "neutral", "label": 0, "h": h})
    stats = {}
    for name in dict.fromkeys(v["group"] for v in values):
        hs = np.array([v["h"] for v in values if v["group"] == name])
        stats[name] = {"mean": float(hs.mean()), "sd": float(hs.std(ddof=1)) if len(hs) > 1 else 0.0, "n": len(hs)}
    lab = np.array([v["label"] for v in values if v["label"] != 0])
    hv = np.array([v["h"] for v in values if v["label"] != 0])
    acc = float((np.sign(hv) == lab).mean())
    pear = float(np.corrcoef(hv, lab)[0, 1]) if hv.std() > 0 else 0.0
    # threshold-free: how often a group-A batch encodes above a group-B batch (ties count half).
    # Sign accuracy also needs the encoder's offset to sit between the groups, which a short
    # training run often does not reach (both groups saturate on one side of tanh).
    ha, hb = hv[lab == 1], hv[lab == -1]
    diff = ha[:, None] - hb[None, :]
    auc = float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / max(diff.size, 1))
    out = {"values": values, "stats": stats, "sign_accuracy": acc, "pearson": pear, "auc": auc,
           "separates": bool(auc > 0.5 and pear > 0)}
    res.evaluation = out
    return out


# ----------------------------------------------------------------------------
# choosing the edit
# ----------------------------------------------------------------------------

H_GRID = (-10, -2, -1, -0.8, -0.6, -0.4, -0.2, 0, 0.2, 0.4, 0.6, 0.8, 1, 2, 10)
ALPHA_GRID = tuple(s * a for a in (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5) for s in (-1, 1))


# The decoder's output has the scale of the captured gradients; on the embedded model its norm over
# all MLP weights is ~0.8, so the paper's alphas (<= 0.5) barely move the model. Measured on the
# embedded model: alpha 10 cut the commerce gender gap by ~80% at +0.8% perplexity; alpha 100
# destroyed it (perplexity x80). The default grid therefore spans four decades.
DEFAULT_ALPHAS = (-10.0, -1.0, -0.1, 0.1, 1.0, 10.0)


def choose_edit(model, res: GradiendResult, *, hs: Sequence[float] = (-1.0, 0.0, 1.0),
                alphas: Sequence[float] = DEFAULT_ALPHAS, max_ppl_increase: float = 0.05,
                neutral_max_texts: int = 6, n_names: int | None = None, seed: int = 0) -> dict:
    """Score every (h, α) on the training context's selection prompts (bias gap) and the neutral set
    (perplexity); choose the smallest |gap| whose perplexity rises by at most ``max_ppl_increase``
    (relative). The paper's full grid is ``H_GRID`` x ``ALPHA_GRID``."""
    from .metrics import contrast_scores, neutral_texts, perplexity

    ctx = load_context(res.context)
    prompts = ctx.prompts(res.axis, templates="selection", names="selection", seed=seed)
    if n_names is not None:
        keep = set(prompts.names[:: max(1, len(prompts.names) // n_names)])
        prompts = prompts.subset([i for i, p in enumerate(prompts) if p.person.name in keep])
    texts = neutral_texts(neutral_max_texts)
    g = prompts.groups

    def gap(scores):
        return float(scores[g == 0].mean() - scores[g == 1].mean())

    gap0 = gap(contrast_scores(model, prompts))
    ppl0 = perplexity(model, texts)
    grid = []
    for h in hs:
        for a in alphas:
            iv = res.edit_for(h, a)
            grid.append({"h": h, "alpha": a, "gap": gap(contrast_scores(model, prompts, intervention=iv)),
                         "perplexity": perplexity(model, texts, intervention=iv)})
    ok = [p for p in grid if p["perplexity"] <= ppl0 * (1 + max_ppl_increase)]
    chosen = min(ok, key=lambda p: abs(p["gap"])) if ok else None
    out = {"gap_before": gap0, "perplexity_before": ppl0, "grid": grid, "chosen": chosen,
           "max_ppl_increase": max_ppl_increase}
    res.edit = out
    return out


def gradiend_selector(cfg: GradiendConfig | None = None, *, edit_kw: dict | None = None, cache: dict | None = None,
                      trained: dict | None = None, log=print):
    """Transfer-engine selector: train on a context, choose (h, α) there, return the weight edit.

    ``trained``: already trained features by context name (e.g. loaded from an interrupted run);
    one is reused only if its axis and training config match."""

    def select(model, ctx: Context, axis: str):
        res = (trained or {}).get(ctx.name)
        same = res is not None and json.loads(json.dumps(res.config)) == json.loads(json.dumps(asdict(cfg or GradiendConfig())))
        if res is None or res.axis != axis or not same:
            res = train_gradiend(model, ctx, axis, cfg, log=log)
        else:
            log(f"[gradiend] {ctx.name}: reusing the feature trained earlier with the same settings")
        ch = choose_edit(model, res, **(edit_kw or {}))
        if cache is not None:
            cache[ctx.name] = res
        if ch["chosen"] is None:
            from .hooks import Identity

            return Identity()
        return res.edit_for(ch["chosen"]["h"], ch["chosen"]["alpha"])

    return select


def decoder_share(res: GradiendResult, neurons: Sequence[tuple[int, int]], model=None, h: float = 1.0) -> dict:
    """Share of the decoder update's squared norm that falls on the given MLP neurons
    (their gate/up rows and down column), against the share those entries have of all parameters."""
    dec = res.param_set.unflatten(res.model.decode(h))
    total = float(sum(float((v.double() ** 2).sum()) for v in dec.values()))
    hit, count, n_all = 0.0, 0, 0
    for name, v in dec.items():
        n_all += v.numel()
        parts = name.split(".")
        if "layers" not in parts:
            continue
        l = int(parts[parts.index("layers") + 1])
        idx = [i for ll, i in neurons if ll == l]
        if not idx:
            continue
        if "down_proj" in name:
            sub = v[:, idx]
        elif "gate_proj" in name or "up_proj" in name:
            sub = v[idx]
        else:
            continue
        hit += float((sub.double() ** 2).sum())
        count += sub.numel()
    return {"share": hit / total if total else float("nan"), "share_of_parameters": count / max(n_all, 1),
            "n_entries": count}
