"""The shared test helpers must be able to fail: sentinels, bitwise equality, dtype tolerances, seeds."""

import pytest
import torch

from bench.testing import (
    TOLERANCES,
    Guarded,
    assert_bitwise_equal,
    assert_close,
    assert_fp8_within_one_step,
    bits,
    generator,
    randn,
    seed_of,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_guarded_starts_poisoned_and_catches_writes_past_either_end(dtype):
    guarded = Guarded.empty((4, 8), dtype, "cpu")
    assert torch.isnan(guarded.tensor.float()).all()
    guarded.check("clean")
    for outside in (guarded.guard - 1, guarded.guard + 32):
        probe = Guarded.empty((4, 8), dtype, "cpu")
        probe.buffer[outside] = 1.0
        with pytest.raises(AssertionError, match="sentinel"):
            probe.check("dirty")


def test_bitwise_equality_tells_nan_payloads_and_signed_zeros_apart():
    assert_bitwise_equal(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]), "nan")
    with pytest.raises(AssertionError, match="differ bitwise"):
        assert_bitwise_equal(torch.tensor([0.0]), torch.tensor([-0.0]), "zero")


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_tolerance_admits_rounding_and_rejects_more(dtype):
    """Holds at any magnitude: atol scales with the reference's largest value."""
    for magnitude in (1e-3, 1.0, 100.0):
        x = torch.linspace(-2.0, 2.0, 64) * magnitude
        rounded = x.to(dtype).float()  # one rounding of each value: within the dtype's tolerance
        assert_close(rounded, x, "rounding", dtype=dtype)
        rtol, atol = TOLERANCES[dtype]
        with pytest.raises(AssertionError):
            assert_close(x + 4 * (rtol + atol) * 2 * magnitude, x, "too far", dtype=dtype)


def test_fp8_one_step():
    x = torch.tensor([1.0, -3.0, 448.0, 0.0]).to(torch.float8_e4m3fn)
    up = (bits(x).to(torch.int16) + 1).to(torch.uint8).view(torch.float8_e4m3fn)
    assert_fp8_within_one_step(up, x, "one step")
    two = (bits(x).to(torch.int16) + 2).to(torch.uint8).view(torch.float8_e4m3fn)
    with pytest.raises(AssertionError, match="more than one rounding step"):
        assert_fp8_within_one_step(two, x, "two steps")


def test_seeded_inputs_are_reproducible_and_distinct():
    a = randn((3, 5), torch.bfloat16, "cpu", generator(seed_of("a")))
    assert torch.equal(a, randn((3, 5), torch.bfloat16, "cpu", generator(seed_of("a"))))
    assert not torch.equal(a, randn((3, 5), torch.bfloat16, "cpu", generator(seed_of("b"))))
    assert seed_of("a") == seed_of("a") != seed_of("b")


def test_property_tests_take_the_fuzz_profiles_budget_under_fuzz():
    """A property test's own max_examples holds by default; `pytest --fuzz` (the "fuzz" profile) overrides
    it with the long search."""
    hypothesis = pytest.importorskip("hypothesis")
    from tests import helpers

    settings = hypothesis.settings
    calls = []

    @helpers.property_test(lambda st: {"n": st.integers(0, 10**6)}, max_examples=3, database=None)
    def check(n):
        calls.append(n)

    previous, fuzz = settings.get_current_profile_name(), settings.get_profile("fuzz")
    try:
        check()
        assert len(calls) == 3
        calls.clear()
        settings.register_profile("fuzz", max_examples=7, database=None)
        settings.load_profile("fuzz")
        check()
        assert len(calls) == 7
    finally:
        settings.register_profile("fuzz", fuzz)
        settings.load_profile(previous)
