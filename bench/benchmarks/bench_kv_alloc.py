"""The block pool on a GPU: one decode step's allocation for 1 to 4096 sequences (and prefill chunks)
against the host pool a scheduler would keep; fork of parallel samples with its block copies; free; and
allocation plus write_kv, the whole per-step KV bookkeeping of a decode step.
Run: ``pytest bench/benchmarks/bench_kv_alloc.py --benchmark-json out.json`` on a GPU."""

import pytest
import torch

import reference.kv_alloc
from bench.measure.device import machine_info
from bench.measure.timing import CUDA_CLOCK, flush_l2
from bench.operators.kv_alloc import ALLOCATE, HOST_POOL_MAX_SEQS, AllocateShape, host_copy, prefilled_pool
from bench.operators.kv_cache import WriteKVShape
from bench.operators.kv_cache import build as write_kv_inputs
from kernels import kv_alloc, kv_cache

pytestmark = [pytest.mark.gpu, pytest.mark.benchmark(timer=CUDA_CLOCK)]
# conftest.py runs ``shape`` over this case's sweep (or its default shapes: --sweep default)
CASE = ALLOCATE

SEQUENCES = (1, 16, 256, 1024, 4096)


@pytest.mark.parametrize("impl", ["triton", *ALLOCATE.peers])
def test_allocate(gpu_benchmark, shape, impl):
    gpu_benchmark(ALLOCATE, shape, impl)


def _time(benchmark, call, reset, label, **info):
    """30 rounds of ``call``, ``reset`` before each; the host pool (info's impl) on the host clock, since it
    launches nothing that CUDA events could time."""
    host = info.get("impl") == "host-pool"

    def setup():
        reset()
        if not host:
            flush_l2()

    timed = CUDA_CLOCK.timed(call, label=label, host=host)
    benchmark.pedantic(timed, setup=setup, rounds=30, warmup_rounds=3)
    benchmark.extra_info.update(info, gpu=machine_info().gpu, timer="host" if host else "cuda-events")


def _host_agrees(host, reset, host_call, pool, device_call, what):
    """Before a host baseline is timed: one host step leaves the same pool state, field by field, as the
    kernel's step on a copy of the device pool (so the two time the same work); the host is put back."""
    device = pool.clone()
    device_call(device)
    reset()
    host_call()
    theirs = host.state()
    for name, value in device.state().items():
        assert torch.equal(value, theirs[name]), f"{what}: host pool's {name} differs from the kernel's"
    reset()


@pytest.mark.parametrize("impl", ["triton", "host-pool"])
@pytest.mark.parametrize("samples", [16, 64])
def test_fork_parallel_samples(benchmark, samples, impl):
    """One prompt of 1000 tokens forked into ``samples`` parallel samples: shared full blocks, one copied
    partial block each (fork, then copy_blocks on the GPU)."""
    pool = kv_alloc.KVBlockPool(4 * samples + 256, 16, samples + 1, 128, device="cuda")
    kv_alloc.allocate(pool, torch.tensor([0], dtype=torch.int32, device="cuda"), 1000)
    built = pool.clone()
    src = torch.zeros(samples, dtype=torch.int32, device="cuda")
    dst = torch.arange(1, samples + 1, dtype=torch.int32, device="cuda")
    k = torch.zeros(pool.num_blocks, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.zeros_like(k)
    if impl == "host-pool":
        host, reset = host_copy(pool)
        sources, targets = src.tolist(), dst.tolist()  # host lists once: a scheduler holds them there
        call = lambda: reference.kv_alloc.fork(host, sources, targets)  # noqa: E731
        _host_agrees(host, reset, call, pool, lambda p: kv_alloc.fork(p, src, dst), "fork")
    else:
        reset = lambda: pool.copy_(built)  # noqa: E731

        def call():
            copies, ok = kv_alloc.fork(pool, src, dst)
            kv_alloc.copy_blocks(k, v, copies)

    _time(
        benchmark,
        call,
        reset,
        f"fork[{impl}] {samples} samples",
        kernel="fork",
        impl=impl,
        shape=f"1000 tokens x {samples} samples",
    )


@pytest.mark.parametrize("impl", ["triton", "host-pool"])
@pytest.mark.parametrize("num_seqs", SEQUENCES)
def test_free(benchmark, num_seqs, impl):
    pool = prefilled_pool(AllocateShape("free", num_seqs, 1), "cuda", seed=1)
    seqs = torch.arange(num_seqs, dtype=torch.int32, device="cuda")
    if impl == "host-pool":
        if num_seqs > HOST_POOL_MAX_SEQS:
            pytest.skip(f"host-pool: over a second a call past {HOST_POOL_MAX_SEQS} sequences")
        host, reset = host_copy(pool)
        ids = seqs.tolist()  # host list once: a scheduler holds its ids there
        call = lambda: reference.kv_alloc.free(host, ids)  # noqa: E731
        _host_agrees(host, reset, call, pool, lambda p: kv_alloc.free(p, seqs), "free")
    else:
        built = pool.clone()
        reset = lambda: pool.copy_(built)  # noqa: E731
        call = lambda: kv_alloc.free(pool, seqs)  # noqa: E731
    _time(
        benchmark, call, reset, f"free[{impl}] {num_seqs}", kernel="free", impl=impl, shape=f"seqs={num_seqs}"
    )


@pytest.mark.parametrize("num_seqs", SEQUENCES)
def test_decode_step_bookkeeping(benchmark, num_seqs):
    """allocate, then write_kv into the slots it returned: a decode step's KV bookkeeping, two launches."""
    shape = AllocateShape("step", num_seqs, 1)
    pool = prefilled_pool(shape, "cuda", seed=2)
    built = pool.clone()
    seqs = torch.arange(num_seqs, dtype=torch.int32, device="cuda")
    rows = write_kv_inputs(WriteKVShape("step", "decode", num_seqs, 8, 128, 128), "cuda", seed=3).args
    k_cache = torch.zeros(pool.num_blocks, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.zeros_like(k_cache)

    def step():
        slots, ok = kv_alloc.allocate(pool, seqs, 1)
        kv_cache.write_kv(rows["key"], rows["value"], k_cache, v_cache, slots)

    _time(
        benchmark,
        step,
        lambda: pool.copy_(built),
        f"decode step {num_seqs}",
        kernel="allocate+write_kv",
        shape=f"seqs={num_seqs} 8x128 bf16",
    )
