"""pytest-benchmark plumbing for bench/bench_*.py (GPU only: on a machine without CUDA they skip).

``gpu_benchmark(case, shape, impl)`` times one kernel (or its reference) at one shape with the CUDA-event
clock, L2 flushed before every round (in pedantic's untimed setup), an NVTX range around every call, and
writes bytes, FLOPs, GB/s and % of the copy bandwidth measured in this session into extra_info, so that
``--benchmark-json`` and ``--benchmark-autosave`` keep them with the times.
"""

import pytest

from bench.cases.base import PeerUnavailable
from bench.measure.device import copy_bandwidth_gbps, machine_info
from bench.measure.results import cost_info
from bench.measure.timing import CUDA_CLOCK, flush_l2
from bench.testing import seed_of

ROUNDS = 30
WARMUP_ROUNDS = 3


def pytest_generate_tests(metafunc):
    """A bench module names its CASE; its ``shape`` argument runs over the case's sweep, or its default
    shapes with ``--sweep default``."""
    if "shape" in metafunc.fixturenames:
        case = metafunc.module.CASE
        full = metafunc.config.getoption("--sweep") == "full"
        shapes = case.sweep() if full else case.default_shapes()
        metafunc.parametrize("shape", shapes, ids=[shape.label for shape in shapes])


_built: dict = {}


def _inputs(case, shape):
    """The inputs of the last shape built: the kernel, its reference and its peers time the same tensors,
    and a multi-GB cache is built once per shape, not once per implementation."""
    key = (case.name, shape)
    if key not in _built:
        _built.clear()
        _built[key] = case.build(shape, "cuda", seed_of(f"{case.name}/{shape.label}"))
    return _built[key]


@pytest.fixture
def gpu_benchmark(benchmark):
    def run(case, shape, impl: str = "triton"):
        if impl == "reference" and not case.reference_affordable(shape):
            pytest.skip(
                f"reference: too slow above {case.reference_max_bytes / 1e9:.1f} GB of modelled traffic"
            )
        inputs = _inputs(case, shape)
        if impl in case.peers:
            try:
                call = case.peers[impl](inputs, shape)
            except PeerUnavailable as why:
                pytest.skip(f"{impl}: {why}")
        else:
            fn = {"triton": case.kernel, "reference": case.reference}[impl]
            call = lambda: fn(**inputs.args)  # noqa: E731
        timed = CUDA_CLOCK.timed(call, label=f"{case.name}[{impl}] {shape.label}")
        benchmark.group = f"{case.name} {shape.label}"
        reset = inputs.reset or (lambda: None)

        def setup():
            reset()
            flush_l2()

        benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
        median_s = benchmark.stats.stats.median
        benchmark.extra_info.update(cost_info(case, shape, median_s, copy_bandwidth_gbps()))
        benchmark.extra_info.update(impl=impl, gpu=machine_info().gpu)
        if impl == "triton":
            benchmark.extra_info["launch_config"] = case.launch_config(inputs) if case.launch_config else None

    return run
