"""Tensor parallelism's all-reduce: the sum over ranks a TP decode step does twice per layer (after the
attention output projection and after the MLP), batch x hidden x 2 bytes, 8 KB to 64 MB: its sizes and its
figures (the run: bench/measure/collectives.py). Timed as nccl-tests times it and reported the same way:
latency, algorithm bandwidth (bytes / time) and bus bandwidth (algbw x 2(n-1)/n, what each rank's links carry
in a ring), the slowest rank's time per call.

Implementations: the group's backend (NCCL on GPUs, gloo on CPUs), and torch's symmetric-memory one-shot
all-reduce (each rank reads every peer's buffer over NVLink and sums: one step, no ring) where the torch and
the machine have it; skipped with the reason elsewhere.
"""

import statistics
from dataclasses import dataclass

#: Bytes per all-reduce: 8 KB (a few tokens of a small model) to 64 MB (a prefill chunk of a large one).
SIZES = tuple(8 * 1024 * 4**i for i in range(7)) + (64 * 1024 * 1024,)
CPU_SIZES = (8 * 1024, 128 * 1024, 2 * 1024 * 1024)


@dataclass(frozen=True)
class AllReduceResult:
    impl: str
    size: int  # bytes per rank
    samples_ms: list[float]  # per call: the slowest rank's time
    mean_rank_ms: float  # median over calls of the ranks' mean
    verified: bool

    def figures(self, world: int) -> dict:
        median = statistics.median_high(self.samples_ms)  # a time one call took, as nccl-tests reports
        algbw = self.size / (median * 1e-3) / 1e9
        return {
            "latency_us": round(median * 1e3, 2),
            "algbw_gbps": round(algbw, 2),
            "busbw_gbps": round(algbw * 2 * (world - 1) / world, 2),
        }
