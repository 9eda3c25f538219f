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
