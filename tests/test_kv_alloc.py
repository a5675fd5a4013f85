"""The device block pool against the host reference: random runs of allocate / fork / free compared state
for state after every call, the pool's invariants, all-or-nothing failures, copy_blocks, bad input."""

import math

import pytest
import torch

import kernels.kv_alloc as kv_alloc
from bench.testing import no_host_sync
from kernels import INTERPRETED
from reference import kv_alloc as reference
from tests import helpers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def ids(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def assert_same_state(pool: kv_alloc.KVBlockPool, host: reference.KVBlockPool, after: str) -> None:
    ours, theirs = pool.state(), host.state()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), (
            f"after {after}: {name} differs\n{ours[name]}\n{theirs[name]}"
        )


def assert_invariants(pool: kv_alloc.KVBlockPool) -> None:
    """Every block is free or referenced, never both, none lost or handed out twice; counts match the
    tables; entries past a sequence's pages are -1; the scratch is back at its neutral values."""
    state = pool.state()
    tables, lens, refs = state["block_tables"].long(), state["seq_lens"].long(), state["ref_counts"].long()
    free = state["free_stack"].long()
    pages = (lens + pool.block_size - 1) // pool.block_size
    used = torch.arange(pool.max_blocks_per_seq)[None, :] < pages[:, None]
    counted = torch.bincount(tables[used], minlength=pool.num_blocks)
    assert torch.equal(counted, refs), "ref_counts differ from the tables' references"
    assert len(set(free.tolist())) == free.numel(), "a block is on the free stack twice"
    assert (refs[free] == 0).all(), "a free block is referenced"
    assert free.numel() + int((refs > 0).sum()) == pool.num_blocks, "a block is neither free nor referenced"
    assert (tables[~used] == -1).all(), "a table entry past a sequence's pages is not -1"
    assert (pool.seq_marks.cpu() == 0).all() and (pool.last_use.cpu() == -1).all(), "scratch not reset"
    usage = pool.usage()
    assert usage["tokens"] + usage["slack"] + usage["free"] == usage["capacity"], usage
    assert usage["tokens"] + usage["shared"] == int(lens.sum())


class Pools:
    """The device pool and the host reference, driven together."""

    def __init__(self, num_blocks=24, block_size=4, max_seqs=8, max_blocks_per_seq=6):
        self.device = kv_alloc.KVBlockPool(
            num_blocks, block_size, max_seqs, max_blocks_per_seq, device=DEVICE
        )
        self.host = reference.KVBlockPool(num_blocks, block_size, max_seqs, max_blocks_per_seq)

    def allocate(self, seqs, counts):
        if isinstance(counts, int):
            got = kv_alloc.allocate(self.device, ids(seqs), counts)
            want = reference.allocate(self.host, seqs, counts)
        else:
            got = kv_alloc.allocate(self.device, ids(seqs), ids(counts), num_tokens=sum(counts))
            want = reference.allocate(self.host, seqs, counts, num_tokens=sum(counts))
        return self.check("allocate", got, want)

    def fork(self, src, dst):
        return self.check(
            "fork", kv_alloc.fork(self.device, ids(src), ids(dst)), reference.fork(self.host, src, dst)
        )

    def free(self, seqs):
        kv_alloc.free(self.device, ids(seqs))
        reference.free(self.host, seqs)
        self.check("free", None, None)

    def check(self, what, got, want):
        assert_same_state(self.device, self.host, what)
        assert_invariants(self.device)
        if got is None:
            return None
        assert torch.equal(got[0].cpu(), want[0]), f"{what}: returned {got[0]} vs {want[0]}"
        assert bool(got[1]) == bool(want[1]), f"{what}: ok {bool(got[1])} vs {bool(want[1])}"
        return bool(got[1])


def test_decode_steps_prefill_fork_and_free():
    pools = Pools()
    assert pools.allocate([0, 1], [5, 9])
    assert pools.allocate([0, 1, 2], 1)
    assert pools.fork([1, 0], [3, 4])
    assert pools.allocate([3, 4], 2)
    pools.free([1, 0])
    pools.free([3, 4, 2])
    assert pools.device.num_free() == pools.device.num_blocks


def test_out_of_blocks_changes_nothing():
    pools = Pools(num_blocks=6)
    assert pools.allocate([0], [16])
    before = pools.device.state()
    assert not pools.allocate([1, 2], [8, 8])  # 4 blocks wanted, 2 free
    assert all(torch.equal(before[k], v) for k, v in pools.device.state().items())
    assert not pools.fork([0, 0], [1, 1])  # a destination listed twice


