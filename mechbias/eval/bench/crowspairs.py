"""CrowS-Pairs (Nangia et al., 2020) in the report card's form: the score of :mod:`mechbias.eval.crows` (share of
pairs whose stereotypical sentence has the higher log-likelihood, %; 50 = unbiased; a masked LM scores the
paper's way, by the pseudo-log-likelihood of the tokens the two sentences share), overall and per bias type,
for the unmodified model and under an intervention, with paired intervals that resample pairs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...core.families import is_masked_lm
from ...interventions.base import Intervention
from ..crows import pair_scores, read_pairs, stereo_and_other
from .common import BenchResult, Outcomes, cluster_ids, metric_rows, score, share

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


def _score(o: Outcomes, idx: np.ndarray) -> float:
    return share(o["stereo"] > o["other"], idx)


def crows_bench(model: TransformerBridge, path: str | Path, *, intervention: Intervention | None = None, n_boot: int = 2000,
                seed: int = 0) -> BenchResult:
    """CrowS-Pairs metric rows (stereotype score per bias type), with and without ``intervention``."""
    rows = read_pairs(path)
    stereo, other = stereo_and_other(rows)

    masked = is_masked_lm(model)

    def run(m) -> Outcomes:
        s, o = pair_scores(m, stereo, other)
        return {"stereo": s, "other": o}

    base, after = score(model, intervention, run)
    types = np.array([r["bias_type"] for r in rows])
    subsets = {"all": np.arange(len(rows)), **{t: np.flatnonzero(types == t) for t in sorted(set(types))}}
    out = metric_rows("CrowS-Pairs", {"score": (_score, "%")}, base, after, cluster_ids(range(len(rows))), subsets,
                      n_boot=n_boot, seed=seed)
    return BenchResult("CrowS-Pairs", out, [], {"file": str(path), "n_pairs": len(rows), "score": (
        "masked LM: summed log P of the shared tokens, each masked in turn" if masked else
        "causal LM: summed log P of the sentence after BOS")})
