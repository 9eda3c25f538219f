"""Log-likelihoods of texts and continuations under a causal model: what the external benchmarks and the
lm-eval model type are scored with.

Every function runs the model as it is: wrap a call in ``intervention.apply(model)``
(or :func:`~mechbias.interventions.base.maybe_apply`) to score under an intervention.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.families import is_masked_lm
from ..core.fastpath import use_kv_cache
from ..core.runner import length_buckets, map_last_logits, tokens_per_batch
from ..data.prompts import tokenize

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


def sentence_logprob(model: TransformerBridge, texts: Sequence[str], max_tokens: int | None = None
                     ) -> Float[Tensor, " n"]:
    """Sum of log P(token_t | tokens_<t) over each text (after BOS), float64."""
    lp, _ = token_logprobs(model, tokenize(model, texts), max_tokens=max_tokens)
    return torch.tensor([float(x.sum()) for x in lp], dtype=torch.float64)


def mean_token_logprob(model: TransformerBridge, texts: Sequence[str], max_tokens: int | None = None
                       ) -> Float[Tensor, " n"]:
    """The mean over each text's tokens (after BOS) of log P(token_t | tokens_<t): a length-normalised score."""
    lp, _ = token_logprobs(model, tokenize(model, texts), max_tokens=max_tokens)
    return torch.tensor([float(x.double().mean()) for x in lp], dtype=torch.float64)


@torch.no_grad()
def token_logprobs(model: TransformerBridge, seqs: Sequence[Tensor], *, max_tokens: int | None = None
                   ) -> tuple[list[Tensor], list[Tensor]]:
    """For each sequence: log P(token_t | tokens_<t) for t = 1..n-1, and whether token_t was the argmax."""
    max_tokens = tokens_per_batch(model, max_tokens)
    lps: list[Tensor] = [torch.empty(0)] * len(seqs)
    greedy: list[Tensor] = [torch.empty(0, dtype=torch.bool)] * len(seqs)
    for bucket in length_buckets([len(s) for s in seqs], max_tokens):
        ids = torch.stack([seqs[i] for i in bucket]).to(model.cfg.device)
        logp = model(ids).float().log_softmax(-1)[:, :-1]
        got = logp.gather(-1, ids[:, 1:, None])[..., 0]
        top = logp.argmax(-1) == ids[:, 1:]
        for k, i in enumerate(bucket):
            lps[i], greedy[i] = got[k].cpu(), top[k].cpu()
    return lps, greedy


def encode_pair(model: TransformerBridge, context: str, continuation: str) -> tuple[Tensor, Tensor]:
    """Token ids of a context (with BOS) and of its continuation.

    Trailing whitespace of the context moves to the continuation, and the
    continuation's ids are what the whole text's ids hold after the context's,
    so a word is tokenised as it is inside the text (with its leading space).
    """
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = model.to_tokens(stripped, prepend_bos=True)[0].cpu()
    whole = model.to_tokens(stripped + continuation, prepend_bos=True)[0].cpu()
    if not torch.equal(whole[: len(ctx)], ctx):  # the boundary merged into one token: split at the context
        return ctx, model.to_tokens(continuation, prepend_bos=False)[0].cpu()
    return ctx, whole[len(ctx):]


@dataclass
class Continuation:
    """The log-probability of a continuation, its length, and whether greedy decoding produces it."""
    logprob: float  # sum over the continuation's tokens
    n_tokens: int
    greedy: bool  # every continuation token was the model's argmax


def continuation_logprob(model: TransformerBridge, pairs: Sequence[tuple[str, str]], *, max_tokens: int | None = None,
                         share_prefix: bool = False) -> list[Continuation]:
    """log P(continuation | context) for each ``(context, continuation)`` pair.

    Full sequences run in length buckets, and only the positions the continuations are read at are
    unembedded (1.4-2.0x faster than unembedding every position, on BBQ with the embedded model in two
    runs of ``benchmarks/continuations.py``). With ``share_prefix`` (and a model whose KV-cache fast path passed its
    self-check), pairs with the same context run that context once into a KV cache and only their
    continuations after it: half the FLOPs on BBQ, but each context's few answers then run as small batches,
    which on a CPU took 2x longer, so it is not the default. Every path agrees with
    :func:`continuation_logprob_reference` to float32 rounding (``tests/test_bench.py``).

    Args:
        model: the model (as it is: wrap the call in ``intervention.apply(model)`` to score under one).
        pairs: ``(context, continuation)`` strings.
        max_tokens: tokens per batch.
        share_prefix: run each distinct context once (exact; falls back to full sequences where the KV-cache
            fast path is not available).

    Returns:
        One :class:`Continuation` per pair, in order.
    """
    enc = _encode_pairs(model, pairs)
    if is_masked_lm(model):
        return _continuations_full(model, enc, max_tokens)
    share_prefix = share_prefix and use_kv_cache(model)
    width = max(len(cont) for _, cont in enc)  # positions read: the last `width` predictions of every row
    fits = [i for i, (ctx, cont) in enumerate(enc) if len(ctx) + len(cont) > width]
    out: list[Continuation | None] = [None] * len(enc)
    rest = [i for i, (ctx, cont) in enumerate(enc) if len(ctx) + len(cont) <= width]
    if rest:  # a row shorter than the widest continuation: full sequences for those rows
        for i, c in zip(rest, _continuations_full(model, [enc[i] for i in rest], max_tokens), strict=True):
            out[i] = c
    if not fits:
        return out  # type: ignore[return-value]
    tgt = torch.zeros(len(fits), width, dtype=torch.long)  # continuation ids, right-aligned
    read = torch.zeros(len(fits), width, dtype=torch.bool)
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for j, i in enumerate(fits):
        ctx, cont = enc[i]
        tgt[j, width - len(cont):], read[j, width - len(cont):] = cont, True
        groups[tuple(ctx.tolist())].append(j)

    def readout(logits: Tensor, rows: list[int]) -> Tensor:
        logp = logits[:, :-1].log_softmax(-1)  # the last `width` positions that predict a next token
        t, m = tgt[rows].to(logp.device), read[rows].to(logp.device)
        got = (logp.gather(-1, t[..., None])[..., 0].double() * m).sum(-1)
        greedy = ((logp.argmax(-1) == t) | ~m).all(-1).double()
        return torch.stack([got, greedy], -1)

    res = map_last_logits(model, [torch.cat(enc[i]) for i in fits], readout, n_last=width + 1,
                          prefix_groups=list(groups.values()) if share_prefix else None, max_tokens=max_tokens,
                          readout_rows=True)
    for j, i in enumerate(fits):
        out[i] = Continuation(float(res[j, 0]), len(enc[i][1]), bool(res[j, 1]))
    return out  # type: ignore[return-value]


