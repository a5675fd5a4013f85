"""What several test files do alike: hold a case's kernel to its reference on fresh guarded inputs."""

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


def check_small_shapes(case: Case, test_name: str, device: str) -> None:
    """Every shape `decodebench run` verifies for ``case``, so that its report and the test suite agree
    (seeded by the test's name and the shape's label)."""
    for shape in case.small_shapes():
        check_against_reference(case, shape, seed_of(test_name + shape.label), device)
