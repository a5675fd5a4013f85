"""write_kv against its reference: random shapes and slot permutations, skipped tokens, untouched slots,
every cache dtype; bad input; launch configuration; and on a GPU, no host sync and CUDA-graph replay."""

import functools

import pytest
import torch

from bench.operators.kv_cache import WRITE_KV, WriteKVShape, build, compare
from bench.testing import assert_bitwise_equal, generator, no_host_sync, randn, seed_of
from kernels import kv_cache
from reference import kv_cache as reference
from tests import helpers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn


# check_against_reference(shape, seed): this file's case, kernel against reference (tests/helpers.py)
check_against_reference = functools.partial(helpers.check_against_reference, WRITE_KV, device=DEVICE)


@pytest.mark.parametrize(
    "cache_dtype, dtype",
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (FP8, torch.bfloat16),
        (FP8, torch.float16),
        (FP8, torch.float32),
    ],
    ids=["fp32", "fp16", "bf16", "fp8<-bf16", "fp8<-fp16", "fp8<-fp32"],
)
@pytest.mark.parametrize("pattern", ["decode", "prefill"])
@pytest.mark.parametrize(
    "heads, head_dim, head_dim_v, block_size",
    [(1, 64, 64, 16), (3, 72, 72, 4), (2, 128, 96, 1), (1, 576, None, 16), (5, 24, 40, 8), (8, 128, 128, 32)],
    ids=["1x64", "3x72", "2x128+96", "latent576", "5x24+40", "8x128"],
)
def test_matches_reference(cache_dtype, dtype, pattern, heads, head_dim, head_dim_v, block_size, request):
    shape = WriteKVShape(
        "test",
        pattern,
        11,
        heads,
        head_dim,
        head_dim_v,
        block_size,
        dtype,
        cache_dtype,
        skipped=2,
        slot_dtype=torch.int32 if heads % 2 else torch.int64,
    )
    check_against_reference(shape, seed_of(request.node.name))


def test_small_shapes_of_the_case(request):
    helpers.check_small_shapes(WRITE_KV, request.node.name, DEVICE)


@helpers.property_test(
    lambda st: dict(
        num_tokens=st.integers(1, 40),
        heads=st.integers(1, 6),
        head_dim=st.sampled_from([8, 16, 40, 64, 72, 96, 128, 136, 192, 256, 576]),
        block_size=st.sampled_from([1, 8, 16, 32, 64, 128]),
        pattern=st.sampled_from(["decode", "prefill"]),
        cache_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, FP8]),
        skip_share=st.floats(0, 1),
        seed=st.integers(0, 2**31 - 1),
    )
)
def test_random_shapes_property(
    num_tokens, heads, head_dim, block_size, pattern, cache_dtype, skip_share, seed
):
    dtype = torch.bfloat16 if cache_dtype == FP8 else cache_dtype
    shape = WriteKVShape(
        "prop",
        pattern,
        num_tokens,
        heads,
        head_dim,
        head_dim,
        block_size,
        dtype,
        cache_dtype,
        skipped=int(skip_share * num_tokens),
    )
    check_against_reference(shape, seed)


def _filled_caches(shape: WriteKVShape, seed: int):
    """Inputs whose caches hold random finite values, to see that untouched slots keep them bit for bit."""
    inputs = build(shape, DEVICE, seed)
    gen = generator(seed + 1)
    for name in inputs.outputs:
        cache = inputs.args[name]
        cache.copy_(randn(cache.shape, torch.float32, DEVICE, gen).to(cache.dtype))
    return inputs


def test_untouched_slots_keep_their_values():
    shape = WriteKVShape("untouched", "decode", 6, 2, 64, 64, block_size=4, skipped=2)
    inputs = _filled_caches(shape, 7)
    before = {name: inputs.args[name].clone() for name in inputs.outputs}
    kv_cache.write_kv(**inputs.args)
    slots = inputs.args["slot_mapping"].long()
    written = torch.zeros(shape.num_blocks * shape.block_size, dtype=torch.bool, device=DEVICE)
    written[slots[slots >= 0]] = True
    for name in inputs.outputs:
        rows_after = inputs.args[name].view(-1, *inputs.args[name].shape[2:])
        rows_before = before[name].view_as(rows_after)
        assert_bitwise_equal(rows_after[~written], rows_before[~written], name)
        assert not torch.equal(rows_after[written], rows_before[written])


