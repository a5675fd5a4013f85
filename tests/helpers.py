"""What several test files do alike: hold a case's kernel to its reference on fresh guarded inputs, build the
batch both decode kernels' split tests run, and run a hypothesis property test that skips where hypothesis
(a dev extra) is not installed."""

from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from bench.operators.base import Case
from bench.testing import seed_of


def check_against_reference(case: Case, shape, seed: int, device: str) -> None:
    """``case``'s kernel and its reference on the same fresh inputs (outputs poisoned inside sentinel fences,
    the reference on a clone), held to each other by the case's own comparison."""
    inputs = case.build(shape, device, seed, guarded=True)
    expected = inputs.clone()
    case.run_kernel(inputs)
    case.run_reference(expected)
    case.compare(inputs, expected, shape)


def split_batch(dtype: torch.dtype, num_splits: int | None) -> dict:
    """The batch the split tests of paged_decode and mla_decode run (PagedBatch's fields; each test adds its
    kernel's heads): mla_decode takes split-KV from paged_decode (the split rule, the partials' layout, the
    merge), so both hold it to the same lengths. A long sequence, one with fewer tiles than some forced
    splits, an empty one; q and cache both in ``dtype``; ``num_splits`` None: derived on the device."""
    return dict(
        name="splits",
        lengths=(700, 3, 0, 300),
        block_size=16,
        dtype=dtype,
        cache_dtype=dtype,
        num_splits=num_splits,
    )


def check_small_shapes(case: Case, test_name: str, device: str) -> None:
    """Every shape `decodebench run` verifies for ``case``, so that its report and the test suite agree
    (seeded by the test's name and the shape's label)."""
    for shape in case.small_shapes():
        check_against_reference(case, shape, seed_of(test_name + shape.label), device)


def property_test(strategies: Callable[[ModuleType], dict], **settings) -> Callable:
    """Makes ``check`` a test that hypothesis runs with the keyword arguments ``strategies(st)`` draws
    (``st``: hypothesis.strategies), under ``settings`` where given (e.g. max_examples for this test alone);
    under ``pytest --fuzz`` the fuzz profile's settings win (its long search is the point of the flag).

    hypothesis is imported when the test runs, not when its module is: without it the test skips and the
    module's other tests still run.
    """

    def decorate(check: Callable) -> Callable:
        def test():
            hypothesis = pytest.importorskip("hypothesis")
            run = hypothesis.given(**strategies(hypothesis.strategies))(check)
            if settings and hypothesis.settings.get_current_profile_name() != "fuzz":
                run = hypothesis.settings(**settings)(run)
            run()

        # pytest collects the test by these; no __wrapped__, or it would ask for check's arguments as fixtures
        test.__name__, test.__qualname__, test.__doc__ = check.__name__, check.__qualname__, check.__doc__
        test.__module__ = check.__module__
        return test

    return decorate


def all_reduce_rows() -> list[dict]:
    """A `decodebench dist allreduce` result's entries on 8 GPUs: NCCL's ring at 8 KB (21 us) and 64 MiB
    (400 us), a one-shot symmetric-memory all-reduce at 8 KB (11 us)."""

    def entry(size, seconds, impl):
        info = {"kernel": "all_reduce", "impl": impl, "bytes": size, "world_size": 8}
        return {"name": f"all_reduce[{impl} {size} B]", "extra_info": info, "stats": {"median": seconds}}

    return [
        entry(8192, 21e-6, "nccl"),
        entry(64 * 2**20, 400e-6, "nccl"),
        entry(8192, 11e-6, "symm-mem one-shot"),
    ]
