"""Unembed only the vocabulary columns a metric reads.

A yes/no score reads two logits of the last position, ``logit(yes) - logit(no)``; the other columns of the
unembedding (49,150 of SmolLM2's 49,152) are computed and never read. Inside :func:`columns_only` the
wrapped unembedding's product runs over the given columns alone, and every other column of its output is
NaN, so a readout that reads outside the columns it declared gets NaN instead of a plausible number; callers
raise on it (:func:`check_read`). Each value in the columns is the same dot product with the same row of
the weight, so it equals the full unembedding's to float rounding; it is computed as a product and a sum per
row in float64, so it does not depend on the other rows in the batch (stacked and separate forwards give the same bits).

It replaces the ``forward`` of the bridge's ``unembed.original_component`` (a ``torch.nn.Linear``; attribute
names checked on transformer-lens 4.3.0) for the call, a library internal, so
:func:`mechbias.core.fastpath.fast_path_status` compares it with the full unembedding on every model before
its first use (check ``"answer_columns"``, :func:`check_columns`) and the full unembedding runs on any
disagreement, loudly. Anything the library applies after that product (a final soft-cap) is elementwise,
keeps NaN as NaN, and is covered by the check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from .pathcheck import PathCheck

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


_CALLS = [0]


def calls() -> int:
    """How many unembedding calls computed answer columns only in this process (a test can see the path ran)."""
    return _CALLS[0]


def _linear(model: TransformerBridge) -> torch.nn.Linear | None:
    inner = getattr(getattr(model, "unembed", None), "original_component", None)
    return inner if isinstance(inner, torch.nn.Linear) else None


def replaceable(model: TransformerBridge) -> str | None:
    """Why the unembedding cannot be cut to columns on ``model`` (``None``: it can)."""
    inner = _linear(model)
    if inner is None:
        return "the model's unembedding is not a wrapped torch.nn.Linear"
    if "forward" in inner.__dict__:
        return "the unembedding's forward is already replaced (an offloading or other wrapper)"
    return None


@contextlib.contextmanager
def columns_only(model: TransformerBridge, columns: Sequence[int]) -> Iterator[None]:
    """Inside the block the unembedding computes only ``columns`` (vocabulary ids); every other logit is NaN.
    Restored on exit, also after an exception."""
    why = replaceable(model)
    if why is not None:
        raise RuntimeError(why)
    inner = _linear(model)
    assert inner is not None
    cols = torch.as_tensor(sorted({int(c) for c in columns}), dtype=torch.long, device=inner.weight.device)
    if not len(cols):
        raise ValueError("columns_only needs at least one column")
    vocab = int(inner.weight.shape[0])
    if int(cols.min()) < 0 or int(cols.max()) >= vocab:
        raise ValueError(f"columns must lie in [0, {vocab}); got {cols.tolist()}")
    weight = inner.weight.index_select(0, cols).double()
    bias = inner.bias.index_select(0, cols).double() if inner.bias is not None else None

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # a product and a sum over d_model per row and column in float64, not a matrix product (whose blocking
        # for a narrow output depends on how many rows share the call): a row's value does not depend on the
        # other rows of its batch, so stacked and separate forwards give the same bits
        part = (x.unsqueeze(-2).double() * weight.to(x.device, torch.float64)).sum(-1)
        if bias is not None:
            part = part + bias.to(x.device, torch.float64)
        part = part.to(x.dtype)
        out = part.new_full((*part.shape[:-1], vocab), float("nan"))
        _CALLS[0] += 1
        return out.index_copy_(-1, cols.to(part.device), part)

    inner.forward = forward  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        inner.__dict__.pop("forward", None)


def check_read(values: Float[Tensor, "*shape"], columns: Sequence[int] | None) -> Float[Tensor, "*shape"]:
    """``values`` unchanged; raises if a readout declared ``columns`` and still produced NaN (it read a logit
    outside them: the NaN fill of :func:`columns_only`)."""
    if columns is not None and values.is_floating_point() and bool(torch.isnan(values).any()):
        raise RuntimeError(f"a readout declared that it reads vocabulary columns {list(columns)} only, but its "
                           f"output has NaN: it read another column, which was not computed")
    return values


def check_columns(model: TransformerBridge, run: Callable[[], Tensor], exact: Float[Tensor, "... vocab"],
                  columns: Sequence[int], tol: float) -> PathCheck:
    """The self-check's part for this path: ``run()`` (a forward the caller sets up, as under ``exact``)
    inside :func:`columns_only` must give ``exact``'s values in ``columns`` within ``tol`` and NaN in every
    other column."""
    why = replaceable(model)
    if why is not None:
        return {"path": "exact", "ok": True, "reason": why}
    try:
        with columns_only(model, columns):
            fast = run().float()
    except Exception as e:
        return {"path": "exact", "ok": False, "error": f"{type(e).__name__}: {e}", "tolerance": tol}
    cols = torch.as_tensor(sorted({int(c) for c in columns}), dtype=torch.long, device=fast.device)
    other = torch.ones(fast.shape[-1], dtype=torch.bool, device=fast.device)
    other[cols] = False
    if fast.shape != exact.shape or not bool(torch.isnan(fast[..., other]).all()):
        return {"path": "exact", "ok": False, "tolerance": tol,
                "error": "the columns not asked for were computed or changed (expected NaN)"}
    diff = float((fast[..., cols] - exact.float()[..., cols]).abs().max())
    ok = diff <= tol
    return {"path": "fast" if ok else "exact", "ok": ok, "max_abs_diff": diff, "tolerance": tol}
