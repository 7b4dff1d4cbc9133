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
    # bounds any host meets, loaded or not (a busy 2-core CI machine runs bf16 at ~1 GFLOP/s)
    assert 1e6 < bandwidth < 1e13  # 1 MB/s .. 10 TB/s
    rate = matmul_rate(CPU, 256, torch.float32, repeats=3)
    assert 1e6 < rate < 1e15  # 1 MFLOP/s .. 1 PFLOP/s


def test_measure_device_on_cpu_uses_the_rows_dtype_and_a_size_the_host_finishes_quickly():
    facts = measure_device(CPU, torch.bfloat16, repeats=2)
    assert {"copy_bandwidth", "matmul_flops", "date", "torch", "triton", "mamba-ssm"} <= set(facts)
    # the rows compute in bf16 (sampling weights, training autocast): their ceiling is a bf16 rate
    assert facts["matmul_dtype"] == "bfloat16" and facts["matmul_n"] in (128, 256, 512, 1024)
    assert 0 < facts["matmul_flops"] < 1e15
    assert facts["kernels"]["available"] is False and facts["gpu"] is None


def test_cpu_matmul_size_follows_the_hosts_rate(monkeypatch):
    import aimkit.bench.timing as timing

    for rate, size in ((1e13, 1024), (2 * 512**3 / 0.05, 512), (1e9, 256), (1e7, 128)):
        monkeypatch.setattr(timing, "matmul_rate", lambda device, n, dtype, repeats, r=rate: r)
        assert timing._cpu_matmul_size(torch.bfloat16) == size, rate
