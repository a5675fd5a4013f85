"""Differential fuzzing: every public kernel against its reference over the awkward space.

Zero and one sized dimensions where legal, odd head dims and group sizes, page sizes 1 to 128, lengths at
page boundaries, forced splits, +-inf and NaN in inputs and masks, -inf-masked experts, all-equal logits,
ids and slots out of range, repeated ids. Every output buffer sits between guard regions that must come
back untouched. By default each test draws a few examples (CI's budget); ``pytest --fuzz`` loads the
hypothesis profile "fuzz" (conftest.py) for a long campaign.
"""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernels import kv_alloc, kv_cache, moe, paged_attention  # noqa: E402
from reference import kv_alloc as kv_alloc_reference  # noqa: E402
from reference import kv_cache as kv_cache_reference  # noqa: E402
from reference import moe as moe_reference  # noqa: E402
from reference import paged_attention as paged_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
NAN, INF = float("nan"), float("inf")
# The interpreter computes NaN and inf through numpy, which warns where a GPU just computes.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def budget(examples: int):
    """``examples`` per test by default; the profile's count under --fuzz."""
    if settings.get_current_profile_name() == "fuzz":
        return settings()
    return settings(max_examples=examples)


def guarded(shape, dtype, fill=-7.0, guard=64):
    """A tensor of ``shape`` inside a buffer with ``guard`` elements of ``fill`` either side."""
    n = math.prod(shape)
    buffer = torch.full((2 * guard + n,), fill, dtype=torch.float32, device=DEVICE).to(dtype)
    return buffer, buffer[guard : guard + n].view(shape), guard


def assert_guards(buffer, guard, fill=-7.0):
    edges = torch.cat([buffer[:guard], buffer[-guard:]]).float()
    assert (edges == fill).all(), "a kernel wrote outside its buffer"


def assert_same(got, want, name, **tol):
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), equal_nan=True, msg=name, **tol)


