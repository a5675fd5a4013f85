"""Write new tokens' K and V into a paged KV cache: the step every decode and prefill takes before attention.

Layouts (the ones every later kernel reads):
    key, value          [num_tokens, num_kv_heads, head_dim]   heads and dims packed; any token stride
    k_cache, v_cache    [num_blocks, block_size, num_kv_heads, head_dim]   contiguous
    slot_mapping        [num_tokens] int32 or int64; slot = block * block_size + offset

A slot names one cache row of num_kv_heads * head_dim elements, so token t's K is one contiguous copy from
key[t] to k_cache.view(-1, num_kv_heads * head_dim)[slot]. A slot of -1 (or any slot outside
[0, num_blocks * block_size)) skips the token: padding tokens cost a slot read and nothing else.

fp8 e4m3 caches store x / scale, saturated to the format's range (+-448), with one fp32 scale per tensor:
a Python float (passed to the kernel by value) or a one-element device tensor (read by the kernel, never by
the host, as a serving engine keeps its calibrated scales). Neither way allocates or syncs.

Byte story: each live token reads its K and V rows once and writes them once; each program also reads its
tokens' slots (and, for fp8 scales held in memory, the two scales). Nothing else moves.
bench/operators/kv_cache.py holds the model.

The value side is optional (value=None and v_cache=None) for caches that hold one latent per token, as
DeepSeek's MLA does (one 576-wide head).
"""

import torch
import triton
import triton.language as tl

from kernels import INTERPRETED, _configs
from kernels._checks import check_contiguous, check_fp8_scales, check_shape, check_tensor, dtype_name

#: Cache dtypes write_kv stores, and the input dtypes it takes. A non-fp8 cache has its input's dtype.
CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448

# Row elements one program copies; longer rows (8 heads of 576) are split across programs.
_MAX_BLOCK = 4096
# Elements one program copies at least, over one or more tokens.
_TILE = 1024


@triton.jit
def _round_to_e4m3_grid(x):
    """Rounds fp32 x (|x| <= 448) to the nearest fp8 e4m3 value, ties to even, staying in fp32.

    Used only in the interpreter, whose fp32 -> fp8 cast rounds half up and drops the carry into the
    exponent (126.0 becomes 64.0); it converts values already on the grid exactly. On a GPU the cast is
    one cvt.rn.satfinite instruction and needs no help.
    """
    bits = x.to(tl.uint32, bitcast=True)
    # Normal range: keep 3 of fp32's 23 mantissa bits, adding just under half an ulp plus the kept lsb.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    # Subnormals (|x| < 2^-6) lie on a grid of 2^-9; fp32's ulp at 2^14 is 2^-9, so the add rounds there.
    magnitude = tl.abs(x)
    subnormal = ((magnitude + 16384.0) - 16384.0).to(tl.uint32, bitcast=True) | (bits & 0x80000000)
    return tl.where(magnitude < 0.015625, subnormal.to(tl.float32, bitcast=True), normal)


