"""Aligned prompt pairs (symmetric token replacement) for patching: a group-A and a group-B prompt of one
template that tokenize to the same length."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from .axes import Axis, Person, load_axis, stable_hash
from .contexts import Context, fill, load_context
from .prompts import Prompt

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


class AlignmentError(ValueError):
    """Prompts that must align token by token (patching) do not."""


@dataclass
class PromptPairs:
    """Clean/corrupted prompt pairs that differ only in the demographic slot.

    ``clean`` holds group-A prompts, ``corrupt`` the same templates with a
    group-B name of the same token length (and the same other attribute, so
    pronouns match). ``clean_tokens``/``corrupt_tokens``: ``[n_pairs, seq]``
    within each length bucket; use :meth:`buckets` to iterate.
    """

    context: str
    axis: Axis
    positive: str
    negative: str
    clean: list[Prompt]
    corrupt: list[Prompt]
    clean_tokens: list[Tensor]
    corrupt_tokens: list[Tensor]

    def __len__(self) -> int:
        return len(self.clean)

    def swapped(self) -> PromptPairs:
        """The same pairs with clean and corrupted exchanged (group B as clean)."""
        return PromptPairs(self.context, self.axis, self.positive, self.negative, self.corrupt, self.clean,
                           self.corrupt_tokens, self.clean_tokens)

    def diff_positions(self, i: int) -> list[int]:
        return (self.clean_tokens[i] != self.corrupt_tokens[i]).nonzero().flatten().tolist()


def make_pairs(model: TransformerBridge, context: Context | str, axis: str | Axis, *, templates: str | Sequence[int] = "all",
               names: str = "all", seed: int = 0, max_pairs: int | None = None) -> PromptPairs:
    """Pair group-A and group-B prompts of equal token length, template by template.

    A pair shares the template and the name's other attribute (a race pair has two names of one gender, so
    pronouns stay the same) and the two prompts tokenize to the same length.

    Args:
        model: the model (its tokenizer decides the lengths).
        context: a context name or object.
        axis: ``"race"`` or ``"gender"``.
        templates: ``"all"``, ``"selection"``, ``"heldout"`` or template indices.
        names: ``"all"``, ``"selection"`` or ``"heldout"``.
        seed: seed of the splits and the pairing.
        max_pairs: keep at most this many pairs per template.

    Returns:
        The aligned :class:`~mechbias.data.pairs.PromptPairs`.

    Raises:
        AlignmentError: no pair can be formed.
    """
    ctx = load_context(context)
    ax = load_axis(axis)
    t_idx = ctx.template_split(templates, seed) if isinstance(templates, str) else list(templates)
    ppl = ax.split_people(names, seed)
    a_people = [p for p in ppl if ax.group_index(p) == 0]
    b_people = [p for p in ppl if ax.group_index(p) == 1]
    clean, corrupt, ct, rt = [], [], [], []
    for t in t_idx:
        tpl = ctx.templates[t]
        toks_a = {p: model.to_tokens(fill(tpl, p), prepend_bos=True)[0].cpu() for p in a_people}
        toks_b = {p: model.to_tokens(fill(tpl, p), prepend_bos=True)[0].cpu() for p in b_people}
        used: set[Person] = set()
        for pa in sorted(a_people, key=lambda p: stable_hash(seed, f"pair:{t}:{p.name}")):
            for pb in sorted(b_people, key=lambda p: stable_hash(seed, f"pair:{t}:{p.name}")):
                if pb in used or pb.get(ax.other_attribute) != pa.get(ax.other_attribute):
                    continue
                if len(toks_a[pa]) != len(toks_b[pb]):
                    continue
                used.add(pb)
                clean.append(Prompt(fill(tpl, pa), t, pa, 0))
                corrupt.append(Prompt(fill(tpl, pb), t, pb, 1))
                ct.append(toks_a[pa])
                rt.append(toks_b[pb])
                break
    if not clean:
        raise AlignmentError(
            f"no equal-token-length name pairs for context {ctx.name!r}, axis {ax.name!r}: patching needs "
            "clean and corrupted prompts that tokenize to the same length"
        )
    if max_pairs is not None and len(clean) > max_pairs:
        keep = sorted(range(len(clean)), key=lambda i: stable_hash(seed, f"keep:{clean[i].text}"))[:max_pairs]
        keep.sort()
        clean, corrupt = [clean[i] for i in keep], [corrupt[i] for i in keep]
        ct, rt = [ct[i] for i in keep], [rt[i] for i in keep]
    return PromptPairs(ctx.name, ax, ctx.positive, ctx.negative, clean, corrupt, ct, rt)
