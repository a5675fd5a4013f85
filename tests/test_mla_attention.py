"""mla_decode against its reference: DeepSeek's widths and widths that are not powers of two, odd head counts
and several head tiles, page sizes 1 to 64, empty, ragged and shared sequences, NaN past every length, fp8
with float and tensor scales, forced and derived splits, out= and a caller's workspace, bad input; and on a
GPU, no host sync and CUDA-graph replay with new lengths and block tables."""

import functools
import inspect

import pytest
import torch

from bench.operators.mla_attention import DEEPSEEK, MLA_DECODE, MLADecodeShape, build, deepseek
from bench.testing import forbid_allocation, no_host_sync, replay_decode_graph, seed_of
from kernels import mla_attention, paged_attention
from kernels.mla_attention import mla_decode_launch_config, mla_min_split_tokens
from reference import mla_attention as reference
from tests import helpers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
S = MLADecodeShape


# check_against_reference(shape, seed): this file's case, kernel against reference (tests/helpers.py)
check_against_reference = functools.partial(helpers.check_against_reference, MLA_DECODE, device=DEVICE)


@pytest.mark.parametrize("num_heads", [5, 16, 40, 72], ids=lambda h: f"h{h}")
@pytest.mark.parametrize(
    "qk_dim, v_head_dim", [(576, 512), (100, 72), (64, 64)], ids=["deepseek", "odd", "all-value"]
)
def test_head_counts_and_widths(num_heads, qk_dim, v_head_dim, request):
    """Head counts under, at and over one tile (72 heads: three tiles, the last mostly masked); widths that
    are not powers of two; rows that are all value (no rope part)."""
    shape = S("heads", (19, 0, 40), num_heads, qk_dim=qk_dim, v_head_dim=v_head_dim, block_size=16)
    check_against_reference(shape, seed_of(request.node.name))


@pytest.mark.parametrize("block_size", [1, 8, 16, 64])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
def test_page_sizes_and_fp8(block_size, cache_dtype, request):
    shape = S(
        "pages", (1, 130, 47, 0), 16, qk_dim=96, v_head_dim=64, block_size=block_size, cache_dtype=cache_dtype
    )
    check_against_reference(shape, seed_of(request.node.name))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_splits_and_q_dtypes(dtype, num_splits, request):
    """Forced splits (more than some sequences have tiles) and derived ones agree with the reference."""
    shape = S(num_heads=4, qk_dim=64, v_head_dim=48, **helpers.split_batch(dtype, num_splits))
    check_against_reference(shape, seed_of(request.node.name))


def test_derived_splits_cover_a_long_sequence(request):
    """Lengths past the split floor take several splits, derived on the device, and still agree."""
    shape = S("long", (1300, 5), 4, qk_dim=72, v_head_dim=64, block_size=64)
    assert shape.lengths[0] > 2 * mla_min_split_tokens(4, 16, 72, 64, 2)
    check_against_reference(shape, seed_of(request.node.name))


def test_deepseek_at_tp1_four_head_tiles_and_a_shared_prompt(request):
    shape = deepseek(1, (40, 70, 9), block_size=16, shared_pages=2)
    assert mla_decode_launch_config(128, 576, 512, 2)["HEAD_BLOCK"] == 32  # four head tiles
    check_against_reference(shape, seed_of(request.node.name))


def test_small_shapes_of_the_case(request):
    helpers.check_small_shapes(MLA_DECODE, request.node.name, DEVICE)


def test_the_value_is_the_leading_columns_of_the_cached_row():
    """out = softmax(q . kv^T * scale) @ kv[..., :v_head_dim]: with one token, every head returns that
    token's first v_head_dim columns, whatever the rope columns hold."""
    shape = S("one", (1,), 16, qk_dim=80, v_head_dim=64, block_size=16)
    inputs = build(shape, DEVICE, 3)
    out = mla_attention.mla_decode(**inputs.args)
    row = inputs.args["kv_cache"][inputs.args["block_tables"][0, 0].long(), 0, 0, :64]
    torch.testing.assert_close(out[0], row.expand(16, 64), rtol=0, atol=0)