def test_a_listing_too_long_for_int32_positions_is_refused_before_anything_changes():
    # Repeats and ids out of range are legal in a free, so a listing can outgrow max_seqs: its (listing, page)
    # positions passed 2^31 here (2048 x 2^20), an int32 last_use wrapped, and two blocks were lost.
    pool = kv_alloc.KVBlockPool(4, 1, 1, 2**20)
    kv_alloc.allocate(
        pool, torch.zeros(1, dtype=torch.int32), torch.tensor([2], dtype=torch.int32), num_tokens=2
    )
    before = pool.state()
    with pytest.raises(ValueError, match="^seq_ids: expected at most 2047 entries"):
        kv_alloc.free(pool, torch.tensor([-1] * 2048 + [0], dtype=torch.int32))
    assert all(torch.equal(before[k], v) for k, v in pool.state().items())
    kv_alloc.free(pool, torch.tensor([-1] * 2046 + [0], dtype=torch.int32))  # the longest it takes
    assert pool.num_free() == 4
    assert_invariants(pool)


@pytest.mark.parametrize(
    "seqs, counts",
    [([0, 0], 1), ([8], 1), ([-1], 1), ([0], [30]), ([0, 1], [2, -1])],
    ids=["repeated", "id too large", "negative id", "outgrows its row", "negative count"],
)
def test_refused_allocations_change_nothing(seqs, counts):
    pools = Pools()
    assert pools.allocate([2], [3])
    assert not pools.allocate(seqs, counts)


@pytest.mark.parametrize(
    "counts, num_tokens",
    [([2**31 - 1, 2**31 - 1, 2], 0), ([2**31 - 1, 2**31 - 1, 5], 3)],
    ids=["sum wraps to 0", "sum wraps to num_tokens"],
)
def test_counts_that_overflow_int32_are_refused(counts, num_tokens):
    """Counts are device data: huge ones, or ones whose int32 sum wraps to num_tokens, wrote past
    slot_mapping (a crash in the interpreter). Now refused like any that outgrow their row."""
    pools = Pools()
    assert pools.allocate([2], [3])
    before = pools.device.state()
    slots, ok = kv_alloc.allocate(pools.device, ids([0, 1, 2]), ids(counts), num_tokens=num_tokens)
    assert not bool(ok) and (slots == -1).all()
    assert all(torch.equal(before[k], v) for k, v in pools.device.state().items())


@pytest.mark.parametrize(
    "src, dst",
    [([0], [0]), ([0, 1], [2, 2]), ([0], [1]), ([0, 2], [2, 3]), ([0], [9])],
    ids=["self", "dst twice", "dst not empty", "dst also a source", "dst out of range"],
)
def test_refused_forks_change_nothing(src, dst):
    pools = Pools()
    assert pools.allocate([0, 1], [6, 3])
    assert not pools.fork(src, dst)


def _pool_runs(st) -> dict:
    """Runs of allocate, prefill, fork and free calls on pools of any size."""
    seq = st.integers(-1, 8)  # -1 and 8 are out of range for max_seqs 8
    step = st.one_of(
        st.tuples(st.just("allocate"), st.lists(seq, min_size=0, max_size=5), st.integers(0, 3)),
        st.tuples(st.just("prefill"), st.lists(st.tuples(seq, st.integers(0, 13)), max_size=4)),
        st.tuples(st.just("fork"), st.lists(st.tuples(seq, seq), max_size=3)),
        st.tuples(st.just("free"), st.lists(seq, max_size=4)),
    )
    return dict(
        steps=st.lists(step, min_size=1, max_size=12),
        num_blocks=st.integers(1, 30),
        block_size=st.sampled_from([1, 2, 4, 16]),
    )


@helpers.property_test(_pool_runs, max_examples=60 if INTERPRETED else 25)  # `pytest --fuzz`: the long search
def test_random_runs_property(steps, num_blocks, block_size):
    pools = Pools(num_blocks=num_blocks, block_size=block_size, max_seqs=8, max_blocks_per_seq=6)
    for kind, *args in steps:
        if kind == "allocate":
            pools.allocate(args[0], args[1])
        elif kind == "prefill":
            pools.allocate([s for s, _ in args[0]], [c for _, c in args[0]])
        elif kind == "fork":
            pools.fork([s for s, _ in args[0]], [d for _, d in args[0]])
        else:
            pools.free(args[0])


