"""Bias metrics.

* :func:`contrast_scores` — the workhorse: ``log P(positive) - log P(negative)``
  after each prompt (multi-token answers by teacher forcing). Differentiable
  versions live with the methods that need gradients.
* :func:`measure_bias` — mean score of group A minus group B per context and
  axis, with a crossed bootstrap CI over names and templates
  (:class:`BiasResult`).
* :func:`demographic_gap` — IG²-style ``P(d1) - P(d2)`` at the prediction position.
* :func:`perplexity` — capability on the shipped neutral text set.

The generation metric of Breaking Down Bias is in :mod:`mechbias.generation`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.families import is_masked_lm
from ..core.fastpath import last_position_unembed, slice_cache, use_kv_cache, use_resume
from ..core.precision import compute_precision
from ..core.results import Result, make_meta
from ..core.resume import ResumeCache
from ..core.runner import length_buckets, map_last_logits, pseudo_nll_each_readout, sequence_nll, tokens_per_batch
from ..core.window import forward_window
from ..data.axes import load_axis
from ..data.contexts import Context, design_blocks, load_context, load_contexts
from ..data.neutral import neutral_texts
from ..data.prompts import PromptSet, answer_tokens, single_token, tokenize
from ..interventions.base import Intervention, maybe_apply
from ..viz.plotting import plot_bias
from .records import BiasRow
from .stats import DEFAULT_BOOT, benjamini_hochberg, group_gap, mdd

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

GAP_KINDS = ("prob", "abs_prob", "logprob", "logit")


# ----------------------------------------------------------------------------
# per-prompt scores
# ----------------------------------------------------------------------------

def contrast_scores(
    model: TransformerBridge,
    prompts: PromptSet | Sequence[str],
    positive: str | None = None,
    negative: str | None = None,
    *,
    intervention: Intervention | None = None,
    share_prefix: bool = False,
    max_tokens: int | None = None,
    progress: bool = False,
    answer_columns: bool = True,
) -> Float[Tensor, " n"]:
    """``log P(positive | prompt) - log P(negative | prompt)`` for every prompt.

    Multi-token answers are scored by teacher forcing (sum of the answer tokens' log-probabilities). With
    single-token answers this equals the logit difference. With ``share_prefix`` the prompts of one template
    share their prefix computation; it is off by default because on the CPU it was slower than full sequences
    batched by length (the axis choice's 640 prompts: 27.9 s against 13.7 s on one thread, gaps equal to
    2e-7): each template meets few names in the incomplete design, and names of other token lengths need their
    own prefix, so its forwards run as many small batches.

    Args:
        model: the model.
        prompts: a :class:`~mechbias.PromptSet` (its context's answers are used) or plain strings.
        positive: the favourable answer; required with plain strings.
        negative: the unfavourable answer; required with plain strings.
        intervention: score under this intervention.
        share_prefix: compute a shared template prefix once (exact; self-checked at run time; slower on the
            CPU for this package's prompts, see above).
        max_tokens: refuse prompts longer than this.
        progress: show a progress bar.
        answer_columns: with single-token answers, unembed only the two answer columns (exact; self-checked;
            :mod:`mechbias.core.answer_columns`); ``False`` unembeds the whole vocabulary.

    Returns:
        A float tensor with one score per prompt, in the prompts' order.
    """
    if isinstance(prompts, PromptSet):
        positive = positive if positive is not None else prompts.positive
        negative = negative if negative is not None else prompts.negative
        groups = prompts.by_template() if share_prefix else None
        texts = prompts.texts
    else:
        texts = list(prompts)
        groups = None
    if positive is None or negative is None:
        raise ValueError("contrast_scores needs the positive and negative answers")
    if not texts:
        raise ValueError("contrast_scores got no prompts")
    with maybe_apply(intervention, model):
        out = [sign * map_last_logits(model, seqs, readout, n_last=k, prefix_groups=groups, max_tokens=max_tokens,
                                      progress=progress, columns=cols if answer_columns else None)
               for seqs, readout, k, sign, cols in contrast_passes(model, texts, positive, negative)]
    return (out[0] if len(out) == 1 else out[0] + out[1]).double()


def contrast_passes(model: TransformerBridge, texts: Sequence[str], positive: str, negative: str
                    ) -> list[tuple[list[Tensor], Callable[[Tensor], Tensor], int, float, tuple[int, ...] | None]]:
    """How :func:`contrast_scores` reads its score, as forward passes ``(sequences, readout, n_last, sign,
    columns)`` whose signed readouts add up to the score: one pass (the logit difference at the last
    position, which reads the two answer columns only) for single-token answers; for multi-token answers one
    teacher-forced pass per answer (the sum of the answer tokens' log-probabilities, the negative answer's with
    sign -1; a log-softmax reads every column: ``columns`` is ``None``)."""
    seqs = tokenize(model, texts)
    pos, neg = answer_tokens(model, positive), answer_tokens(model, negative)
    if len(pos) == 1 and len(neg) == 1:
        p, n = int(pos[0]), int(neg[0])
        return [(seqs, lambda lg: lg[:, -1, p] - lg[:, -1, n], 1, 1.0, (p, n))]
    return [(*_teacher_forced(seqs, pos), 1.0, None), (*_teacher_forced(seqs, neg), -1.0, None)]


def _teacher_forced(seqs, answer: Tensor) -> tuple[list[Tensor], Callable[[Tensor], Tensor], int]:
    k = len(answer)
    ext = [torch.cat([s, answer[:-1]]) for s in seqs]
    ans = answer.clone()

    def readout(lg):  # [b, k, v]
        lp = lg.log_softmax(-1)
        return lp.gather(-1, ans.to(lp.device)[None, :, None].expand(lg.shape[0], k, 1))[..., 0].sum(-1)

    return ext, readout, k


def gap_from_logits(logits: Float[Tensor, "b v"], d1: int, d2: int, kind: str = "prob") -> Float[Tensor, " b"]:
    """The IG² gap between two target tokens from last-position logits.

    ``prob``: P(d1) - P(d2) (signed, the authors' code); ``abs_prob``:
    |P(d1) - P(d2)| (the poster's formula); ``logprob``: log P(d1) - log P(d2);
    ``logit``: logit(d1) - logit(d2) (equal to ``logprob`` for a full softmax).
    """
    if kind == "logit":
        return logits[..., d1] - logits[..., d2]
    lp = logits.log_softmax(-1)
    if kind == "logprob":
        return lp[..., d1] - lp[..., d2]
    diff = lp[..., d1].exp() - lp[..., d2].exp()
    if kind == "prob":
        return diff
    if kind == "abs_prob":
        return diff.abs()
    raise ValueError(f"unknown gap kind {kind!r}; choose from {GAP_KINDS}")


def demographic_gap(model: TransformerBridge, texts: Sequence[str], d1: str, d2: str, *, kind: str = "prob",
                    intervention: Intervention | None = None) -> Float[Tensor, " n"]:
    """IG²-style gap ``P(d1) - P(d2)`` (or a variant, see :func:`gap_from_logits`) after each text.

    Args:
        model: the model.
        texts: the demographic-prediction prompts.
        d1: the first demographic word (e.g. ``" he"``).
        d2: the second demographic word.
        kind: ``"prob"`` (the paper's probability difference) or another variant of
            :func:`gap_from_logits`.
        intervention: measure under this intervention.

    Returns:
        A float tensor with one gap per text.
    """
    t1, t2 = single_token(model, d1, "demographic word d1"), single_token(model, d2, "demographic word d2")
    seqs = tokenize(model, texts)
    with maybe_apply(intervention, model):
        # the logit gap reads two columns; the others normalise over the whole vocabulary
        return map_last_logits(model, seqs, lambda lg: gap_from_logits(lg[:, -1], t1, t2, kind),
                               columns=(t1, t2) if kind == "logit" else None).double()


def favoured_group(model: TransformerBridge, context: Context | str, axis, *, templates="selection", names="selection",
                   seed: int = 0) -> int:
    """Index (0 = group A, 1 = group B) of the group the model favours on the contrast metric.

    Args:
        model: the model.
        context: a context name or object.
        axis: ``"race"`` or ``"gender"``.
        templates: the template split measured (default the selection split, so no decision reads
            held-out prompts).
        names: the name split measured.
        seed: seed of the splits.

    Returns:
        0 when group A's mean score is higher, else 1.
    """
    ctx = load_context(context)
    ps = ctx.prompts(axis, templates=templates, names=names, seed=seed)
    scores = contrast_scores(model, ps)
    g = ps.groups
    return 0 if float(scores[g == 0].mean() - scores[g == 1].mean()) >= 0 else 1


# ----------------------------------------------------------------------------
# bias per context and axis
# ----------------------------------------------------------------------------

@dataclass
class BiasResult(Result):
    """Baseline (or intervened) bias per context and axis, from :func:`~mechbias.measure_bias`.

    Args:
        rows: one dict per (context, axis) with ``gap`` (mean score of group A minus group B, in log-odds
            units of the contrast answers), ``ci_low``, ``ci_high`` (95% crossed bootstrap over names and
            templates), ``p_value``, ``effect_size`` (gap over the pooled SD of per-name mean scores),
            ``n_prompts``, the group labels and the name ``roster``; ``min_detectable`` is the gap a test
            at 0.05 detects with power 0.8, ``p_bh`` the Benjamini-Hochberg p over all rows (one family) and
            ``min_detectable_family`` the detectable gap at 0.05 / rows.
        prompts: one dict per scored prompt (context, axis, template, name, group).
        scores: every prompt's score, in the order of ``prompts``.
        meta: versions, seed and settings of the run.
    """

    rows: list[BiasRow]
    prompts: list[dict] = field(default_factory=list)
    scores: Tensor = field(default_factory=lambda: torch.zeros(0))
    meta: dict = field(default_factory=dict)
    result_type = "bias"

    def prompt_dataframe(self):
        import pandas as pd

        df = pd.DataFrame(self.prompts)
        df["score"] = self.scores.numpy()
        return df

    def get(self, context: str, axis: str) -> BiasRow:
        for r in self.rows:
            if r["context"] == context and r["axis"] == axis:
                return r
        raise KeyError(f"no row for context={context!r}, axis={axis!r}")

    def plot(self, ax=None):
        return plot_bias(self, ax=ax)


def measure_bias(
    model: TransformerBridge,
    contexts: Sequence[str | Context] | str | None = None,
    axes: Sequence[str] | str = ("race", "gender"),
    *,
    templates: str | Sequence[int] = "all",
    names: str = "all",
    intervention: Intervention | None = None,
    n_boot: int = DEFAULT_BOOT,
    seed: int = 0,
    blocks: int = 1,
    templates_per_name: int | None = None,
    progress: bool = False,
) -> BiasResult:
    """Bias of ``model`` in each context and on each axis: the gap between the groups' contrast scores.

    Args:
        model: a model from :func:`~mechbias.load_model`.
        contexts: context names, :class:`~mechbias.Context` objects or ``"all"``; ``None`` = the built-ins.
        axes: ``"race"``, ``"gender"``, or either on another roster (``"gender@extended"``: 100 names per
            race x gender cell); a single string or several.
        templates: ``"all"``, ``"selection"``, ``"heldout"`` or a list of template indices.
        names: ``"all"``, ``"selection"`` or ``"heldout"``.
        intervention: measure under this intervention (applied for the call, removed after).
        n_boot: bootstrap replicates of the crossed bootstrap over names and templates.
        seed: seed of the splits and the bootstrap.
        blocks: ``> 1`` scores the incomplete crossed design of :meth:`Context.prompts` (each template meets
            1 / ``blocks`` of the names).
        templates_per_name: instead of ``blocks``: per context, the blocks that let each name meet about this
            many of the templates (:func:`~mechbias.data.contexts.design_blocks`).
        progress: show a progress bar.

    Returns:
        A :class:`~mechbias.BiasResult`: one row per (context, axis) with the gap, its 95% CI, p, the
        Benjamini-Hochberg p over the rows and the detectable gap, plus every prompt's score.

    Example:
        >>> res = measure_bias(model, ["finance"], "gender@extended", blocks=2)   # doctest: +SKIP
        >>> res.to_dataframe()[["context", "gap", "ci_low", "ci_high", "p_bh"]]   # doctest: +SKIP
    """
    ctxs = load_contexts(contexts)
    axes = [axes] if isinstance(axes, str) else list(axes)
    rows, prompt_rows, all_scores = [], [], []
    for ctx in ctxs:
        memo: dict[str, float] = {}  # both axes use the same names: score each prompt once
        for ax_name in axes:
            ax = load_axis(ax_name)
            if ax.name not in ctx.axes:
                continue
            b = blocks if templates_per_name is None else design_blocks(ctx, templates, templates_per_name, seed,
                                                                        ax.split_people(names, seed))
            ps = ctx.prompts(ax, templates=templates, names=names, seed=seed, blocks=b)
            todo = [i for i, p in enumerate(ps) if p.text not in memo]
            if todo:
                fresh = contrast_scores(model, ps.subset(todo), intervention=intervention, progress=progress)
                memo.update({ps.items[i].text: float(v) for i, v in zip(todo, fresh, strict=True)})
            scores = torch.tensor([memo[p.text] for p in ps], dtype=torch.float64)
            rows.append(bias_row(ps, scores, n_boot=n_boot, seed=seed))
            for p in ps:
                prompt_rows.append({"context": ctx.name, "axis": ax.name, "template": p.template,
                                    "name": p.person.name, "group": ax.groups[p.group]})
            all_scores.append(scores)
    if not rows:
        raise ValueError(f"no context in {[c.name for c in ctxs]} is crossed with axes {axes}")
    # the rows are one family of tests: Benjamini-Hochberg over them, and the detectable gap at alpha / m
    # (BH's threshold for the smallest p-value; a conservative bound for the others)
    for r, q in zip(rows, benjamini_hochberg([r["p_value"] for r in rows]), strict=True):
        r["p_bh"] = q
        r["min_detectable_family"] = mdd(r["se"], r["df"], 0.05 / len(rows))
    meta = make_meta(model, contexts=[c.name for c in ctxs], axes=axes, seed=seed, n_boot=n_boot, blocks=blocks, templates_per_name=templates_per_name,
                     templates=templates if isinstance(templates, str) else list(templates), names=names,
                     intervention=intervention.describe() if intervention else None)
    return BiasResult(rows, prompt_rows, torch.cat(all_scores), meta)


def bias_row(ps: PromptSet, scores: Float[Tensor, " n"], *, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> BiasRow:
    """One row of :class:`BiasResult` from a prompt set and its scores."""
    mat, t_ids, _names, col_group = ps.grid(scores)
    g = group_gap(mat, col_group, n_boot=n_boot, seed=seed)
    return {"context": ps.context, "axis": ps.axis.name, "roster": ps.axis.roster,  # type: ignore[typeddict-item]
            "group_a": ps.axis.groups[0], "group_b": ps.axis.groups[1], **g.as_dict(), "templates": t_ids}


# ----------------------------------------------------------------------------
# capability: perplexity on neutral text
# ----------------------------------------------------------------------------

def token_nll(model: TransformerBridge, texts: Sequence[str], *, intervention: Intervention | None = None,
              max_tokens: int | None = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and token count over ``texts``.

    An intervention that acts at every position is applied to whole sequences. One
    that acts at particular positions (``"last"``, the prediction position, or a
    list) is applied the way a prompt meets it: each next token is predicted with
    the intervention in place at the predicting position (see
    :func:`_nll_each_prediction`), so its capability cost is not hidden by where
    a batch happens to end.
    """
    if intervention is not None and str(intervention.positions) != "all":
        seqs = tokenize(model, texts)
        with maybe_apply(intervention, model), torch.no_grad():
            if is_masked_lm(model):
                return pseudo_nll_each_readout(model, seqs)
            return _nll_each_prediction(model, seqs)
    if use_resume(model):
        # whole sequences in length buckets, resumed at the intervention's first block from the unmodified
        # residual stream (kept per model and text set, so the draws of a control share it); the unmodified
        # model runs the same buckets, so an intervention that changes nothing changes nothing here either
        cache = _nll_cache(model, texts, max_tokens)
        layer = 0 if intervention is None else min(intervention.first_layer(model), int(model.cfg.n_layers) - 1)
        if layer > 0:
            cache.resid(layer)  # captured before the intervention applies
        with maybe_apply(intervention, model):
            nll = cache.map_logits(_next_token_nll(cache), layer)
        return float(nll.sum()), sum(len(q) - 1 for q in cache.seqs)
    with maybe_apply(intervention, model):
        return sequence_nll(model, tokenize(model, texts), max_tokens=max_tokens)


_NLL_CACHES: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def _nll_cache(model: TransformerBridge, texts: Sequence[str], max_tokens: int | None) -> ResumeCache:
    """The resume cache of a text set on ``model`` (the two most recently used text sets are kept)."""
    per = _NLL_CACHES.setdefault(model, {})
    key = (tuple(texts), max_tokens)
    if key not in per:
        while len(per) >= 2:
            per.pop(next(iter(per)))
        seqs = tokenize(model, texts)
        per[key] = ResumeCache(model, seqs, length_buckets([len(q) for q in seqs], tokens_per_batch(model, max_tokens)),
                               max_bytes=2**29)
    hit = per.pop(key)
    per[key] = hit
    return hit


def _next_token_nll(cache: ResumeCache):
    def fn(logits: Tensor, bucket: list[int]) -> Tensor:  # per row: the summed NLL of every next token
        ids = torch.stack([cache.seqs[i] for i in bucket]).to(logits.device)
        lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        return -lp.sum(-1)
    return fn


def _nll_each_prediction(model: TransformerBridge, seqs: Sequence[Tensor]) -> tuple[float, int]:
    """NLL where the prediction of token ``t + 1`` runs with the hooks' "last" position at ``t``.

    Exact for a causal model: the clean-of-position-hooks prefix is computed once
    (positions ``< t`` with every all-position hook active) into a KV cache, and
    each position ``t`` then runs as one token on the cache sliced to ``t``
    inside a forward window ``(t, t + 1)``. Models without KV-cache support run
    every prefix ``[:t + 1]`` in full (same values, quadratic cost).
    """
    device = model.cfg.device
    n, longest = len(seqs), max(len(s) for s in seqs)
    batch = torch.zeros(n, longest, dtype=torch.long)
    mask = torch.zeros(n, longest, dtype=torch.bool)
    for r, s in enumerate(seqs):
        batch[r, : len(s)] = s
        mask[r, : len(s)] = True
    batch = batch.to(device)
    total, count = 0.0, 0
    use_kv = use_kv_cache(model)
    cache = None
    if use_kv and longest > 2:
        with forward_window(0, longest), last_position_unembed(model, 1):  # right padding affects no earlier position
            _, cache = model(batch[:, :-1], return_type="logits_and_cache", use_cache=True)
    for t in range(longest - 1):
        valid = mask[:, t + 1].to(device)
        if not bool(valid.any()):
            continue
        if use_kv and t > 0 and cache is not None:
            with forward_window(t, t + 1):
                logits = model(batch[:, t:t + 1], past_key_values=slice_cache(cache, t))
        else:
            with forward_window(0, t + 1):
                logits = model(batch[:, : t + 1])
        lp = logits[:, -1].float().log_softmax(-1).gather(-1, batch[:, t + 1, None])[:, 0]
        total += float(-(lp * valid).sum())
        count += int(valid.sum())
    return total, count


def perplexity(model: TransformerBridge, texts: Sequence[str] | None = None, *, intervention: Intervention | None = None,
               max_texts: int | None = None) -> float:
    """Perplexity on ``texts`` (default: the reporting half of the neutral set), computed in float32.

    Args:
        model: the model.
        texts: the texts; ``None`` = the reporting half of the neutral texts.
        intervention: measure under this intervention.
        max_texts: with ``texts=None``, use only the first this many neutral texts.

    Returns:
        exp of the mean next-token negative log-likelihood over all predicted tokens.
    """
    texts = list(texts) if texts is not None else neutral_texts(max_texts, split="reporting")
    if not texts:
        raise ValueError("perplexity needs at least one text")
    with compute_precision(model, "exact"):  # a reported number
        nll, n = token_nll(model, texts, intervention=intervention)
    return float(np.exp(nll / max(n, 1)))
