"""paged_decode against its reference: MHA, GQA, MQA; head dims and page sizes; empty, ragged and shared
sequences; fp8 caches; forced and derived splits; NaN past every length; bad input; the opt-in device checks;
and on a GPU, no host sync and CUDA-graph replay with new lengths and block tables."""

import functools

import pytest
import torch

from bench.operators.paged_attention import PAGED_DECODE, PagedDecodeShape, build
from bench.testing import forbid_allocation, no_host_sync, replay_decode_graph, seed_of
from kernels import paged_attention
from kernels.paged_attention import check_paged_inputs, max_splits_for
from reference import paged_attention as reference
from tests import helpers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn


# check_against_reference(shape, seed): this file's case, kernel against reference (tests/helpers.py)
check_against_reference = functools.partial(helpers.check_against_reference, PAGED_DECODE, device=DEVICE)


@pytest.mark.parametrize(
    "num_q_heads, num_kv_heads",
    [(4, 4), (8, 2), (16, 2), (32, 2), (8, 1), (24, 1)],
    ids=["mha", "gqa4", "gqa8", "gqa16", "mqa8", "mqa24"],
)
@pytest.mark.parametrize("head_dim", [64, 128, 256, 80, 96], ids=lambda d: f"d{d}")
def test_head_layouts(num_q_heads, num_kv_heads, head_dim, request):
    shape = PagedDecodeShape("heads", (19, 0, 70), num_q_heads, num_kv_heads, head_dim, block_size=16)
    check_against_reference(shape, seed_of(request.node.name))


@pytest.mark.parametrize("block_size", [1, 8, 16, 32, 64, 128])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
def test_page_sizes_and_fp8(block_size, cache_dtype, request):
    shape = PagedDecodeShape(
        "pages", (1, 130, 47, 0), 8, 2, 64, block_size=block_size, cache_dtype=cache_dtype
    )
    check_against_reference(shape, seed_of(request.node.name))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("num_splits", [None, 1, 2, 5])
def test_splits_and_q_dtypes(dtype, num_splits, request):
    """Forced splits (including more splits than some sequences have tiles) and derived ones agree."""
    shape = PagedDecodeShape(
        num_q_heads=8, num_kv_heads=2, head_dim=64, **helpers.split_batch(dtype, num_splits)
    )
    check_against_reference(shape, seed_of(request.node.name))


def test_shared_prefix_blocks(request):
    shape = PagedDecodeShape("shared", (90, 40, 64, 17), 8, 2, 64, block_size=16, shared_pages=3)
    check_against_reference(shape, seed_of(request.node.name))


# Issue 20, item 1: groups whose [group x head_dim] accumulator exceeds one program were refused. SGLang's
# grouped-decode test (test/srt/test_triton_attention_kernels.py) runs 128 query heads over 2 KV heads of 512.
WIDE_GROUPS = {
    "peer-suite": PagedDecodeShape("wide", (5, 100), 128, 2, 512, block_size=16),
    "peer-suite derived split": PagedDecodeShape("wide", (300, 37), 128, 2, 512, block_size=16),
    "peer-suite fp8 forced split": PagedDecodeShape(
        "wide", (70, 0), 128, 2, 512, block_size=32, cache_dtype=FP8, num_splits=2
    ),
    # 40 heads a KV head: a second tile that is partly past the group (its rows are the next KV head's).
    "group 40 odd head_dim": PagedDecodeShape(
        "wide", (45, 9), 80, 2, 320, block_size=8, dtype=torch.float16, cache_dtype=torch.float16
    ),
    "group 128 d256": PagedDecodeShape("wide", (33,), 128, 1, 256, block_size=16),
}


@pytest.mark.parametrize("case", WIDE_GROUPS, ids=list(WIDE_GROUPS))
def test_groups_wider_than_one_program_are_served_by_head_tiles(case, request):
    shape = WIDE_GROUPS[case]
    check_against_reference(shape, seed_of(request.node.name))
    group = shape.num_q_heads // shape.num_kv_heads
    config = paged_attention.paged_decode_launch_config(group, shape.head_dim, shape.cache_dtype.itemsize)
    assert config["HEAD_TILE"] < group  # the group took several programs


