"""Root conftest, for tests/ and bench/ alike.

``bench.interpreter.setup()`` first selects Triton's interpreter (TRITON_INTERPRET=1) when no CUDA device
is present, before any @triton.jit is evaluated (the kernels package leaves the environment alone); on a GPU
the same tests run compiled. Tests marked ``gpu`` (CUDA graphs, sync checks, timing) skip with the reason
on a machine without one.

Compiled kernels take CUDA tensors only. A test that builds inputs for kernels takes the ``kernel_device``
fixture (the GPU there, the CPU in the interpreter) rather than naming the CPU; one that needs CPU tensors
by design (a gloo group in this process, the dry run's host clock, a GPU path simulated on the CPU) is
marked ``cpu_kernels`` and skips with the reason where kernels are compiled.
"""

import os

import pytest
import torch

# The suite compiles the static report for sm_90 only (the lent GPUs' target): sm_80 doubles a cold compile
# that CI pays every run. `decodebench static` and `decodebench proxies` compile both; write_kv's fp8 at
# sm_80 (an error row, not an exception) is compiled for its test alone.
os.environ.setdefault("DECODEBENCH_ARCHS", "90")

from bench.interpreter import setup  # noqa: E402

setup()  # TRITON_INTERPRET where no CUDA device: before any kernel module is imported
import kernels  # noqa: E402

try:
    from hypothesis import settings

    # The interpreter runs each program in Python, and on a GPU each new launch configuration compiles
    # (a second or two, and random shapes are mostly new): keep examples few, and drop the deadline.
    settings.register_profile("interpreter", max_examples=25, deadline=None)
    settings.register_profile("gpu", max_examples=10, deadline=None)
    # pytest --fuzz: the long campaign (a night in the interpreter), every property and fuzz test.
    settings.register_profile("fuzz", max_examples=5000, deadline=None)
    settings.load_profile("interpreter" if kernels.INTERPRETED else "gpu")
except ImportError:  # hypothesis is a dev extra; the property tests skip without it
    pass


def pytest_report_header(config):
    import numpy
    import triton

    mode = "Triton's interpreter (no CUDA device)" if kernels.INTERPRETED else "compiled on the GPU"
    lines = [f"decodebench: kernels run in {mode}; torch {torch.__version__}, triton {triton.__version__}"]

    def version(module):
        return tuple(int(part) for part in module.__version__.split(".")[:2])

    if kernels.INTERPRETED and version(triton) < (3, 9) and version(numpy) >= (2, 4):
        lines.append(
            "WARNING: Triton < 3.9's interpreter breaks range() over a value loaded from memory with "
            "numpy >= 2.4 (paged_decode's loop): use triton >= 3.9 or numpy < 2.4 on this machine"
        )
    return lines


def pytest_addoption(parser):
    parser.addoption(
        "--sweep",
        choices=("full", "default"),
        default="full",
        help="bench/: every shape of each case's sweep (full) or its default shapes only",
    )
    parser.addoption(
        "--fuzz",
        action="store_true",
        help="the long fuzz campaign: hypothesis profile 'fuzz' (many examples) for tests/test_fuzz.py and "
        "every other property test; without it each stays within CI's budget",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", f"cpu_kernels: {CPU_KERNELS}; skipped with the reason elsewhere")
    if config.getoption("--fuzz"):
        from hypothesis import settings

        settings.load_profile("fuzz")


CPU_KERNELS = "hands kernels CPU tensors by design: runs where kernels take them (in Triton's interpreter)"


@pytest.fixture
def kernel_device() -> str:
    """The device whose tensors this run's kernels take: "cuda" where they are compiled on a GPU, "cpu" in
    Triton's interpreter (bench.measure.device.kernel_device)."""
    from bench.measure.device import kernel_device as device

    return device()


def pytest_collection_modifyitems(config, items):
    from bench.measure.device import kernel_device as device

    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = "needs a CUDA device (CUDA graphs, sync checks, timing); none on this machine"
    if device() != "cpu":
        skips["cpu_kernels"] = f"{CPU_KERNELS}; here they are compiled for the GPU and take CUDA tensors only"
    for item in items:
        for marker, reason in skips.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


# The tests that read the static report (the sm_90/sm_80 AOT compile of every case: a minute or two of CPU
# in child processes). Its compile starts as soon as one of them is collected, so that it runs on the cores
# the interpreted tests leave idle instead of after them.
STATIC_READERS = {"test_static.py", "test_regressions.py", "test_harness.py"}


def pytest_collection_finish(session):
    if torch.cuda.is_available() or not kernels.INTERPRETED:
        return
    if any(item.path.name in STATIC_READERS for item in session.items):
        from bench.measure import static
        from bench.operators import static_cases

        static.start_compiles([case.name for case in static_cases()])
        static.start_compiles(["write_kv"], archs=(80,))


def pytest_sessionfinish(session):
    import sys

    static = sys.modules.get("bench.measure.static")
    if static is not None:
        static.stop_compiles()
