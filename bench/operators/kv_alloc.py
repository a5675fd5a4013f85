"""The block pool's operators: ``allocate`` (a decode step or a prefill chunk over a pool already holding
sequences of reasoning lengths) and ``copy_blocks`` (the copies a fork of parallel samples asks for); and
``kv_pool``, fork's and free's launches for the static report only (bench_kv_alloc.py times them).

``allocate``'s peer is the host pool a serving scheduler keeps (reference/kv_alloc.py), stepping in Python.
Its set-up (a host copy of the device pool's state, the sequence ids as a Python list) is done once in
prepare; its reset puts the host pool back before each call, outside the timing; so the timed call is only
the Python bookkeeping a scheduler does for a decode step, timed on the host clock (``host_only``). Its
check holds slots, ok and the pool's state against the expected run, field by field.
"""

from dataclasses import dataclass

import torch

import kernels.kv_alloc
import reference.kv_alloc
from bench.operators.base import Case, Inputs, Peer, PeerUnavailable, Prepared, StaticOnly
from bench.serving.models import DEFAULT_BLOCK_SIZE
from bench.testing import Guarded, assert_bitwise_equal, generator, randn

# --- allocate -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllocateShape:
    """``num_seqs`` sequences already hold between 1 and ``max_len`` tokens; each gets ``new_tokens`` more
    (1: a decode step). The pool has room for all of them twice over."""

    name: str
    num_seqs: int
    new_tokens: int
    max_len: int = 4096
    block_size: int = DEFAULT_BLOCK_SIZE

    @property
    def label(self) -> str:
        step = "decode" if self.new_tokens == 1 else f"prefill {self.new_tokens} tok"
        return f"{self.name} {step} seqs={self.num_seqs} page={self.block_size}"

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-(self.max_len + self.new_tokens) // self.block_size)


def prefill_lengths(shape: AllocateShape, seed: int) -> torch.Tensor:
    """Each sequence's cached tokens before the timed call: uniform in 1..max_len, seeded."""
    return torch.randint(1, shape.max_len + 1, (shape.num_seqs,), generator=generator(seed))


def _prefilled_state(shape: AllocateShape, seed: int) -> dict[str, torch.Tensor]:
    """The state the host reference's ``allocate(pool, range(num_seqs), lengths)`` leaves on an empty pool,
    computed in a few tensor operations instead of token by token: it pops blocks 0, 1, 2, ... off the top of
    the free stack in (sequence, page) order, so sequence s owns the blocks from the sum of the earlier
    sequences' page counts on; each holds one reference; the free stack's entries are untouched (its count
    drops by the blocks taken)."""
    num_blocks = 2 * shape.num_seqs * shape.max_blocks_per_seq
    lengths = prefill_lengths(shape, seed)
    pages = (lengths + shape.block_size - 1) // shape.block_size
    first = torch.cumsum(pages, 0) - pages
    column = torch.arange(shape.max_blocks_per_seq)
    owned = column[None, :] < pages[:, None]
    taken = int(pages.sum())
    ref_counts = torch.zeros(num_blocks, dtype=torch.int32)
    ref_counts[:taken] = 1
    return {
        "block_tables": torch.where(owned, first[:, None] + column[None, :], -1).to(torch.int32),
        "seq_lens": lengths.to(torch.int32),
        "ref_counts": ref_counts,
        "free_stack": torch.arange(num_blocks - 1, -1, -1, dtype=torch.int32),
        "free_count": torch.tensor([num_blocks - taken], dtype=torch.int32),
    }


_prefilled: dict = {}  # (shape, seed, device) -> pool: a few, so measure, static and benchmarks share them
_PREFILLED_KEPT = 4


def prefilled_pool(shape: AllocateShape, device, seed: int) -> kernels.kv_alloc.KVBlockPool:
    """A pool whose sequences hold random lengths, in the state the host reference's allocate lays down
    (not the kernel under test's); built once per (shape, seed, device), a fresh clone each call."""
    key = (shape, seed, str(torch.device(device)))
    if key not in _prefilled:
        if len(_prefilled) >= _PREFILLED_KEPT:
            _prefilled.pop(next(iter(_prefilled)))
        num_blocks = 2 * shape.num_seqs * shape.max_blocks_per_seq
        pool = kernels.kv_alloc.KVBlockPool(
            num_blocks, shape.block_size, shape.num_seqs, shape.max_blocks_per_seq, device=device
        )
        for name, value in _prefilled_state(shape, seed).items():
            getattr(pool, name).copy_(value)
        _prefilled[key] = pool
    return _prefilled[key].clone()


