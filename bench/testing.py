"""Helpers that tests/ and ``decodebench run`` share to check kernels against their references.

- ``generator(seed)``: a seeded torch.Generator, so each input is fresh per test yet reproducible.
- ``Guarded``: an output buffer poisoned before the call, with sentinel regions on both sides; a kernel that
  writes out of bounds, or leaves an element it owns unwritten, shows up in ``check``.
- ``TOLERANCES`` and ``assert_close``: tolerances set by dtype, never per test.
"""

import contextlib
import dataclasses
import zlib
from dataclasses import dataclass

import torch

# (rtol, atol) by dtype of the compared tensor, for results a few roundings in that dtype away from an fp32
# reference. atol is relative to the reference's largest magnitude (normwise), so a result that is small
# everywhere (attention over a long context) is held as tightly as a large one. fp8 results are compared by
# their codes instead (assert_fp8_within_one_step): its subnormal grid is absolute, not relative.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

SENTINEL_BYTE = 0x5A  # a finite, recognisable pattern in every float dtype (bf16 0x5A5A ~ 1.5e16)
# Outputs start as NaN: an element the kernel should write but does not cannot pass as right.
POISON = float("nan")


def seed_of(name: str) -> int:
    """A stable seed from a test or case name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode())


#: fp8 as the kernels take it (e4m3), and every dtype as shape labels write it.
FP8 = torch.float8_e4m3fn
DTYPE_LABELS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", FP8: "fp8"}


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def device_generator(seed: int, device) -> torch.Generator:
    """A generator on ``device`` where that is a GPU (inputs of gigabytes are drawn where they go), on the
    CPU otherwise."""
    return generator(seed, device if torch.device(device).type == "cuda" else "cpu")


def randn(shape, dtype, device, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Normal values drawn in fp32 on ``gen``'s device, then cast: the same values on CPU and GPU."""
    x = torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32) * scale
    return x.to(device=device, dtype=dtype)


@dataclass
class Guarded:
    """A contiguous ``tensor`` inside a larger buffer whose ``guard`` elements on each side hold
    SENTINEL_BYTE. ``tensor`` itself starts poisoned (NaN) unless filled."""

    buffer: torch.Tensor
    tensor: torch.Tensor
    guard: int

    @classmethod
    def empty(cls, shape, dtype, device, guard: int = 1024, fill: float | None = None) -> "Guarded":
        numel = 1
        for s in shape:
            numel *= s
        buffer = torch.empty(numel + 2 * guard, dtype=dtype, device=device)
        buffer.view(torch.uint8).fill_(SENTINEL_BYTE)
        tensor = buffer[guard : guard + numel].view(shape)
        tensor.fill_(POISON if fill is None else fill)
        return cls(buffer, tensor, guard)

    def sentinels_intact(self) -> bool:
        g = self.guard
        raw = self.buffer.view(torch.uint8)
        item = self.buffer.element_size()
        head, tail = raw[: g * item], raw[raw.numel() - g * item :]
        return bool((head == SENTINEL_BYTE).all()) and bool((tail == SENTINEL_BYTE).all())

    def check(self, name: str) -> None:
        if not self.sentinels_intact():
            raise AssertionError(
                f"{name}: a sentinel around the output was overwritten (out-of-bounds write)"
            )


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of x as integers, so that NaN == NaN and -0.0 != 0.0 in comparisons."""
    return x.contiguous().view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    )


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(
            f"{name}: {actual.dtype}{tuple(actual.shape)} vs {expected.dtype}{tuple(expected.shape)}"
        )
    differ = bits(actual) != bits(expected)
    if differ.any():
        where = differ.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(differ.sum())} of {differ.numel()} elements differ bitwise; first at {where}: "
            f"{actual[tuple(where)].item()} vs {expected[tuple(where)].item()}"
        )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, dtype: torch.dtype | None = None):
    """Compares in fp32 with the tolerance of ``dtype`` (default: actual's); NaN must match NaN."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    finite = expected[torch.isfinite(expected)].float()
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(
        actual.float(),
        expected.float(),
        rtol=rtol,
        atol=atol * max(scale, 1e-30),
        equal_nan=True,
        msg=lambda m: f"{name}: {m}",
    )


def assert_fp8_within_one_step(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """fp8 e4m3 codes at most one rounding step apart (adjacent codes of the same sign); NaN codes equal."""
    steps = (bits(actual).to(torch.int16) - bits(expected).to(torch.int16)).abs()
    if (steps > 1).any():
        raise AssertionError(f"{name}: {int((steps > 1).sum())} fp8 codes more than one rounding step off")


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the elements both hold as finite numbers (0 when none)."""
    a, e = actual.float(), expected.float()
    finite = torch.isfinite(a) & torch.isfinite(e)
    return float((a[finite] - e[finite]).abs().max()) if finite.any() else 0.0


class NoAllocation:
    """Stands in for ``torch`` inside kernel modules under test: every allocating call fails the test."""

    ALLOCATING = ("empty", "empty_like", "zeros", "zeros_like", "full", "ones", "tensor")

    def __getattr__(self, name):
        if name in self.ALLOCATING:
            raise AssertionError(f"a launcher called torch.{name} with a workspace given")
        return getattr(torch, name)


def forbid_allocation(monkeypatch, *modules) -> None:
    """Until ``monkeypatch.undo()``, the ``torch`` of each kernel module (a launcher's, and those of the
    modules whose helpers it calls) refuses to allocate."""
    for module in modules:
        monkeypatch.setattr(module, "torch", NoAllocation())


@contextlib.contextmanager
def no_host_sync():
    """Inside: any CUDA call that makes the host wait for the device raises (torch's sync debug mode).
    Compile and warm up before entering; in-flight work is drained first so it cannot count."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def replay_decode_graph(case, base, inputs, caches: tuple[str, ...], runs) -> None:
    """A paged decode's CUDA-graph path: captures ``case``'s kernel once on ``inputs`` (built for ``base``,
    the capacity, with the caller's workspace), then for each (seed, lengths) in ``runs`` writes fresh
    inputs of those lengths into the captured buffers (q, lengths, block tables, the ``caches``' leading
    blocks), replays and holds the result to the reference. Spare pages make up for the pages the new
    lengths do not use, so every block table keeps base's width."""
    case.kernel(**inputs.args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        case.kernel(**inputs.args)
    for seed, lengths in runs:
        unused = max(base.pages) - max(-(-n // base.block_size) for n in lengths)
        shape = dataclasses.replace(base, lengths=lengths, spare_pages=base.spare_pages + unused)
        fresh = case.build(shape, "cuda", seed)
        assert fresh.args["block_tables"].shape == inputs.args["block_tables"].shape
        for name in ("q", "seq_lens", "block_tables"):
            inputs.args[name].copy_(fresh.args[name])
        for name in caches:
            assert fresh.args[name].shape[0] <= inputs.args[name].shape[0], name
            inputs.args[name][: fresh.args[name].shape[0]].copy_(fresh.args[name])
        inputs.args["out"].fill_(float("nan"))
        graph.replay()
        expected = inputs.clone()
        expected.result = case.reference(**{**expected.args, "out": None})
        inputs.result = inputs.args["out"]
        case.compare(inputs, expected, shape)
