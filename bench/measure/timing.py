"""Device timing with CUDA events, the pytest-benchmark timer built on it, and a wall-clock twin for dry runs.

``time_cuda(fn)`` warms up, then times each call alone between two CUDA events, with L2 cleared before it
outside the events, so every call reads its inputs from DRAM as a decode step does. L2 is cleared by
*reading* a buffer four times the device's L2: a write (``zero_()``) would leave up to an L2's worth of dirty
lines to be written back while the next, timed kernel runs, overstating its time. Nothing else sits between
the events: a stateful input's reset (``setup``) runs before the flush. Each timed call sits in an NVTX range
so Nsight shows which call was which. With ``cuda_graph=True`` the call is captured once and the graph is
replayed instead: launch overhead drops out, which is what a serving engine running decode under CUDA graphs
sees, and the headline figure for decode-size calls.

``time_wall(fn)`` has the same shape with ``time.perf_counter`` (no events, no flush, no graphs): what
``gpu-check --dry-run`` runs on a CPU to prove the orchestration, labelled as wall-clock wherever it lands.

The result carries the median with p20 and p80 (robust to a stray slow call) and every sample.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.measure.nvtx import nvtx_range

# Read this many times the L2 size to evict it (replacement is not strict LRU: one L2's worth may not do).
_L2_FLUSH_FACTOR = 4
# Where the device does not report its L2 (H100 50 MB, H200 60 MB; 64 MiB covers both).
_L2_FALLBACK_BYTES = 64 * 1024 * 1024
_flush: tuple[torch.Tensor, torch.Tensor] | None = None  # (buffer read, its sum: the one value written)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    mean_ms: float
    samples_ms: tuple[float, ...]

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> "Timing":
        # Deciles by linear interpolation between closest ranks ("inclusive": numpy's default method).
        deciles = statistics.quantiles(samples_ms, n=10, method="inclusive") if len(samples_ms) > 1 else None
        return cls(
            median_ms=statistics.median(samples_ms),
            p20_ms=deciles[1] if deciles else samples_ms[0],
            p80_ms=deciles[7] if deciles else samples_ms[0],
            min_ms=min(samples_ms),
            mean_ms=statistics.fmean(samples_ms),
            samples_ms=tuple(samples_ms),
        )


def l2_flush_bytes(device=None) -> int:
    """Bytes read to clear L2: four times the L2 the device reports."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or _L2_FALLBACK_BYTES
    return _L2_FLUSH_FACTOR * l2


def read_through(buffer: torch.Tensor, total: torch.Tensor) -> None:
    """Reads every byte of ``buffer`` (a sum into the preallocated one-element ``total``): the buffer is
    not written, so no dirty line is left to be written back inside the next timed call."""
    torch.sum(buffer, dim=0, out=total)


def flush_l2() -> None:
    """Clears L2 by reading a buffer four times its size (allocated once per process)."""
    global _flush
    if _flush is None:
        # fp32 in, fp32 out: no cast, so no converted copy of the buffer is written either
        words = l2_flush_bytes() // 4
        _flush = (torch.zeros(words, device="cuda"), torch.zeros((), device="cuda"))
    read_through(*_flush)


def capture_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run once on a side stream (warm-up), then captured in a CUDA graph: returns its replay."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm the allocator and the compile cache outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_cuda(
    fn: Callable[[], object],
    *,
    label: str = "call",
    warmup_ms: float = 20.0,
    rep_ms: float = 100.0,
    min_reps: int = 10,
    max_reps: int = 500,
    flush: bool = True,
    cuda_graph: bool = False,
    setup: Callable[[], object] | None = None,
) -> Timing:
    """Times ``fn`` on the current CUDA stream; every timed call is its own sample. ``setup`` runs before
    every call, outside the events (it puts stateful inputs back)."""
    prepare = setup or (lambda: None)
    prepare()
    call = capture_graph(fn) if cuda_graph else fn
    prepare()
    call()  # compile and allocate before estimating
    torch.cuda.synchronize()

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        prepare()  # inside this estimate only
        call()
    end.record()
    end.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)

    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        prepare()
        call()
    reps = max(min_reps, min(max_reps, int(rep_ms / estimate_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        prepare()
        if flush:
            flush_l2()
        with nvtx_range(label):
            starts[i].record()
            call()
            ends[i].record()
    torch.cuda.synchronize()
    return Timing.from_samples([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_wall(
    fn: Callable[[], object],
    *,
    label: str = "call",
    rep_ms: float = 20.0,
    min_reps: int = 3,
    max_reps: int = 50,
    setup: Callable[[], object] | None = None,
) -> Timing:
    """``time_cuda``'s twin on the host clock: the dry run's stand-in where no CUDA device exists."""
    prepare = setup or (lambda: None)
    prepare()
    first = time.perf_counter()
    fn()  # warm-up, and the estimate
    estimate_ms = max((time.perf_counter() - first) * 1e3, 1e-3)
    samples = []
    for _ in range(max(min_reps, min(max_reps, int(rep_ms / estimate_ms)))):
        prepare()
        with nvtx_range(label):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    return Timing.from_samples(samples)


class CudaClock:
    """A pytest-benchmark timer that reads device time, not host time.

    Calls made through ``clock.timed(fn)`` are bracketed by CUDA events; a reading waits for the calls
    made so far and returns their summed device time in seconds, so the difference between the readings
    pytest-benchmark takes around a round is that round's GPU time. The events sit right around the kernel
    in the stream: when the L2 flush of the round's setup is still running as they are queued, the host's
    launch latency stays out of the figure, as it does in a CUDA graph. Pass the clock as
    ``@pytest.mark.benchmark(timer=CUDA_CLOCK)``.

    Host-only work (the host pool a scheduler keeps) launches nothing: events around it would read the
    device's idle time, near 0. ``clock.timed(fn, host=True)`` adds the call's host time (perf_counter)
    instead, so the same benchmark file times both on one clock.
    """

    def __init__(self):
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._total_s = 0.0

    def timed(self, fn: Callable, label: str = "call", host: bool = False) -> Callable:
        def on_device(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with nvtx_range(label):
                start.record()
                result = fn(*args, **kwargs)
                end.record()
            self._pending.append((start, end))
            return result

        def on_host(*args, **kwargs):
            with nvtx_range(label):
                start = time.perf_counter()
                result = fn(*args, **kwargs)
                self._total_s += time.perf_counter() - start
            return result

        return on_host if host else on_device

    def __repr__(self) -> str:  # pytest-benchmark records the timer by its repr
        return "bench.measure.timing.CUDA_CLOCK (CUDA events; host clock for host-only calls)"

    def __call__(self) -> float:
        for start, end in self._pending:
            end.synchronize()
            self._total_s += start.elapsed_time(end) / 1e3
        self._pending.clear()
        return self._total_s


CUDA_CLOCK = CudaClock()
