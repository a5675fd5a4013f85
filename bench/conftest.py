"""pytest-benchmark plumbing for bench/bench_*.py (GPU only: on a machine without CUDA they skip).

``gpu_benchmark(case, shape, impl)`` times one kernel (or its reference) at one shape with the CUDA-event
clock, L2 flushed before every round (in pedantic's untimed setup), an NVTX range around every call, and
writes bytes, FLOPs, GB/s and % of the copy bandwidth measured in this session into extra_info, so that
``--benchmark-json`` and ``--benchmark-autosave`` keep them with the times.
"""

import pytest

from bench.device import copy_bandwidth_gbps, machine_info
from bench.results import cost_info
from bench.testing import seed_of
from bench.timing import CUDA_CLOCK, flush_l2

ROUNDS = 30
WARMUP_ROUNDS = 3


@pytest.fixture
def gpu_benchmark(benchmark):
    def run(case, shape, impl: str = "triton"):
        fn = {"triton": case.kernel, "reference": case.reference}[impl]
        inputs = case.build(shape, "cuda", seed_of(f"{case.name}/{shape.label}"))
        timed = CUDA_CLOCK.timed(lambda: fn(**inputs.args), label=f"{case.name}[{impl}] {shape.label}")
        benchmark.group = f"{case.name} {shape.label}"
        benchmark.pedantic(timed, setup=flush_l2, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
        median_s = benchmark.stats.stats.median
        benchmark.extra_info.update(cost_info(case, shape, median_s, copy_bandwidth_gbps()))
        benchmark.extra_info.update(impl=impl, gpu=machine_info().gpu)

    return run