def test_returns_out_when_given_and_a_new_tensor_otherwise():
    shape = S("out", (10, 20), 16, qk_dim=96, v_head_dim=64)
    inputs = build(shape, DEVICE, 1)
    fresh = mla_attention.mla_decode(**{**inputs.args, "out": None})
    out = torch.empty(2, 16, 64, dtype=torch.bfloat16, device=DEVICE)
    assert mla_attention.mla_decode(**{**inputs.args, "out": out}) is out
    assert torch.equal(out, fresh) and fresh.shape == (2, 16, 64) and fresh.dtype == torch.bfloat16


def test_scale_argument_is_the_softmax_scale():
    shape = S("scale", (33,), 16, qk_dim=64, v_head_dim=64)
    inputs = build(shape, DEVICE, 2)
    got = mla_attention.mla_decode(**{**inputs.args, "scale": DEEPSEEK.softmax_scale})
    want = reference.mla_decode(**{**inputs.args, "scale": DEEPSEEK.softmax_scale})
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1.6e-2)
    default = reference.mla_decode(**{**inputs.args, "scale": None})
    assert not torch.allclose(got.float(), default.float(), atol=1e-3)


def test_deepseek_softmax_scale_from_its_config():
    """1/sqrt(128 + 64) times YaRN's (0.1 ln 40 + 1)^2, as DeepSeek-V3's modelling code computes it."""
    assert DEEPSEEK.softmax_scale == pytest.approx(192**-0.5 * (0.1 * 3.6888794541139363 + 1) ** 2)


def test_float_and_tensor_fp8_scales_agree():
    shape = S("fp8", (50, 9), 16, qk_dim=64, v_head_dim=64, cache_dtype=FP8)
    inputs = build(shape, DEVICE, 3)
    as_tensor = mla_attention.mla_decode(**inputs.args)
    as_float = mla_attention.mla_decode(**{**inputs.args, "kv_scale": 0.5})
    assert torch.equal(as_tensor, as_float)


def test_split_floor_bounds_the_partials_traffic():
    """A split reads at least 32 times the bytes of its head tile's partials. By hand, for DeepSeek's
    576-wide bf16 latent: 16 heads write 16 x (512 x 4 + 4) x 2 = 65,664 B a split, 32 times that over
    1,152 B a token is 1,824 tokens; tiles stop at 32 heads, so 64 and 128 heads take 32 heads' 3,648."""
    for heads, want in ((16, 1824), (32, 3648), (64, 3648), (128, 3648)):
        head_block = mla_decode_launch_config(heads, 576, 512, 2)["HEAD_BLOCK"]
        assert mla_min_split_tokens(heads, head_block, 576, 512, 2) == want, heads
    assert mla_min_split_tokens(16, 16, 576, 512, 1) == 3648  # fp8: half the bytes a token
    assert mla_min_split_tokens(4, 16, 72, 64, 2) == 464  # 4 x 260 x 2 x 32 / 144 = 462.2, in 16s
    assert mla_min_split_tokens(1, 16, 72, 64, 2) == 256  # paged_decode's floor


def test_launch_config_keeps_the_accumulator_within_registers():
    """At most 32 heads a program and 32 fp32 accumulator elements a thread at DeepSeek's width (the static
    report holds the compile to 0 spills and 0 stack)."""
    for heads in (1, 16, 32, 64, 128):
        config = mla_decode_launch_config(heads, 576, 512, 2)
        assert 16 <= config["HEAD_BLOCK"] <= 32
        assert config["HEAD_BLOCK"] * config["V_PAD"] // (32 * config["num_warps"]) <= 32, config
        assert mla_decode_launch_config(heads, 576, 512, 1)["num_warps"] <= 8  # fp8: room to widen
        assert config["ROPE_PAD"] == 64
    assert mla_decode_launch_config(16, 64, 64, 2)["ROPE_PAD"] == 0


