"""GRADIEND gradients: the trained parameter set, and batch gradients captured into flat buffers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ...core.fastpath import position_unembed
from ...core.params import block_component, frozen, linear_weight_name, named_params
from ...core.runner import length_buckets, readout_ids
from ...core.window import readout_position
from ...data.prompts import tokenize

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

# ----------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------

def _readout_batches(model: TransformerBridge, texts: Sequence[str], max_tokens: int):
    """``(row indices, ids [rows, n], position)`` batches of equal length and prediction position: a causal
    LM predicts after the text's last token; a masked LM at a mask token after the text (the target word
    masked, as the gradiend package trains encoders; our texts end where the target word stands)."""
    prepared = [readout_ids(model, s) for s in tokenize(model, texts)]
    by_key: dict[tuple[int, int], list[int]] = {}
    for i, (ids, pos) in enumerate(prepared):
        by_key.setdefault((len(ids), pos), []).append(i)
    for (n, pos), idx in sorted(by_key.items()):
        for bucket in length_buckets([n] * len(idx), max_tokens):
            rows = [idx[j] for j in bucket]
            yield rows, torch.stack([prepared[i][0] for i in rows]), pos


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
        for n, s in zip(self.names, self.shapes, strict=True):
            k = math.prod(s)
            out.append((n, i, i + k))
            i += k
        return out

    def unflatten(self, flat: Float[Tensor, " params"]) -> dict[str, Tensor]:
        """The flat vector as one tensor per parameter, in the parameters' shapes."""
        return {n: flat[a:b].view(s) for (n, a, b), s in zip(self.offsets(), self.shapes, strict=True)}


def param_set(model: TransformerBridge, which: str | Sequence[str] = "mlp", layers: Sequence[int] | None = None) -> ParamSet:
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
        bad = [l for l in (layers or []) if not 0 <= int(l) < model.cfg.n_layers]
        if bad:
            raise ValueError(f"GRADIEND layers {bad} are outside 0..{model.cfg.n_layers - 1}")
        if which == "down-late" and layers is None:
            L = model.cfg.n_layers
            layers = list(range(L - max(1, math.ceil(L / 4)), L))
        gated = block_component(model, 0, "mlp.gate") is not None  # GPT-2, GPT-NeoX, BERT: no gate matrix
        names = [linear_weight_name(model, l, comp)
                 for l in (range(model.cfg.n_layers) if layers is None else layers) for comp in comps[which]
                 if gated or comp != "mlp.gate"]
    return ParamSet(names, [tuple(params[n].shape) for n in names])


def batch_gradient(model: TransformerBridge, ps: ParamSet, texts: Sequence[str], targets: Sequence[int], *,
                   max_tokens: int = 2048, out: Float[Tensor, " params"] | None = None) -> Float[Tensor, " params"]:
    """Flattened float32 gradient of the mean next-token loss of ``targets`` after ``texts`` (a masked LM:
    the loss of ``targets`` at a mask after each text).

    Autograd accumulates straight into one flat buffer (each parameter's
    ``.grad`` is a view of it), so no second copy of the gradient is made.
    ``out`` reuses a buffer of ``ps.numel`` floats.
    """
    if len(texts) != len(targets) or not texts:
        raise ValueError("batch_gradient needs as many targets as texts (and at least one)")
    params = named_params(model)
    plist = [params[n] for n in ps.names]
    flat = out if out is not None else torch.empty(ps.numel, dtype=torch.float32)
    flat.zero_()
    tg = torch.tensor(list(targets))
    device = model.cfg.device
    # float32 parameters accumulate straight into the flat buffer; bfloat16/float16 ones into their own
    # .grad, added to the float32 buffer after each micro-batch (float32 accumulation across batches)
    direct = all(p.dtype == torch.float32 and p.device == flat.device for p in plist)
    with frozen(model):
        for p, (_, a, b) in zip(plist, ps.offsets(), strict=True):
            p.requires_grad_(True)
            if direct:
                p.grad = flat[a:b].view(p.shape)
        try:
            for bucket, ids, pos in _readout_batches(model, texts, max_tokens):
                with position_unembed(model, pos), readout_position(pos):
                    lg = model(ids.to(device))[:, -1].float()
                loss = torch.nn.functional.cross_entropy(lg, tg[bucket].to(device), reduction="sum") / len(texts)
                loss.backward()
                if not direct:
                    for p, (_, a, b) in zip(plist, ps.offsets(), strict=True):
                        if p.grad is not None:
                            flat[a:b] += p.grad.reshape(-1).float().to(flat.device)
                            p.grad = None
        finally:
            for p in plist:
                p.grad = None
    return flat


def batch_gradient_pair(model: TransformerBridge, ps: ParamSet, texts: Sequence[str], factual: Sequence[int],
                        counterfactual: Sequence[int], *, out_f: Float[Tensor, " params"],
                        out_t: Float[Tensor, " params"], max_tokens: int = 160
                        ) -> tuple[Float[Tensor, " params"], Float[Tensor, " params"]]:
    """The factual gradient and the target (factual - counterfactual gradient) from one forward.

    ``CE(factual) - CE(counterfactual) = logit(counterfactual) - logit(factual)``
    (the normalizer cancels), so the target is the gradient of that logit
    difference: one forward with the graph kept, then two backward passes.
    Texts run in micro-batches of at most ``max_tokens`` tokens (gradients
    accumulate), which bounds activation memory while the GRADIEND weights and
    optimizer state are resident.
    """
    params = named_params(model)
    plist = [params[n] for n in ps.names]
    f = torch.tensor(list(factual))
    c = torch.tensor(list(counterfactual))
    device = model.cfg.device
    out_f.zero_()
    out_t.zero_()
    with frozen(model):
        for p in plist:
            p.requires_grad_(True)
        try:
            for bucket, ids, pos in _readout_batches(model, texts, max_tokens):
                with position_unembed(model, pos), readout_position(pos):
                    lg = model(ids.to(device))[:, -1].float()
                fb, cb = f[bucket].to(device), c[bucket].to(device)
                loss_f = torch.nn.functional.cross_entropy(lg, fb, reduction="sum") / len(texts)
                diff = (lg.gather(1, cb[:, None]) - lg.gather(1, fb[:, None])).sum() / len(texts)
                for p, (_, a, b) in zip(plist, ps.offsets(), strict=True):
                    p.grad = out_f[a:b].view(p.shape)
                loss_f.backward(retain_graph=True)
                for p, (_, a, b) in zip(plist, ps.offsets(), strict=True):
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


