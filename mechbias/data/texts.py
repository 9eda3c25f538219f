"""Neutral text (no demographic content), for capability measurements.

The paragraphs were written for mechbias and ship in ``data/files/neutral.txt``.
"""

from __future__ import annotations

from ..core.models import DATA_FILES


def neutral_texts(max_texts: int | None = None) -> list[str]:
    """Paragraphs of the neutral text set written for mechbias (no demographic content)."""
    text = (DATA_FILES / "neutral.txt").read_text()
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    return paras[:max_texts] if max_texts else paras
