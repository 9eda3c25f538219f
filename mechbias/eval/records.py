"""Typed records of the evaluation layer's tests: a contrast of transfer cells, an equivalence test, the
transfer test and the selection-vs-control test, and what a transfer matrix records about a row.

:class:`Contrast` and :class:`Equivalence` are dataclasses. The transfer test and the control test are
``TypedDict`` s: they are stored in :attr:`~mechbias.eval.transfer.TransferMatrix.transfer_test` (JSON) and a
study extends them with its family-wide corrections, so their keys are typed (mypy checks every access) and
their values stay JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

from ..core.results import Record


@dataclass
class Contrast(Record):
    """A linear combination of cells' bias removed (:meth:`~mechbias.eval.transfer.TransferMatrix.contrast`).

    Args:
        estimate: the combination of the score grids' mean changes.
        cells_estimate: the same combination of the cells' ``gap_removed`` (equal to ``estimate`` up to rounding).
        ci_low, ci_high: 95% t interval.
        p_value: two-sided, against 0.
        se, df: standard error and Welch-Satterthwaite degrees of freedom.
        min_detectable: the true value a two-sided test at 0.05 detects with power 0.8.
    """

    estimate: float
    cells_estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    se: float
    df: float
    min_detectable: float


@dataclass
class Equivalence(Record):
    """Two one-sided tests of ``|effect| < margin`` (:func:`~mechbias.eval.stats.tost`).

    Args:
        margin: the equivalence margin (fixed before the run).
        alpha: the level of each one-sided test.
        p_value: the larger of the two one-sided p-values.
        equivalent: ``p_value < alpha`` (the ``1 - 2 alpha`` CI lies inside ``(-margin, margin)``).
        ci_low_90, ci_high_90: that ``1 - 2 alpha`` interval.
    """

    margin: float
    alpha: float
    p_value: float
    equivalent: bool
    ci_low_90: float
    ci_high_90: float


class RatioTest(TypedDict, total=False):
    """cross / within with a Fieller interval, reported only where within's CI excludes 0."""

    statistic: str
    within: float
    within_ci: list[float]
    within_p_value: float
    ratio: float | None
    ci_low: float | None
    ci_high: float | None
    method: str
    note: str


class TransferTest(TypedDict, total=False):
    """The within- vs cross-context test compared within columns
    (:meth:`~mechbias.eval.transfer.TransferMatrix.test_transfer`); a study adds the family-wide keys
    (``p_adjusted``, ``within_p_adjusted``, ``family_size``, ``alpha_bh``, ``min_detectable_bh``)."""

    statistic: str
    which: str
    columns: list[str]
    n_rows: int
    within_mean: float
    cross_mean: float
    within_minus_cross: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    p_adjusted: float
    se: float
    df: float
    min_detectable: float | None
    family_size: int
    alpha_bh: float
    min_detectable_bh: float
    tost: dict[str, Any]
    ratio: RatioTest
    within_ci: list[float]
    cross_ci: list[float]
    within_p_value: float
    within_p_adjusted: float
    gated: bool
    gate_note: str
    empty_rows: list[str]
    empty_note: str
    pooled_diagonal_minus_offdiagonal: float
    note: str


class ControlTest(TypedDict, total=False):
    """Selection minus a control on the diagonal, with the draws' variance
    (:meth:`~mechbias.eval.transfer.TransferMatrix.test_against_control`)."""

    control: str
    statistic: str
    difference: float | None
    n_draws: int
    selected_removed: float
    draws_removed: list[float]
    rank_p: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    se: float | None
    df: float
    se_prompts: float
    se_draws: float
    min_detectable: float
    note: str


class BiasRow(TypedDict, total=False):
    """One context x axis of a :class:`~mechbias.eval.metrics.BiasResult`: the gap (``Gap`` fields) and what
    it was measured on; ``p_bh`` is Benjamini-Hochberg over the result's rows."""

    context: str
    axis: str
    roster: str | None
    group_a: str
    group_b: str
    gap: float
    ci_low: float
    ci_high: float
    p_value: float
    p_bh: float
    mean_a: float
    mean_b: float
    effect_size: float
    n_templates: int
    n_names_a: int
    n_names_b: int
    se: float
    df: float
    min_detectable: float
    min_detectable_family: float
    n_prompts: int
    significant: bool
    templates: list[int]


class GenerationSummary(TypedDict, total=False):
    """The generation metric of a prompt set (:func:`~mechbias.eval.generation.summarize_generation`)."""

    group_a: str
    group_b: str
    smd: float
    smd_per_question: list[float]
    smd_pooled: float
    p_value_names: float
    mean_a: float
    mean_b: float
    parse_failure_a: float
    parse_failure_b: float
    parse_failure: float
    inlier_ratio: float


class GenerationCost(TypedDict):
    """An intervention's generation metric before and after (:func:`~mechbias.eval.generation.generation_cost`)."""

    parse_failure_before: float
    parse_failure_after: float
    inlier_ratio: float | None
    smd_before: float
    smd_after: float
    n_prompts: int
    n_samples: int
    max_new_tokens: int
    temperature: float
    seed: int


class RowInfo(TypedDict, total=False):
    """What a transfer matrix records about one row's intervention and its controls
    (:func:`~mechbias.eval.transfer.make_row_info`); ``<control>_perplexity_change`` keys are added per control."""

    context: str
    intervention: str
    n_components: int
    controls: dict[str, str]
    n_draws: dict[str, int]
    balance: dict[str, Any]
    perplexity_base: float
    perplexity_change: float | None
    generation: GenerationCost
    note: str