@pytest.mark.parametrize("name", ["allocate", "copy_blocks"])
def test_small_shapes_of_the_cases(name):
    """The shapes `decodebench run` verifies (a pool laid down by the reference, then one kernel call)."""
    from bench.measure.runner import verify
    from bench.operators import CASES

    for shape in CASES[name].small_shapes():
        outcome = verify(CASES[name], shape, DEVICE)
        assert outcome.ok, outcome.message


def test_copy_blocks_copies_whole_blocks_and_skips_minus_one():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(6, 4, 2, 24, generator=gen).to(torch.bfloat16).to(DEVICE)
    v = torch.randn(6, 4, 2, 24, generator=gen).to(torch.bfloat16).to(DEVICE)
    copies = ids([[1, 4], [-1, -1], [2, 5]])
    k_ref, v_ref = k.clone(), v.clone()
    kv_alloc.copy_blocks(k, v, copies)
    reference.copy_blocks(k_ref, v_ref, copies.cpu())
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert torch.equal(k[4], k[1]) and not torch.equal(k[3], k[1])


def guarded_caches(num_blocks, block_shape, dtype=torch.float32, guard_blocks=2, seed=0):
    """k and v caches viewed inside one buffer, each with guard_blocks blocks of sentinel before and after it
    (guard | k | guard | v | guard): a write or read one block outside either cache lands in a guard."""
    block = math.prod(block_shape)
    guard, cache = guard_blocks * block, num_blocks * block
    buffer = torch.full((3 * guard + 2 * cache,), -7.0, dtype=dtype, device=DEVICE)
    k = buffer[guard : guard + cache].view(num_blocks, *block_shape)
    v = buffer[2 * guard + cache : 2 * guard + 2 * cache].view(num_blocks, *block_shape)
    gen = torch.Generator().manual_seed(seed)
    k.copy_(torch.randn(k.shape, generator=gen).to(dtype))
    v.copy_(torch.randn(v.shape, generator=gen).to(dtype))
    guards = torch.ones_like(buffer, dtype=torch.bool)
    guards[guard : guard + cache] = False
    guards[2 * guard + cache : 2 * guard + 2 * cache] = False
    return buffer, k, v, guards


def check_copy_blocks_stays_inside(pairs, num_blocks=5, block_shape=(2, 1, 8)):
    buffer, k, v, guards = guarded_caches(num_blocks, block_shape)
    k_ref, v_ref = k.clone(), v.clone()
    copies = ids(pairs).view(-1, 2)
    kv_alloc.copy_blocks(k, v, copies)
    assert (buffer[guards] == -7.0).all(), "copy_blocks wrote outside the caches"
    reference.copy_blocks(k_ref, v_ref, copies.cpu())
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@pytest.mark.parametrize(
    "pairs",
    [[[0, -1]], [[1, 5]], [[5, 2]], [[-1, 3]], [[2, -1], [3, 4], [0, 5], [6, 1]]],
    ids=["dst -1", "dst num_blocks", "src num_blocks", "src -1", "mixed"],
)
def test_copy_blocks_skips_pairs_outside_the_caches(pairs):
    """Issue 10, item 1: a pair naming a block outside [0, num_blocks), either side, copies nothing; the
    guard memory around both caches stays untouched and the valid pairs still copy."""
    check_copy_blocks_stays_inside(pairs)


def test_copy_blocks_never_forms_an_address_for_far_ids():
    check_copy_blocks_stays_inside([[0, 2**31 - 1], [-(2**31), 1], [2**30, -(2**30)], [4, 0]])


def test_fork_then_copy_gives_the_destination_the_sources_tokens():
    pools = Pools(num_blocks=10, block_size=4)
    assert pools.allocate([0], [10])  # 2 full blocks and a partial one
    copies, ok = kv_alloc.fork(pools.device, ids([0]), ids([1]))
    assert pools.check("fork", (copies, ok), reference.fork(pools.host, [0], [1]))
    tables = pools.device.block_tables
    assert copies.tolist() == [[int(tables[0, 2]), int(tables[1, 2])]]  # source's partial block -> fresh one
    assert int(tables[1, 2]) != int(tables[0, 2])
    k = torch.arange(10 * 4 * 1 * 8, dtype=torch.float32, device=DEVICE).view(10, 4, 1, 8)
    v = -k
    kv_alloc.copy_blocks(k, v, copies)
    for position in range(10):
        page, offset = divmod(position, 4)
        assert torch.equal(k[tables[1, page], offset], k[tables[0, page], offset])


