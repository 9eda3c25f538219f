"""Work accounting: floating-point operations done, and what this machine's matrix products can do.

:func:`counting_flops` counts the FLOPs of matrix products (and attention) inside a block with PyTorch's
``FlopCounterMode`` (forward and backward; element-wise work is not counted, so the totals are a slight
underestimate of the arithmetic and an honest measure of the matmul work a chip is judged by).
:func:`matmul_peak` measures the GFLOP/s of one square matrix product at the current thread count, in float32
and bfloat16: the peak the achieved rate is compared with.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any, TypedDict

import torch


@contextlib.contextmanager
def counting_flops() -> Iterator[dict]:
    """Count the FLOPs run inside a ``with`` block; afterwards ``work["flops"]`` holds them."""
    from torch.utils.flop_counter import FlopCounterMode

    work = {"flops": 0}
    mode = FlopCounterMode(display=False)
    with mode:
        yield work
    work["flops"] = int(mode.get_total_flops())


@contextlib.contextmanager
def torch_threads(n: int):
    """Inside the block, torch uses ``n`` threads (restored on exit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class MatmulPeak(TypedDict, total=False):
    """GFLOP/s of a square matrix product at a thread count (:func:`matmul_peak`)."""

    threads: int
    size: int
    float32_gflops: float
    bfloat16_gflops: float


class AchievedRate(TypedDict, total=False):
    """A run's matrix-product rate against the measured peaks (:func:`achieved_rate`; empty without work)."""

    achieved_gflops: float
    fraction_of_fp32_peak: float | None
    fraction_of_bf16_peak: float | None


def matmul_peak(size: int = 1024, seconds: float = 0.5) -> MatmulPeak:
    """GFLOP/s of a ``size`` x ``size`` matrix product repeated for about ``seconds``, in float32 and bfloat16,
    at the current torch thread count."""
    out: MatmulPeak = {"threads": torch.get_num_threads(), "size": size}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            n += 1
        dt = time.perf_counter() - t0
        rate = round(2 * size**3 * n / dt / 1e9, 1)
        if dtype == torch.float32:
            out["float32_gflops"] = rate
        else:
            out["bfloat16_gflops"] = rate
    return out


def achieved_rate(work: Mapping[str, Any]) -> AchievedRate:
    """Matrix-product GFLOP/s over the jobs' summed seconds, and as fractions of the measured peaks."""
    secs, peak = work.get("total_work_seconds") or 0.0, work.get("matmul_peak") or {}
    if secs <= 0 or not work.get("total_tflop"):
        return {}
    rate = work["total_tflop"] * 1e3 / secs
    return {"achieved_gflops": round(rate, 1),
            "fraction_of_fp32_peak": round(rate / peak["float32_gflops"], 3) if peak.get("float32_gflops") else None,
            "fraction_of_bf16_peak": round(rate / peak["bfloat16_gflops"], 3) if peak.get("bfloat16_gflops") else None}