def test_all_skipped_and_out_of_range_slots_write_nothing():
    shape = WriteKVShape("skip", "decode", 5, 2, 32, 32, block_size=4)
    inputs = _filled_caches(shape, 3)
    num_slots = shape.num_blocks * shape.block_size
    inputs.args["slot_mapping"] = torch.tensor([-1, -7, num_slots, num_slots + 100, -1], device=DEVICE)
    before = {name: inputs.args[name].clone() for name in inputs.outputs}
    kv_cache.write_kv(**inputs.args)
    for name in inputs.outputs:
        assert_bitwise_equal(inputs.args[name], before[name], name)


def test_zero_tokens_is_a_no_op():
    shape = WriteKVShape("empty", "prefill", 0, 2, 32, 32, block_size=4)
    inputs = _filled_caches(shape, 5)
    before = {name: inputs.args[name].clone() for name in inputs.outputs}
    kv_cache.write_kv(**inputs.args)
    for name in inputs.outputs:
        assert_bitwise_equal(inputs.args[name], before[name], name)


def test_fp8_saturates_and_scales():
    key = torch.tensor([[[1000.0, -1000.0, 3.0, -0.0, 447.0, 449.0, 1e-6, -2.0]]], device=DEVICE)
    k_cache = torch.zeros(1, 1, 1, 8, dtype=FP8, device=DEVICE)
    kv_cache.write_kv(key, None, k_cache, None, torch.tensor([0], device=DEVICE), k_scale=0.5)
    got = k_cache.float().flatten().tolist()
    assert got[:2] == [448.0, -448.0]  # 2000 and -2000 saturate
    assert got[2] == 6.0 and got[7] == -4.0  # divided by the scale
    assert got[4:6] == [448.0, 448.0]  # 894 and 898 saturate too
    assert torch.signbit(k_cache.float().flatten()[3])  # -0.0 keeps its sign


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_fp8_keeps_nan_and_saturates_inf(dtype):
    """Issue 10, item 7: NaN stays NaN in an fp8 e4m3 cache (the interpreter's cast made it +-384), as on a
    GPU and in the reference; +-inf saturate to +-448; the finite values beside them are untouched."""
    nan = float("nan")
    row = [nan, -nan, float("inf"), -float("inf"), 1.0, -3.0, 0.0, 448.0]
    key = torch.tensor([[row]], device=DEVICE).to(dtype)
    key[0, 0, 1] = -key[0, 0, 0]  # a NaN with the sign bit set
    k_cache = torch.zeros(2, 1, 1, 8, dtype=FP8, device=DEVICE)
    expected = k_cache.clone()
    kv_cache.write_kv(key, None, k_cache, None, torch.tensor([1], device=DEVICE))
    reference.write_kv(key, None, expected, None, torch.tensor([1], device=DEVICE))
    got, want = k_cache[1].float().flatten(), expected[1].float().flatten()
    assert got.isnan().tolist() == [True, True] + [False] * 6, got
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    assert got[2:].tolist() == [448.0, -448.0, 1.0, -3.0, 0.0, 448.0]
    assert (k_cache[0].view(torch.uint8) == 0).all()


def test_float_scale_equals_tensor_scale():
    shape = WriteKVShape("scale", "prefill", 9, 2, 64, 64, block_size=8, cache_dtype=FP8)
    a = build(shape, DEVICE, 11)
    b = a.clone()
    a.args.update(k_scale=0.75, v_scale=1.25)
    b.args.update(k_scale=torch.tensor([0.75], device=DEVICE), v_scale=torch.tensor([1.25], device=DEVICE))
    kv_cache.write_kv(**a.args)
    kv_cache.write_kv(**b.args)
    for name in a.outputs:
        assert_bitwise_equal(a.args[name], b.args[name], name)


