"""The generation metric of Breaking Down Bias, done carefully.

For each numeric prompt (e.g. "what initial offer should I propose in US
dollars?") the model samples ``n_samples`` completions at temperature ``T``.
Numbers are parsed robustly — the first number, ranges to their midpoint,
``k``/``M`` suffixes and thousands separators — never by concatenating digits
(the released code turned "$500-$700" into 500700).

Sampling uses **per-sample seeds**: sample *i* of every prompt draws its
random numbers from a generator seeded with ``(seed, i)``, by inverse-CDF
sampling. Two runs that differ only by an intervention therefore use the same
random numbers, so before/after comparisons are paired (common random numbers).

Summary statistics: standardized mean difference (group A - group B, pooled
SD), Mann-Whitney U, parse-failure rate, and the inlier ratio — the share of
outputs inside the unmodified model's 5-95% band for the same prompt.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.fastpath import use_kv_cache
from ..core.results import Result, make_meta
from ..data.contexts import Context
from ..data.prompts import PromptSet
from ..interventions.base import Intervention, maybe_apply
from ..viz.plotting import plot_generation
from .describe import smd
from .records import GenerationCost, GenerationSummary

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

_NUM = r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_SUFFIX = r"\s*(k|K|thousand|m|M|million|mil|bn|billion)?\b"
_RANGE = re.compile(r"\$?\s*" + _NUM + _SUFFIX + r"\s*(?:-|–|—|to)\s*\$?\s*" + _NUM + _SUFFIX)
_SINGLE = re.compile(r"\$?\s*" + _NUM + _SUFFIX)
_MULT = {"k": 1e3, "thousand": 1e3, "m": 1e6, "million": 1e6, "mil": 1e6, "bn": 1e9, "billion": 1e9}


def _value(num: str, suffix: str | None) -> float:
    v = float(num.replace(",", ""))
    if suffix:
        v *= _MULT.get(suffix.lower(), 1.0)
    return v


def parse_number(text: str) -> float:
    """The first number in ``text`` (NaN if none).

    ``"$1,200"`` -> 1200, ``"1.5k"`` -> 1500, ``"$500-$700"`` -> 600,
    ``"between 10 and 20"`` -> 10 (first number), ``"12%"`` -> 12.
    """
    if not text:
        return float("nan")
    rng = _RANGE.search(text)
    single = _SINGLE.search(text)
    if rng and single and rng.start() <= single.start():
        a = _value(rng.group(1), rng.group(2) or rng.group(4))
        b = _value(rng.group(3), rng.group(4))
        return (a + b) / 2
    if single:
        return _value(single.group(1), single.group(2))
    return float("nan")


def chat_prompt(model: TransformerBridge, text: str, answer_prefix: str = "") -> Int[Tensor, " p"]:
    """Token ids for ``text`` as a user turn (chat template if the tokenizer has one).

    ``answer_prefix`` is appended after the generation prompt, starting the
    assistant's answer (e.g. ``"$"``).
    """
    tok = model.tokenizer
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        ids = torch.tensor(ids, dtype=torch.long)
    else:
        ids = model.to_tokens(text + " Answer:", prepend_bos=True)[0].cpu()
    if answer_prefix:
        ids = torch.cat([ids, model.to_tokens(answer_prefix, prepend_bos=False)[0].cpu()])
    return ids


def _uniforms(seed: int, n_samples: int, steps: int) -> Tensor:
    """``[n_samples, steps]`` uniforms; row i depends only on (seed, i)."""
    rows = []
    for i in range(n_samples):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
        rows.append(torch.rand(steps, generator=g, dtype=torch.float64))
    return torch.stack(rows)


def sample_completions(model: TransformerBridge, prompt_ids: Int[Tensor, " p"], *, n_samples: int = 20, temperature: float = 0.6,
                       max_new_tokens: int = 8, seed: int = 0) -> list[str]:
    """Sample ``n_samples`` completions with per-sample seeds (inverse-CDF sampling)."""
    return _sample_rows(model, prompt_ids[None], _uniforms(seed, n_samples, max_new_tokens), temperature)


def sample_replies(model: TransformerBridge, prompts: Sequence[Tensor], seeds: Sequence[int], *, temperature: float = 0.6,
                   max_new_tokens: int = 8) -> list[str]:
    """One completion per prompt, prompt ``i`` with seed ``seeds[i]``: the same text as
    ``sample_completions(model, prompts[i], n_samples=1, seed=seeds[i])[0]``, with prompts of equal token
    length sampled together in one batch (rows never see each other)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    out: list[str] = [""] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_len.setdefault(len(ids), []).append(i)
    for idx in by_len.values():
        u = torch.cat([_uniforms(seeds[i], 1, max_new_tokens) for i in idx])
        texts = _sample_rows(model, torch.stack([prompts[i] for i in idx]), u, temperature)
        for i, t in zip(idx, texts, strict=True):
            out[i] = t
    return out


