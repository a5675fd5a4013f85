"""pytest-benchmark plumbing for bench/bench_*.py (GPU only: on a machine without CUDA they skip).

``gpu_benchmark(case, shape, impl, graph=False)`` (time_case) times one kernel (or its reference) at one
shape with the CUDA-event
clock (a host-only peer on the host clock: ``"timer": "host"``), L2 flushed before every round (in
pedantic's untimed setup), an NVTX range around every call, and
writes bytes, FLOPs, GB/s, TFLOP/s, % of the copy bandwidth and of the bf16 matmul ceiling measured in this
session, and which of the two binds, into extra_info, so that
``--benchmark-json`` and ``--benchmark-autosave`` keep them with the times. A peer is prepared and verified
at the shape it is timed (bench.operators.base.verify_and_prepare) before its rounds: a wrong peer fails its
test, one that cannot run here is skipped with the reason, and extra_info records ``verified``,
``checked_against`` and ``max_error``.
"""

import functools

import pytest

from bench.measure.device import copy_bandwidth_gbps, machine_info, matmul_tflops
from bench.measure.results import cost_info
from bench.measure.timing import CUDA_CLOCK, capture_graph, flush_l2, time_cuda
from bench.operators.base import PeerUnavailable, Prepared, verify_and_prepare
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


_expected: dict = {}


def expected_of(case, shape, inputs):
    """The reference's run on a copy of ``inputs`` as built (once per shape, shared by the peers), or None
    where the reference is too slow for the shape (peers are then checked against the kernel)."""
    if not case.reference_affordable(shape):
        return None
    key = (case.name, shape)
    if key not in _expected:
        _expected.clear()
        if inputs.reset:
            inputs.reset()
        expected = inputs.clone()
        case.run_reference(expected)
        _expected[key] = expected
    return _expected[key]


def prepare_peer(case, shape, impl, inputs, expected) -> tuple[Prepared, dict]:
    """The peer verified at this shape and ready to time, and what extra_info records of the check. Skips
    (with the reason) a peer that cannot run here; a wrong result (AssertionError) or any other error of
    the peer propagates and fails the test."""
    try:
        prepared, error = verify_and_prepare(case, impl, inputs, shape, expected)
    except PeerUnavailable as why:
        pytest.skip(f"{impl}: {why}")
    against = "reference" if expected is not None else "kernel (the reference is too slow at this shape)"
    return prepared, {"verified": True, "checked_against": against, "max_error": error}


def verify_kernel(case, shape, inputs, expected) -> dict:
    """Runs the kernel once on the inputs it is about to be timed on and holds it to the reference's result
    (an AssertionError fails the test); where the reference is too slow for the shape, says so."""
    if expected is None:
        return {"verified": None}
    if inputs.reset:
        inputs.reset()
    case.run_kernel(inputs)
    return {"verified": True, "max_error": case.compare(inputs, expected, shape)}


def _timer(host: bool) -> str:
    """extra_info's word for the clock a figure was read on."""
    return "host" if host else "cuda-events"


def time_case(benchmark, case, shape, impl: str = "triton", *, graph: bool = False) -> None:
    """What ``gpu_benchmark(case, shape, impl)`` does (the module docstring). ``graph``: the call is
    captured once into a CUDA graph (outside the rounds) and its replays are the rounds, cuda_graph true,
    the eager median beside them as eager_us: what a serving engine sees of a layer whose launches take
    longer to issue than to run."""
    if impl == "reference" and not case.reference_affordable(shape):
        pytest.skip(f"reference: too slow above {case.reference_max_bytes / 1e9:.1f} GB of modelled traffic")
    inputs = _inputs(case, shape)
    info, host = {}, False
    if impl in case.peers:
        expected = expected_of(case, shape, inputs)
        prepared, info = prepare_peer(case, shape, impl, inputs, expected)
        host = case.peers[impl].host_only
    else:
        fn = {"triton": case.kernel, "reference": case.reference}[impl]
        prepared = Prepared(lambda: fn(**inputs.args), inputs.reset)
        if impl == "triton":  # the kernel too is checked at the shape it is timed, where affordable
            info = verify_kernel(case, shape, inputs, expected_of(case, shape, inputs))
    label = f"{case.name}[{impl}{' graph' if graph else ''}] {shape.label}"
    reset = prepared.reset or (lambda: None)
    if graph:
        reset()
    call = capture_graph(prepared.call) if graph else prepared.call
    timed = CUDA_CLOCK.timed(call, label=label, host=host)
    benchmark.group = f"{case.name} {shape.label}"

    def setup():
        reset()
        if not host:  # host-only work reads no device memory
            flush_l2()

    benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(cost_info(case, shape, median_s, copy_bandwidth_gbps(), matmul_tflops()))
    timed_as = {"impl": impl, "gpu": machine_info().gpu, "timer": _timer(host), "cuda_graph": graph}
    benchmark.extra_info.update(timed_as | info)
    if graph:
        eager = time_cuda(prepared.call, label=f"{label} eager", setup=prepared.reset)
        benchmark.extra_info["eager_us"] = round(eager.median_ms * 1e3, 2)
    if impl == "triton":
        benchmark.extra_info["launch_config"] = case.launch_config(inputs) if case.launch_config else None


@pytest.fixture
def gpu_benchmark(benchmark):
    return functools.partial(time_case, benchmark)
