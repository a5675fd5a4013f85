"""Bytes each kernel moves under the interpreter against its byte model, and the counter itself."""

import pytest
import torch
import triton
import triton.language as tl

from bench.measure.runner import TRAFFIC_LIMIT, count_traffic, traffic
from bench.measure.traffic import measure
from bench.operators import CASES
from bench.operators.paged_attention import PagedDecodeShape
from kernels import INTERPRETED

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="traffic is counted in Triton's interpreter")

WRITE_KV = CASES["write_kv"]
CASE_SHAPES = [(case, shape) for case in CASES.values() for shape in case.traffic_shapes()]


@pytest.mark.parametrize("case, shape", CASE_SHAPES, ids=[f"{c.name}-{s.label}" for c, s in CASE_SHAPES])
def test_traffic_within_the_byte_model(case, shape):
    row = traffic(case, shape)
    if case.traffic_limit is None:
        pytest.skip(f"{case.name}: traffic reported, not held to a limit (its case says why)")
    assert row.ratio <= case.traffic_limit <= TRAFFIC_LIMIT, row


@pytest.mark.parametrize("shape", WRITE_KV.traffic_shapes(), ids=lambda shape: shape.label)
def test_write_kv_touches_exactly_its_byte_model(shape):
    """Every byte the model names is touched, and no other: distinct addresses add up to the model."""
    row = traffic(WRITE_KV, shape)
    assert row.unique == row.model, row


@pytest.mark.parametrize("shape", CASES["paged_decode"].traffic_shapes(), ids=lambda shape: shape.label)
def test_paged_decode_reads_each_live_kv_byte_once(shape):
    """Bytes loaded from the caches are exactly the live tokens' K and V, once per sequence (shared pages
    once per sequence that uses them): no re-reads, no slot past a length, whatever the splits."""
    inputs, counted = count_traffic(CASES["paged_decode"], shape)  # the run the traffic check counted
    live = sum(shape.lengths) * shape.num_kv_heads * shape.head_dim * shape.cache_dtype.itemsize
    assert counted.loaded_from(inputs.args["k_cache"]) == live
    assert counted.loaded_from(inputs.args["v_cache"]) == live


def test_paged_decode_head_tiles_reread_kv_only_from_l2():
    """A group too wide for one program (64 query heads per KV head of 512) is served by head tiles, each
    loading its KV head's live rows: the counter sees K and V once per tile, and at distinct addresses once.
    The byte model states DRAM bytes; the tiles of one KV head are grid neighbours, so the later tiles'
    reads are L2 hits. The traffic less exactly those re-reads must meet the model as any shape's does."""
    from kernels.paged_attention import paged_decode_launch_config

    case = CASES["paged_decode"]
    shape = PagedDecodeShape("wide", (100, 37), 128, 2, 512, block_size=16)
    inputs, counted = count_traffic(case, shape)
    tiles = -(-64 // paged_decode_launch_config(64, 512, 2)["HEAD_TILE"])
    assert tiles > 1
    live = sum(shape.lengths) * shape.num_kv_heads * shape.head_dim * shape.cache_dtype.itemsize
    for name in ("k_cache", "v_cache"):
        assert counted.loaded_from(inputs.args[name]) == tiles * live, name
    model = case.byte_model(shape)
    assert counted.unique_bytes() <= model * case.traffic_limit
    l2_rereads = 2 * (tiles - 1) * live  # K and V, every tile after a KV head's first
    assert (counted.total_bytes - l2_rereads) / model <= case.traffic_limit


def test_route_moves_exactly_its_byte_model_without_a_bias():
    route = CASES["route"]
    for shape in route.traffic_shapes():
        if not shape.model.bias:
            assert traffic(route, shape).ratio == pytest.approx(1.0), shape.label


@triton.jit
def _copy_twice_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(src_ptr + offs, mask=mask)
    x += tl.load(src_ptr + offs, mask=mask)  # a re-read the counter must see
    x += tl.load(src_ptr + offs // 8, mask=mask)  # 77 lanes, 10 distinct addresses: one transaction each
    tl.store(dst_ptr + offs, x, mask=mask)


def test_counter_sees_rereads_masks_and_broadcasts():
    src, dst = torch.ones(100, dtype=torch.float16), torch.empty(100, dtype=torch.float16)
    counted = measure(lambda: _copy_twice_kernel[(1,)](src, dst, 77, BLOCK=128))
    assert counted.loaded_bytes == (2 * 77 + 10) * 2 and counted.stored_bytes == 77 * 2
    assert counted.load_instructions == 3 and counted.store_instructions == 1
    assert counted.unique_bytes() == 77 * 2 + 77 * 2
    assert counted.ratio(77 * 2 * 2) == pytest.approx((2 * 77 + 10 + 77) / (2 * 77))


def test_counter_restores_the_interpreter():
    from triton.runtime.interpreter import interpreter_builder

    measure(lambda: None)
    assert "create_masked_load" not in vars(interpreter_builder)