def _sample_rows(model: TransformerBridge, ids: Int[Tensor, "b p"], u: Tensor, temperature: float) -> list[str]:
    """Row ``r`` of ``u`` (``[rows, steps]`` uniforms) samples a continuation of ``ids[0]`` (one prompt, ``b`` = 1)
    or of ``ids[r]`` (``b`` = rows)."""
    rows, max_new_tokens = u.shape
    if ids.shape[0] not in (1, rows):
        raise ValueError(f"{ids.shape[0]} prompts for {rows} rows of random numbers")
    eos = model.tokenizer.eos_token_id
    device = model.cfg.device
    out = torch.zeros(rows, 0, dtype=torch.long)
    done = torch.zeros(rows, dtype=torch.bool)
    ids = ids.to(device)
    kv = use_kv_cache(model)
    with torch.no_grad():
        if kv:
            logits, cache = model(ids, return_type="logits_and_cache", use_cache=True)
            if ids.shape[0] == 1 and rows > 1:
                cache.batch_repeat_interleave(rows)
            last = logits[:, -1].expand(rows, -1)
        else:
            last = model(ids)[:, -1].expand(rows, -1)
        for step in range(max_new_tokens):
            probs = torch.softmax(last.double() / max(temperature, 1e-6), -1).cpu()
            cdf = probs.cumsum(-1)
            nxt = torch.searchsorted(cdf, (u[:, step] * cdf[:, -1])[:, None]).clamp(max=probs.shape[-1] - 1)[:, 0]
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done |= nxt == eos
            out = torch.cat([out, nxt[:, None]], 1)
            if bool(done.all()):
                break
            if kv:
                logits, cache = model(nxt[:, None].to(device), past_key_values=cache, return_type="logits_and_cache")
                last = logits[:, -1]
            else:
                full = torch.cat([ids.expand(rows, -1).cpu(), out], 1).to(device)
                last = model(full)[:, -1]
    texts = []
    for row in out:
        toks = [t for t in row.tolist() if t != eos]
        texts.append(model.tokenizer.decode(toks, skip_special_tokens=True))
    return texts


@dataclass
class GenerationResult(Result):
    """Sampled numeric answers per prompt, and their group statistics.

    ``values``: ``[n_prompts, n_samples]`` parsed numbers (NaN = parse failure).
    ``summary``: SMD (group A - group B over all parsed values), Mann-Whitney
    p-value, parse-failure rate per group, mean per group, and the inlier ratio
    when a reference was given.
    """

    prompts: list[dict]
    values: Tensor
    texts: list[list[str]] = field(default_factory=list)
    summary: GenerationSummary = field(default_factory=lambda: GenerationSummary())
    meta: dict = field(default_factory=dict)
    result_type = "generation"

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for i, p in enumerate(self.prompts):
            for j, v in enumerate(self.values[i].tolist()):
                rows.append({**p, "sample": j, "value": v, "text": self.texts[i][j] if self.texts else None})
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        return plot_generation(self, ax=ax)


def generation_bias(
    model: TransformerBridge,
    prompts: PromptSet,
    *,
    n_samples: int = 20,
    temperature: float = 0.6,
    max_new_tokens: int = 8,
    seed: int = 0,
    intervention: Intervention | None = None,
    reference: GenerationResult | None = None,
    progress: bool = False,
) -> GenerationResult:
    """Sample numeric answers for every prompt and summarise the group difference."""
    rows, values, texts = [], [], []
    it = list(prompts)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", leave=False, disable=None)
    with maybe_apply(intervention, model):
        for p in it:
            ids = chat_prompt(model, p.text, prompts.answer_prefix)
            outs = sample_completions(model, ids, n_samples=n_samples, temperature=temperature,
                                      max_new_tokens=max_new_tokens, seed=seed)
            texts.append(outs)
            values.append([parse_number(o) for o in outs])
            rows.append({"context": prompts.context, "template": p.template, "name": p.person.name,
                         "group": prompts.axis.groups[p.group]})
    vals = torch.tensor(values, dtype=torch.float64)
    summary = summarize_generation(vals, [prompts.axis.groups[p.group] for p in prompts], prompts.axis.groups,
                                   reference.values if reference is not None else None,
                                   templates=[p.template for p in prompts], names=[p.person.name for p in prompts],
                                   seed=seed)
    meta = make_meta(model, context=prompts.context, axis=prompts.axis.name, n_samples=n_samples,
                     temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                     intervention=intervention.describe() if intervention else None)
    return GenerationResult(rows, vals, texts, summary, meta)


