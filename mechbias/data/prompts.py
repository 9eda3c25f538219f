"""Prompt sets (a context's templates x an axis's names) and the tokenization helpers that read them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .axes import Axis, Person

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


@dataclass(frozen=True)
class Prompt:
    """One filled template: its text, template index, person and group."""
    text: str
    template: int
    person: Person
    group: int  # 0 = group A, 1 = group B of the axis


@dataclass
class PromptSet:
    """A grid of prompts (templates x names) for one context and axis.

    Args:
        context: the context's name.
        axis: the :class:`~mechbias.Axis`.
        positive: the favourable answer.
        negative: the unfavourable answer.
        items: the prompts, each with its template index, person and group.
        answer_prefix: text the answer is read after (numeric prompts).
        blocks: the incomplete design's number of name blocks (1 = the full grid).
    """

    context: str
    axis: Axis
    positive: str
    negative: str
    items: list[Prompt]
    answer_prefix: str = ""  # numeric prompts: text that starts the assistant's answer
    blocks: int = 1  # > 1: the incomplete crossed design (each template meets one block of names)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.items]

    @property
    def groups(self) -> Int[Tensor, " n"]:
        return torch.tensor([p.group for p in self.items])

    @property
    def template_ids(self) -> list[int]:
        return sorted({p.template for p in self.items})

    @property
    def names(self) -> list[str]:
        seen: dict[str, None] = {}
        for p in self.items:
            seen.setdefault(p.person.name, None)
        return list(seen)

    def by_template(self) -> list[list[int]]:
        """Indices of the prompts of each template (prefix-sharing groups)."""
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(self.items):
            groups.setdefault(p.template, []).append(i)
        return list(groups.values())

    def subset(self, keep: Iterable[int]) -> PromptSet:
        return PromptSet(self.context, self.axis, self.positive, self.negative, [self.items[i] for i in keep],
                         self.answer_prefix, self.blocks)

    def grid(self, values: Float[Tensor, " n"]
             ) -> tuple[Float[Tensor, "templates names"], list[int], list[str], Int[Tensor, " names"]]:
        """Arrange per-prompt ``values`` as a matrix ``[templates, names]``.

        Returns the matrix, the template ids (rows), the names (columns) and
        the group of each column. Raises if the set is not a full grid, unless it was built with the
        incomplete crossed design (``blocks > 1``): then a name's cells for the templates it did not meet
        are NaN (the statistics of :mod:`mechbias.eval.stats` read them as missing).
        """
        t_ids, names = self.template_ids, self.names
        ti = {t: i for i, t in enumerate(t_ids)}
        ni = {n: i for i, n in enumerate(names)}
        mat = torch.full((len(t_ids), len(names)), float("nan"), dtype=torch.float64)
        col_group = torch.zeros(len(names), dtype=torch.long)
        for v, p in zip(values.tolist(), self.items, strict=True):
            mat[ti[p.template], ni[p.person.name]] = v
            col_group[ni[p.person.name]] = p.group
        if torch.isnan(mat).any() and self.blocks == 1:
            raise ValueError("prompt set is not a full templates x names grid")
        return mat, t_ids, names, col_group


def tokenize(model: TransformerBridge, texts: Sequence[str]) -> list[Tensor]:
    """Token ids of each text, with the model's BOS prepended, as 1-D tensors."""
    return [model.to_tokens(t, prepend_bos=True)[0].cpu() for t in texts]


def _word_ids(model: TransformerBridge, text: str) -> Tensor:
    """Token ids of ``text`` alone: no BOS, and none of the special tokens a masked LM's tokenizer adds
    around every text (``[CLS]``/``[SEP]``, ``<s>``/``</s>``)."""
    ids = model.to_tokens(text, prepend_bos=False)[0].cpu()
    if getattr(model.tokenizer, "mask_token_id", None) is not None:
        special = torch.tensor(sorted(set(model.tokenizer.all_special_ids)), dtype=ids.dtype)
        ids = ids[~torch.isin(ids, special)]
    return ids


def answer_tokens(model: TransformerBridge, answer: str) -> Int[Tensor, " t"]:
    """Token ids of an answer continuation (no BOS)."""
    if not answer:
        raise ValueError("empty answer string")
    ids = _word_ids(model, answer)
    if len(ids) == 0:
        raise ValueError(f"answer {answer!r} tokenizes to nothing")
    return ids


def single_token(model: TransformerBridge, word: str, what: str = "target word") -> int:
    """The id of ``word`` if it is exactly one token; a clear error otherwise."""
    ids = _word_ids(model, word)
    if len(ids) != 1:
        pieces = model.to_str_tokens(ids) if len(ids) else []
        raise ValueError(
            f"{what} {word!r} is not a single token for this model: it splits into {len(ids)} "
            f"tokens {pieces}. Use a word that is one token (mind the leading space)."
        )
    return int(ids[0])