@triton.jit
def _quantize_fp8(
    x, scale, SCALE_IN_MEMORY: tl.constexpr, FP8_MAX: tl.constexpr, INTERPRETER_FP8_ROUNDING: tl.constexpr
):
    if SCALE_IN_MEMORY:
        scale = tl.load(scale)
    # Upcast right after the load: bf16 arithmetic is wrong in the interpreter, and fp32 is exact here.
    x = x.to(tl.float32) / scale
    x = tl.clamp(x, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    if INTERPRETER_FP8_ROUNDING:
        # The interpreter's fp8 cast also maps NaN to 0x7C (384); a GPU's gives NaN (0x7F): cast here.
        nan = tl.full(x.shape, 0x7F, tl.uint8).to(tl.float8e4nv, bitcast=True)
        x = tl.where(x != x, nan, _round_to_e4m3_grid(x).to(tl.float8e4nv))
    return x


@triton.jit
def _write_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim_k], token stride key_stride
    value_ptr,  # [num_tokens, num_kv_heads, head_dim_v], token stride value_stride; unread without HAS_VALUE
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim_k], contiguous
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim_v], contiguous; untouched w/o HAS_VALUE
    slot_mapping_ptr,  # [num_tokens] int32 or int64; outside [0, num_slots) skips the token
    k_scale,  # fp32 per-tensor scale: a value, or a [1] fp32 pointer when SCALES_IN_MEMORY; used if QUANTIZE
    v_scale,  # the same for V
    num_tokens,
    key_stride,  # elements between consecutive tokens of key
    value_stride,  # elements between consecutive tokens of value
    num_slots,  # num_blocks * block_size
    k_row,  # num_kv_heads * head_dim_k: one token's K, one cache row
    v_row,  # num_kv_heads * head_dim_v
    TOKENS: tl.constexpr,  # tokens per program, a power of two (several when rows are short)
    BLOCK: tl.constexpr,  # row elements per program, a power of two
    HAS_VALUE: tl.constexpr,
    QUANTIZE: tl.constexpr,  # fp8 cache: store clamp(x / scale, -FP8_MAX, FP8_MAX)
    SCALES_IN_MEMORY: tl.constexpr,
    FP8_MAX: tl.constexpr,
    INTERPRETER_FP8_ROUNDING: tl.constexpr,  # interpreter only: see _round_to_e4m3_grid
):
    # Each program copies a [TOKENS, BLOCK] tile: TOKENS tokens, BLOCK elements of each one's row.
    tokens = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)

    slot = tl.load(slot_mapping_ptr + tokens, mask=tokens < num_tokens, other=-1).to(tl.int64)
    live = (slot >= 0) & (slot < num_slots)
    # A dead token's lanes are all masked: it moves no K/V bytes and never forms an out-of-range address.
    # (Masks are built as live[:, None] & (offs < row)[None, :] so the compiler still sees 16-byte runs.)
    slot = tl.where(live, slot, 0)
    src_row = tokens.to(tl.int64)[:, None]
    dst_row = slot[:, None]

    k_mask = live[:, None] & (offs < k_row)[None, :]
    k = tl.load(key_ptr + src_row * key_stride + offs[None, :], mask=k_mask)
    if QUANTIZE:
        k = _quantize_fp8(k, k_scale, SCALES_IN_MEMORY, FP8_MAX, INTERPRETER_FP8_ROUNDING)
    tl.store(k_cache_ptr + dst_row * k_row + offs[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=k_mask)

    if HAS_VALUE:
        v_mask = live[:, None] & (offs < v_row)[None, :]
        v = tl.load(value_ptr + src_row * value_stride + offs[None, :], mask=v_mask)
        if QUANTIZE:
            v = _quantize_fp8(v, v_scale, SCALES_IN_MEMORY, FP8_MAX, INTERPRETER_FP8_ROUNDING)
        tl.store(
            v_cache_ptr + dst_row * v_row + offs[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=v_mask
        )


def write_kv_launch_config(row: int, input_bytes: int, cache_bytes: int) -> dict:
    """Tile and warps for rows of ``row`` elements.

    Each thread moves 16 bytes on the narrower side (so loads and stores are 16 bytes wide), each program
    at least _TILE elements: short rows (one head of 128) take several tokens per program, which keeps
    programs at 4 warps instead of 1 and the SMs' block slots from limiting the bytes in flight.
    """
    per_thread = 16 // min(input_bytes, cache_bytes)
    block = min(triton.next_power_of_2(max(row, 1)), _MAX_BLOCK)
    tokens = max(1, _TILE // block)
    num_warps = max(1, min(8, tokens * block // (per_thread * 32)))
    return {"TOKENS": tokens, "BLOCK": block, "num_warps": num_warps}


#: Knobs of write_kv_launch_config a per-GPU table (kernels/configs/) may override.
TUNABLE = ("TOKENS", "BLOCK", "num_warps")


def write_kv_config_key(input_dtype: torch.dtype, cache_dtype: torch.dtype, row: int, has_value: bool) -> str:
    """The shape key of a launch in the per-GPU tables: dtypes, the widest row, and whether V is written."""
    side = "" if has_value else " key-only"
    return f"in={dtype_name(input_dtype)} cache={dtype_name(cache_dtype)} row={row}{side}"


def write_kv_choice(key, value, k_cache) -> _configs.LaunchChoice:
    """The launch configuration write_kv takes for these inputs (metadata only) and where it came from."""
    k_row = key.shape[1] * key.shape[2]
    v_row = value.shape[1] * value.shape[2] if value is not None else 0
    row = max(k_row, v_row)
    heuristic = write_kv_launch_config(row, key.element_size(), k_cache.element_size())
    shape_key = write_kv_config_key(key.dtype, k_cache.dtype, row, value is not None)
    return _configs.choose("write_kv", shape_key, key.device, heuristic, TUNABLE)


def _check_side(side: str, x, cache, num_tokens: int | None) -> None:
    """Checks one of (key, k_cache) or (value, v_cache); num_tokens comes from key when side is 'value'."""
    x_name, cache_name = side, f"{side[0]}_cache"
    check_tensor(x_name, x, ndim=3, dtypes=INPUT_DTYPES)
    check_tensor(cache_name, cache, ndim=4, dtypes=CACHE_DTYPES, device=x.device)
    if num_tokens is not None:
        check_shape(x_name, x, (num_tokens, None, None), "[num_tokens, num_kv_heads, head_dim] like key")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{x_name}: expected num_kv_heads and head_dim >= 1, got shape {tuple(x.shape)}")
    if (x.shape[2] > 1 and x.stride(2) != 1) or (x.shape[1] > 1 and x.stride(1) != x.shape[2]):
        raise ValueError(
            f"{x_name}: expected heads and head_dim packed (strides (*, {x.shape[2]}, 1)), got {x.stride()}"
        )
    check_shape(
        cache_name,
        cache,
        (None, None, x.shape[1], x.shape[2]),
        f"[num_blocks, block_size, num_kv_heads, head_dim] to match {x_name}",
    )
    check_contiguous(cache_name, cache)
    if cache.dtype != torch.float8_e4m3fn and cache.dtype != x.dtype:
        raise ValueError(
            f"{cache_name}: expected dtype {dtype_name(x.dtype)} (as {x_name}) or float8_e4m3fn, "
            f"got {dtype_name(cache.dtype)}"
        )


def write_kv(key, value, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None) -> None:
    """Writes key[t] (and value[t]) into cache slot slot_mapping[t] in place; returns nothing, never syncs.

    key, value: [num_tokens, num_kv_heads, head_dim] fp32, fp16 or bf16 (value and v_cache may both be None
    for a latent-only cache). Caches: [num_blocks, block_size, num_kv_heads, head_dim] in key's dtype or fp8
    e4m3. k_scale, v_scale: per-tensor scales for fp8 caches (None means 1.0), as floats or one-element fp32
    device tensors. Slots outside [0, num_blocks * block_size), -1 among them, are skipped.
    """
    _check_side("key", key, k_cache, None)
    num_tokens = key.shape[0]
    has_value = value is not None or v_cache is not None
    if has_value:
        if value is None or v_cache is None:
            missing = "value" if value is None else "v_cache"
            raise ValueError(
                f"{missing}: expected a tensor, since value and v_cache go together (or both None)"
            )
        check_tensor("value", value, ndim=3, dtypes=(key.dtype,), device=key.device)
        _check_side("value", value, v_cache, num_tokens)
        if v_cache.shape[:2] != k_cache.shape[:2] or v_cache.dtype != k_cache.dtype:
            raise ValueError(
                f"v_cache: expected k_cache's blocks {tuple(k_cache.shape[:2])} and dtype "
                f"{dtype_name(k_cache.dtype)}, got {tuple(v_cache.shape[:2])} and {dtype_name(v_cache.dtype)}"
            )
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int32, torch.int64), device=key.device)
    check_shape("slot_mapping", slot_mapping, (num_tokens,), "[num_tokens] like key")
    check_contiguous("slot_mapping", slot_mapping)

    quantize = k_cache.dtype == torch.float8_e4m3fn
    if not has_value and v_scale is not None:
        raise ValueError("v_scale: a latent-only cache (value and v_cache None) takes one scale, k_scale")
    if not has_value:
        v_scale = k_scale  # never read (HAS_VALUE is off); checked alike
    k_scale, v_scale, scales_in_memory = check_fp8_scales(k_scale, v_scale, k_cache.dtype, key.device)

    if num_tokens == 0:
        return
    if not has_value:
        value, v_cache = key, k_cache  # never read or written: HAS_VALUE is off

    k_row = key.shape[1] * key.shape[2]
    v_row = value.shape[1] * value.shape[2] if has_value else 0
    config = write_kv_choice(key, value if has_value else None, k_cache).config
    grid = (triton.cdiv(num_tokens, config["TOKENS"]), triton.cdiv(max(k_row, v_row), config["BLOCK"]))
    _write_kv_kernel[grid](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        k_scale,
        v_scale,
        num_tokens,
        key.stride(0),
        value.stride(0),
        k_cache.shape[0] * k_cache.shape[1],
        k_row,
        v_row,
        TOKENS=config["TOKENS"],
        BLOCK=config["BLOCK"],
        HAS_VALUE=has_value,
        QUANTIZE=quantize,
        SCALES_IN_MEMORY=scales_in_memory,
        FP8_MAX=FP8_E4M3_MAX,
        INTERPRETER_FP8_ROUNDING=INTERPRETED,
        num_warps=config["num_warps"],
    )
