"""Resume a forward pass at a layer: the exact work of an unmodified prefix of the layers, skipped.

An intervention whose earliest hook or weight sits in block ``L`` cannot change
what blocks ``0..L-1`` compute. :class:`ResumeCache` runs an evaluation set's
sequences once without any intervention, keeps the residual stream entering
block ``L`` (per length bucket, for each layer asked for), and then scores any
intervention that starts at ``L`` or later by running blocks ``L..n-1`` only.
Exact: the skipped blocks' output is what the unmodified model computes, bit for bit.

How: the bridge's public ``start_at_layer`` feeds the kept residual into block
``L``, and :func:`skip_blocks` turns the wrapped Hugging Face layers ``0..L-1``
into identities for the call (TransformerLens would otherwise run them and
discard their output). That second part uses a library internal
(``BlockBridge.original_component``), so the first resumed forward per model is
compared with the full forward by :func:`mechbias.core.fastpath.fast_path_status`
(check ``"resume"``); on disagreement the full forward runs instead, loudly.

Masked LMs and models without the bridge's block stack always run the full forward.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .families import is_masked_lm
from .hooks import hooked
from .pathcheck import PathCheck, compare
from .sites import hook_name
from .window import forward_window

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

_LAYER_IN_NAME = re.compile(r"(?:^|\.)(?:blocks|layers|h|layer)\.(\d+)(?:\.|$)")
_AFTER_BLOCKS = re.compile(r"^(?:unembed|ln_final)\.|(?:^|\.)(?:lm_head|ln_f|final_layernorm|norm|final_norm)\.")


def layer_of_name(name: str, n_layers: int) -> int:
    """The block a hook or parameter name belongs to: ``blocks.7.mlp.hook_post`` and
    ``model.layers.7.mlp.down_proj.weight`` give 7; the unembedding and the final norm give ``n_layers``;
    anything else (embeddings, unknown names) gives 0, the safe answer (nothing is skipped)."""
    m = _LAYER_IN_NAME.search(name)
    if m:
        return int(m.group(1))
    if _AFTER_BLOCKS.search(name):
        return n_layers
    return 0


def resumable(model: TransformerBridge) -> bool:
    """Whether ``model`` can resume at a layer at all: a causal bridge over a Hugging Face model with a
    ``blocks`` stack (TransformerLens-native models run their own block loop, which this does not patch)."""
    blocks = getattr(model, "blocks", None)
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return (not is_masked_lm(model) and blocks is not None and len(blocks) > 1
            and isinstance(getattr(model, "original_model", None), PreTrainedModel)
            and all(isinstance(getattr(b, "original_component", None), torch.nn.Module) for b in blocks))


def _identity_layer(hidden_states, *args, **kwargs):
    return hidden_states


@contextlib.contextmanager
def skip_blocks(model: TransformerBridge, layer: int):
    """Inside the block, the wrapped Hugging Face layers of blocks ``0..layer-1`` return their input unchanged
    (their hooks still fire on it). Only correct together with ``start_at_layer=layer``."""
    patched = []
    try:
        for i in range(layer):
            inner = model.blocks[i].original_component
            inner.forward = _identity_layer
            patched.append(inner)
        yield
    finally:
        for inner in patched:
            inner.__dict__.pop("forward", None)


def capture_resid(model: TransformerBridge, ids: Int[Tensor, "b p"], layer: int) -> Float[Tensor, "b p d_model"]:
    """The unmodified residual stream entering block ``layer`` for ``ids`` (blocks past it never run)."""
    with torch.no_grad(), forward_window(0, ids.shape[1]):
        out = model(ids, stop_at_layer=layer)
    if not isinstance(out, Tensor) or out.shape[:2] != ids.shape:
        raise RuntimeError(f"stop_at_layer={layer} returned {type(out).__name__}, not the residual stream")
    return out


def resumed_logits(model: TransformerBridge, resid: Float[Tensor, "b p d_model"], layer: int
                   ) -> Float[Tensor, "b p d_vocab"]:
    """The model's output when ``resid`` (the residual stream entering block ``layer``) runs through blocks
    ``layer..n-1``. Hooks active in the caller's context fire in those blocks."""
    with torch.no_grad(), skip_blocks(model, layer):
        return model(resid, start_at_layer=layer)


def resume_check(model: TransformerBridge, ids: Int[Tensor, "b p"], tol: float) -> PathCheck:
    """The self-check's part for this path: resumed at the middle block with a hook there (it must fire on the
    kept residual), against the full forward with the same hook."""
    if not resumable(model):
        return {"path": "exact", "ok": True, "reason": "the model cannot resume at a layer"}
    layer = max(1, model.cfg.n_layers // 2)
    shift = torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(1)).to(model.cfg.device)
    bump = [(hook_name("resid_pre", layer), lambda x, hook: x + shift.to(x.dtype))]
    try:
        with hooked(model, bump), forward_window(0, ids.shape[1]):
            exact = model(ids)
        resid = capture_resid(model, ids, layer)
        with hooked(model, bump), forward_window(0, ids.shape[1]):
            fast: Any = resumed_logits(model, resid, layer)
        out = compare("resume", fast, exact, tol)
    except Exception as e:
        out = compare("resume", e, torch.zeros(1), tol)
    out["layer"] = layer
    return out


