"""The shape of a fast path's run-time self-check (:func:`mechbias.core.fastpath.fast_path_status`): the
tolerance, one check's record, and the comparison of a fast result with the exact one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict

import torch
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

#: the largest max |fast - exact| logit difference accepted, as a fraction of (1 + max |exact logit|), by dtype
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def tolerance(model: TransformerBridge, exact: Float[Tensor, "*shape"]) -> float:
    """The tolerance for ``model``'s dtype, scaled by the exact logits' largest magnitude."""
    dtype = getattr(model.cfg, "dtype", torch.float32)
    return TOLERANCE.get(dtype, 5e-2) * (1.0 + float(exact.abs().max()))


class PathCheck(TypedDict, total=False):
    """One fast path's self-check against the exact path on a model."""

    path: str  # "fast" or "exact": which one runs
    ok: bool  # the fast path agreed within the tolerance (or was not needed)
    max_abs_diff: float
    tolerance: float
    error: str  # the fast path raised
    reason: str  # why the exact path runs without a check
    shim: bool  # the cache keyword shim was installed
    checks: dict[str, PathCheck]  # the KV-cache path's three checks
    layer: int  # where the resume check resumed


def compare(name: str, fast: Any, exact: Float[Tensor, "*shape"], tol: float) -> PathCheck:
    """The check of fast path ``name``: ``fast`` (a tensor, or the exception it raised) against ``exact``."""
    if isinstance(fast, Exception):
        return {"path": "exact", "ok": False, "error": f"{type(fast).__name__}: {fast}", "tolerance": tol}
    diff = float((fast.float() - exact.float()).abs().max())
    ok = diff <= tol
    return {"path": "fast" if ok else "exact", "ok": ok, "max_abs_diff": diff, "tolerance": tol}
