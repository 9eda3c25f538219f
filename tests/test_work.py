"""Work accounting: FLOPs counted inside a block, and the achieved rate against a measured peak."""

import torch

from mechbias.core.work import achieved_rate, counting_flops, matmul_peak, torch_threads


def test_counted_flops_equal_the_matmul_formula_forward_and_backward():
    a = torch.randn(7, 11, requires_grad=True)
    b = torch.randn(11, 13)
    with counting_flops() as work:
        (a @ b).sum().backward()
    # forward 2*7*11*13, backward (grad of a: [7,13] x [13,11]) the same again
    assert work["flops"] == 2 * (2 * 7 * 11 * 13)
    with counting_flops() as none:
        a.detach() + 1
    assert none["flops"] == 0


def test_achieved_rate_and_peak():
    with torch_threads(1):
        peak = matmul_peak(size=128, seconds=0.05)
        assert peak["threads"] == 1 and peak["float32_gflops"] > 0 and peak["bfloat16_gflops"] > 0
    w = {"total_work_seconds": 10.0, "total_tflop": 0.5, "matmul_peak": {"float32_gflops": 100.0,
                                                                        "bfloat16_gflops": 400.0}}
    assert achieved_rate(w) == {"achieved_gflops": 50.0, "fraction_of_fp32_peak": 0.5, "fraction_of_bf16_peak": 0.125}
    assert achieved_rate({"total_work_seconds": 0.0, "total_tflop": 1.0}) == {}
