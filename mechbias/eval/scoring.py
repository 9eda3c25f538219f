"""Log-likelihoods of texts and continuations under a causal model: what the external benchmarks and the
lm-eval model type are scored with.

Every function runs the model as it is: wrap a call in ``intervention.apply(model)``
(or :func:`~mechbias.interventions.base.maybe_apply`) to score under an intervention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..core.runner import length_buckets
from ..data.contexts import tokenize

DEFAULT_MAX_TOKENS = 4096


def sentence_logprob(model, texts: Sequence[str], max_tokens: int = DEFAULT_MAX_TOKENS) -> Tensor:
    """Sum of log P(token_t | tokens_<t) over each text (after BOS), float64."""
    lp, _ = token_logprobs(model, tokenize(model, texts), max_tokens=max_tokens)
    return torch.tensor([float(x.sum()) for x in lp], dtype=torch.float64)


def mean_token_logprob(model, texts: Sequence[str], max_tokens: int = DEFAULT_MAX_TOKENS) -> Tensor:
    """The mean over each text's tokens (after BOS) of log P(token_t | tokens_<t): a length-normalised score."""
    lp, _ = token_logprobs(model, tokenize(model, texts), max_tokens=max_tokens)
    return torch.tensor([float(x.double().mean()) for x in lp], dtype=torch.float64)


@torch.no_grad()
def token_logprobs(model, seqs: Sequence[Tensor], *, max_tokens: int = DEFAULT_MAX_TOKENS
                   ) -> tuple[list[Tensor], list[Tensor]]:
    """For each sequence: log P(token_t | tokens_<t) for t = 1..n-1, and whether token_t was the argmax."""
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


def encode_pair(model, context: str, continuation: str) -> tuple[Tensor, Tensor]:
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
    logprob: float  # sum over the continuation's tokens
    n_tokens: int
    greedy: bool  # every continuation token was the model's argmax


def continuation_logprob(model, pairs: Sequence[tuple[str, str]], *, max_tokens: int = DEFAULT_MAX_TOKENS
                         ) -> list[Continuation]:
    """log P(continuation | context) for each ``(context, continuation)`` pair."""
    enc = [encode_pair(model, c, x) for c, x in pairs]
    for (c, x), (_, cont) in zip(pairs, enc):
        if len(cont) == 0:
            raise ValueError(f"the continuation {x!r} of {c[-40:]!r} tokenizes to nothing")
    seqs = [torch.cat([ctx, cont]) for ctx, cont in enc]
    lps, greedy = token_logprobs(model, seqs, max_tokens=max_tokens)
    out = []
    for (ctx, cont), lp, g in zip(enc, lps, greedy):
        k = len(cont)
        out.append(Continuation(float(lp[-k:].double().sum()), k, bool(g[-k:].all())))
    return out
