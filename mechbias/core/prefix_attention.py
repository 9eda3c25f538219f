"""Attention of new tokens over a frozen batch-1 prefix, without copying the prefix per row and head.

IG²'s fast path runs hundreds of rows (scaled copies of the prediction position) through a frozen KV cache
of the prompt's prefix. The bridge's reconstructed attention first concatenates the prefix to every row's
new key and value, repeats them for every query head of a key-value group (grouped-query attention), and
runs one tiny matrix product per row and head; in the backward it sums the repeated gradients back. A
profile of one SmolLM2 prompt put about a third of IG²'s time there (``aten::bmm``, ``copy_``, the expand
backward's ``sum``).

Inside :func:`prefix_attention`, an eligible attention call instead computes, per key-value head ``k``
with query heads ``g`` of its group::

    scores = [q · K_prefix[k]ᵀ , q · K_new[k]ᵀ] * scaling + mask    (one product for all rows and heads)
    out    = softmax(scores)[:P] · V_prefix[k] + softmax(scores)[P:] · V_new[k]

which is the same attention, algebraically, with the prefix read once. Every hook the bridge fires on the
way in and out (``hook_in``, ``hook_q/k/v``, the q/k norms, ``hook_rot_q/k``, ``hook_z``, ``hook_out``)
fires here too. A call is eligible only in the plain case this implements (a frozen prefix cache layer, one
new token per row or several with the causal mask the model passes, standard rotary embedding, no soft-capping, sinks, gates, split inputs or per-head
results, and no hook on ``hook_attn_scores`` or ``hook_pattern``, which would need the full pattern); any
other call runs the bridge's own forward. The path reads the bridge's attention internals (attribute names
checked on transformer-lens 4.3.0), so :func:`mechbias.core.fastpath.fast_path_status` compares it with the
full-sequence forward on every model before its first use, and falls back (with a warning) on any
disagreement. ``calls()`` counts the calls that took this path, so a test can see it was not a no-op.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import torch

_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("mechbias_prefix_attention", default=False)
_STATE: dict[str, Any] = {"installed": False, "calls": 0}


def calls() -> int:
    """How many attention calls took the prefix path in this process."""
    return int(_STATE["calls"])


def _hooked(point) -> bool:
    return point is not None and bool(getattr(point, "_forward_hooks", None) or getattr(point, "_backward_hooks", None))


def _frozen_layer(kwargs: dict, layer_idx) -> Any:
    cache = next((kwargs[k] for k in ("past_key_values", "layer_past", "cache") if kwargs.get(k) is not None), None)
    layers = getattr(cache, "layers", None)
    if layer_idx is None or not layers or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    return layer if getattr(type(layer), "_mechbias_frozen", False) and getattr(layer, "keys", None) is not None else None


def _eligible(self: Any, base: Any, hidden, kwargs: dict):
    """The frozen cache layer when this call is the plain case :func:`_forward` implements, else None."""
    cfg, hf = self.config, self.original_component
    if type(self) is not base or self.training or hf is None or hidden.dim() != 3:
        return None
    pe = kwargs.get("position_embeddings")
    if pe is None or kwargs.get("cycle_offset", 0) or pe[0].shape[-1] != getattr(hf, "head_dim", None):
        return None  # no rotary, or partial / half-width rotary
    if any(bool(getattr(cfg, k, False)) for k in ("use_split_qkv_input", "use_attn_in", "gated_q_proj",
                                                   "use_attn_result", "qk_norm_after_rope",
                                                   "rotary_interleaved_cos_sin", "rotary_adjacent_pairs")):
        return None
    if any(getattr(hf, k, None) is not None for k in ("key_multiplier", "attn_logit_softcapping", "sinks")):
        return None
    if getattr(getattr(hf, "config", None), "clip_qkv", None) is not None:
        return None
    rope = getattr(getattr(hf, "config", None), "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
        return None
    if self._modules.get("gate") is not None or type(self)._pre_output_projection is not base._pre_output_projection:
        return None
    phase = getattr(self, "_qk_norm_phase", None)
    if phase not in (None, "post_reshape") or (phase and getattr(self, "_qk_norm_per_head", False)):
        return None
    if _hooked(getattr(self, "hook_attn_scores", None)) or _hooked(getattr(self, "hook_pattern", None)):
        return None
    layer = _frozen_layer(kwargs, getattr(self, "_layer_idx", None))
    if layer is None or layer.keys.shape[0] != 1:
        return None
    mask = kwargs.get("attention_mask")
    n, p = hidden.shape[1], layer.keys.shape[-2]
    if mask is None:  # one new token sees everything; several need the causal mask the model passes
        return layer if n == 1 else None
    if not torch.is_floating_point(mask) or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2] != n \
            or mask.shape[-1] != p + n or mask.shape[0] not in (1, hidden.shape[0]):
        return None
    return layer


def _forward(self: Any, hidden, layer, kwargs: dict):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hf = self.original_component
    hidden = self.hook_in(hidden)
    b, n, hd = hidden.shape[0], hidden.shape[1], hf.head_dim
    q = self.q(hidden).view(b, n, -1, hd).transpose(1, 2)  # [b, heads, n, hd]
    k = self.k(hidden).view(b, n, -1, hd).transpose(1, 2)  # [b, kv heads, n, hd]
    v = self.v(hidden).view(b, n, -1, hd).transpose(1, 2)
    if getattr(self, "_qk_norm_phase", None) == "post_reshape" and "q_norm" in self.submodules:
        q = self.hook_q_normed(self.q_norm(q))
        if "k_norm" in self.submodules:
            k = self.hook_k_normed(self.k_norm(k))
    cos, sin = self._apply_position_embedding_hooks(kwargs["position_embeddings"])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if hasattr(self, "hook_rot_q"):
        q = self.hook_rot_q(q)
    if hasattr(self, "hook_rot_k"):
        k = self.hook_rot_k(k)
    kp, vp = layer.keys[0].to(q.dtype), layer.values[0].to(q.dtype)  # [kv heads, P, hd]
    n_kv, p = kp.shape[0], kp.shape[1]
    n_heads = q.shape[1]
    g = n_heads // n_kv
    qg = q.reshape(b, n_kv, g, n, hd)  # head h = kv head h // g (the order of repeat_kv)
    s_pre = torch.einsum("bkgnd,kpd->bkgnp", qg, kp)
    if n == 1:  # elementwise: a batched product of 1 x 1 blocks costs more than it computes
        s_new = (qg * k.reshape(b, n_kv, 1, 1, hd)).sum(-1, keepdim=True)
    else:
        s_new = torch.einsum("bkgnd,bkmd->bkgnm", qg, k)
    scores = torch.cat([s_pre, s_new], dim=-1) * getattr(hf, "scaling", hd ** -0.5)  # [b, kv, g, n, P + n]
    mask = kwargs.get("attention_mask")
    if mask is not None:
        scores = scores + mask.reshape(mask.shape[0], 1, 1, n, p + n).to(scores.dtype)
    w = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.einsum("bkgnp,kpd->bkgnd", w[..., :p], vp)
    if n == 1:
        out = out + w[..., p:] * v.reshape(b, n_kv, 1, 1, hd)
    else:
        out = out + torch.einsum("bkgnm,bkmd->bkgnd", w[..., p:], v)
    out = self._pre_output_projection(out.reshape(b, n_heads, n, hd).transpose(1, 2).reshape(b, n, n_heads * hd))
    o_weight = getattr(getattr(getattr(self, "o", None), "original_component", None), "weight", None)
    if isinstance(o_weight, torch.Tensor) and o_weight.dtype.is_floating_point and out.dtype != o_weight.dtype:
        out = out.to(o_weight.dtype)
    out = self.hook_out(self.o(out))
    _STATE["calls"] += 1
    return out, w.reshape(b, n_heads, n, p + n)


def _install() -> bool:
    """Wrap the bridge's rotary attention class once per process; the wrapper is a pass-through outside
    :func:`prefix_attention`. Returns whether it is in place."""
    if _STATE["installed"]:
        return True
    try:
        from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
            PositionEmbeddingsAttentionBridge as base,
        )
    except ImportError:
        return False
    original = base.forward

    def forward(self, *args, **kwargs):
        if _ON.get() and not args and "hidden_states" in kwargs:
            layer = _eligible(self, base, kwargs["hidden_states"], kwargs)
            if layer is not None:
                return _forward(self, kwargs["hidden_states"], layer, kwargs)
        return original(self, *args, **kwargs)

    forward._mechbias_prefix = True  # type: ignore[attr-defined]
    base.forward = forward  # type: ignore[method-assign]
    _STATE["installed"] = True
    return True


@contextlib.contextmanager
def prefix_attention(enabled: bool = True):
    """Inside the block, eligible attention calls over a frozen prefix take the path above (``enabled=False``:
    a no-op block). Callers ask :func:`mechbias.core.fastpath.use_prefix_attention` first."""
    if not enabled or not _install():
        yield
        return
    token = _ON.set(True)
    try:
        yield
    finally:
        _ON.reset(token)