def summarize_generation(values: Float[Tensor, "prompts samples"], groups: Sequence[str], group_names: Sequence[str],
                         reference: Float[Tensor, "prompts samples"] | None = None, *, templates: Sequence[int] | None = None,
                         names: Sequence[str] | None = None, n_perm: int = 2000, seed: int = 0) -> GenerationSummary:
    """SMD per numeric question, averaged (the paper), a permutation p-value over names, parse failures
    (and the inlier ratio against ``reference``).

    The samples of one prompt share their random numbers with every other prompt (common random numbers,
    so before/after comparisons are paired), so they are not independent observations: the p-value
    permutes the group labels of **names** (each name's samples averaged per question), the unit that is
    exchangeable under "no group difference". ``smd_pooled`` keeps the earlier pooled SMD for reference.
    """
    v = values.numpy()
    ga = np.array([g == group_names[0] for g in groups])
    a, b = v[ga].ravel(), v[~ga].ravel()
    tpl = np.zeros(len(groups), dtype=int) if templates is None else np.asarray(templates)
    nm = np.asarray([str(i) for i in range(len(groups))] if names is None else list(names))
    per_q = [smd(v[(tpl == t) & ga].ravel(), v[(tpl == t) & ~ga].ravel()) for t in sorted(set(tpl.tolist()))]
    per_q = [x for x in per_q if np.isfinite(x)]
    out: GenerationSummary = {
        "group_a": group_names[0], "group_b": group_names[1],
        "smd": float(np.mean(per_q)) if per_q else math.nan, "smd_per_question": per_q, "smd_pooled": smd(a, b),
        "p_value_names": _name_permutation_p(v, tpl, nm, ga, n_perm, seed),
        "mean_a": float(np.nanmean(a)) if np.isfinite(a).any() else math.nan,
        "mean_b": float(np.nanmean(b)) if np.isfinite(b).any() else math.nan,
        "parse_failure_a": float(np.isnan(a).mean()) if a.size else math.nan,
        "parse_failure_b": float(np.isnan(b).mean()) if b.size else math.nan,
        "parse_failure": float(np.isnan(v).mean()) if v.size else math.nan,
    }
    if reference is not None:
        out["inlier_ratio"] = inlier_ratio(values, reference)
    return out


def _name_permutation_p(v: np.ndarray, tpl: np.ndarray, names: np.ndarray, ga: np.ndarray, n_perm: int,
                        seed: int) -> float:
    """Two-sided permutation p-value of the mean per-question difference of name means, permuting names."""
    uniq = sorted(set(names.tolist()))
    qs = sorted(set(tpl.tolist()))
    means = np.full((len(qs), len(uniq)), np.nan)
    for qi, q in enumerate(qs):
        for ni, n in enumerate(uniq):
            rows = (tpl == q) & (names == n)
            vals = v[rows].ravel()
            vals = vals[np.isfinite(vals)]
            if len(vals):
                means[qi, ni] = vals.mean()
    lab = np.array([bool(ga[names == n][0]) for n in uniq])
    if lab.all() or not lab.any():
        return math.nan

    def stat(is_a):
        with warnings.catch_warnings():  # a question with no parsed answer in a group is skipped, not warned
            warnings.simplefilter("ignore", RuntimeWarning)
            d = np.nanmean(means[:, is_a], 1) - np.nanmean(means[:, ~is_a], 1)
        return float(np.nanmean(d)) if np.isfinite(d).any() else math.nan

    obs = stat(lab)
    if not np.isfinite(obs):
        return math.nan
    rng = np.random.default_rng(seed)
    perm = np.array([stat(rng.permutation(lab)) for _ in range(n_perm)])
    perm = perm[np.isfinite(perm)]
    return float((1 + (np.abs(perm) >= abs(obs) - 1e-12).sum()) / (1 + len(perm)))


def inlier_ratio(values: Float[Tensor, "prompts samples"], reference: Float[Tensor, "prompts samples"],
                 lo: float = 5, hi: float = 95) -> float:
    """Share of parsed values inside the reference's [lo, hi] percentile band of the same prompt."""
    inside, total = 0, 0
    for row, ref in zip(values.numpy(), reference.numpy(), strict=True):
        ref = ref[np.isfinite(ref)]
        row = row[np.isfinite(row)]
        if len(ref) == 0 or len(row) == 0:
            continue
        a, b = np.percentile(ref, [lo, hi])
        inside += int(((row >= a) & (row <= b)).sum())
        total += len(row)
    return inside / total if total else math.nan


def generation_cost(model: TransformerBridge, ctx: Context, axis: str, iv: Intervention, *, n_samples: int = 8, n_names: int = 8,
                    max_new_tokens: int = 8, temperature: float = 0.6, seed: int = 0) -> GenerationCost:
    """Generation metric of an intervention on a context's numeric questions (held-out names)."""
    ps = ctx.numeric_prompts(axis, names="heldout", seed=seed)
    keep = set()
    for g in (0, 1):  # the same number of names from each group
        names = list(dict.fromkeys(p.person.name for p in ps if p.group == g))
        keep |= set(names[: max(1, n_names // 2)])
    ps = ps.subset([i for i, p in enumerate(ps) if p.person.name in keep])
    kw: dict[str, Any] = dict(n_samples=n_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=seed)
    ref = generation_bias(model, ps, **kw)
    after = generation_bias(model, ps, intervention=iv, reference=ref, **kw)
    return {"parse_failure_before": ref.summary["parse_failure"], "parse_failure_after": after.summary["parse_failure"],
            "inlier_ratio": after.summary.get("inlier_ratio"), "smd_before": ref.summary["smd"],
            "smd_after": after.summary["smd"], "n_prompts": len(ps), "n_samples": n_samples,
            "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
