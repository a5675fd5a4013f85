"""write_kv's operator: shapes from the model presets, inputs, byte and FLOP models, the check against the
reference, and its tuning candidates."""

from dataclasses import dataclass, replace

import torch

import kernels.kv_cache
from bench.operators.base import Case, Inputs, TuneSpec, pow2_between
from bench.serving.models import DECODE_BATCHES, DEFAULT_BLOCK_SIZE, MODELS, PREFILL_CHUNKS
from bench.testing import (
    DTYPE_LABELS,
    Guarded,
    assert_bitwise_equal,
    assert_fp8_within_one_step,
    generator,
    max_error,
    randn,
)


@dataclass(frozen=True)
class WriteKVShape:
    """One write_kv call. ``head_dim_v`` None means a latent-only cache (MLA): no value, no v_cache.

    ``pattern`` places the slots as a serving engine would: "decode" puts each token in a block of its own
    (one new token per sequence), "prefill" fills consecutive slots of a sequence's blocks.
    """

    name: str  # model or test label
    pattern: str  # "decode" | "prefill"
    num_tokens: int
    num_kv_heads: int
    head_dim: int
    head_dim_v: int | None
    block_size: int = DEFAULT_BLOCK_SIZE
    dtype: torch.dtype = torch.bfloat16
    cache_dtype: torch.dtype = torch.bfloat16
    skipped: int = 0  # tokens whose slot is -1 (padding)
    slot_dtype: torch.dtype = torch.int64
    token_stride: int | None = None  # key/value rows inside a wider buffer (a fused QKV projection)

    @property
    def label(self) -> str:
        size = f"b={self.num_tokens}" if self.pattern == "decode" else f"{self.num_tokens} tok"
        cache = DTYPE_LABELS[self.cache_dtype]
        return f"{self.name} {self.pattern} {size} {self.num_kv_heads}x{self.head_dim} {cache}"

    @property
    def k_row(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def v_row(self) -> int:
        return 0 if self.head_dim_v is None else self.num_kv_heads * self.head_dim_v

    @property
    def num_blocks(self) -> int:
        blocks_needed = (
            self.num_tokens if self.pattern == "decode" else -(-self.num_tokens // self.block_size)
        )
        return 2 * blocks_needed + 1  # room to scatter, so block ids are not simply 0..n


def byte_model(shape: WriteKVShape) -> int:
    """Each live token reads its K and V rows once and writes them once; every token's slot is read once;
    an fp8 cache adds its 4-byte scales, one a side (``build`` passes them as device tensors)."""
    live = shape.num_tokens - shape.skipped
    input_bytes = shape.dtype.itemsize
    cache_bytes = shape.cache_dtype.itemsize
    rows = live * (shape.k_row + shape.v_row) * (input_bytes + cache_bytes)
    slots = shape.num_tokens * shape.slot_dtype.itemsize
    sides = 1 if shape.head_dim_v is None else 2
    scales = 4 * sides if shape.cache_dtype == torch.float8_e4m3fn else 0
    return rows + slots + scales


def flop_model(shape: WriteKVShape) -> int:
    """A copy; quantising to fp8 costs one division per element (the clamp is not counted)."""
    if shape.cache_dtype != torch.float8_e4m3fn:
        return 0
    return (shape.num_tokens - shape.skipped) * (shape.k_row + shape.v_row)


def _slots(shape: WriteKVShape, gen: torch.Generator) -> torch.Tensor:
    blocks = torch.randperm(shape.num_blocks, generator=gen, device=gen.device)
    if shape.pattern == "decode":
        offsets = torch.randint(0, shape.block_size, (shape.num_tokens,), generator=gen, device=gen.device)
        slots = blocks[: shape.num_tokens] * shape.block_size + offsets
    else:
        token = torch.arange(shape.num_tokens, device=gen.device)
        slots = blocks[token // shape.block_size] * shape.block_size + token % shape.block_size
    if shape.skipped:
        skip = torch.randperm(shape.num_tokens, generator=gen, device=gen.device)[: shape.skipped]
        slots[skip] = -1
    return slots


def _rows(shape, head_dim, device, gen, scale) -> torch.Tensor:
    """[num_tokens, num_kv_heads, head_dim], inside a wider buffer when the shape asks for a token stride."""
    row = shape.num_kv_heads * head_dim
    stride = shape.token_stride or row
    buffer = randn((shape.num_tokens, stride), shape.dtype, device, gen, scale)
    return buffer[:, :row].view(shape.num_tokens, shape.num_kv_heads, head_dim)


def build(shape: WriteKVShape, device, seed: int, guarded: bool = False) -> Inputs:
    """Random K/V (spread wide enough to hit fp8's saturation), slots per ``shape.pattern``, and caches.

    For verification (``guarded``) the caches start as NaN inside sentinel fences, so that any slot written
    by mistake, or left unwritten, shows; for timing they are plain zeros.
    """
    gen = generator(seed)
    cache_shape = (shape.num_blocks, shape.block_size, shape.num_kv_heads)
    spread = 200.0 if shape.cache_dtype == torch.float8_e4m3fn else 1.0
    args = {
        "key": _rows(shape, shape.head_dim, device, gen, spread),
        "value": None,
        "k_cache": None,
        "v_cache": None,
        "slot_mapping": _slots(shape, gen).to(device=device, dtype=shape.slot_dtype),
    }
    guards = {}
    sides = [("key", "k_cache", shape.head_dim)]
    if shape.head_dim_v is not None:
        args["value"] = _rows(shape, shape.head_dim_v, device, gen, spread)
        sides.append(("value", "v_cache", shape.head_dim_v))
    for _, cache_name, head_dim in sides:
        if guarded:
            guards[cache_name] = Guarded.empty((*cache_shape, head_dim), shape.cache_dtype, device)
            args[cache_name] = guards[cache_name].tensor
        else:
            args[cache_name] = torch.zeros((*cache_shape, head_dim), dtype=shape.cache_dtype, device=device)
    if shape.cache_dtype == torch.float8_e4m3fn:
        args["k_scale"] = torch.tensor([0.75], device=device)
        if shape.head_dim_v is not None:  # a latent-only cache takes one scale
            args["v_scale"] = torch.tensor([1.25], device=device)
    outputs = tuple(name for _, name, _ in sides)
    return Inputs(args, outputs, guards)


def compare(actual: Inputs, expected: Inputs, shape: WriteKVShape) -> float:
    """Bit-exact caches for fp32/fp16/bf16 (a copy); fp8 codes within one rounding step of the reference.

    Every slot the call does not own stays as it was (NaN here), which the bitwise comparison covers, and
    the sentinels around each cache are intact.
    """
    for name, guard in actual.guards.items():
        guard.check(name)
    error = 0.0
    for name in actual.outputs:
        a, e = actual.args[name], expected.args[name]
        if shape.cache_dtype == torch.float8_e4m3fn:
            assert_fp8_within_one_step(a, e, name)
        else:
            assert_bitwise_equal(a, e, name)
        error = max(error, max_error(a, e))
    return error


def _presets() -> list[tuple[str, int, int, bool]]:
    """(label, KV heads per rank, head_dim, has a V cache) for the write_kv benchmarks.

    Llama-3.1-8B and -70B write the same row per layer at TP 1 (8 KV heads of 128), so they share one
    preset; under TP 8, 70B keeps one KV head per rank; DeepSeek-R1 caches one 576-wide latent, no V.
    """
    llama8, llama70, r1 = MODELS["Llama-3.1-8B"], MODELS["Llama-3.1-70B"], MODELS["DeepSeek-R1"]
    assert (llama8.num_kv_heads, llama8.head_dim) == (llama70.num_kv_heads, llama70.head_dim)
    return [
        ("Llama-3.1-8B/70B", llama70.kv_heads_per_rank(1), llama70.head_dim, True),
        ("Llama-3.1-70B TP8", llama70.kv_heads_per_rank(8), llama70.head_dim, True),
        ("DeepSeek-R1 latent", r1.kv_heads_per_rank(1), r1.latent_dim, False),
    ]


def _model_shapes(pattern: str, sizes, cache_dtypes) -> list[WriteKVShape]:
    return [
        WriteKVShape(name, pattern, n, heads, head_dim, head_dim if has_value else None, cache_dtype=dtype)
        for name, heads, head_dim, has_value in _presets()
        for dtype in cache_dtypes
        for n in sizes
    ]


def sweep() -> list[WriteKVShape]:
    dtypes = (torch.bfloat16, torch.float8_e4m3fn)
    return _model_shapes("decode", DECODE_BATCHES, dtypes) + _model_shapes("prefill", PREFILL_CHUNKS, dtypes)


def default_shapes() -> list[WriteKVShape]:
    bf16 = (torch.bfloat16,)
    both = (torch.bfloat16, torch.float8_e4m3fn)
    return _model_shapes("decode", (1, 256), bf16) + _model_shapes("prefill", (4096,), both)


def small_shapes() -> list[WriteKVShape]:
    """Odd sizes for the interpreter: non-power-of-two head_dim, skipped tokens, every cache dtype."""
    S = WriteKVShape
    return [
        S("odd", "decode", 5, 3, 72, 72, block_size=4, skipped=1, slot_dtype=torch.int32),
        S(
            "odd",
            "prefill",
            19,
            2,
            40,
            24,
            block_size=8,
            skipped=3,
            dtype=torch.float16,
            cache_dtype=torch.float16,
        ),
        S("odd", "prefill", 9, 2, 96, 96, block_size=1, dtype=torch.float32, cache_dtype=torch.float32),
        S("odd", "decode", 6, 2, 80, 80, block_size=16, skipped=2, cache_dtype=torch.float8_e4m3fn),
        S("latent", "decode", 4, 1, 576, None, block_size=16),
        S("strided", "prefill", 7, 2, 64, 64, block_size=8, token_stride=3 * 2 * 64),
    ]


def static_shapes() -> list[WriteKVShape]:
    """One shape per distinct launch configuration that the benchmarks use."""
    S = WriteKVShape
    return [
        S("Llama-3.1-70B", "prefill", 64, 8, 128, 128),
        S("Llama-3.1-70B TP8", "prefill", 64, 1, 128, 128),
        S("DeepSeek-R1 latent", "prefill", 64, 1, 576, None),
        S("Llama-3.1-70B", "prefill", 64, 8, 128, 128, cache_dtype=torch.float8_e4m3fn),
        S("Llama-3.1-70B", "prefill", 64, 8, 128, 128, dtype=torch.float32, cache_dtype=torch.float32),
    ]


def launch_config(inputs: Inputs) -> dict:
    a = inputs.args
    return kernels.kv_cache.write_kv_choice(a["key"], a["value"], a["k_cache"]).as_info()


TUNE = TuneSpec(
    "_write_kv_kernel",
    kernels.kv_cache.TUNABLE,
    (
        lambda h: {"TOKENS": h["TOKENS"] * 2},
        lambda h: {"TOKENS": h["TOKENS"] * 4},
        lambda h: {"num_warps": h["num_warps"] // 2},
        lambda h: {"num_warps": h["num_warps"] * 2},
    ),
    {
        "TOKENS": pow2_between(1, 64),
        "BLOCK": pow2_between(16, 4096),
        "num_warps": pow2_between(1, 8),
    },
    lambda shape: replace(shape, num_tokens=min(shape.num_tokens, 64), skipped=0),
)


WRITE_KV = Case.by_convention(globals(), "write_kv", traffic_shapes=lambda: small_shapes() + static_shapes())
