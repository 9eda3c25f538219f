"""Parameters of a bridge: clean names, MLP matrices, linear layers, and weight deltas.

Weight layouts differ between families (GPT-2's ``Conv1D`` stores ``[in, out]``,
``nn.Linear`` stores ``[out, in]``); every function here says which layout it
returns, so Wanda scores, neuron norms and weight masks index the same entries
whatever the family.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .sites import LINEAR_COMPONENTS, hook_name

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


def named_params(model: TransformerBridge) -> dict[str, torch.nn.Parameter]:
    """The model's live parameters under clean names (wrapper segments removed).

    For Hugging Face models these are the HF names, e.g.
    ``model.layers.3.mlp.down_proj.weight``.
    """
    return {n.replace("._original_component", ""): p for n, p in model.named_parameters()}


@contextlib.contextmanager
def frozen(model: TransformerBridge):
    """Set ``requires_grad=False`` on every parameter; restore the flags on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def block_component(model: TransformerBridge, layer: int, path: str):
    """The bridge module at ``blocks[layer].<path>`` (e.g. ``mlp.gate``), or None where the family has none."""
    mod = model.blocks[layer]
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def is_transposed(module) -> bool:
    """Whether a linear module stores its weight as ``[in, out]`` (GPT-2's ``Conv1D``)."""
    return type(module).__name__ == "Conv1D"


def linear_layers(model: TransformerBridge) -> list[tuple[str, str, int, bool]]:
    """(parameter name, input hook name, layer, transposed) for every linear layer in every block."""
    ids = {id(p): n for n, p in named_params(model).items()}
    out = []
    for l in range(model.cfg.n_layers):
        for comp in LINEAR_COMPONENTS:
            mod = block_component(model, l, comp)
            if mod is None or getattr(mod, "original_component", None) is None:
                continue
            w = mod.original_component.weight
            out.append((ids[id(w)], hook_name(f"in:{comp}", l), l, is_transposed(mod.original_component)))
    return out


def linear_weight_name(model: TransformerBridge, layer: int, component: str) -> str:
    """The parameter name of a block's linear layer (``attn.q``, ``mlp.out``, ...)."""
    mod = block_component(model, layer, component)
    if mod is None or getattr(mod, "original_component", None) is None:
        raise ValueError(f"layer {layer} has no linear component {component!r}")
    ids = {id(p): n for n, p in named_params(model).items()}
    return ids[id(mod.original_component.weight)]


def linear_slot(model: TransformerBridge, layer: int, component: str) -> tuple[str, str | None, bool]:
    """(weight name, bias name or None, transposed) of a block's linear layer (``attn.q``, ``mlp.out``, ...).

    ``transposed`` is True for GPT-2's ``Conv1D`` (weight ``[in, out]``); ``nn.Linear`` is ``[out, in]``.
    Raises ``ValueError`` where the family has no such separate layer (e.g. a fused q/k/v projection).
    """
    mod = block_component(model, layer, component)
    lin = getattr(mod, "original_component", None) if mod is not None else None
    if lin is None or getattr(lin, "weight", None) is None:
        raise ValueError(f"layer {layer} has no separate linear layer {component!r} in this model family")
    ids = {id(p): n for n, p in named_params(model).items()}
    bias = getattr(lin, "bias", None)
    return ids[id(lin.weight)], (ids[id(bias)] if bias is not None else None), is_transposed(lin)


def mlp_weights(model: TransformerBridge, layer: int) -> tuple[torch.nn.Parameter, torch.nn.Parameter, torch.nn.Parameter]:
    """(gate ``[d_mlp, d_model]``, in/up ``[d_mlp, d_model]``, out/down ``[d_model, d_mlp]``) of a gated MLP."""
    mlp = model.blocks[layer].mlp
    return (mlp.gate.original_component.weight, mlp.__getattr__("in").original_component.weight,
            mlp.out.original_component.weight)


def attn_weights(model: TransformerBridge, layer: int) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """(query ``[n_heads * d_head, d_model]``, output ``[d_model, n_heads * d_head]``) of an attention block.

    Rows ``h * d_head : (h + 1) * d_head`` of the query and the same columns of
    the output belong to head ``h``. Only the ``nn.Linear`` layout is supported.
    """
    attn = model.blocks[layer].attn
    q, o = attn.q.original_component, attn.o.original_component
    if is_transposed(q) or is_transposed(o):
        raise NotImplementedError("per-head weight slices of Conv1D (GPT-2 layout) attention are not supported")
    return q.weight, o.weight


def w_out_row_norms(model: TransformerBridge, layer: int) -> Float[Tensor, " d_mlp"]:
    """``||W_out[neuron]||`` for every MLP neuron of a layer (layout-independent), on the CPU."""
    mod = model.blocks[layer].mlp.out.original_component
    w = mod.weight
    if is_transposed(mod):  # Conv1D layout [d_mlp, d_model]
        return w.detach().norm(dim=1).cpu()
    return w.detach().norm(dim=0).cpu()


def head_rows(heads: Int[Tensor, " h"], d_head: int) -> Int[Tensor, " rows"]:
    """The query rows (= output columns) of ``heads``: ``h * d_head ... (h + 1) * d_head - 1`` for each."""
    return (heads.long()[:, None] * d_head + torch.arange(d_head)[None]).flatten()