BAD = {
    "seq_ids int64": ("seq_ids", lambda p: kv_alloc.allocate(p, torch.zeros(2, dtype=torch.int64), 1)),
    "seq_ids 2-D": ("seq_ids", lambda p: kv_alloc.allocate(p, ids([[0]]), 1)),
    "counts float": ("num_new_tokens", lambda p: kv_alloc.allocate(p, ids([0]), 1.5)),
    "counts negative int": ("num_new_tokens", lambda p: kv_alloc.allocate(p, ids([0]), -1)),
    "counts length": ("num_new_tokens", lambda p: kv_alloc.allocate(p, ids([0, 1]), ids([1]), num_tokens=1)),
    "num_tokens missing": ("num_tokens", lambda p: kv_alloc.allocate(p, ids([0]), ids([3]))),
    "num_tokens wrong": ("num_tokens", lambda p: kv_alloc.allocate(p, ids([0, 1]), 2, num_tokens=3)),
    "fork shapes": ("dst", lambda p: kv_alloc.fork(p, ids([0, 1]), ids([2]))),
    "free on meta": ("seq_ids", lambda p: kv_alloc.free(p, torch.zeros(1, dtype=torch.int32, device="meta"))),
    "copies shape": (
        "copies",
        lambda p: kv_alloc.copy_blocks(
            torch.zeros(2, 1, 1, 8, device=DEVICE), torch.zeros(2, 1, 1, 8, device=DEVICE), ids([0, 1])
        ),
    ),
    "pool size": ("num_blocks", lambda p: kv_alloc.KVBlockPool(0, 16, 4, 4)),
    # Issue 10, item 5: block ids and lengths are int32 on the device; these were accepted.
    "num_blocks 2^31": ("num_blocks", lambda p: kv_alloc.KVBlockPool(2**31, 16, 4, 4, device="meta")),
    "block_size 2^31": ("block_size", lambda p: kv_alloc.KVBlockPool(16, 2**31, 4, 1, device="meta")),
    "sequence length past int32": ("block_size", lambda p: kv_alloc.KVBlockPool(16, 2**20, 4, 2**11)),
    "num_blocks a bool": ("num_blocks", lambda p: kv_alloc.KVBlockPool(True, 16, 4, 4)),
    "pool on meta": ("device", lambda p: kv_alloc.KVBlockPool(16, 16, 4, 4, device="meta")),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_names_the_argument_and_changes_nothing(case):
    argument, call = BAD[case]
    pools = Pools()
    assert pools.allocate([0], [5])
    before = pools.device.state()
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        call(pools.device)
    assert all(torch.equal(before[k], v) for k, v in pools.device.state().items())


@pytest.mark.gpu
def test_decode_step_allocation_has_no_host_sync():
    pool = kv_alloc.KVBlockPool(4096, 16, 1024, 64, device="cuda")
    seqs = torch.arange(1024, dtype=torch.int32, device="cuda")
    kv_alloc.allocate(pool, seqs, 1)
    with no_host_sync():
        kv_alloc.allocate(pool, seqs, 1)
        kv_alloc.free(pool, seqs[:10])


@pytest.mark.parametrize(
    "num_seqs, max_len, block_size",
    [(1, 1, 16), (5, 40, 4), (70, 100, 16), (33, 300, 1), (9, 4096, 128)],
)
def test_prefilled_pool_is_the_state_the_reference_lays_down(num_seqs, max_len, block_size):
    """The benchmarks' vectorized prefill against the host reference's allocate, replayed token by token
    from an empty pool: every field equal, the whole free stack included (stale entries too)."""
    from bench.operators.kv_alloc import AllocateShape, prefill_lengths, prefilled_pool

    shape = AllocateShape("prefill", num_seqs, 1, max_len=max_len, block_size=block_size)
    pool = prefilled_pool(shape, DEVICE, seed=11)
    host = reference.KVBlockPool(pool.num_blocks, block_size, num_seqs, shape.max_blocks_per_seq)
    _, ok = reference.allocate(host, list(range(num_seqs)), prefill_lengths(shape, 11).tolist())
    assert bool(ok)
    for name in host.STATE:
        assert torch.equal(getattr(pool, name).cpu(), getattr(host, name)), name
    assert_invariants(pool)
    again = prefilled_pool(shape, DEVICE, seed=11)  # from the cache: an independent copy
    again.seq_lens.zero_()
    assert torch.equal(prefilled_pool(shape, DEVICE, seed=11).seq_lens, pool.seq_lens)
