"""GRADIEND gradients: the trained parameter set, and batch gradients captured into flat buffers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ...core.families import require_causal
from ...core.runner import last_position_unembed, length_buckets
from ...core.weights import block_component, frozen, linear_weight_name, named_params
from ...data.contexts import tokenize

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
    """Parameters for GRADIEND: ``mlp`` (gate, up and down matrices; no gate where the family's MLP has
    none), ``down`` (W_out only), ``down-late`` (W_out of the last quarter of the layers, unless ``layers``
    says otherwise), ``attn`` (q, k, v, o), ``mlp+attn``, or an explicit list of names; optionally
    restricted to ``layers``."""
    params = named_params(model)
    if not isinstance(which, str):
        names = list(which)
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"unknown parameters {missing[:3]}")
    else:
        comps = {"mlp": ["mlp.gate", "mlp.in", "mlp.out"], "down": ["mlp.out"], "down-late": ["mlp.out"],
                 "attn": ["attn.q", "attn.k", "attn.v", "attn.o"],
                 "mlp+attn": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.in", "mlp.out"]}
        if which not in comps:
            raise ValueError(f"parameter set must be one of {sorted(comps)} or a list of names, not {which!r}")
        if which == "down-late" and layers is None:
            L = model.cfg.n_layers
            layers = list(range(L - max(1, math.ceil(L / 4)), L))
        gated = block_component(model, 0, "mlp.gate") is not None  # GPT-2, GPT-NeoX, BERT: no gate matrix
        names = [linear_weight_name(model, l, comp)
                 for l in (range(model.cfg.n_layers) if layers is None else layers) for comp in comps[which]
                 if gated or comp != "mlp.gate"]
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
    require_causal(model, "GRADIEND's causal gradient (next-token loss)")
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
    require_causal(model, "GRADIEND's causal gradient (next-token loss)")
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


def trim_memory() -> None:
    """Return memory freed by a forward/backward to the OS (glibc keeps it otherwise), so the
    GRADIEND weights and optimizer state, allocated next, do not stack on top of it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