# --- caller-owned workspace ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_splits", [None, 3], ids=["derived", "forced"])
def test_a_workspace_gives_the_same_result_and_allocates_nothing(num_splits, monkeypatch):
    shape = S("ws", (700, 17, 0), 16, qk_dim=64, v_head_dim=64, spare_pages=40, num_splits=num_splits)
    inputs = build(shape, DEVICE, 4)
    fresh = mla_attention.mla_decode(**{**inputs.args, "out": None})
    workspace = mla_attention.mla_decode_workspace(3, 16, 64, device=DEVICE)
    out = torch.full_like(fresh, float("nan"))
    forbid_allocation(monkeypatch, mla_attention, paged_attention)  # split_partials lives there
    assert mla_attention.mla_decode(**{**inputs.args, "out": out, "workspace": workspace}) is out
    monkeypatch.undo()
    assert torch.equal(out, fresh)


def test_a_workspace_too_small_names_the_argument():
    args = build(S("ws", (20, 5), 16, qk_dim=64, v_head_dim=64, num_splits=4), DEVICE, 1).args
    small = mla_attention.mla_decode_workspace(2, 16, 64, max_splits=2, device=DEVICE)
    with pytest.raises(ValueError, match=r"^workspace: "):
        mla_attention.mla_decode(**args, workspace=small)
    narrow = mla_attention.mla_decode_workspace(2, 16, 32, max_splits=4, device=DEVICE)
    with pytest.raises(ValueError, match=r"^workspace: "):
        mla_attention.mla_decode(**args, workspace=narrow)


def test_the_reference_takes_the_same_arguments():
    assert inspect.signature(reference.mla_decode).parameters.keys() == (
        inspect.signature(mla_attention.mla_decode).parameters.keys()
    )


# --- bad input ---------------------------------------------------------------------------------------------


def _args(cache_dtype=torch.bfloat16):
    shape = S("bad", (20, 5), 16, qk_dim=96, v_head_dim=64, cache_dtype=cache_dtype)
    return build(shape, DEVICE, 1).args