@pytest.mark.parametrize("input_bytes, cache_bytes", [(4, 4), (2, 2), (2, 1), (4, 1)])
@pytest.mark.parametrize("row", [64, 128, 576, 1024, 4608])
def test_launch_config_gives_16_byte_lanes(row, input_bytes, cache_bytes):
    """Each thread owns whole 16-byte runs on the narrower side (several when 8 warps are not enough)."""
    config = kv_cache.write_kv_launch_config(row, input_bytes, cache_bytes)
    elements = config["TOKENS"] * config["BLOCK"]
    threads = config["num_warps"] * 32
    per_thread_bytes = elements // threads * min(input_bytes, cache_bytes)
    assert per_thread_bytes >= 16 and per_thread_bytes % 16 == 0
    assert config["BLOCK"] >= min(row, 4096)


# --- bad input: ValueError naming the argument, and nothing written -----------------------------------------


def _valid_args():
    shape = WriteKVShape("bad", "decode", 4, 2, 32, 32, block_size=4)
    return build(shape, DEVICE, 1).args


def _fp8_args():
    shape = WriteKVShape("bad", "decode", 4, 2, 32, 32, block_size=4, cache_dtype=FP8)
    return build(shape, DEVICE, 1).args


def _replace(**changes):
    def mutate(args):
        for name, make in changes.items():
            args[name] = make(args)
        return args

    return mutate