def continuation_logprob_reference(model: TransformerBridge, pairs: Sequence[tuple[str, str]], *, max_tokens: int | None = None
                                   ) -> list[Continuation]:
    """:func:`continuation_logprob` over every full sequence, unembedding every position (the exact path)."""
    return _continuations_full(model, _encode_pairs(model, pairs), max_tokens)


def _encode_pairs(model: TransformerBridge, pairs: Sequence[tuple[str, str]]) -> list[tuple[Tensor, Tensor]]:
    enc = [encode_pair(model, c, x) for c, x in pairs]
    for (c, x), (_, cont) in zip(pairs, enc, strict=True):
        if len(cont) == 0:
            raise ValueError(f"the continuation {x!r} of {c[-40:]!r} tokenizes to nothing")
    return enc


def _continuations_full(model: TransformerBridge, enc: list[tuple[Tensor, Tensor]], max_tokens: int | None) -> list[Continuation]:
    seqs = [torch.cat([ctx, cont]) for ctx, cont in enc]
    lps, greedy = token_logprobs(model, seqs, max_tokens=max_tokens)
    out = []
    for (_ctx, cont), lp, g in zip(enc, lps, greedy, strict=True):
        k = len(cont)
        out.append(Continuation(float(lp[-k:].double().sum()), k, bool(g[-k:].all())))
    return out


# ----------------------------------------------------------------------------
# masked language models (BERT, RoBERTa): the benchmarks' masked-LM scores
# ----------------------------------------------------------------------------

def _mask_id(model: TransformerBridge) -> int:
    mid = getattr(model.tokenizer, "mask_token_id", None)
    if mid is None:
        raise ValueError("this masked LM's tokenizer has no mask token")
    return int(mid)


def _ids(model: TransformerBridge, text: str) -> Tensor:
    """Token ids with the tokenizer's own special tokens ([CLS] ... [SEP] / <s> ... </s>)."""
    return torch.tensor(model.tokenizer(text)["input_ids"], dtype=torch.long)


@torch.no_grad()
def _masked_logprobs(model: TransformerBridge, ids: Tensor, groups: Sequence[Sequence[int]]) -> list[Tensor]:
    """For each group of positions: mask them all at once in ``ids`` and return log P(original token) at each."""
    mask = _mask_id(model)
    out = []
    for k in range(0, len(groups), 32):
        chunk = groups[k:k + 32]
        batch = ids.repeat(len(chunk), 1)
        for row, pos in enumerate(chunk):
            batch[row, list(pos)] = mask
        logp = model(batch.to(model.cfg.device)).float().log_softmax(-1).cpu()
        out += [logp[row, list(pos), ids[list(pos)]] for row, pos in enumerate(chunk)]
    return out


def shared_token_pll(model: TransformerBridge, a: str, b: str) -> tuple[float, float]:
    """CrowS-Pairs' masked-LM score (Nangia et al., 2020): for each sentence, the sum over the tokens it shares
    with the other (aligned by longest matching blocks of token ids, special tokens excluded) of log P(token)
    with that one token masked."""
    ia, ib = _ids(model, a), _ids(model, b)
    sm = difflib.SequenceMatcher(a=ia[1:-1].tolist(), b=ib[1:-1].tolist(), autojunk=False)
    pa, pb = [], []
    for blk in sm.get_matching_blocks():
        pa += [1 + blk.a + j for j in range(blk.size)]
        pb += [1 + blk.b + j for j in range(blk.size)]
    sa = sum(float(x) for x in _masked_logprobs(model, ia, [[p] for p in pa]))
    sb = sum(float(x) for x in _masked_logprobs(model, ib, [[p] for p in pb]))
    return sa, sb


def masked_fill_logprob(model: TransformerBridge, template: str, fill: str, blank: str = "BLANK") -> float:
    """StereoSet's masked-LM score of a filling: the template with every token of ``fill`` masked at once, the
    mean over those tokens of log P(token)."""
    if template.count(blank) != 1:
        raise ValueError(f"the context {template!r} must contain {blank} exactly once")
    pre, post = template.split(blank)
    whole, rest = _ids(model, pre + fill + post), _ids(model, pre + post)
    p = 0  # the filling's tokens: what the filled text holds beyond the common prefix and suffix
    while p < min(len(whole), len(rest)) and whole[p] == rest[p]:
        p += 1
    q = 0
    while q < min(len(whole), len(rest)) - p and whole[-1 - q] == rest[-1 - q]:
        q += 1
    pos = list(range(p, len(whole) - q))
    if not pos:
        raise ValueError(f"cannot find the tokens of {fill!r} inside {template!r} for this tokenizer")
    return float(_masked_logprobs(model, whole, [pos])[0].double().mean())
