"""The guard that keeps every decision away from held-out data.

Selections, tuning and every other choice run inside :func:`selection_phase` (every method's ``select`` does);
inside it, asking for reporting texts, held-out templates or held-out names raises :class:`LeakageError`. The
data readers (:mod:`mechbias.data.contexts`, :mod:`mechbias.data.axes`, :mod:`mechbias.data.neutral`) call
:func:`check_not_reporting` before they hand out a held-out split.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_SELECTING: ContextVar[str | None] = ContextVar("mechbias_selection_phase", default=None)
_FOLD: ContextVar[tuple[int, int]] = ContextVar("mechbias_split_fold", default=(0, 0))


class LeakageError(RuntimeError):
    """A decision (selection, tuning) asked for data reserved for reporting."""


@contextlib.contextmanager
def selection_phase(what: str = "selection") -> Iterator[None]:
    """Mark a block as making decisions: held-out prompts and reporting texts are refused inside it."""
    token = _SELECTING.set(what)
    try:
        yield
    finally:
        _SELECTING.reset(token)


def in_selection_phase() -> bool:
    """Whether a decision is being made now (reporting texts and held-out splits are refused then)."""
    return _SELECTING.get() is not None


@contextlib.contextmanager
def split_fold(fold: int = 0, split: int = 0) -> Iterator[None]:
    """Cross-fitting and repeated splits: inside the block, ``fold`` 1 swaps the halves (a request for the
    ``selection`` templates, names or neutral texts gets the held-out or reporting half, and the other way
    round), and ``split`` > 0 draws another random halving (a different hash key per split). Fold 0 of split 0
    is the fixed split every other result uses. The leakage guard holds inside each fold: decisions still get
    only what they ask for as ``selection``, which is disjoint from what that fold evaluates on."""
    if fold not in (0, 1) or split < 0:
        raise ValueError(f"fold must be 0 or 1 and split >= 0, not fold={fold}, split={split}")
    token = _FOLD.set((int(fold), int(split)))
    try:
        yield
    finally:
        _FOLD.reset(token)


def resolve_split(split: str, other: str = "heldout") -> str:
    """The half a request for ``split`` gets in the current fold (:func:`split_fold`): in fold 1, ``selection``
    and ``other`` (``heldout`` for templates and names, ``reporting`` for neutral texts) trade places."""
    fold, _ = _FOLD.get()
    if fold == 1 and split in ("selection", other):
        return other if split == "selection" else "selection"
    return split


def split_salt() -> str:
    """What the current repeated split adds to the hash keys of the halving ("" for the fixed split)."""
    _, split = _FOLD.get()
    return f":split{split}" if split else ""


def check_not_reporting(kind: str, split: str) -> None:
    """Raise :class:`LeakageError` if ``split`` of ``kind`` is requested while a decision is being made."""
    what = _SELECTING.get()
    if what is not None and split not in ("selection",):
        raise LeakageError(f"{what} asked for the {split!r} {kind}; decisions may only use selection data "
                           "(held-out names and templates and the reporting texts are for evaluation)")
