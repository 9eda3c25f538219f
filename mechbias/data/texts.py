"""Neutral text (no demographic content) for capability measurements, split in two, and the guard
that keeps every decision away from held-out data.

The paragraphs were written for mechbias and ship in ``data/files/neutral.txt``.
They are split deterministically into a **selection** half (capability guards,
the choice of an edit's strength, any tuning) and a **reporting** half (the
perplexity change a transfer matrix reports). No decision sees the reporting
half: :func:`selection_phase` marks code that makes decisions (every method's
``select`` runs inside it), and inside it asking for reporting texts, held-out
templates or held-out names raises :class:`LeakageError`.
"""

from __future__ import annotations

import contextlib
import hashlib
from contextvars import ContextVar
from typing import Iterator

from ..core.models import DATA_FILES

CAPABILITY_SPLITS = ("selection", "reporting", "all")
_SELECTING: ContextVar[str | None] = ContextVar("mechbias_selection_phase", default=None)


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


def check_not_reporting(kind: str, split: str) -> None:
    """Raise :class:`LeakageError` if ``split`` of ``kind`` is requested while a decision is being made."""
    what = _SELECTING.get()
    if what is not None and split not in ("selection",):
        raise LeakageError(f"{what} asked for the {split!r} {kind}; decisions may only use selection data "
                           "(held-out names and templates and the reporting texts are for evaluation)")


def _paragraphs() -> list[str]:
    text = (DATA_FILES / "neutral.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def neutral_texts(max_texts: int | None = None, *, split: str) -> list[str]:
    """Paragraphs of the neutral text set: the ``selection`` half, the ``reporting`` half, or ``all``.

    The halves are fixed (every other paragraph by a hash of its index), so a selection made today never
    saw the texts any report uses.

    Args:
        max_texts: return at most this many paragraphs.
        split: ``"selection"`` (decisions), ``"reporting"`` (reported numbers; refused while a decision is
            being made) or ``"all"``.

    Returns:
        The paragraphs.
    """
    if split not in CAPABILITY_SPLITS:
        raise ValueError(f"split must be one of {CAPABILITY_SPLITS}, not {split!r}")
    check_not_reporting("neutral texts", split)
    paras = _paragraphs()
    if split != "all":
        order = sorted(range(len(paras)), key=lambda i: hashlib.sha256(f"neutral:{i}".encode()).hexdigest())
        half = set(order[: len(order) // 2])
        paras = [p for i, p in enumerate(paras) if (i in half) == (split == "selection")]
    return paras[:max_texts] if max_texts else paras
