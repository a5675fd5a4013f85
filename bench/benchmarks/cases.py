"""What the bench_*.py files share: one case timed at every shape conftest.py gives it, by each
implementation."""

import pytest


def benchmark_every_impl(case):
    """A test timing ``case`` by its kernel, its reference and each of its peers; its ``shape`` runs over
    the case's sweep, or its default shapes with ``--sweep default`` (conftest.py reads the module's CASE)."""

    @pytest.mark.parametrize("impl", ["triton", "reference", *case.peers])
    def test(gpu_benchmark, shape, impl):
        gpu_benchmark(case, shape, impl)

    return test
