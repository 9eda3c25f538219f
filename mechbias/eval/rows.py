"""What a transfer matrix records about its rows (each row's intervention, controls, balance and cost) and its
columns (each evaluation context's unmodified gap); both drivers, :func:`~mechbias.eval.transfer.transfer_matrix`
and the study's job planner, build them here."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import cast

import numpy as np

from ..interventions.base import Intervention
from .cells import EvalSet, TransferConfig
from .records import GenerationCost, RowInfo
from .stats import group_gap

_LOG = logging.getLogger(__name__)

__all__ = ["EMPTY_ROW", "baseline_rows", "make_row_info"]


def baseline_rows(eval_sets: Mapping[str, EvalSet], cols: Sequence[str], cfg: TransferConfig) -> list[dict]:
    """The unmodified gap of each evaluation context (held-out prompts) with its CI."""
    out = []
    for c in cols:
        g = group_gap(eval_sets[c].before, eval_sets[c].col_group, n_boot=cfg.n_boot, seed=cfg.seed)
        out.append({"context": c, **g.as_dict()})
    return out


def make_row_info(context: str, iv: Intervention, controls: Mapping[str, Sequence[Intervention]],
                  perplexity_base: float | None, perplexity_change: float | None,
                  control_ppl: Mapping[str, Sequence[float]] | None, generation: GenerationCost | None) -> RowInfo:
    """What a transfer matrix records about one row's intervention and its controls."""
    info: RowInfo = {"context": context, "intervention": iv.describe(), "n_components": iv.n_components,
                            "controls": {k: v[0].describe() for k, v in controls.items() if len(v)},
                            "n_draws": {k: len(v) for k, v in controls.items() if len(v)}}
    balance = {k: v[0].match_info for k, v in controls.items() if len(v) and getattr(v[0], "match_info", None)}
    if balance:  # caliper, achieved balance (standardised difference) and unmatched units of matched controls
        info["balance"] = balance
    if perplexity_base is not None:
        info["perplexity_base"], info["perplexity_change"] = perplexity_base, perplexity_change
        for name, pc in (control_ppl or {}).items():
            if len(pc):
                cast(dict, info)[f"{name}_perplexity_change"] = float(np.mean(pc))  # a key per control
    if generation is not None:
        info["generation"] = generation
    if iv.n_components == 0:  # a legitimate outcome of a selection rule, never a silent one
        info["note"] = EMPTY_ROW
        _LOG.warning(f"the selection on {context} chose no unit ({iv.describe()}): {EMPTY_ROW}")
    return info


#: what a row whose selection chose no unit records (and the transfer test repeats)
EMPTY_ROW = "selected no unit: every cell of this row is unchanged (0) by construction"
