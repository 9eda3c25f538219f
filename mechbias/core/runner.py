"""Running many prompts through a bridge quickly and exactly.

Three ideas, used by every method:

* **Length buckets, no padding.** Prompts are grouped by token length and each
  group runs as one batch, so no padding token ever enters a forward pass and
  batched results equal single-prompt results.
* **Shared prefixes.** Prompts built from one template share every token
  before the name. The prefix runs once; its keys and values are kept in a
  Hugging Face KV cache that is *frozen* (broadcast to the batch, never
  extended), and only the suffixes run in batch. Exact, because a causal model's
  prefix does not depend on what follows. Used when the model supports a KV
  cache (Hugging Face-backed bridges); TransformerLens-native models fall back
  to full sequences.
* **Forward windows.** A forward pass may cover only part of a sequence (the
  prefix, or the suffix after a cached prefix). :func:`forward_window` records
  which absolute positions the current call covers, and
  :func:`local_positions` turns an intervention's absolute positions
  (``"all"``, ``"last"``, or indices) into indices of the current call. This is
  what keeps position-specific interventions correct under prefix sharing.

**Masked LMs** (BERT, RoBERTa) have no next token. Every readout of "the
model's prediction after a prompt" reads a mask token instead: inserted after
the prompt's text (before the tokenizer's closing special token), or the
prompt's own mask when it has exactly one (the IG² paper's fill-in form).
:func:`readout_ids` builds that sequence, :func:`readout_position` makes
``"last"`` in an intervention mean the mask's position, and every forward runs
the whole sequence (no shared prefix: a bidirectional prefix depends on what
follows). Perplexity becomes pseudo-perplexity (:func:`sequence_nll`).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .answer_columns import check_read
from .families import is_masked_lm
from .fastpath import answer_unembed, last_position_unembed, prefix_cache, use_kv_cache
from .hooks import hooked
from .window import forward_window, readout_position

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

#: Rows x tokens per forward pass on a CPU; bounds memory, tuned for a 2-core machine.
DEFAULT_TOKENS_PER_BATCH = 4096
_TOKENS: ContextVar[int | None] = ContextVar("mechbias_tokens_per_batch", default=None)


def tokens_for_memory(free_bytes: float, cfg, dtype_bytes: int, *, fraction: float = 0.5) -> int:
    """Tokens per forward pass whose activations fit in ``fraction`` of ``free_bytes``.

    A forward without gradients holds, per token, about the residual stream, one block's attention and MLP
    activations (``4 d_model + 2 d_mlp`` values in the model's dtype) and the logits with their float32 copy
    (``2 d_vocab`` float32 values). Attention scores (heads x sequence length per token) are left out: the
    prompts here are short. Clamped to [256, 2**20]."""
    per_token = (4 * cfg.d_model + 2 * cfg.d_mlp) * dtype_bytes + 8 * cfg.d_vocab
    return int(min(max(fraction * free_bytes // per_token, 256), 2**20))


def tokens_per_batch(model: TransformerBridge, requested: int | None = None) -> int:
    """The tokens per forward pass a batched call uses: ``requested`` if given; else the value set by
    :func:`batch_tokens`; else, on a CUDA device, what fits in half its free memory
    (:func:`tokens_for_memory`); else :data:`DEFAULT_TOKENS_PER_BATCH`."""
    if requested is not None:
        return int(requested)
    fixed = _TOKENS.get()
    if fixed is not None:
        return fixed
    device = torch.device(model.cfg.device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        dtype = getattr(model.cfg, "dtype", torch.float32)
        return tokens_for_memory(free, model.cfg, torch.empty(0, dtype=dtype).element_size())
    return DEFAULT_TOKENS_PER_BATCH


@contextlib.contextmanager
def batch_tokens(n: int):
    """Inside the block, batched calls that are not given ``max_tokens`` run ``n`` tokens per forward."""
    if n < 1:
        raise ValueError(f"tokens per batch must be >= 1, not {n}")
    token = _TOKENS.set(int(n))
    try:
        yield
    finally:
        _TOKENS.reset(token)


def readout_ids(model: TransformerBridge, seq: Int[Tensor, " p"]) -> tuple[Tensor, int]:
    """The token ids a prediction is read from, and the position it is read at.

    Causal LM: ``seq`` itself and its last position. Masked LM: ``seq``'s own mask
    token if it has exactly one, else a mask inserted after the text (before a
    closing ``[SEP]``/``</s>``).
    """
    if not is_masked_lm(model):
        return seq, len(seq) - 1
    tok = model.tokenizer
    mask = getattr(tok, "mask_token_id", None)
    if mask is None:
        raise ValueError(f"this masked LM's tokenizer ({type(tok).__name__}) has no mask token")
    found = (seq == mask).nonzero().flatten().tolist()
    if len(found) == 1:
        return seq, int(found[0])
    if len(found) > 1:
        raise ValueError(f"a prompt for a masked LM may hold at most one mask token; this one holds {len(found)}")
    closing = {getattr(tok, "sep_token_id", None), getattr(tok, "eos_token_id", None)} - {None}
    cut = len(seq) - 1 if len(seq) and int(seq[-1]) in closing else len(seq)
    out = torch.cat([seq[:cut], torch.tensor([mask], dtype=seq.dtype), seq[cut:]])
    return out, cut


# ----------------------------------------------------------------------------
# batching
# ----------------------------------------------------------------------------

def length_buckets(lengths: Sequence[int], max_tokens: int = DEFAULT_TOKENS_PER_BATCH) -> list[list[int]]:
    """Indices grouped by equal length, each group cut to at most ``max_tokens`` tokens."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(lengths):
        by_len[int(n)].append(i)
    out: list[list[int]] = []
    for n in sorted(by_len):
        idx = by_len[n]
        rows = max(1, max_tokens // max(n, 1))
        out.extend(idx[k : k + rows] for k in range(0, len(idx), rows))
    return out


def common_prefix_len(seqs: Sequence[Tensor]) -> int:
    """Length of the longest token prefix shared by every sequence."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0][:n]
    same = torch.ones(n, dtype=torch.bool)
    for s in seqs[1:]:
        same &= s[:n] == first
    bad = (~same).nonzero()
    return int(bad[0]) if len(bad) else n


def map_last_logits(
    model: TransformerBridge,
    seqs: Sequence[Int[Tensor, " p"]],
    readout: Callable[..., Tensor],
    *,
    n_last: int = 1,
    prefix_groups: Iterable[Sequence[int]] | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
    readout_rows: bool = False,
    columns: Sequence[int] | None = None,
) -> Float[Tensor, "seqs ..."]:
    """Apply ``readout`` to the logits of the last ``n_last`` positions of every sequence.

    Args:
        model: the model.
        seqs: 1-D token tensors (BOS included), any lengths.
        readout: maps logits ``[batch, n_last, vocab]`` to a tensor ``[batch, ...]``;
            it runs under ``torch.no_grad``.
        prefix_groups: groups of sequence indices whose members share a prefix
            (e.g. one template filled with different names). Each group's prefix
            runs once when the model supports a KV cache.
        n_last: how many final positions' logits each readout sees.
        max_tokens: tokens per batch (default: sized to the model and device).
        progress: show a progress bar.
        readout_rows: call ``readout(logits, rows)``, where ``rows`` are the indices into ``seqs`` of the
            batch's sequences (for a readout that needs per-sequence targets).
        columns: the vocabulary ids ``readout`` reads (e.g. the two answer tokens of a logit difference):
            only those columns are unembedded (self-checked; the others are NaN, and a readout that reads
            one raises). ``None``: every column.

    Returns:
        ``readout`` results stacked in the order of ``seqs``.
    """
    max_tokens = tokens_per_batch(model, max_tokens)
    if is_masked_lm(model):
        if readout_rows:
            raise ValueError("readout_rows is for causal models")
        return _map_masked(model, seqs, readout, n_last=n_last, max_tokens=max_tokens)
    n = len(seqs)
    results: list[Tensor | None] = [None] * n
    use_prefix = prefix_groups is not None and use_kv_cache(model)
    groups = [list(g) for g in prefix_groups] if use_prefix and prefix_groups is not None else [list(range(n))]
    done = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="forward", leave=False, disable=None)
    device = model.cfg.device
    with torch.no_grad():
        for group in groups:
            if not group:
                continue
            p = 0
            if use_prefix and len(group) > 1:
                p = common_prefix_len([seqs[i] for i in group])
                # every suffix must keep at least n_last tokens
                p = min(p, min(len(seqs[i]) for i in group) - n_last)
                p = max(p, 0)
            cache_by_total: dict[int, object] = {}
            for bucket in length_buckets([len(seqs[i]) for i in group], max_tokens):
                rows = [group[j] for j in bucket]
                total = len(seqs[rows[0]])
                batch = torch.stack([seqs[i] for i in rows]).to(device)
                if p > 0:
                    # the prefix is identical for all totals, but position-aware
                    # hooks need to know the total length, so cache per total
                    if total not in cache_by_total:
                        with forward_window(0, total):
                            cache_by_total[total] = prefix_cache(model, batch[:1, :p])
                    with forward_window(p, total), answer_unembed(model, n_last, columns):
                        logits = model(batch[:, p:], past_key_values=cache_by_total[total])
                else:
                    with forward_window(0, total), answer_unembed(model, n_last, columns):
                        logits = model(batch)
                last = logits[:, -n_last:].float()
                out = check_read(readout(last, rows) if readout_rows else readout(last), columns)
                for k, i in enumerate(rows):
                    results[i] = out[k].detach().cpu()
                done += len(rows)
                if bar is not None:
                    bar.update(len(rows))
    if bar is not None:
        bar.close()
    return torch.stack(results)  # type: ignore[arg-type]


def _map_masked(model: TransformerBridge, seqs, readout, *, n_last: int, max_tokens: int) -> Tensor:
    """:func:`map_last_logits` for a masked LM: the logits at each prompt's mask (see the module docstring)."""
    if n_last != 1:
        raise ValueError(f"a masked LM ({type(model.original_model).__name__}) predicts one token at its mask; "
                         f"answers of {n_last} tokens need a causal LM")
    prepared = [readout_ids(model, s) for s in seqs]
    keys = [(len(ids), pos) for ids, pos in prepared]
    results: list[Tensor | None] = [None] * len(seqs)
    by_key: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        by_key[key].append(i)
    device = model.cfg.device
    with torch.no_grad():
        for (n_tok, pos), idx in sorted(by_key.items()):
            for bucket in length_buckets([n_tok] * len(idx), max_tokens):
                rows = [idx[j] for j in bucket]
                batch = torch.stack([prepared[i][0] for i in rows]).to(device)
                with forward_window(0, n_tok), readout_position(pos):
                    logits = model(batch)
                out = readout(logits[:, pos : pos + 1].float())
                for k, i in enumerate(rows):
                    results[i] = out[k].detach().cpu()
    return torch.stack(results)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------
# activation capture
# ----------------------------------------------------------------------------

def capture(
    model: TransformerBridge,
    seqs: Sequence[Int[Tensor, " p"]],
    names: Sequence[str],
    *,
    position: str = "last",
    max_tokens: int | None = None,
) -> dict[str, Tensor]:
    """Activations at hook points ``names`` for every sequence, with no intervention and no gradient.

    ``position``: ``"last"`` (the prediction position: ``[n, ...]``) or ``"mean"``
    (mean over positions: ``[n, ...]``). Sequences run in length buckets (no
    padding), so each row equals a single-sequence forward. The forward stops
    after the deepest requested layer's activations are read only where the
    model allows; values are returned in float32 on the CPU.
    """
    if position not in ("last", "mean"):
        raise ValueError(f"capture position must be 'last' or 'mean', not {position!r}")
    rows = _capture_rows(model, seqs, names, (lambda a: a[:, -1]) if position == "last" else (lambda a: a.mean(1)),
                         max_tokens)
    return {n: torch.stack(v) for n, v in rows.items()}


def capture_all(model: TransformerBridge, seqs: Sequence[Int[Tensor, " p"]], names: Sequence[str], *, max_tokens: int | None = None
                ) -> dict[str, list[Tensor]]:
    """Activations at hook points ``names`` at every position of every sequence: per name, one ``[p, ...]``
    tensor per sequence (float32, CPU), with no intervention and no gradient (:func:`capture` reduced)."""
    return _capture_rows(model, seqs, names, lambda a: a, max_tokens)


def _capture_rows(model: TransformerBridge, seqs: Sequence[Tensor], names: Sequence[str], reduce: Callable[[Tensor], Tensor],
                  max_tokens: int | None) -> dict[str, list[Tensor]]:
    """The one capture loop: length buckets without padding, ``reduce`` applied to each ``[b, p, ...]``."""
    max_tokens = tokens_per_batch(model, max_tokens)
    out: dict[str, list] = {n: [None] * len(seqs) for n in names}
    device = model.cfg.device
    with torch.no_grad():
        for bucket in length_buckets([len(s) for s in seqs], max_tokens):
            ids = torch.stack([seqs[i] for i in bucket]).to(device)
            seen: dict[str, Tensor] = {}
            fwd = [(n, (lambda a, hook, n=n, seen=seen: seen.__setitem__(n, reduce(a)))) for n in names]
            with hooked(model, fwd), last_position_unembed(model, 1):
                model(ids)
            for n in names:
                vals = seen[n].float().cpu()
                for k, i in enumerate(bucket):
                    out[n][i] = vals[k]
    return out


def sequence_nll(model: TransformerBridge, seqs: Sequence[Int[Tensor, " p"]], *, max_tokens: int | None = None
                 ) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and token count over whole sequences (right-padded
    batches; padding never affects earlier positions of a causal model). Hooks active in the caller's
    context apply to every position.

    Masked LM: the pseudo-log-likelihood (Salazar et al., 2020; CrowS-Pairs' score): each token except the
    tokenizer's special tokens masked on its own, its log-probability read there; summed and counted the
    same way, so ``exp(total / count)`` is the pseudo-perplexity."""
    max_tokens = tokens_per_batch(model, max_tokens)
    if is_masked_lm(model):
        return _pseudo_nll(model, seqs, max_tokens=max_tokens)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches: list[list[int]] = []
    for k in order:  # ascending length: the last row of a batch is its longest
        if batches and (len(batches[-1]) + 1) * len(seqs[k]) <= max_tokens:
            batches[-1].append(k)
        else:
            batches.append([k])
    total, count = 0.0, 0
    device = model.cfg.device
    with torch.no_grad():
        for rows in batches:
            longest = len(seqs[rows[-1]])
            batch = torch.zeros(len(rows), longest, dtype=torch.long)
            mask = torch.zeros(len(rows), longest, dtype=torch.bool)
            for r, k in enumerate(rows):
                batch[r, : len(seqs[k])] = seqs[k]
                mask[r, : len(seqs[k])] = True
            with forward_window(0, longest):
                logits = model(batch.to(device)).float()
            lp = logits[:, :-1].log_softmax(-1).gather(-1, batch[:, 1:, None].to(logits.device))[..., 0]
            m = mask[:, 1:].to(lp.device)
            total += float(-(lp * m).sum())
            count += int(m.sum())
    return total, count


def pseudo_nll_each_readout(model: TransformerBridge, seqs: Sequence[Int[Tensor, " p"]]) -> tuple[float, int]:
    """A masked LM's pseudo-log-likelihood with each masked token as the readout position: an intervention's
    ``"last"`` acts at the token being predicted, as it acts at the mask of a prompt (one forward per token).
    The masked-LM counterpart of predicting each next token with a position-specific intervention in place."""
    return _pseudo_nll(model, seqs, max_tokens=1, each_readout=True)


def _pseudo_nll(model: TransformerBridge, seqs, *, max_tokens: int, each_readout: bool = False) -> tuple[float, int]:
    tok = model.tokenizer
    mask = tok.mask_token_id
    special = set(getattr(tok, "all_special_ids", []))
    total, count = 0.0, 0
    device = model.cfg.device
    with torch.no_grad():
        for s in seqs:
            where = [i for i, t in enumerate(s.tolist()) if t not in special]
            rows = 1 if each_readout else max(1, max_tokens // max(len(s), 1))
            for k in range(0, len(where), rows):
                pos = where[k : k + rows]
                batch = s[None].repeat(len(pos), 1)
                batch[torch.arange(len(pos)), pos] = mask
                at = readout_position(pos[0]) if each_readout else contextlib.nullcontext()
                with forward_window(0, len(s)), at:
                    lp = model(batch.to(device)).float().log_softmax(-1)
                got = lp[torch.arange(len(pos)), pos, s[pos].to(lp.device)]
                total += float(-got.sum())
                count += len(pos)
    return total, count
