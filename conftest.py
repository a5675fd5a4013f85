"""Root conftest, for tests/ and bench/ alike.

Importing ``kernels`` first selects Triton's interpreter (TRITON_INTERPRET=1) when no CUDA device is
present, before any @triton.jit is evaluated; on a GPU the same tests run compiled. Tests marked ``gpu``
(CUDA graphs, sync checks, timing) skip with the reason on a machine without one.
"""

import pytest
import torch

import kernels  # noqa: F401  (must come before any kernel module)

try:
    from hypothesis import settings

    # The interpreter runs each program in Python, and on a GPU each new launch configuration compiles
    # (a second or two, and random shapes are mostly new): keep examples few, and drop the deadline.
    settings.register_profile("interpreter", max_examples=25, deadline=None)
    settings.register_profile("gpu", max_examples=10, deadline=None)
    settings.load_profile("interpreter" if kernels.INTERPRETED else "gpu")
except ImportError:  # hypothesis is a dev extra; the property tests skip without it
    pass


def pytest_addoption(parser):
    parser.addoption(
        "--sweep",
        choices=("full", "default"),
        default="full",
        help="bench/: every shape of each case's sweep (full) or its default shapes only",
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA device (CUDA graphs, sync checks, timing); none on this machine"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
