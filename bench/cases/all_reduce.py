"""Tensor parallelism's all-reduce: the sum over ranks a TP decode step does twice per layer (after the
attention output projection and after the MLP), batch x hidden x 2 bytes, 8 KB to 64 MB. Timed as
nccl-tests times it and reported the same way: latency, algorithm bandwidth (bytes / time) and bus bandwidth
(algbw x 2(n-1)/n, what each rank's links carry in a ring), the slowest rank's time per call.

Implementations: the group's backend (NCCL on GPUs, gloo on CPUs), and torch's symmetric-memory one-shot
all-reduce (each rank reads every peer's buffer over NVLink and sums: one step, no ring) where the torch and
the machine have it; skipped with the reason elsewhere.
"""

import functools
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bench.measure.distributed import Rank, gather_floats, guard

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
        median = sorted(self.samples_ms)[len(self.samples_ms) // 2]
        algbw = self.size / (median * 1e-3) / 1e9
        return {
            "latency_us": round(median * 1e3, 2),
            "algbw_gbps": round(algbw, 2),
            "busbw_gbps": round(algbw * 2 * (world - 1) / world, 2),
        }


def _timer(rank: Rank):
    if rank.device.type == "cuda":

        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

    else:

        def timed(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

    return timed


def _one_shot(rank: Rank, numel: int):
    """torch's symmetric-memory one-shot all-reduce on a buffer of ``numel`` bf16, or the reason it cannot
    run here."""
    if rank.device.type != "cuda":
        return None, "needs CUDA devices (symmetric memory maps peers' GPU buffers)"
    if rank.world < 2:
        return None, "needs 2+ GPUs connected by NVLink (world size 1)"
    try:
        import torch.distributed._symmetric_memory as symm_mem

        buffer = symm_mem.empty(numel, dtype=torch.bfloat16, device=rank.device)
        group = dist.group.WORLD
        symm_mem.rendezvous(buffer, group.group_name)
        op = torch.ops.symm_mem.one_shot_all_reduce

        def call():
            return op(buffer, "sum", group.group_name)

        call()
        return (buffer, call), None
    except Exception as error:  # alpha API: absent, or the machine lacks the links it needs
        return None, f"symmetric memory unavailable: {type(error).__name__}: {str(error)[:120]}"


def run(rank: Rank, sizes=SIZES, *, reps: int = 20, warmup: int = 5) -> tuple[list[AllReduceResult], dict]:
    """Every size with the backend's all-reduce and with the one-shot one; returns the results and the
    reasons any implementation was skipped."""
    timed = _timer(rank)
    results, skipped = [], {}
    for size in sizes:
        numel = size // 2
        data = torch.empty(numel, dtype=torch.bfloat16, device=rank.device)
        impls = {rank.backend: (data, functools.partial(dist.all_reduce, data))}
        one_shot, reason = _one_shot(rank, numel)
        if one_shot is None:
            skipped["symm-mem one-shot"] = reason
        else:
            impls["symm-mem one-shot"] = one_shot
        for impl, (buffer, call) in impls.items():
            with guard(rank, f"all-reduce {impl} {size} B"):
                buffer.fill_(rank.rank + 1)
                result = call()
                summed = result if isinstance(result, torch.Tensor) else buffer
                verified = bool((summed == rank.world * (rank.world + 1) / 2).all())
                mine = []
                for i in range(warmup + reps):
                    dist.barrier()
                    ms = timed(call)
                    if i >= warmup:
                        mine.append(ms)
                everyone = gather_floats(rank, mine + [float(verified)])
            per_call = [max(r[i] for r in everyone) for i in range(reps)]
            means = sorted(sum(r[i] for r in everyone) / rank.world for i in range(reps))
            ok = all(r[-1] == 1.0 for r in everyone)
            results.append(AllReduceResult(impl, size, per_call, means[reps // 2], ok))
    return results, skipped


def check(rank: Rank, sizes=(8 * 1024, 100_002)) -> list[str]:
    """The backend's all-reduce sums correctly at a few sizes (one odd), timed path included."""
    found, _ = run(rank, sizes, reps=1, warmup=0)
    wrong = [f"{r.impl} {r.size} B" for r in found if not r.verified]
    if wrong:
        raise AssertionError(f"rank {rank.rank}: all-reduce summed wrong at {', '.join(wrong)}")
    return [f"rank {rank.rank} all-reduce {r.impl} {r.size} B: sums match" for r in found]
