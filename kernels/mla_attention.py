"""MLA paged decode: DeepSeek's multi-head latent attention in its absorbed form, one new token per sequence.

Layouts:
    q             [batch, num_heads, qk_dim]   fp16 or bf16: the absorbed query, latent part then rope part
    kv_cache      [num_blocks, block_size, 1, qk_dim]   one latent row per token, as write_kv writes a
                  latent-only cache; q's dtype or fp8 e4m3 with a per-tensor kv_scale
    block_tables  [batch, max_blocks] int32: page i of sequence b is block block_tables[b, i]
    seq_lens      [batch] int32: tokens in each sequence's cache (0 gives zeros)
    out           [batch, num_heads, v_head_dim] in q's dtype

    out = softmax(q . kv^T * scale) @ kv[..., :v_head_dim]

The first v_head_dim columns of a cached row are both key (with the rope columns after them) and value:
the kernel loads them once and uses them in both dots. For DeepSeek-R1, qk_dim = 576 (512 latent + 64 rope)
and v_head_dim = 512.

Byte story: every query head attends over the same cached rows, so a program serves a tile of HEAD_BLOCK
heads (16 or 32) of one sequence and split, with the heads as the M dimension of tl.dot: each cached byte
is read once per head tile, not once per head. Past 32 heads (DeepSeek-R1 at TP 1 and 2) a sequence has
several head tiles; they are neighbours in the grid (axis 0), so they run together and the later tiles
find the rows in L2: DRAM sees each live byte about once. (A 64-head tile, which would halve those L2
reads, spills at sm_90: its [64 x 512] fp32 accumulator took all 128 registers of a 16-warp program and
ptxas spilled 244 to 276 bytes a thread through the stack; the launcher refuses it.) Slots past a
sequence's length are masked at the load, never read (they may hold NaN).

Where the time goes: per cached token, 2 x heads x (qk_dim + v_head_dim) FLOPs against qk_dim cache bytes,
about 240 FLOP/byte at 128 bf16 heads (compute-bound on an H200, near the knee on an H100), 30 at 16
heads (bandwidth-bound).

Long contexts and small batches split each sequence's tokens (split-KV) as paged_decode does: the launcher
bounds the splits from shapes only, each program derives its sequence's split count from its length on the
device, and paged_decode's merge kernel combines the partials by their log-sum-exp. No host read, so a CUDA
graph captured once stays right for any lengths and block tables. One difference: a split's partials are a
512-wide fp32 row per head, so a split takes enough tokens to read 32 times those bytes
(mla_min_split_tokens), where paged_decode takes 256.

fp8 e4m3 caches: kv_scale is folded into the softmax scale (keys) and into the final normalisation (values),
so the inner loop only widens fp8 to q's dtype.
"""

import torch
import triton
import triton.language as tl

from kernels import _configs
from kernels._checks import (
    check_contiguous,
    check_fp8_scale,
    check_int,
    check_tensor,
    dtype_name,
)

# Split-KV is paged_decode's: the same split rule on the device, the same partial layout and merge kernel.
from kernels.paged_attention import (
    LOG2_E,
    MAX_SPLITS,
    MIN_SPLIT_TOKENS,
    PagedDecodeWorkspace,
    check_softmax_scale,
    check_tables,
    check_workspace_args,
    decode_buffers,
    launch_split_decode,
    paged_decode_workspace,
    plan_splits,
    scale_value,
    split_range,
    store_split,
)

Q_DTYPES = (torch.float16, torch.bfloat16)
# Largest fp32 accumulator [head tile x padded value width] one program keeps in registers.
_MAX_ACCUMULATOR = 32 * 512