BAD_INPUTS = {
    "key not a tensor": ("key", _valid_args, _replace(key=lambda a: a["key"].tolist())),
    "key 2-D": ("key", _valid_args, _replace(key=lambda a: a["key"].flatten(1))),
    "key int dtype": ("key", _valid_args, _replace(key=lambda a: a["key"].to(torch.int32))),
    "key heads not packed": (
        "key",
        _valid_args,
        _replace(key=lambda a: a["key"].transpose(1, 2).contiguous().transpose(1, 2)),
    ),
    "value dtype differs": ("value", _valid_args, _replace(value=lambda a: a["value"].half())),
    "value token count": ("value", _valid_args, _replace(value=lambda a: a["value"][:3])),
    "value without v_cache": ("v_cache", _valid_args, _replace(v_cache=lambda a: None)),
    "v_cache without value": ("value", _valid_args, _replace(value=lambda a: None)),
    "k_cache head_dim": ("k_cache", _valid_args, _replace(k_cache=lambda a: a["k_cache"][..., :16])),
    "k_cache heads": ("k_cache", _valid_args, _replace(k_cache=lambda a: a["k_cache"][:, :, :1])),
    "k_cache not contiguous": (
        "k_cache",
        _valid_args,
        _replace(k_cache=lambda a: a["k_cache"].transpose(0, 1).contiguous().transpose(0, 1)),
    ),
    "k_cache dtype differs from key": (
        "k_cache",
        _valid_args,
        _replace(k_cache=lambda a: a["k_cache"].half()),
    ),
    "k_cache 3-D": ("k_cache", _valid_args, _replace(k_cache=lambda a: a["k_cache"].flatten(0, 1))),
    "v_cache blocks differ": ("v_cache", _valid_args, _replace(v_cache=lambda a: a["v_cache"][:-1])),
    "slot_mapping float": (
        "slot_mapping",
        _valid_args,
        _replace(slot_mapping=lambda a: a["slot_mapping"].float()),
    ),
    "slot_mapping int16": (
        "slot_mapping",
        _valid_args,
        _replace(slot_mapping=lambda a: a["slot_mapping"].to(torch.int16)),
    ),
    "slot_mapping length": (
        "slot_mapping",
        _valid_args,
        _replace(slot_mapping=lambda a: a["slot_mapping"][:3]),
    ),
    "slot_mapping 2-D": (
        "slot_mapping",
        _valid_args,
        _replace(slot_mapping=lambda a: a["slot_mapping"][:, None]),
    ),
    "slot_mapping strided": (
        "slot_mapping",
        _valid_args,
        _replace(slot_mapping=lambda a: a["slot_mapping"].repeat_interleave(2)[::2]),
    ),
    "slot_mapping other device": (
        "slot_mapping",
        _valid_args,
        _replace(slot_mapping=lambda a: a["slot_mapping"].to("meta")),
    ),
    "k_cache other device": ("k_cache", _valid_args, _replace(k_cache=lambda a: a["k_cache"].to("meta"))),
    "scale on a bf16 cache": ("k_scale", _valid_args, _replace(k_scale=lambda a: 0.5)),
    "scale negative": ("k_scale", _fp8_args, _replace(k_scale=lambda a: -1.0)),
    "key heads zero": (
        "key",
        _valid_args,
        _replace(key=lambda a: a["key"][:, :0], k_cache=lambda a: a["k_cache"][:, :, :0]),
    ),
    "value head_dim zero": (
        "value",
        _valid_args,
        _replace(value=lambda a: a["value"][..., :0], v_cache=lambda a: a["v_cache"][..., :0]),
    ),
    "scale inf": ("k_scale", _fp8_args, _replace(k_scale=lambda a: float("inf"))),
    "scale nan": ("v_scale", _fp8_args, _replace(v_scale=lambda a: float("nan"))),
    "scale a bool": ("k_scale", _fp8_args, _replace(k_scale=lambda a: True)),
    "scale two elements": ("v_scale", _fp8_args, _replace(v_scale=lambda a: torch.ones(2, device=DEVICE))),
    "scale fp16": ("k_scale", _fp8_args, _replace(k_scale=lambda a: torch.ones(1, device=DEVICE).half())),
    "scale a string": ("k_scale", _fp8_args, _replace(k_scale=lambda a: "1.0")),
    "scales of two kinds": ("v_scale", _fp8_args, _replace(v_scale=lambda a: 2.0)),
    "v_scale on a latent-only cache": (
        "v_scale",
        _fp8_args,
        _replace(value=lambda a: None, v_cache=lambda a: None),
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_names_the_argument_and_writes_nothing(case):
    argument, make_args, mutate = BAD_INPUTS[case]
    args = mutate(make_args())
    caches = {
        n: args[n]
        for n in ("k_cache", "v_cache")
        if isinstance(args[n], torch.Tensor) and args[n].device.type != "meta"
    }
    for cache in caches.values():
        cache.view(torch.uint8).fill_(0x3C)
    before = {n: c.clone() for n, c in caches.items()}
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        kv_cache.write_kv(**args)
    for name, cache in caches.items():
        assert_bitwise_equal(cache, before[name], name)


# --- GPU only -----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_no_host_sync(cache_dtype):
    shape = WriteKVShape("sync", "prefill", 37, 8, 128, 128, cache_dtype=cache_dtype, skipped=3)
    inputs = build(shape, "cuda", 2)
    kv_cache.write_kv(**inputs.args)  # compile outside the check
    with no_host_sync():
        kv_cache.write_kv(**inputs.args)
        kv_cache.write_kv(
            **{**inputs.args, "k_scale": 0.5, "v_scale": 2.0} if cache_dtype == FP8 else inputs.args
        )


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_slots_and_values():
    shape = WriteKVShape("graph", "decode", 16, 8, 128, 128)
    inputs = build(shape, "cuda", 4, guarded=True)
    kv_cache.write_kv(**inputs.args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kv_cache.write_kv(**inputs.args)
    for seed in (5, 6):
        fresh = build(shape, "cuda", seed, guarded=True)
        for name in ("key", "value", "slot_mapping"):
            inputs.args[name].copy_(fresh.args[name])
        for name in inputs.outputs:
            inputs.args[name].fill_(float("nan"))
        expected = inputs.clone()
        graph.replay()
        reference.write_kv(**expected.args)
        compare(inputs, expected, shape)
