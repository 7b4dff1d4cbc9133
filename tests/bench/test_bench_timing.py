"""aimkit.bench.timing on the CPU: the measured ceilings are nonzero and realistic."""

import torch

from aimkit.bench.timing import copy_rate, matmul_rate, measure_device, time_call, time_calls

CPU = torch.device("cpu")


def test_time_call_returns_seconds_and_result():
    seconds, out = time_call(lambda: 41 + 1, CPU)
    assert out == 42 and 0 <= seconds < 1
    assert len(time_calls(lambda: None, CPU, repeats=3, warmup=2)) == 3


def test_copy_and_matmul_rates_are_realistic_on_cpu():
    nbytes, bandwidth = copy_rate(CPU, 1 << 20, repeats=3)
    assert nbytes == 2 * 4 * (1 << 20)  # read + write of float32
    assert 1e8 < bandwidth < 1e13  # 0.1 GB/s .. 10 TB/s
    rate = matmul_rate(CPU, 256, torch.float32, repeats=3)
    assert 1e8 < rate < 1e15  # a CPU does 0.1 GFLOP/s .. 1 PFLOP/s


def test_measure_device_on_cpu_uses_the_rows_dtype_and_a_large_enough_product():
    facts = measure_device(CPU, torch.bfloat16, repeats=2)
    assert {"copy_bandwidth", "matmul_flops", "date", "torch", "triton", "mamba-ssm"} <= set(facts)
    # the rows compute in bf16 (sampling weights, training autocast): their ceiling is a bf16 rate
    assert facts["matmul_dtype"] == "bfloat16" and facts["matmul_n"] == 1024
    assert facts["matmul_flops"] > 1e9  # nonzero in TFLOP/s at three significant digits
    assert facts["kernels"]["available"] is False and facts["gpu"] is None
