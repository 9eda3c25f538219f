"""Compute precision: ``"exact"`` (the model's own dtype, float32 on a CPU) or ``"fast"`` (bfloat16 autocast).

mechbias *selects fast and evaluates exact*: ``fast`` may make choices (a method's selection, screening,
training), and every reported number (baselines, transfer cells, controls, perplexity, benchmark scores) is
computed at ``exact``. Under ``fast``, matrix products run in bfloat16 with float32 accumulation through
``torch.autocast``; on CPUs with AMX or AVX-512 BF16 they are several times faster, and each prompt's
log-odds score moves by a few hundredths (measured in ``benchmarks/precision.py``).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Literal, get_args

import torch

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

Precision = Literal["exact", "fast"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_precision(precision: str) -> Precision:
    """Return ``precision`` if it is one of :data:`PRECISIONS`, else raise ``ValueError``."""
    if precision == "exact":
        return "exact"
    if precision == "fast":
        return "fast"
    raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")


@contextlib.contextmanager
def compute_precision(model: TransformerBridge, precision: str):
    """Inside the block, forwards and backwards of ``model`` run at ``precision``. ``"exact"`` turns autocast
    off (a caller's autocast region cannot lower a reported number's precision); ``"fast"`` enables bfloat16
    autocast on the model's device type. Outputs of autocast regions may be bfloat16: callers that keep them
    cast to float32."""
    check_precision(precision)
    device = torch.device(getattr(model.cfg, "device", "cpu") or "cpu").type
    if precision == "exact":
        with torch.autocast(device_type=device, enabled=False):
            yield
        return
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        yield
