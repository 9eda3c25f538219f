"""What every external bias benchmark shares: items in clusters, metrics computed from per-item outcomes, and a
paired cluster bootstrap of the unmodified model, the model under an intervention and their difference.

Each difference also gets a two-sided bootstrap p-value, adjusted by Benjamini–Hochberg per metric within two
families: the headline subsets (all items; a BBQ condition) and the breakdowns (categories, bias types).

A benchmark reads its public file format into items, scores each item under the
model (:func:`score` runs the model once as it is and once under the
intervention), and defines its metrics as functions of the per-item outcomes
restricted to a set of item indices. Intervals resample **clusters** (items that
share a template, a target term or a sentence pair), the same clusters for both
models, so the difference is paired and the design is respected. Every metric is
an aggregate over the resampled items (never a mean of per-cluster ratios).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Bool, Int

from ...interventions.base import Intervention, maybe_apply
from ..stats import benjamini_hochberg, bootstrap_p, check_boot, percentile_ci

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


def jsonl_objects(path: Path) -> Iterator[tuple[str, dict]]:
    """``(where, object)`` for every non-empty line of a UTF-8 JSONL file (``where`` = ``path:line``); a line
    that is not a JSON object, or a file that is not UTF-8, raises a one-line ``ValueError``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err})") from err
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: each line must be a JSON object, not {type(obj).__name__}")
        yield where, obj


Outcomes = dict[str, np.ndarray]  # per-item arrays (scores, choices, flags), all of length n_items
Metric = Callable[[Outcomes, np.ndarray], float]  # (outcomes, item indices) -> value


@dataclass
class MetricRow:
    """One benchmark metric on one subset: unmodified, under the intervention and their paired difference."""
    benchmark: str
    metric: str
    subset: str  # "all" or a category / bias type / condition
    unmodified: float
    unmodified_ci: tuple[float, float]
    intervention: float | None = None
    intervention_ci: tuple[float, float] | None = None
    difference: float | None = None  # intervention - unmodified, paired
    difference_ci: tuple[float, float] | None = None
    difference_p: float | None = None  # two-sided bootstrap p of the paired difference
    difference_p_adjusted: float | None = None  # Benjamini-Hochberg over the subsets of this metric
    n_items: int = 0
    n_clusters: int = 0
    unit: str = ""

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class BenchResult:
    """A benchmark's metric rows, per-item scores and metadata."""
    benchmark: str
    rows: list[MetricRow]
    per_item: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def row(self, metric: str, subset: str = "all") -> MetricRow:
        for r in self.rows:
            if r.metric == metric and r.subset == subset:
                return r
        raise KeyError(f"{self.benchmark} has no metric {metric!r} for {subset!r}")

    def as_dict(self) -> dict:
        return {"benchmark": self.benchmark, "rows": [r.as_dict() for r in self.rows], "meta": self.meta}


def cluster_ids(keys: Sequence[Any]) -> Int[np.ndarray, " items"]:
    """Integer cluster ids (in order of first appearance) for per-item cluster keys."""
    seen: dict[Any, int] = {}
    return np.array([seen.setdefault(k, len(seen)) for k in keys], dtype=np.int64)


def _resampled_items(clusters: np.ndarray, subset: np.ndarray, rng: np.random.Generator, n_boot: int
                     ) -> list[np.ndarray]:
    """``n_boot`` resamples of ``subset``: its clusters drawn with replacement, each bringing all its items."""
    check_boot(n_boot)
    members: dict[int, list[int]] = {}
    for i in subset:
        members.setdefault(int(clusters[i]), []).append(int(i))
    groups = [np.array(v) for v in members.values()]
    out = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(groups), size=len(groups))
        out.append(np.concatenate([groups[k] for k in pick]))
    return out


def metric_rows(benchmark: str, metrics: Mapping[str, tuple[Metric, str]], base: Outcomes, after: Outcomes | None,
                clusters: Int[np.ndarray, " items"], subsets: dict[str, np.ndarray], *, n_boot: int = 2000, seed: int = 0,
                primary: tuple[str, ...] = ("all",)) -> list[MetricRow]:
    """Each metric on each subset: unmodified, under the intervention, and the paired difference, with
    percentile intervals from one cluster bootstrap per subset (the same resamples for all three).

    p-values are adjusted by Benjamini-Hochberg per metric within two families: the ``primary`` subsets (the
    headline: all items, or a BBQ condition) and the other subsets (categories, bias types)."""
    rows = []
    for sname, subset in subsets.items():
        if len(subset) == 0:
            continue
        boots = _resampled_items(clusters, subset, np.random.default_rng(seed), n_boot)
        for mname, (fn, unit) in metrics.items():
            b0 = fn(base, subset)
            bb = np.array([fn(base, idx) for idx in boots])
            row = MetricRow(benchmark, mname, sname, b0, percentile_ci(bb), n_items=len(subset),
                            n_clusters=len(set(clusters[subset].tolist())), unit=unit)
            if after is not None:
                a0 = fn(after, subset)
                ab = np.array([fn(after, idx) for idx in boots])
                row.intervention, row.intervention_ci = a0, percentile_ci(ab)
                row.difference, row.difference_ci = a0 - b0, percentile_ci(ab - bb)
                row.difference_p = bootstrap_p(ab - bb)
            rows.append(row)
    for mname in metrics:
        for head in (True, False):
            fam = [r for r in rows if r.metric == mname and r.difference_p is not None
                   and (r.subset in primary) == head]
            for r, adj in zip(fam, benjamini_hochberg([float(r.difference_p or 0.0) for r in fam]), strict=True):
                r.difference_p_adjusted = adj
    return rows


def score(model: TransformerBridge, intervention: Intervention | None, fn: Callable[[Any], Outcomes]) -> tuple[Outcomes, Outcomes | None]:
    """``fn(model)`` as the model is, then under ``intervention`` (None when there is none)."""
    base = fn(model)
    if intervention is None:
        return base, None
    with maybe_apply(intervention, model):
        return base, fn(model)


def share(mask: Bool[np.ndarray, " items"], idx: Int[np.ndarray, " k"]) -> float:
    """100 x the share of ``mask`` that is true over ``idx`` (percent)."""
    return float(100.0 * mask[idx].mean()) if len(idx) else float("nan")