# Groups that fill one program's accumulator in one tile (32 heads of 512, 16 of 1024): on 4 warps they used
# stack at sm_90 (tests/test_static.py holds their compile); they take the head tiles' warps.
FULL_GROUPS = {
    "group 32 d512": PagedDecodeShape("full", (37, 0), 64, 2, 512, block_size=16),
    "group 32 d512 fp8 forced split": PagedDecodeShape(
        "full", (45,), 64, 2, 512, block_size=32, cache_dtype=FP8, num_splits=2
    ),
    "group 16 d1024": PagedDecodeShape("full", (33, 5), 16, 1, 1024, block_size=8),
    "group 16 d1024 fp8": PagedDecodeShape("full", (21,), 16, 1, 1024, block_size=16, cache_dtype=FP8),
}


@pytest.mark.parametrize("case", FULL_GROUPS, ids=list(FULL_GROUPS))
def test_groups_that_fill_one_program_take_wide_warps(case, request):
    shape = FULL_GROUPS[case]
    check_against_reference(shape, seed_of(request.node.name))
    group = shape.num_q_heads // shape.num_kv_heads
    nbytes = shape.cache_dtype.itemsize
    config = paged_attention.paged_decode_launch_config(group, shape.head_dim, nbytes)
    assert config["HEAD_TILE"] == group  # one program
    assert config["num_warps"] == (16 if nbytes > 1 else 8)  # the head tiles' warps