class ResumeCache:
    """The unmodified residual streams of a fixed list of sequences at the layers asked for.

    ``seqs`` run in the same length buckets as :func:`~mechbias.core.runner.map_last_logits` (no
    padding). :meth:`map_last_logits` is that function for an intervention whose earliest block is
    ``layer``: the caller applies the intervention around the call. ``max_bytes`` bounds the residual
    streams kept (the least recently used layer is dropped first)."""

    def __init__(self, model: TransformerBridge, seqs: Sequence[Tensor], buckets: list[list[int]], *, max_bytes: float = 2**30):
        self.model, self.seqs, self.buckets = model, list(seqs), buckets
        self.max_bytes = max_bytes
        self._resid: dict[int, list[Tensor]] = {}
        self.captures = 0  # how many layers were captured (each costs a forward through blocks 0..layer-1)

    def resid(self, layer: int) -> list[Tensor]:
        hit = self._resid.pop(layer, None)
        if hit is None:
            device = self.model.cfg.device
            hit = [capture_resid(self.model, torch.stack([self.seqs[i] for i in b]).to(device), layer)
                   for b in self.buckets]
            self.captures += 1
        self._resid[layer] = hit  # most recently used last
        size = sum(t.numel() * t.element_size() for v in self._resid.values() for t in v)
        while size > self.max_bytes and len(self._resid) > 1:
            old = next(iter(self._resid))
            size -= sum(t.numel() * t.element_size() for t in self._resid.pop(old))
        return hit

    def map_logits(self, fn: Callable[[Tensor, list[int]], Tensor], layer: int, *,
                   trim: Callable[[], Any] | None = None) -> Float[Tensor, "seqs ..."]:
        """``fn(logits, bucket)`` for every bucket, stacked in the order of the sequences: ``fn`` maps the float32
        logits ``[rows, positions, vocab]`` of a bucket to one tensor row per sequence. ``layer`` 0 runs the
        plain forward (nothing captured); ``layer >= 1`` resumes there. ``trim()``: a context manager active
        around each forward (e.g. unembedding only the last positions)."""
        device = self.model.cfg.device
        resid = self.resid(layer) if layer > 0 else [None] * len(self.buckets)
        results: list[Tensor | None] = [None] * len(self.seqs)
        for bucket, r in zip(self.buckets, resid, strict=True):
            total = len(self.seqs[bucket[0]])
            with forward_window(0, total), (trim() if trim is not None else contextlib.nullcontext()):
                if r is None:
                    with torch.no_grad():
                        logits = self.model(torch.stack([self.seqs[i] for i in bucket]).to(device))
                else:
                    logits = resumed_logits(self.model, r, layer)
            out = fn(logits.float(), bucket)
            for k, i in enumerate(bucket):
                results[i] = out[k].detach().cpu()
        return torch.stack(results)  # type: ignore[arg-type]

    def stacked_last_logits(self, readout: Callable[[Tensor], Tensor], layer: int, copies: int, *,
                            on_chunk: Callable[[range, int], Any], n_last: int = 1,
                            unembed: Callable[[int], Any] | None = None,
                            max_tokens: int = 4096) -> Float[Tensor, "copies seqs ..."]:
        """:meth:`map_last_logits` for ``copies`` versions of every sequence, several per forward: each bucket's
        kept residual stream is repeated for a chunk of copies (as many as keep the forward within
        ``max_tokens``, at least one) and resumed once. ``on_chunk(copy_range, rows)`` gives the context manager
        entered around that forward, which tells the caller's hooks that rows ``j * rows ... (j + 1) * rows - 1``
        belong to copy ``copy_range[j]``. Rows of a batch never interact in a transformer, so each copy's
        values equal a separate forward's (to float rounding of the larger matrix products)."""
        if layer < 1:
            raise ValueError("stacked copies resume from a kept residual stream: layer must be >= 1")
        resid = self.resid(layer)
        results: list[list[Tensor | None]] = [[None] * len(self.seqs) for _ in range(copies)]
        for bucket, r in zip(self.buckets, resid, strict=True):
            total = len(self.seqs[bucket[0]])
            per = max(1, int(max_tokens) // max(1, r.shape[0] * total))
            for start in range(0, copies, per):
                chunk = range(start, min(copies, start + per))
                with forward_window(0, total), (unembed(n_last) if unembed is not None else contextlib.nullcontext()), \
                        on_chunk(chunk, r.shape[0]):
                    logits = resumed_logits(self.model, r.repeat(len(chunk), 1, 1), layer)
                out = readout(logits.float()[:, -n_last:]).detach().cpu()
                for j, c in enumerate(chunk):
                    for k, i in enumerate(bucket):
                        results[c][i] = out[j * r.shape[0] + k]
        return torch.stack([torch.stack(rows) for rows in results])  # type: ignore[arg-type]

    def map_last_logits(self, readout: Callable[[Tensor], Tensor], layer: int, *, n_last: int = 1,
                        unembed: Callable[[int], Any] | None = None) -> Float[Tensor, "seqs ..."]:
        """``readout`` of the last ``n_last`` positions' logits, every sequence resumed at ``layer``.
        ``unembed(n_last)``: a context manager trimming positions before the unembedding."""
        return self.map_logits(lambda lg, bucket: readout(lg[:, -n_last:]), layer,
                               trim=(lambda: unembed(n_last)) if unembed is not None else None)