BAD_INPUTS = {
    "q 2-D": ("q", {}, lambda a: {"q": a["q"][0]}),
    "q fp32": ("q", {}, lambda a: {"q": a["q"].float()}),
    "q width strided": ("q", {}, lambda a: {"q": a["q"].transpose(1, 2).contiguous().transpose(1, 2)}),
    "q width against the cache's": ("q", {}, lambda a: {"q": a["q"][..., :80].contiguous()}),
    "q heads zero": ("q", {}, lambda a: {"q": a["q"][:, :0]}),
    "kv_cache two latent heads": (
        "kv_cache",
        {},
        lambda a: {"kv_cache": a["kv_cache"].expand(-1, -1, 2, -1)},
    ),
    "kv_cache 3-D": ("kv_cache", {}, lambda a: {"kv_cache": a["kv_cache"][:, :, 0]}),
    "kv_cache dtype": ("kv_cache", {}, lambda a: {"kv_cache": a["kv_cache"].half()}),
    "kv_cache strided": (
        "kv_cache",
        {},
        lambda a: {"kv_cache": a["kv_cache"].transpose(0, 1).contiguous().transpose(0, 1)},
    ),
    "kv_cache other device": ("kv_cache", {}, lambda a: {"kv_cache": a["kv_cache"].to("meta")}),
    "kv_cache block_size zero": ("kv_cache", {}, lambda a: {"kv_cache": a["kv_cache"][:, :0]}),
    "v_head_dim wider than the row": ("v_head_dim", {}, lambda a: {"v_head_dim": 97}),
    "v_head_dim zero": ("v_head_dim", {}, lambda a: {"v_head_dim": 0}),
    "v_head_dim a float": ("v_head_dim", {}, lambda a: {"v_head_dim": 64.0}),
    "block_tables int64": ("block_tables", {}, lambda a: {"block_tables": a["block_tables"].long()}),
    "block_tables batch": ("block_tables", {}, lambda a: {"block_tables": a["block_tables"][:1]}),
    "seq_lens int64": ("seq_lens", {}, lambda a: {"seq_lens": a["seq_lens"].long()}),
    "seq_lens batch": ("seq_lens", {}, lambda a: {"seq_lens": a["seq_lens"][:1]}),
    "scale negative": ("scale", {}, lambda a: {"scale": -1.0}),
    "scale nan": ("scale", {}, lambda a: {"scale": float("nan")}),
    "kv_scale on bf16": ("kv_scale", {}, lambda a: {"kv_scale": 0.5}),
    "kv_scale two elements": (
        "kv_scale",
        {"cache_dtype": FP8},
        lambda a: {"kv_scale": torch.ones(2, device=DEVICE)},
    ),
    "kv_scale inf": ("kv_scale", {"cache_dtype": FP8}, lambda a: {"kv_scale": float("inf")}),
    "kv_scale fp16 tensor": (
        "kv_scale",
        {"cache_dtype": FP8},
        lambda a: {"kv_scale": torch.ones(1, dtype=torch.float16, device=DEVICE)},
    ),
    "num_splits zero": ("num_splits", {}, lambda a: {"num_splits": 0}),
    "num_splits too many": ("num_splits", {}, lambda a: {"num_splits": 1000}),
    "out dtype": ("out", {}, lambda a: {"out": torch.empty(2, 16, 64, device=DEVICE)}),
    "out shape (q's, not the value's)": ("out", {}, lambda a: {"out": torch.empty_like(a["q"])}),
    "out strided": (
        "out",
        {},
        lambda a: {"out": torch.empty(2, 64, 16, dtype=a["q"].dtype, device=DEVICE).transpose(1, 2)},
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_names_the_argument_and_writes_nothing(case):
    argument, build_kw, change = BAD_INPUTS[case]
    args = _args(**build_kw)
    args.update(change(args))
    out = args.get("out")
    before = out.clone() if isinstance(out, torch.Tensor) and out.device.type != "meta" else None
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        mla_attention.mla_decode(**args)
    if before is not None:
        assert torch.equal(out.nan_to_num(), before.nan_to_num())


def test_a_value_too_wide_for_one_program_is_refused():
    args = build(S("huge", (4,), 16, qk_dim=4096, v_head_dim=4096), DEVICE, 1).args
    refused = r"^v_head_dim: 4096 value columns .* exceed one program.s accumulator"
    with pytest.raises(ValueError, match=refused):
        mla_attention.mla_decode(**args)


# --- GPU only ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("num_splits", [None, 4])
def test_no_host_sync(cache_dtype, num_splits):
    shape = deepseek(8, (9000, 10, 0), cache_dtype=cache_dtype, num_splits=num_splits)
    inputs = build(shape, "cuda", 2)
    mla_attention.mla_decode(**inputs.args)  # compile outside the check
    with no_host_sync():
        mla_attention.mla_decode(**inputs.args)


@pytest.mark.gpu
@pytest.mark.parametrize("tp", [8, 1])
def test_cuda_graph_replay_with_new_lengths_and_block_tables(tp):
    """Capture once at a capacity; replay with other lengths and tables (the splits follow the lengths)."""
    base = deepseek(tp, (6000, 6000, 6000, 6000), spare_pages=8)
    inputs = build(base, "cuda", 3, guarded=True)
    inputs.args["workspace"] = mla_attention.mla_decode_workspace(base.batch, base.num_heads, device="cuda")
    replay_decode_graph(
        MLA_DECODE, base, inputs, ("kv_cache",), ((4, (10, 6100, 0, 2500)), (5, (256, 1900, 4096, 1)))
    )
