"""GRADIEND texts: factual / counterfactual feature texts for a context and axis, and neutral texts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...data.axes import load_axis
from ...data.contexts import Context, design_blocks, fill, load_context
from ...data.neutral import neutral_texts
from ...data.prompts import single_token

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

FEATURE_SUFFIX = {
    "gender": (" Afterwards, {name} said that", None),
    "race": (" Is {name} White or Black? {name} is", " Is {name} Black or White? {name} is"),
}


# ----------------------------------------------------------------------------
# texts
# ----------------------------------------------------------------------------

@dataclass
class FeatureText:
    """One GRADIEND training text: its group, and the factual and counterfactual next tokens."""
    text: str
    group: int          # 0 = group A, 1 = group B, -1 = neutral
    factual: int        # token id of the factual next token
    counterfactual: int  # token id of the other group's word (= factual for neutral texts)
    template: int = -1
    name: str = ""


def feature_texts(model: TransformerBridge, context: Context | str, axis: str, *, templates: str | Sequence[int] = "selection",
                  names: str = "selection", seed: int = 0, templates_per_name: int = 0) -> list[FeatureText]:
    """Factual/counterfactual texts for one context and axis (see the module docstring). ``templates_per_name``
    > 0: each name meets about that many of the templates (the incomplete crossed design of
    :meth:`~mechbias.Context.prompts`); 0: every template."""
    ctx = load_context(context)
    ax = load_axis(axis)
    if ax.name not in FEATURE_SUFFIX:
        raise ValueError(f"no GRADIEND feature prompt for axis {ax.name!r}")
    words = [single_token(model, ax.words[g], f"{ax.name} word") for g in ax.groups]
    people = ax.split_people(names, seed)
    blocks = design_blocks(ctx, templates, templates_per_name, seed, people)
    out = []
    for prompt in ctx.prompts(ax, templates=templates, names=people, seed=seed, blocks=blocks):
        t, p = prompt.template, prompt.person
        question = ctx.templates[t].rsplit(" Answer:", 1)[0]
        suffix = FEATURE_SUFFIX[ax.name][t % 2] or FEATURE_SUFFIX[ax.name][0]
        g = ax.group_index(p)
        out.append(FeatureText(fill(question + suffix, p), g, words[g], words[1 - g], t, p.name))
    return out


def neutral_feature_texts(model: TransformerBridge, n: int = 24, length: int = 18, *, split: str = "reporting") -> list[FeatureText]:
    """Prefixes of the neutral paragraphs; the target is the real next token."""
    out = []
    for para in neutral_texts(split=split):
        ids = model.to_tokens(para)[0]
        for t in _prefix_texts(model, ids, range(length, len(ids) - 1, 2 * length)):
            out.append(t)
            if len(out) >= n:
                return out
    return out


def _prefix_texts(model: TransformerBridge, ids, ends) -> list[FeatureText]:
    """Prefixes ``ids[1:end]`` (BOS dropped) of one tokenized paragraph, each with its real next token."""
    return [FeatureText(model.to_string(ids[1:end]), -1, int(ids[end]), int(ids[end])) for end in ends]


def neutral_training_rows(model: TransformerBridge, per_row: int, *, split: str = "selection", first: int = 12,
                          step: int = 6) -> list[tuple[int, list[FeatureText]]]:
    """Neutral rows for GRADIEND training (the gradiend code's neutral-data option): prefixes of each
    neutral paragraph ending every ``step`` tokens from token ``first`` on, each with its real next token
    (factual = counterfactual, so the target ``F - C`` is exactly 0), grouped ``per_row`` consecutive
    prefixes of one paragraph to a row. Returns ``(paragraph index, texts)`` per row."""
    if per_row < 1:
        raise ValueError("per_row must be >= 1")
    out = []
    for i, para in enumerate(neutral_texts(split=split)):
        ids = model.to_tokens(para)[0]
        texts = _prefix_texts(model, ids, range(first, len(ids) - 1, step))
        out += [(i, texts[k:k + per_row]) for k in range(0, len(texts) - per_row + 1, per_row)]
    return out