@triton.jit
def _mla_decode_kernel(
    q_ptr,  # [batch, num_heads, QK_DIM], strides (stride_q_seq, stride_q_head, 1)
    kv_cache_ptr,  # [num_blocks, block_size, 1, QK_DIM], contiguous: value/latent columns, then rope
    block_tables_ptr,  # [batch, max_blocks] int32, row stride stride_table
    seq_lens_ptr,  # [batch] int32
    out_ptr,  # [batch, num_heads, V_DIM], contiguous: sequences with one split
    partial_out_ptr,  # [batch, num_heads, MAX_SPLITS, V_DIM] fp32: normalised output of each split
    partial_lse_ptr,  # [batch, num_heads, MAX_SPLITS] fp32: log2-sum-exp2 of each split's scores
    softmax_scale_log2,  # scale * log2(e): scores go through exp2
    kv_scale,  # fp32 per-tensor scale: a value, or a [1] fp32 pointer when SCALE_IN_MEMORY
    forced_splits,  # > 0: every sequence takes this many splits; 0: each derives its own from its length
    stride_q_seq,
    stride_q_head,
    stride_table,
    NUM_HEADS: tl.constexpr,
    HEAD_BLOCK: tl.constexpr,  # heads a program serves, the dots' M (power of two >= 16)
    QK_DIM: tl.constexpr,  # cached row width (576 for DeepSeek)
    V_DIM: tl.constexpr,  # leading columns that are also the value (512)
    V_PAD: tl.constexpr,  # power of two >= max(V_DIM, 16)
    ROPE_PAD: tl.constexpr,  # power of two >= max(QK_DIM - V_DIM, 16); 0 when the row is all value
    BLOCK_SIZE: tl.constexpr,  # tokens per cache page
    BLOCK_N: tl.constexpr,  # tokens per loop iteration
    MAX_SPLITS: tl.constexpr,  # splits the grid provides per sequence; 1 compiles the merge out
    MIN_SPLIT_TOKENS: tl.constexpr,
    SCALE_IN_MEMORY: tl.constexpr,
    INTERPRETER_UPCAST: tl.constexpr,  # interpreter only: bf16 dots are wrong there, so dot in fp32
):
    head_tile = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    num_splits, start, end = split_range(seq_len, split, forced_splits, BLOCK_N, MAX_SPLITS, MIN_SPLIT_TOKENS)
    if split >= num_splits:
        return

    heads = head_tile.to(tl.int64) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)
    head_mask = heads < NUM_HEADS
    v_dims = tl.arange(0, V_PAD)
    v_mask = v_dims < V_DIM
    q_rows = q_ptr + seq.to(tl.int64) * stride_q_seq + heads[:, None] * stride_q_head
    q_value = tl.load(q_rows + v_dims[None, :], mask=head_mask[:, None] & v_mask[None, :], other=0.0)
    if INTERPRETER_UPCAST:
        q_value = q_value.to(tl.float32)
    dot_dtype = q_value.dtype
    if ROPE_PAD > 0:
        rope_dims = V_DIM + tl.arange(0, ROPE_PAD)
        rope_mask = rope_dims < QK_DIM
        q_rope = tl.load(q_rows + rope_dims[None, :], mask=head_mask[:, None] & rope_mask[None, :], other=0.0)
        q_rope = q_rope.to(dot_dtype)
    kv_scale = scale_value(kv_scale, SCALE_IN_MEMORY)
    qk_scale = softmax_scale_log2 * kv_scale

    m = tl.full([HEAD_BLOCK], float("-inf"), dtype=tl.float32)  # running max of scaled scores (log2)
    denom = tl.zeros([HEAD_BLOCK], dtype=tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([HEAD_BLOCK, V_PAD], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    for tile in range(start, end, BLOCK_N):
        tokens = tile + tl.arange(0, BLOCK_N)
        live = tokens < end
        # Lanes of one page name the same table entry: one transaction per page.
        block = tl.load(table + tokens // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
        rows = kv_cache_ptr + (block * BLOCK_SIZE + tokens % BLOCK_SIZE)[:, None] * QK_DIM
        # The value columns: read once, the keys' leading part here and the values below.
        kv = tl.load(rows + v_dims[None, :], mask=live[:, None] & v_mask[None, :], other=0.0).to(dot_dtype)
        scores = tl.dot(q_value, tl.trans(kv))  # [HEAD_BLOCK, BLOCK_N] fp32
        if ROPE_PAD > 0:
            k_rope = tl.load(rows + rope_dims[None, :], mask=live[:, None] & rope_mask[None, :], other=0.0)
            scores = tl.dot(q_rope, tl.trans(k_rope.to(dot_dtype)), scores)
        scores = tl.where(live[None, :], scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), kv)
        m = m_new

    head_rows = seq.to(tl.int64) * NUM_HEADS + heads
    store_split(
        out_ptr,
        partial_out_ptr,
        partial_lse_ptr,
        acc,
        m,
        denom,
        kv_scale,
        head_rows,
        v_dims,
        head_mask,
        v_mask,
        split,
        num_splits,
        V_DIM,
        MAX_SPLITS,
    )


def mla_decode_launch_config(num_heads: int, qk_dim: int, v_head_dim: int, cache_bytes: int) -> dict:
    """Head tile, token tile, warps and pipeline depth.

    Up to 32 heads share a program (the dots' M). Warps are sized so the fp32 accumulator [heads x value
    width] is 32 elements a thread, 16 warps at most: at DeepSeek's 512 columns, 8 warps for 16 heads (103
    registers in the sm_90 compile, two programs an SM) and 16 for 32 (103); 4 warps at 32 heads compiled
    to 255 registers, and a 64-head tile spilled. fp8 caches stop at 8 warps: widening the tile to bf16 in
    registers left a 16-warp program (128 registers at most) 16 bytes of stack at 32 heads; 8 warps take
    179. 32 tokens a tile keep a 576-wide bf16 row tile at 36 KB, two deep in shared memory. fp8 caches
    load directly, as in paged_decode.
    """
    v_pad = max(16, triton.next_power_of_2(v_head_dim))
    rope = qk_dim - v_head_dim
    head_block = min(32, max(16, triton.next_power_of_2(num_heads)))
    while head_block > 16 and head_block * v_pad > _MAX_ACCUMULATOR:
        head_block //= 2
    return {
        "HEAD_BLOCK": head_block,
        "V_PAD": v_pad,
        "ROPE_PAD": max(16, triton.next_power_of_2(rope)) if rope > 0 else 0,
        "BLOCK_N": 32,
        "num_warps": min(16 if cache_bytes > 1 else 8, max(4, head_block * v_pad // (32 * 32))),
        "num_stages": 1 if cache_bytes == 1 else 2,
    }


# A split reads at least this many times the bytes of its head tile's partials (its fp32 output rows written,
# then read back by the merge): split-KV adds at most 1/32 to the traffic with one head tile a sequence.
# Past 32 heads each head tile writes its own partials while the rows are read from DRAM once (the tiles
# share them through L2), so the extra traffic is up to tiles/32: 1/16 at 64 heads, 1/8 at 128. Counting
# every head instead would take those shapes (a batch of 32 at 8K) down to one split and leave a TP2 fp8
# grid of 64 programs on 132 SMs: which is faster is for a GPU to measure. The price of the floor is
# parallelism for a lone long sequence: at 16 heads a 64K-token sequence takes 36 splits, not 64.
_SPLIT_READ_OVER_PARTIALS = 32


def mla_min_split_tokens(
    num_heads: int, head_block: int, qk_dim: int, v_head_dim: int, cache_bytes: int
) -> int:
    """Fewest tokens a split takes. paged_decode's 256 suits a few query heads per KV head; here a split
    writes a v_head_dim-wide fp32 row per head of its tile (32 KB for 16 of DeepSeek's heads) against
    qk_dim cache bytes per token, so the floor grows with the tile's heads and the value width: 1,824 tokens
    at 16 heads over a bf16 576-wide cache, 3,648 at 32 heads and more (tiles stop at 32 heads)."""
    heads = min(num_heads, head_block)
    partial_bytes = heads * (v_head_dim * 4 + 4) * 2  # out row and log-sum-exp, written and read back
    tokens = triton.cdiv(_SPLIT_READ_OVER_PARTIALS * partial_bytes, qk_dim * cache_bytes)
    return max(MIN_SPLIT_TOKENS, triton.cdiv(tokens, 16) * 16)


#: Knobs of mla_decode_launch_config a per-GPU table (kernels/configs/) may override.
TUNABLE = ("HEAD_BLOCK", "BLOCK_N", "num_warps", "num_stages")


def mla_decode_config_key(
    q_dtype: torch.dtype, cache_dtype: torch.dtype, num_heads: int, qk_dim: int, v_head_dim: int
) -> str:
    """The shape key of a launch in the per-GPU tables (lengths, batch and page size do not change the best
    tile; the split count follows from them on its own)."""
    return (
        f"q={dtype_name(q_dtype)} kv={dtype_name(cache_dtype)} heads={num_heads} qk_dim={qk_dim} "
        f"v_head_dim={v_head_dim}"
    )


def mla_decode_choice(q: torch.Tensor, kv_cache: torch.Tensor, v_head_dim: int) -> _configs.LaunchChoice:
    """The launch configuration mla_decode takes for these inputs (metadata only) and where it came from."""
    num_heads, qk_dim = q.shape[1], q.shape[2]
    heuristic = mla_decode_launch_config(num_heads, qk_dim, v_head_dim, kv_cache.element_size())
    key = mla_decode_config_key(q.dtype, kv_cache.dtype, num_heads, qk_dim, v_head_dim)
    return _configs.choose("mla_decode", key, q.device, heuristic, TUNABLE)


def mla_decode_workspace(
    batch: int, num_heads: int, v_head_dim: int = 512, *, max_splits: int = MAX_SPLITS, device=None
) -> PagedDecodeWorkspace:
    """Split-KV scratch for up to ``batch`` sequences of ``num_heads`` heads: paged_decode's workspace with
    the value width as its head_dim (the two kernels share the merge and its partial layout)."""
    check_workspace_args(batch, ("num_heads", num_heads), ("v_head_dim", v_head_dim), max_splits, device)
    check_int("v_head_dim", v_head_dim, 1, _MAX_ACCUMULATOR // 16)  # what mla_decode takes at 16 heads
    return paged_decode_workspace(batch, num_heads, v_head_dim, max_splits=max_splits, device=device)


def mla_decode(
    q,
    kv_cache,
    block_tables,
    seq_lens,
    *,
    v_head_dim=512,
    scale=None,
    kv_scale=None,
    num_splits=None,
    out=None,
    workspace=None,
) -> torch.Tensor:
    """Absorbed MLA decode of q against each sequence's paged latent cache; returns out
    [batch, num_heads, v_head_dim].

    Validates metadata only; ``kernels.paged_attention.check_paged_inputs(kv_cache, block_tables, seq_lens)``
    checks lengths and block ids against the cache (it reads device data: keep it off timed and captured
    paths). With ``workspace`` (mla_decode_workspace) and ``out`` given, the call allocates nothing.
    """
    check_tensor("q", q, ndim=3, dtypes=Q_DTYPES)
    batch, num_heads, qk_dim = q.shape
    if q.stride(2) != 1 and qk_dim > 1:  # a size-1 dimension's stride is never used
        raise ValueError(f"q: expected the last dimension contiguous (stride 1), got strides {q.stride()}")
    if num_heads == 0 or qk_dim == 0:
        raise ValueError(f"q: expected num_heads and qk_dim >= 1, got shape {tuple(q.shape)}")
    check_tensor("kv_cache", kv_cache, ndim=4, dtypes=(q.dtype, torch.float8_e4m3fn), device=q.device)
    check_contiguous("kv_cache", kv_cache)
    num_blocks, block_size, latent_heads, cache_dim = kv_cache.shape
    if block_size == 0 or latent_heads != 1:
        raise ValueError(
            "kv_cache: expected [num_blocks, block_size >= 1, 1, qk_dim] (one latent row per token), got "
            f"shape {tuple(kv_cache.shape)}"
        )
    if cache_dim != qk_dim:
        raise ValueError(
            f"q: expected its width {qk_dim} to equal the cache's row width, got kv_cache of shape "
            f"{tuple(kv_cache.shape)}"
        )
    if isinstance(v_head_dim, bool) or not isinstance(v_head_dim, int) or not 1 <= v_head_dim <= qk_dim:
        raise ValueError(f"v_head_dim: expected an integer in [1, {qk_dim}] (q's width), got {v_head_dim!r}")
    check_tables(block_tables, seq_lens, batch, q.device)
    config = mla_decode_choice(q, kv_cache, v_head_dim).config
    if config["HEAD_BLOCK"] * config["V_PAD"] > _MAX_ACCUMULATOR:
        raise ValueError(
            f"v_head_dim: {v_head_dim} value columns (padded to {config['V_PAD']}) x a tile of "
            f"{config['HEAD_BLOCK']} heads exceed one program's accumulator ({_MAX_ACCUMULATOR} elements; "
            f"a 16-head tile holds {_MAX_ACCUMULATOR // 16} columns)"
        )
    scale = check_softmax_scale(scale, qk_dim)
    kv_scale, scale_in_memory = check_fp8_scale("kv_scale", kv_scale, kv_cache.dtype, q.device)
    head_tiles = triton.cdiv(num_heads, config["HEAD_BLOCK"])
    min_split_tokens = mla_min_split_tokens(
        num_heads, config["HEAD_BLOCK"], qk_dim, v_head_dim, kv_cache.element_size()
    )
    max_context = block_tables.shape[1] * block_size
    splits, forced = plan_splits(num_splits, batch, head_tiles, max_context, q.device, min_split_tokens)
    inputs = {"q": q, "kv_cache": kv_cache, "block_tables": block_tables, "seq_lens": seq_lens}
    buffers = decode_buffers(
        out, workspace, splits, (batch, num_heads, v_head_dim), "[batch, num_heads, v_head_dim]", inputs
    )
    # Head tiles of one (sequence, split) are neighbours on axis 0: they share every row through L2.
    return launch_split_decode(
        _mla_decode_kernel,
        (head_tiles, splits, batch),
        inputs,
        buffers,
        (scale * LOG2_E, kv_scale),
        (splits, forced, min_split_tokens),
        config,
        NUM_HEADS=num_heads,
        HEAD_BLOCK=config["HEAD_BLOCK"],
        QK_DIM=qk_dim,
        V_DIM=v_head_dim,
        V_PAD=config["V_PAD"],
        ROPE_PAD=config["ROPE_PAD"],
        BLOCK_SIZE=block_size,
        SCALE_IN_MEMORY=scale_in_memory,
    )