def allocate_build(shape: AllocateShape, device, seed: int, guarded: bool = False) -> Inputs:
    pool = prefilled_pool(shape, device, seed)
    built = pool.clone()
    order = torch.randperm(shape.num_seqs, generator=generator(seed + 1)).to(torch.int32).to(device)
    args = {"pool": pool, "seq_ids": order, "num_new_tokens": shape.new_tokens}
    return Inputs(args, ("pool",), reset=lambda: pool.copy_(built))


def allocate_byte_model(shape: AllocateShape) -> int:
    """Per sequence: its id, its length read and written, its last page's table entry; per new page: the
    stack entry popped, the table entry and reference count written; per token: its slot; the free count."""
    n = shape.num_seqs
    new_pages = n * (-(-shape.new_tokens // shape.block_size))  # at most; decode steps add far fewer
    return n * 4 * 4 + new_pages * 12 + n * shape.new_tokens * 8 + 8


def allocate_compare(actual: Inputs, expected: Inputs, shape) -> float:
    """Same slots, same ok, and the pool's state equal field by field."""
    (slots, ok), (want_slots, want_ok) = actual.result, expected.result
    assert_bitwise_equal(slots.cpu(), want_slots.cpu(), "slot_mapping")
    if bool(ok) != bool(want_ok):
        raise AssertionError(f"ok: {bool(ok)} vs the reference's {bool(want_ok)}")
    ours, theirs = actual.args["pool"].state(), expected.args["pool"].state()
    for name in ours:
        assert_bitwise_equal(ours[name], theirs[name], f"pool.{name}")
    return 0.0


def allocate_shapes(sizes=(1, 4, 16, 64, 256, 1024, 4096)) -> list[AllocateShape]:
    return [AllocateShape("reasoning", n, 1) for n in sizes]


# --- allocate's peer: the host pool -------------------------------------------------------------------------

# Past this many sequences one host step takes over a second: too slow to time a few dozen rounds of.
HOST_POOL_MAX_SEQS = 1024


def host_copy(pool):
    """The host pool a serving scheduler would keep, in ``pool``'s state (one device-to-host copy, here),
    and a function that puts it back in that state (host tensors only: no device work, no sync)."""
    host = reference.kv_alloc.KVBlockPool(
        pool.num_blocks, pool.block_size, pool.max_seqs, pool.max_blocks_per_seq
    )
    snapshot = {name: getattr(pool, name).cpu() for name in host.STATE}

    def reset():
        for name, value in snapshot.items():
            getattr(host, name).copy_(value)

    reset()
    return host, reset


def host_pool_prepare(inputs, shape) -> Prepared:
    if shape.num_seqs > HOST_POOL_MAX_SEQS:
        raise PeerUnavailable(f"the host pool takes over a second a step past {HOST_POOL_MAX_SEQS} sequences")
    a = inputs.args
    host, reset = host_copy(a["pool"])
    seq_ids = [int(s) for s in a["seq_ids"].tolist()]  # once, here: a scheduler holds its ids on the host
    new_tokens = a["num_new_tokens"]

    def step():  # the host pool rides along in the result (no work): check reads its state
        slots, ok = reference.kv_alloc.allocate(host, seq_ids, new_tokens)
        return slots, ok, host

    return Prepared(step, reset)


def host_pool_check(result, expected, shape) -> float:
    """Same slots, same ok, and the pool's state equal field by field: allocate's own comparison."""
    slots, ok, host = result
    return allocate_compare(Inputs({"pool": host}, ("pool",), result=(slots, ok)), expected, shape)


PEERS = {"host-pool": Peer("host-pool", host_pool_prepare, host_pool_check, host_only=True)}


ALLOCATE = Case.by_convention(
    globals(),
    "allocate",
    prefix="allocate_",
    kernel=lambda **a: kernels.kv_alloc.allocate(a["pool"], a["seq_ids"], a["num_new_tokens"]),
    reference=lambda **a: reference.kv_alloc.allocate(a["pool"], a["seq_ids"].tolist(), a["num_new_tokens"]),
    flop_model=lambda shape: 0,
    sweep=lambda: allocate_shapes() + [AllocateShape("reasoning", n, 2048) for n in (1, 4, 16)],
    default_shapes=lambda: allocate_shapes((1, 64, 1024, 4096)) + [AllocateShape("reasoning", 4, 2048)],
    small_shapes=lambda: [
        AllocateShape("small", 5, 1, max_len=40, block_size=4),
        AllocateShape("small", 3, 37, max_len=40, block_size=8),
        AllocateShape("small", 70, 1, max_len=100, block_size=16),
    ],
    static_shapes=lambda: [AllocateShape("reasoning", 1024, 1), AllocateShape("reasoning", 4, 2048)],
    traffic_shapes=lambda: [AllocateShape("small", 70, 1, max_len=100, block_size=16)],
    peers=PEERS,  # the host pool
    reference_max_bytes=0,  # the reference walks device tensors element by element: the host pool is its peer
    traffic_limit=None,  # several passes over a few kilobytes: latency, not bandwidth, decides its time
)


# --- copy_blocks --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyBlocksShape:
    """A fork of ``pairs`` parallel samples: each copies its source's partly filled last block."""

    name: str
    pairs: int
    num_kv_heads: int
    head_dim: int
    block_size: int = DEFAULT_BLOCK_SIZE
    dtype: torch.dtype = torch.bfloat16

    @property
    def label(self) -> str:
        return f"{self.name} pairs={self.pairs} page={self.block_size} {self.num_kv_heads}x{self.head_dim}"

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize


def copy_build(shape: CopyBlocksShape, device, seed: int, guarded: bool = False) -> Inputs:
    num_blocks = 2 * shape.pairs + 2
    gen = generator(seed)
    cache_shape = (num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
    caches = {}
    for name in ("k_cache", "v_cache"):
        if guarded:
            guard = Guarded.empty(cache_shape, shape.dtype, device, fill=0.0)
            guard.tensor.copy_(randn(cache_shape, shape.dtype, device, gen))
            caches[name] = guard
        else:
            caches[name] = randn(cache_shape, shape.dtype, device, gen)
    order = torch.randperm(num_blocks, generator=gen)
    copies = torch.stack([order[: shape.pairs], order[shape.pairs : 2 * shape.pairs]], dim=1).to(torch.int32)
    copies[::3] = -1  # a pair whose source had no partial block: nothing to copy
    args = {name: c.tensor if guarded else c for name, c in caches.items()}
    args["copies"] = copies.to(device)
    guards = {name: c for name, c in caches.items()} if guarded else {}
    return Inputs(args, ("k_cache", "v_cache"), guards)


def copy_byte_model(shape: CopyBlocksShape) -> int:
    copied = shape.pairs - len(range(0, shape.pairs, 3))
    return 2 * 2 * copied * shape.block_bytes + shape.pairs * 8


def copy_compare(actual: Inputs, expected: Inputs, shape) -> float:
    for name, guard in actual.guards.items():
        guard.check(name)
    for name in actual.outputs:
        assert_bitwise_equal(actual.args[name], expected.args[name], name)
    return 0.0


COPY_BLOCKS = Case.by_convention(
    globals(),
    "copy_blocks",
    prefix="copy_",
    flop_model=lambda shape: 0,
    sweep=lambda: [CopyBlocksShape("Llama-3.1-8B fork", n, 8, 128) for n in (1, 16, 64, 256, 1024)],
    default_shapes=lambda: [CopyBlocksShape("Llama-3.1-8B fork", 16, 8, 128)],
    small_shapes=lambda: [
        CopyBlocksShape("small", 7, 2, 24, block_size=4),
        CopyBlocksShape("small", 3, 1, 576),
    ],
    static_shapes=lambda: [CopyBlocksShape("Llama-3.1-8B fork", 16, 8, 128)],
    traffic_shapes=lambda: [
        CopyBlocksShape("small", 7, 2, 24, block_size=4),
        CopyBlocksShape("small", 9, 8, 128),
    ],
)


# --- static report: fork and free, the pool's kernels without a case of their own -------------------------


@dataclass(frozen=True, kw_only=True)
class PoolOpShape:
    """One ``op`` ("fork": ``seqs`` parallel samples forked from as many sources; "free": ``seqs`` finished
    sequences) on a pool sized as allocate's reasoning shapes (1024 sequences of up to 4K tokens)."""

    op: str
    seqs: int
    max_seqs: int = 1024
    max_len: int = 4096
    block_size: int = DEFAULT_BLOCK_SIZE

    @property
    def label(self) -> str:
        return f"reasoning {self.op} seqs={self.seqs} page={self.block_size}"


def _pool_op_launch(shape: PoolOpShape, device="cpu") -> None:
    """The launcher's call at this shape (the static report captures its launch; nothing runs)."""
    pages = -(-shape.max_len // shape.block_size)
    pool = kernels.kv_alloc.KVBlockPool(
        2 * shape.max_seqs * pages, shape.block_size, shape.max_seqs, pages, device
    )
    ids = torch.arange(2 * shape.seqs, dtype=torch.int32, device=device)
    if shape.op == "fork":
        kernels.kv_alloc.fork(pool, ids[: shape.seqs], ids[shape.seqs :])
    else:
        kernels.kv_alloc.free(pool, ids[: shape.seqs])


POOL_STATIC = StaticOnly(
    name="kv_pool",
    module="kv_alloc",
    static_shapes=lambda: [PoolOpShape(op=op, seqs=n) for op in ("fork", "free") for n in (8, 512)],
    launch=_pool_op_launch,
)
