"""Forward windows and the readout position: which absolute positions the current forward call covers.

A forward pass may cover only part of a sequence (the prefix, or the suffix after a cached prefix).
:func:`forward_window` records which absolute positions the current call covers, and
:func:`local_positions` turns an intervention's absolute positions (``"all"``, ``"last"``, or indices)
into indices of the current call. This is what keeps position-specific interventions correct under
prefix sharing. :func:`readout_position` makes ``"last"`` mean a masked LM's mask position.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

_WINDOW: ContextVar[tuple[int, int] | None] = ContextVar("mechbias_forward_window", default=None)
_READOUT: ContextVar[int | None] = ContextVar("mechbias_readout_position", default=None)


@contextlib.contextmanager
def forward_window(start: int, total: int):
    """Declare that forwards inside the block cover positions ``start..`` of sequences of length ``total``."""
    token = _WINDOW.set((int(start), int(total)))
    try:
        yield
    finally:
        _WINDOW.reset(token)


def local_positions(positions, seq_len: int) -> slice | list[int]:
    """Indices, within the current forward call, of the absolute ``positions``.

    ``positions`` is ``"all"``, ``"last"``, or a sequence of absolute indices
    (negative ones count from the end of the whole sequence). Outside a
    :func:`forward_window` the call is taken to cover the whole sequence.
    """
    if isinstance(positions, str) and positions == "all":
        return slice(None)
    window = _WINDOW.get()
    start, total = window if window is not None else (0, seq_len)
    if isinstance(positions, str):
        if positions != "last":
            raise ValueError(f"positions must be 'all', 'last' or a list of indices, not {positions!r}")
        readout = _READOUT.get()
        wanted = [total - 1 if readout is None else readout]
    else:
        wanted = [p if p >= 0 else total + p for p in positions]
    return [p - start for p in wanted if start <= p < start + seq_len]


@contextlib.contextmanager
def readout_position(position: int):
    """Inside the block, an intervention's ``"last"`` position is ``position`` (a masked LM's mask)."""
    token = _READOUT.set(int(position))
    try:
        yield
    finally:
        _READOUT.reset(token)