def special_floats(draw, shape, specials):
    """Normal values with some replaced by the given specials (NaN, +-inf, -0.0)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(shape, generator=gen) * draw(st.sampled_from([0.5, 2.0, 8.0]))
    if draw(st.booleans()):
        x = x.round()  # many exact ties
    if specials and x.numel():
        flat = x.view(-1)
        for i in draw(st.lists(st.integers(0, x.numel() - 1), max_size=min(6, x.numel()))):
            flat[i] = draw(st.sampled_from(specials))
    return x


# --- route -------------------------------------------------------------------------------------------------


@st.composite
def routings(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3, 4]))
    group_size = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16] if groups > 1 else [1, 2, 3, 5, 8, 60, 64]))
    experts = groups * group_size
    kw = {}
    softmax_after = groups == 1 and draw(st.booleans())
    if softmax_after:
        kw["softmax_after_topk"] = True
    else:
        kw["scoring"] = draw(st.sampled_from(["softmax", "sigmoid"]))
        kw["renormalize"] = draw(st.booleans())
        kw["scale"] = draw(st.sampled_from([1.0, 2.5]))
    top_k_max = experts
    if groups > 1:
        kw["num_groups"] = groups
        kw["topk_groups"] = draw(st.integers(1, groups))
        top_k_max = kw["topk_groups"] * group_size
    top_k = draw(st.integers(1, min(top_k_max, 9)))
    tokens = draw(st.sampled_from([0, 1, 3, 17]))
    logits = special_floats(draw, (tokens, experts), [NAN, INF, -INF, -INF, -0.0])
    if tokens and draw(st.booleans()):
        logits[draw(st.integers(0, tokens - 1))] = draw(st.sampled_from([0.0, -INF, 1.5]))  # all equal
    # With a bias, groups rank by the sum of their top-2 scores: groups of one take none.
    if not softmax_after and (groups == 1 or group_size > 1) and draw(st.booleans()):
        kw["bias"] = special_floats(draw, (experts,), [-INF, NAN]).to(DEVICE)
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return logits.to(dtype).to(DEVICE), top_k, kw


@budget(40)
@given(routings())
def test_route_matches_reference_and_never_repeats_an_id(case):
    logits, top_k, kw = case
    weights, ids = moe.route(logits, top_k, **kw)
    want_weights, want_ids = moe_reference.route(logits, top_k, **kw)
    assert all(len(set(row)) == top_k for row in ids.tolist()), ids
    assert ((ids >= 0) & (ids < logits.shape[1])).all()
    assert torch.equal(ids.cpu(), want_ids.cpu()), (ids, want_ids)
    assert_same(weights, want_weights, "weights", rtol=1e-5, atol=1e-6)
    if logits.shape[0] > 1:  # a token's result does not depend on the others
        one_weights, one_ids = moe.route(logits[1:2], top_k, **kw)
        assert torch.equal(one_ids[0], ids[1])
        assert_same(one_weights[0], weights[1], "a token alone", rtol=0, atol=0)


# --- dispatch and combine -----------------------------------------------------------------------------------


@st.composite
def dispatches(draw):
    experts = draw(st.sampled_from([1, 2, 5, 8, 16]))
    top_k = draw(st.integers(1, 4))
    tokens = draw(st.sampled_from([0, 1, 2, 7, 19]))
    choices = st.one_of(st.integers(0, experts - 1), st.sampled_from([-1, experts, experts + 3, -(2**31)]))
    ids = draw(st.lists(st.lists(choices, min_size=top_k, max_size=top_k), min_size=tokens, max_size=tokens))
    hidden = draw(st.sampled_from([1, 3, 17, 64]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    x = special_floats(draw, (tokens, hidden), [NAN, INF, -INF]).to(dtype)
    ids = torch.tensor(ids, dtype=torch.int32).view(tokens, top_k)
    align = draw(st.sampled_from([1, 2, 3, 16]))
    return x.to(DEVICE), ids.to(DEVICE), experts, align


@budget(40)
@given(dispatches())
def test_dispatch_and_combine_match_reference(case):
    x, ids, experts, align = case
    x_sorted, plan = moe.dispatch(x, ids, experts, align=align)
    want_rows, want = moe_reference.dispatch(x, ids, experts, align=align)
    for field in ("tokens_per_expert", "expert_offsets", "row_token", "slot_row"):
        assert torch.equal(getattr(plan, field).cpu(), getattr(want, field).cpu()), field
    real = want.row_token >= 0
    assert torch.equal(
        x_sorted[real].cpu().view(torch.int8), want_rows[real].cpu().view(torch.int8)
    )  # bitwise
    if x.shape[0]:
        gen = torch.Generator().manual_seed(x.shape[0])
        weights = torch.rand(ids.shape, generator=gen).to(DEVICE)
        out = moe.combine(x_sorted, weights, plan)
        assert_same(out, moe_reference.combine(want_rows, weights, want), "combine", rtol=1e-2, atol=1e-2)


# --- write_kv -----------------------------------------------------------------------------------------------


@st.composite
def writes(draw):
    heads, head_dim = draw(st.integers(1, 3)), draw(st.sampled_from([1, 3, 8, 17, 64]))
    block_size = draw(st.sampled_from([1, 2, 3, 16, 128]))
    num_blocks = draw(st.integers(0, 3))
    slots_total = num_blocks * block_size
    tokens = draw(st.sampled_from([0, 1, 2, 5]))
    # Distinct slots in range (repeated slots race on a GPU), or out of range in either direction.
    in_range = draw(st.permutations(range(slots_total)))[:tokens] if slots_total else []
    slots = [
        in_range[i]
        if i < len(in_range) and draw(st.booleans())
        else draw(st.sampled_from([-1, slots_total, 2**40]))
        for i in range(tokens)
    ]
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    cache_dtype = draw(st.sampled_from([dtype, FP8]))
    has_value = draw(st.booleans())
    key = special_floats(draw, (tokens, heads, head_dim), [NAN, INF, -INF, -0.0, 1e6]).to(dtype)
    value = special_floats(draw, (tokens, heads, head_dim), [NAN, -INF]).to(dtype) if has_value else None
    scales = {}
    if cache_dtype == FP8 and draw(st.booleans()):
        scales = {"k_scale": draw(st.sampled_from([0.25, 3.0]))}
        if has_value:
            scales["v_scale"] = draw(st.sampled_from([0.5, 1.0]))
    return key, value, (num_blocks, block_size, heads, head_dim), cache_dtype, slots, scales


@budget(40)
@given(writes())
def test_write_kv_matches_reference(case):
    key, value, cache_shape, cache_dtype, slots, scales = case
    k_buffer, k_cache, guard = guarded(cache_shape, cache_dtype)
    v_buffer, v_cache, _ = guarded(cache_shape, cache_dtype) if value is not None else (None, None, 0)
    expected_k = k_cache.clone()
    expected_v = v_cache.clone() if value is not None else None
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    key, value = key.to(DEVICE), value.to(DEVICE) if value is not None else None
    kv_cache.write_kv(key, value, k_cache, v_cache, slot_mapping, **scales)
    kv_cache_reference.write_kv(key, value, expected_k, expected_v, slot_mapping, **scales)
    assert_guards(k_buffer, guard)
    assert_same(k_cache, expected_k, "k_cache", rtol=0, atol=0)
    if value is not None:
        assert_guards(v_buffer, guard)
        assert_same(v_cache, expected_v, "v_cache", rtol=0, atol=0)


# --- paged_decode -------------------------------------------------------------------------------------------


@st.composite
def decodes(draw):
    kv_heads, group = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3, 5]))
    head_dim = draw(st.sampled_from([1, 3, 16, 40, 64]))
    block_size = draw(st.sampled_from([1, 2, 3, 16, 128]))
    batch = draw(st.integers(1, 3))
    width = draw(st.integers(1, 4))  # block table columns
    capacity = width * block_size
    boundary = st.sampled_from(
        sorted({0, 1, block_size - 1, block_size, block_size + 1, capacity - 1, capacity})
    )
    lens = [min(max(draw(boundary), 0), capacity) for _ in range(batch)]
    num_blocks = batch * width + 1
    tables = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    tables = tables[: batch * width].view(batch, width).to(torch.int32)
    splits = draw(st.sampled_from([None, 1, 2, 3]))
    cache_dtype = draw(st.sampled_from([torch.bfloat16, FP8]))
    q = special_floats(draw, (batch, kv_heads * group, head_dim), []).to(torch.bfloat16)
    return q, (num_blocks, block_size, kv_heads, head_dim), cache_dtype, tables, lens, splits


@budget(40)
@given(decodes())
def test_paged_decode_matches_reference_and_ignores_nan_past_the_lengths(case):
    q, cache_shape, cache_dtype, tables, lens, splits = case
    gen = torch.Generator().manual_seed(len(lens))
    k = (torch.randn(cache_shape, generator=gen) * 2).to(cache_dtype)
    v = (torch.randn(cache_shape, generator=gen) * 2).to(cache_dtype)
    # Every slot no sequence uses holds NaN: a kernel that reads one shows it.
    used = torch.zeros(cache_shape[0] * cache_shape[1], dtype=torch.bool)
    for b, length in enumerate(lens):
        for t in range(length):
            used[int(tables[b, t // cache_shape[1]]) * cache_shape[1] + t % cache_shape[1]] = True
    for cache in (k, v):
        nan = 0x7F if cache.dtype == FP8 else 0x7FC0  # fp8 e4m3's NaN, bf16's
        bits = cache.view(torch.uint8 if cache.dtype == FP8 else torch.int16)
        bits.view(-1, cache_shape[2], cache_shape[3])[~used] = nan
    args = [x.to(DEVICE) for x in (q, k, v, tables, torch.tensor(lens, dtype=torch.int32))]
    scales = {"k_scale": 0.5, "v_scale": 2.0} if cache_dtype == FP8 else {}
    out = paged_attention.paged_decode(*args, num_splits=splits, **scales)
    want = paged_reference.paged_decode(*args, **scales)
    assert not out.isnan().any()
    assert_same(out, want, "out", rtol=2e-2, atol=2e-2)


# --- the block pool and copy_blocks -------------------------------------------------------------------------


@budget(40)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["allocate", "fork", "free"]),
            st.lists(st.integers(-2, 7), min_size=0, max_size=4),  # ids: out of range and repeated too
            st.lists(st.sampled_from([0, 1, 3, 4, 9, -1, 2**31 - 1]), min_size=4, max_size=4),
        ),
        max_size=6,
    )
)
def test_pool_matches_host_pool_on_any_ids_and_counts(calls):
    pool = kv_alloc.KVBlockPool(12, 4, 6, 4, device=DEVICE)
    host = kv_alloc_reference.KVBlockPool(12, 4, 6, 4)
    for kind, seqs, counts in calls:
        seq_ids = torch.tensor(seqs, dtype=torch.int32, device=DEVICE)
        if kind == "allocate":
            counts = counts[: len(seqs)]
            # num_tokens as a caller sizes it: the true sum, or a wrapped one a hostile count could match.
            total = sum(counts) % 2**32 if sum(counts) > 64 else sum(counts)
            total = total if 0 <= total <= 64 else 0
            got = kv_alloc.allocate(
                pool, seq_ids, torch.tensor(counts, dtype=torch.int32, device=DEVICE), num_tokens=total
            )
            want = kv_alloc_reference.allocate(host, seqs, counts, num_tokens=total)
        elif kind == "fork":
            dst = [s + 1 for s in seqs]
            got = kv_alloc.fork(pool, seq_ids, torch.tensor(dst, dtype=torch.int32, device=DEVICE))
            want = kv_alloc_reference.fork(host, seqs, dst)
        else:
            kv_alloc.free(pool, seq_ids)
            kv_alloc_reference.free(host, seqs)
            got = want = None
        if got is not None:
            assert bool(got[1]) == bool(want[1]), kind
            assert torch.equal(got[0].cpu(), want[0]), kind
        for name, tensor in pool.state().items():
            assert torch.equal(tensor, host.state()[name]), (kind, name)


@budget(40)
@given(
    num_blocks=st.integers(0, 6),
    block_shape=st.sampled_from([(1, 1, 1), (2, 1, 8), (3, 2, 5)]),
    pairs=st.lists(st.tuples(st.integers(-3, 9), st.integers(-3, 9)), max_size=6),
    far=st.lists(st.sampled_from([2**31 - 1, -(2**31), 2**30]), max_size=2),
)
def test_copy_blocks_never_touches_memory_outside_the_caches(num_blocks, block_shape, pairs, far):
    # Distinct destinations that are no source: the pairs' order then does not matter (programs run at once).
    chosen, sources = {}, {s for s, _ in pairs}
    for src, dst in pairs:
        if dst not in chosen and dst not in sources:
            chosen[dst] = src
    rows = [[s, d] for d, s in chosen.items()] + [[f, 0] for f in far] + [[0, f] for f in far]
    block = math.prod(block_shape)
    guard = 2 * max(block, 1)
    buffer = torch.full((3 * guard + 2 * num_blocks * block,), -7.0, device=DEVICE)
    k = buffer[guard : guard + num_blocks * block].view(num_blocks, *block_shape)
    start = 2 * guard + num_blocks * block
    v = buffer[start : start + num_blocks * block].view(num_blocks, *block_shape)
    k.copy_(torch.arange(k.numel(), dtype=torch.float32).view(k.shape))
    v.copy_(-torch.arange(v.numel(), dtype=torch.float32).view(v.shape))
    expected_k, expected_v = k.clone(), v.clone()
    copies = torch.tensor(rows, dtype=torch.int32, device=DEVICE).view(-1, 2)
    kv_alloc.copy_blocks(k, v, copies)
    kv_alloc_reference.copy_blocks(expected_k, expected_v, copies.cpu())
    guards = torch.cat([buffer[:guard], buffer[guard + k.numel() : start], buffer[start + v.numel() :]])
    assert (guards == -7.0).all(), "copy_blocks wrote outside the caches"
    assert torch.equal(k, expected_k) and torch.equal(v, expected_v)