def test_derived_splits_cover_a_long_sequence(request):
    """One long stream: the launcher provides several splits and the sequence takes them by its length."""
    shape = PagedDecodeShape("long", (2000,), 4, 1, 64, block_size=64)
    assert max_splits_for(1, 1, (2000 // 64 + 2) * 64, 132) > 1
    check_against_reference(shape, seed_of(request.node.name))


def test_small_shapes_of_the_case(request):
    helpers.check_small_shapes(PAGED_DECODE, request.node.name, DEVICE)


@helpers.property_test(
    lambda st: dict(
        lengths=st.lists(st.integers(0, 300), min_size=1, max_size=4),
        num_kv_heads=st.sampled_from([1, 2]),
        group=st.sampled_from([1, 2, 3, 4, 8, 16]),
        head_dim=st.sampled_from([16, 32, 64, 72, 128]),
        block_size=st.sampled_from([1, 8, 16, 32, 64, 128]),
        cache_dtype=st.sampled_from([torch.bfloat16, FP8]),
        num_splits=st.sampled_from([None, 1, 2, 3]),
        seed=st.integers(0, 2**31 - 1),
    )
)
def test_random_shapes_property(
    lengths, num_kv_heads, group, head_dim, block_size, cache_dtype, num_splits, seed
):
    shape = PagedDecodeShape(
        "prop",
        tuple(lengths),
        num_kv_heads * group,
        num_kv_heads,
        head_dim,
        block_size=block_size,
        cache_dtype=cache_dtype,
        num_splits=num_splits,
    )
    check_against_reference(shape, seed)


def test_returns_out_when_given_and_a_new_tensor_otherwise():
    shape = PagedDecodeShape("out", (10, 20), 4, 2, 64)
    inputs = build(shape, DEVICE, 1)
    fresh = paged_attention.paged_decode(**{**inputs.args, "out": None})
    out = torch.empty_like(inputs.args["q"])
    assert paged_attention.paged_decode(**{**inputs.args, "out": out}) is out
    assert torch.equal(out, fresh) and fresh.dtype == inputs.args["q"].dtype


def test_scale_argument_is_the_softmax_scale():
    shape = PagedDecodeShape("scale", (33,), 4, 2, 64)
    inputs = build(shape, DEVICE, 2)
    got = paged_attention.paged_decode(**{**inputs.args, "scale": 0.3})
    want = reference.paged_decode(**{**inputs.args, "scale": 0.3})
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1.6e-2)
    default = reference.paged_decode(**inputs.args)
    assert not torch.allclose(got.float(), default.float(), atol=1e-3)


def test_float_and_tensor_fp8_scales_agree():
    shape = PagedDecodeShape("fp8", (50, 9), 4, 2, 64, cache_dtype=FP8)
    inputs = build(shape, DEVICE, 3)
    as_tensors = paged_attention.paged_decode(**inputs.args)
    as_floats = paged_attention.paged_decode(**{**inputs.args, "k_scale": 0.5, "v_scale": 1.5})
    assert torch.equal(as_tensors, as_floats)


@pytest.mark.parametrize("sms", [1, 78, 132])
def test_max_splits_fill_the_machine_without_splitting_past_what_a_context_fills(sms):
    """Invariants, not the heuristic's own numbers: a power of two within [1, MAX_SPLITS]; never more
    splits than the widest context fills with MIN_SPLIT_TOKENS each (beyond the power of two's rounding);
    and, where the context allows, enough (sequence, KV head, split) programs for two per SM, but not
    twice the splits that would take."""
    from kernels.paged_attention import MAX_SPLITS, MIN_SPLIT_TOKENS

    for batch in (1, 3, 32, 256):
        for heads in (1, 8):
            for context in (16, 300, 4096, 65536, 1 << 20):
                splits = max_splits_for(batch=batch, num_kv_heads=heads, max_context=context, sms=sms)
                label = (batch, heads, context, sms, splits)
                assert 1 <= splits <= MAX_SPLITS and splits & (splits - 1) == 0, label
                fillable = -(-context // MIN_SPLIT_TOKENS)
                assert splits < 2 * fillable, label
                programs = batch * heads
                if programs >= 2 * sms:
                    assert splits == 1, label  # the machine is full without splitting
                elif fillable >= MAX_SPLITS:
                    wanted = -(-2 * sms // programs)
                    assert programs * splits >= min(2 * sms, programs * MAX_SPLITS), label
                    assert splits < 2 * wanted, label


# --- caller-owned workspace ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_splits", [None, 3], ids=["derived", "forced"])
def test_a_workspace_gives_the_same_result_and_allocates_nothing(num_splits, monkeypatch):
    shape = PagedDecodeShape("ws", (300, 17, 0), 32, 8, 128, spare_pages=40, num_splits=num_splits)
    inputs = build(shape, DEVICE, 4)
    fresh = paged_attention.paged_decode(**{**inputs.args, "out": None})
    workspace = paged_attention.paged_decode_workspace(3, 32, 128, device=DEVICE)
    out = torch.full_like(fresh, float("nan"))
    forbid_allocation(monkeypatch, paged_attention)
    assert paged_attention.paged_decode(**{**inputs.args, "out": out, "workspace": workspace}) is out
    monkeypatch.undo()
    assert torch.equal(out, fresh)


def test_a_workspace_for_more_sequences_and_splits_serves_a_smaller_call():
    shape = PagedDecodeShape("ws", (300, 40), 8, 2, 64, num_splits=2)
    inputs = build(shape, DEVICE, 5)
    workspace = paged_attention.paged_decode_workspace(16, 8, 64, max_splits=8, device=DEVICE)
    got = paged_attention.paged_decode(**inputs.args, workspace=workspace)
    assert torch.equal(got, paged_attention.paged_decode(**inputs.args))


def test_the_reference_takes_the_same_arguments():
    import inspect

    assert inspect.signature(reference.paged_decode).parameters.keys() == (
        inspect.signature(paged_attention.paged_decode).parameters.keys()
    )


BAD_WORKSPACES = {
    "too few splits": lambda: paged_attention.paged_decode_workspace(2, 8, 64, max_splits=1, device=DEVICE),
    "too few heads": lambda: paged_attention.paged_decode_workspace(2, 4, 64, max_splits=4, device=DEVICE),
    "fp16": lambda: paged_attention.PagedDecodeWorkspace(
        torch.empty(2, 8, 4, 64, dtype=torch.float16, device=DEVICE), torch.empty(2, 8, 4, device=DEVICE)
    ),
    "other device": lambda: paged_attention.PagedDecodeWorkspace(
        torch.empty(2, 8, 4, 64, device="meta"), torch.empty(2, 8, 4, device="meta")
    ),
    "strided": lambda: paged_attention.PagedDecodeWorkspace(
        torch.empty(2, 8, 64, 8, device=DEVICE).transpose(2, 3), torch.empty(2, 8, 4, device=DEVICE)
    ),
    "a tuple": lambda: (torch.empty(2, 8, 4, 64), torch.empty(2, 8, 4)),
}


@pytest.mark.parametrize("case", BAD_WORKSPACES, ids=list(BAD_WORKSPACES))
def test_a_workspace_that_does_not_fit_names_the_argument(case):
    args = build(PagedDecodeShape("ws", (20, 5), 8, 2, 64, num_splits=4), DEVICE, 1).args
    with pytest.raises(ValueError, match=r"^workspace: "):
        paged_attention.paged_decode(**args, workspace=BAD_WORKSPACES[case]())


# --- bad input ---------------------------------------------------------------------------------------------


def _args(cache_dtype=torch.bfloat16):
    return build(PagedDecodeShape("bad", (20, 5), 8, 2, 64, cache_dtype=cache_dtype), DEVICE, 1).args


BAD_INPUTS = {
    "q 2-D": ("q", {}, lambda a: {"q": a["q"][0]}),
    "q fp32": ("q", {}, lambda a: {"q": a["q"].float()}),
    "q head_dim strided": ("q", {}, lambda a: {"q": a["q"].transpose(1, 2).contiguous().transpose(1, 2)}),
    "q heads not a multiple": ("q", {}, lambda a: {"q": a["q"][:, :7]}),
    "k_cache head_dim": ("k_cache", {}, lambda a: {"k_cache": a["k_cache"][..., :32]}),
    "k_cache dtype": ("k_cache", {}, lambda a: {"k_cache": a["k_cache"].half()}),
    "k_cache strided": (
        "k_cache",
        {},
        lambda a: {"k_cache": a["k_cache"].transpose(0, 1).contiguous().transpose(0, 1)},
    ),
    "v_cache shape": ("v_cache", {}, lambda a: {"v_cache": a["v_cache"][:-1]}),
    "v_cache other device": ("v_cache", {}, lambda a: {"v_cache": a["v_cache"].to("meta")}),
    "block_tables int64": ("block_tables", {}, lambda a: {"block_tables": a["block_tables"].long()}),
    "block_tables batch": ("block_tables", {}, lambda a: {"block_tables": a["block_tables"][:1]}),
    "block_tables columns strided": (
        "block_tables",
        {},
        lambda a: {"block_tables": a["block_tables"].t().contiguous().t()},
    ),
    "seq_lens int64": ("seq_lens", {}, lambda a: {"seq_lens": a["seq_lens"].long()}),
    "seq_lens batch": ("seq_lens", {}, lambda a: {"seq_lens": a["seq_lens"][:1]}),
    "scale negative": ("scale", {}, lambda a: {"scale": -1.0}),
    "k_scale on bf16": ("k_scale", {}, lambda a: {"k_scale": 0.5}),
    "v_scale kinds differ": ("v_scale", {"cache_dtype": FP8}, lambda a: {"v_scale": 2.0}),
    "k_scale two elements": (
        "k_scale",
        {"cache_dtype": FP8},
        lambda a: {"k_scale": torch.ones(2, device=DEVICE)},
    ),
    "num_splits zero": ("num_splits", {}, lambda a: {"num_splits": 0}),
    "num_splits too many": ("num_splits", {}, lambda a: {"num_splits": 1000}),
    "num_splits float": ("num_splits", {}, lambda a: {"num_splits": 2.0}),
    "out dtype": ("out", {}, lambda a: {"out": torch.empty_like(a["q"], dtype=torch.float32)}),
    "out shape": ("out", {}, lambda a: {"out": torch.empty_like(a["q"])[:, :4]}),
    # Issue 10, item 3: block_size 0 crashed the interpreter's process; 0 KV heads or head_dim 0 raised
    # ZeroDivisionError.
    "block_size zero": ("k_cache", {}, lambda a: {n: a[n][:, :0] for n in ("k_cache", "v_cache")}),
    "kv heads zero": ("k_cache", {}, lambda a: {n: a[n][:, :, :0] for n in ("k_cache", "v_cache")}),
    "head_dim zero": (
        "q",
        {},
        lambda a: {n: a[n][..., :0].contiguous() for n in ("q", "k_cache", "v_cache")},
    ),
    "q heads zero": ("q", {}, lambda a: {"q": a["q"][:, :0]}),
    "scale inf": ("scale", {}, lambda a: {"scale": float("inf")}),
    "scale nan": ("scale", {}, lambda a: {"scale": float("nan")}),
    "scale a bool": ("scale", {}, lambda a: {"scale": True}),
    "k_scale inf": ("k_scale", {"cache_dtype": FP8}, lambda a: {"k_scale": float("inf"), "v_scale": 1.0}),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_names_the_argument(case):
    argument, build_kw, change = BAD_INPUTS[case]
    args = _args(**build_kw)
    args.update(change(args))
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        paged_attention.paged_decode(**args)


def test_a_head_too_wide_for_one_program_is_refused():
    """Head tiles split a wide group, never a head: 16 query heads (the dots' smallest M) of 2048 columns
    exceed one program's accumulator, so the call is refused before anything runs."""
    shape = PagedDecodeShape("huge", (4,), 2, 1, 2048)
    args = build(shape, DEVICE, 1).args
    with pytest.raises(ValueError, match="^q: head_dim 2048 exceeds"):
        paged_attention.paged_decode(**args)


def test_opt_in_checks_catch_lengths_and_block_ids():
    args = _args()
    check_paged_inputs(args["k_cache"], args["block_tables"], args["seq_lens"])
    with pytest.raises(ValueError, match=r"^seq_lens: .* got 9999"):
        check_paged_inputs(
            args["k_cache"], args["block_tables"], torch.tensor([9999, 1], dtype=torch.int32, device=DEVICE)
        )
    with pytest.raises(ValueError, match=r"^seq_lens: "):
        check_paged_inputs(
            args["k_cache"], args["block_tables"], torch.tensor([-1, 1], dtype=torch.int32, device=DEVICE)
        )
    bad = args["block_tables"].clone()
    bad[1, 0] = args["k_cache"].shape[0]
    with pytest.raises(ValueError, match=r"^block_tables: "):
        check_paged_inputs(args["k_cache"], bad, args["seq_lens"])
    bad[1, 0] = 0
    bad[1, -1] = -5  # a column past the sequence's pages is never read, so never checked
    check_paged_inputs(args["k_cache"], bad, args["seq_lens"])
    # Issue 10, item 3: a 1-D block table raised IndexError.
    for name, call in (
        ("block_tables", lambda: check_paged_inputs(args["k_cache"], bad[0], args["seq_lens"])),
        ("block_tables", lambda: check_paged_inputs(args["k_cache"], bad.long(), args["seq_lens"])),
        ("seq_lens", lambda: check_paged_inputs(args["k_cache"], bad, args["seq_lens"][:1])),
        ("k_cache", lambda: check_paged_inputs(args["k_cache"][0], bad, args["seq_lens"])),
        ("k_cache", lambda: check_paged_inputs(args["k_cache"][:, :0], bad, args["seq_lens"])),
    ):
        with pytest.raises(ValueError, match=rf"^{name}: "):
            call()


# --- GPU only ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("num_splits", [None, 4])
def test_no_host_sync(cache_dtype, num_splits):
    shape = PagedDecodeShape(
        "sync", (4000, 10, 0), 32, 8, 128, cache_dtype=cache_dtype, num_splits=num_splits
    )
    inputs = build(shape, "cuda", 2)
    paged_attention.paged_decode(**inputs.args)  # compile outside the check
    with no_host_sync():
        paged_attention.paged_decode(**inputs.args)


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_lengths_and_block_tables():
    """Capture once at a capacity; replay with other lengths and tables (the splits follow the lengths)."""
    base = PagedDecodeShape("graph", (3000, 3000, 3000, 3000), 32, 8, 128, spare_pages=8)
    inputs = build(base, "cuda", 3, guarded=True)
    # A serving engine's graph path: the split partials live in a workspace allocated once, outside.
    inputs.args["workspace"] = paged_attention.paged_decode_workspace(base.batch, 32, 128, device="cuda")
    replay_decode_graph(
        PAGED_DECODE,
        base,
        inputs,
        ("k_cache", "v_cache"),
        ((4, (10, 3100, 0, 1500)), (5, (256, 257, 2048, 1))),
    )
