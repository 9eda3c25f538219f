"""Neutral text (no demographic content) for capability measurements, split in two.

The paragraphs were written for mechbias and ship in ``data/files/neutral.txt``.
They are split deterministically into a **selection** half (capability guards,
the choice of an edit's strength, any tuning) and a **reporting** half (the
perplexity change a transfer matrix reports). No decision sees the reporting
half: :mod:`mechbias.data.leakage` refuses it inside a decision.
"""

from __future__ import annotations

import hashlib

from ..core.models import DATA_FILES
from .leakage import check_not_reporting, resolve_split, split_salt

CAPABILITY_SPLITS = ("selection", "reporting", "all")


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
        split, salt = resolve_split(split, "reporting"), split_salt()  # cross-fitting folds and repeated splits
        order = sorted(range(len(paras)), key=lambda i: hashlib.sha256(f"neutral:{i}{salt}".encode()).hexdigest())
        half = set(order[: len(order) // 2])
        paras = [p for i, p in enumerate(paras) if (i in half) == (split == "selection")]
    return paras[:max_texts] if max_texts else paras
