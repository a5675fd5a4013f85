"""Paged-attention decode: one new query token per sequence attends to that sequence's whole KV cache.

Layouts:
    q             [batch, num_q_heads, head_dim]   fp16 or bf16
    k_cache       [num_blocks, block_size, num_kv_heads, head_dim]   as write_kv writes it; q's dtype or fp8
    v_cache       same as k_cache
    block_tables  [batch, max_blocks] int32: page i of sequence b is block block_tables[b, i]
    seq_lens      [batch] int32: tokens in each sequence's cache (0 gives zeros)
    out           [batch, num_q_heads, head_dim] in q's dtype

Byte story: a program serves one (sequence, KV head, split) and all the query heads that share the KV head
(GQA/MQA groups), so every K and V byte of the live tokens is read exactly once; slots past a sequence's
length are masked at the load, never read (they may hold NaN). Beside q, K/V and out, a program reads one
block id per page it visits and its sequence's length.

Wide groups: a group whose fp32 accumulator [query heads x head_dim] exceeds one program's registers (64
query heads per KV head of 512, as SGLang's grouped-decode test runs) is cut into head tiles, a power of two
of the group's heads each (32 heads of 512, 64 of 256). Each tile reads its KV head's live rows; the tiles
of one (sequence, KV head, split) are neighbours on grid axis 0, so they run together and the later ones
find the rows in L2: DRAM should see each live byte about once (Nsight Compute can confirm it on a GPU), L2
serves the (tiles - 1) further reads. A group that fits is one tile, launched as it always was.

Long contexts: with few sequences, (sequence, KV head) pairs cannot fill the SMs, so each sequence's tokens
are cut into splits, each program writes its split's normalised partial output and log-sum-exp, and a
second kernel merges them. The launcher bounds the splits from the SM count and the block table's width
(shapes only); each program derives its own sequence's split count from its length on the device, so the
host never reads device data and a CUDA graph captured once stays right for any lengths and block tables.
A sequence with one split writes its output directly. ``num_splits`` forces a split count for every sequence.

fp8 e4m3 caches: K and V are dequantised by their per-tensor scales, folded into the softmax scale (K) and
into the final normalisation (V), so the inner loop only widens fp8 to q's dtype.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import INTERPRETED, _configs
from kernels._checks import (
    check_contiguous,
    check_device,
    check_disjoint,
    check_fp8_scales,
    check_int,
    check_shape,
    check_tensor,
    dtype_name,
    is_positive_finite,
)

Q_DTYPES = (torch.float16, torch.bfloat16)
LOG2_E = 1.4426950408889634

# A split covers at least this many tokens: below it, the merge costs more than the parallelism gains.
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 64
# Largest [query heads x head_dim] accumulator one program keeps in registers: a group that fits takes one
# program, a wider one head tiles of this size.
_MAX_GROUP_X_HEAD_DIM = 64 * 256
# Largest accumulator 4 warps hold (64 fp32 elements a thread) without spilling; larger ones take more warps.
_MAX_FOUR_WARP_ACCUMULATOR = _MAX_GROUP_X_HEAD_DIM // 2
# The dots' smallest M: no head tile is narrower, so a head wider than _MAX_GROUP_X_HEAD_DIM / 16 is refused.
_MIN_HEAD_TILE = 16


@triton.jit
def scale_value(scale, IN_MEMORY: tl.constexpr):
    if IN_MEMORY:
        scale = tl.load(scale)
    return scale


@triton.jit
def splits_of(seq_len, forced_splits, MAX_SPLITS: tl.constexpr, MIN_SPLIT_TOKENS: tl.constexpr):
    """A sequence's split count: forced, or one per MIN_SPLIT_TOKENS tokens up to MAX_SPLITS. The decode
    and merge kernels derive it alike, from the length on the device."""
    if forced_splits > 0:
        return forced_splits
    return tl.minimum(tl.maximum(tl.cdiv(seq_len, MIN_SPLIT_TOKENS), 1), MAX_SPLITS)


@triton.jit
def split_range(
    seq_len,
    split,
    forced_splits,
    BLOCK_N: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    MIN_SPLIT_TOKENS: tl.constexpr,
):
    """(num_splits, start, end): this split's tokens of a sequence. Splits are whole tiles of BLOCK_N, so
    only a split's last tile is ragged; a split at or past num_splits has nothing (the caller returns)."""
    num_splits = splits_of(seq_len, forced_splits, MAX_SPLITS, MIN_SPLIT_TOKENS)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    return num_splits, start, tl.minimum(start + split_len, seq_len)


@triton.jit
def _store_output(out_ptr, head_rows, dims, result, mask, HEAD_DIM: tl.constexpr):
    offsets = head_rows.to(tl.int64)[:, None] * HEAD_DIM + dims[None, :]
    tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_split(
    out_ptr,  # [batch, heads, HEAD_DIM] in q's dtype: sequences with one split
    partial_out_ptr,  # [batch, heads, MAX_SPLITS, HEAD_DIM] fp32
    partial_lse_ptr,  # [batch, heads, MAX_SPLITS] fp32
    acc,  # [rows, dims] fp32: sum of exp2(score - m) x value
    m,  # [rows]: running max of the scaled scores (log2)
    denom,  # [rows]: sum of exp2(score - m)
    value_scale,  # fp8 caches' value scale (1.0 otherwise)
    head_rows,  # [rows]: seq x heads + head
    dims,  # [dims]
    row_mask,
    dim_mask,
    split,
    num_splits,
    HEAD_DIM: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
):
    """A split's normalised result: into out when its sequence has one split, else into the partials with
    its log2-sum-exp2 for the merge. An empty sequence (or split) has denom == 0: its output is 0 and its
    log-sum-exp -inf, never NaN."""
    safe_denom = tl.where(denom > 0, denom, 1.0)
    result = acc * (value_scale / safe_denom)[:, None]
    mask = row_mask[:, None] & dim_mask[None, :]
    if MAX_SPLITS == 1:
        _store_output(out_ptr, head_rows, dims, result, mask, HEAD_DIM)
    elif num_splits == 1:
        _store_output(out_ptr, head_rows, dims, result, mask, HEAD_DIM)
    else:
        partial_rows = head_rows.to(tl.int64) * MAX_SPLITS + split
        tl.store(partial_out_ptr + partial_rows[:, None] * HEAD_DIM + dims[None, :], result, mask=mask)
        lse = tl.where(denom > 0, m + tl.log2(safe_denom), float("-inf"))
        tl.store(partial_lse_ptr + partial_rows, lse, mask=row_mask)


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [batch, num_q_heads, head_dim], strides (stride_q_seq, stride_q_head, 1)
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    block_tables_ptr,  # [batch, max_blocks] int32, row stride stride_table
    seq_lens_ptr,  # [batch] int32
    out_ptr,  # [batch, num_q_heads, head_dim], contiguous: sequences with one split
    partial_out_ptr,  # [batch, num_q_heads, MAX_SPLITS, head_dim] fp32: normalised output of each split
    partial_lse_ptr,  # [batch, num_q_heads, MAX_SPLITS] fp32: log2-sum-exp2 of each split's scores
    softmax_scale_log2,  # scale * log2(e): scores go through exp2
    k_scale,  # fp32 per-tensor scale: a value, or a [1] fp32 pointer when SCALES_IN_MEMORY
    v_scale,
    forced_splits,  # > 0: every sequence takes this many splits; 0: each derives its own from its length
    stride_q_seq,
    stride_q_head,
    stride_table,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_TILE: tl.constexpr,  # query heads a program serves, the dots' M: a power of two >= 16
    HEAD_TILES: tl.constexpr,  # head tiles per group, cdiv(GROUP, HEAD_TILE); 1 when the group fits
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # power of two >= max(HEAD_DIM, 16)
    BLOCK_SIZE: tl.constexpr,  # tokens per cache page
    BLOCK_N: tl.constexpr,  # tokens per loop iteration
    MAX_SPLITS: tl.constexpr,  # splits the grid provides per sequence; 1 compiles the merge out
    MIN_SPLIT_TOKENS: tl.constexpr,
    SCALES_IN_MEMORY: tl.constexpr,
    INTERPRETER_UPCAST: tl.constexpr,  # interpreter only: bf16 dots are wrong there, so dot in fp32
):
    # Axis 0 is (sequence, head tile), tiles innermost: the tiles of one KV head's rows run side by side.
    seq = tl.program_id(0) // HEAD_TILES
    head_tile = (tl.program_id(0) % HEAD_TILES).to(tl.int64)  # int64: it scales head offsets
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    num_splits, start, end = split_range(seq_len, split, forced_splits, BLOCK_N, MAX_SPLITS, MIN_SPLIT_TOKENS)
    if split >= num_splits:
        return

    group = head_tile * HEAD_TILE + tl.arange(0, HEAD_TILE)
    dims = tl.arange(0, HEAD_DIM_PAD)
    heads = kv_head * GROUP + group
    group_mask = group < GROUP
    dim_mask = dims < HEAD_DIM
    q_offsets = seq.to(tl.int64) * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=group_mask[:, None] & dim_mask[None, :], other=0.0)
    if INTERPRETER_UPCAST:
        q = q.to(tl.float32)
    dot_dtype = q.dtype
    qk_scale = softmax_scale_log2 * scale_value(k_scale, SCALES_IN_MEMORY)

    m = tl.full([HEAD_TILE], float("-inf"), dtype=tl.float32)  # running max of scaled scores (log2)
    denom = tl.zeros([HEAD_TILE], dtype=tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([HEAD_TILE, HEAD_DIM_PAD], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    head_offset = kv_head * HEAD_DIM
    for tile in range(start, end, BLOCK_N):
        tokens = tile + tl.arange(0, BLOCK_N)
        live = tokens < end
        # Lanes of one page name the same table entry: one transaction per page.
        block = tl.load(table + tokens // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
        rows = block * BLOCK_SIZE + tokens % BLOCK_SIZE
        kv_offsets = rows[:, None] * (NUM_KV_HEADS * HEAD_DIM) + head_offset + dims[None, :]
        kv_mask = live[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(dot_dtype)
        scores = tl.dot(q, tl.trans(k)) * qk_scale  # [HEAD_TILE, BLOCK_N] fp32
        scores = tl.where(live[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(dot_dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), v)
        m = m_new

    head_rows = seq.to(tl.int64) * (NUM_KV_HEADS * GROUP) + heads
    v_scale = scale_value(v_scale, SCALES_IN_MEMORY)
    store_split(
        out_ptr,
        partial_out_ptr,
        partial_lse_ptr,
        acc,
        m,
        denom,
        v_scale,
        head_rows,
        dims,
        group_mask,
        dim_mask,
        split,
        num_splits,
        HEAD_DIM,
        MAX_SPLITS,
    )


@triton.jit
def _merge_splits_kernel(
    seq_lens_ptr,  # [batch] int32
    partial_out_ptr,  # [batch, num_q_heads, MAX_SPLITS, head_dim] fp32
    partial_lse_ptr,  # [batch, num_q_heads, MAX_SPLITS] fp32 (log2 domain)
    out_ptr,  # [batch, num_q_heads, head_dim], contiguous
    forced_splits,
    NUM_Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_BLOCK: tl.constexpr,  # head_dim columns a program merges (grid axis 2 covers head_dim)
    MAX_SPLITS: tl.constexpr,  # splits per sequence in the partial buffers
    SPLITS_PAD: tl.constexpr,  # power of two >= MAX_SPLITS
    MIN_SPLIT_TOKENS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    dim_block = tl.program_id(2)
    num_splits = splits_of(tl.load(seq_lens_ptr + seq), forced_splits, MAX_SPLITS, MIN_SPLIT_TOKENS)
    if num_splits == 1:
        return  # the decode kernel wrote this sequence's output itself

    splits = tl.arange(0, SPLITS_PAD)
    dims = dim_block * DIM_BLOCK + tl.arange(0, DIM_BLOCK)
    row = seq.to(tl.int64) * NUM_Q_HEADS + head
    lse = tl.load(partial_lse_ptr + row * MAX_SPLITS + splits, mask=splits < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    # All splits empty (a zero-length sequence under forced splits): weights 0, output 0, no inf - inf.
    lse_max = tl.where(lse_max > float("-inf"), lse_max, 0.0)
    weights = tl.exp2(lse - lse_max)
    total = tl.sum(weights, axis=0)
    weights = weights / tl.where(total > 0, total, 1.0)
    live = (splits < num_splits) & (weights > 0)
    offsets = (row * MAX_SPLITS + splits)[:, None] * HEAD_DIM + dims[None, :]
    partial = tl.load(partial_out_ptr + offsets, mask=live[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    merged = tl.sum(partial * weights[:, None], axis=0)
    tl.store(out_ptr + row * HEAD_DIM + dims, merged.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


# Largest [splits x head_dim columns] tile of fp32 partials one merge program holds (64 registers a thread).
_MAX_MERGE_TILE = 8192


def merge_dim_block(splits: int, head_dim: int) -> int:
    """Head_dim columns one merge program takes: all of a head up to 8K partial elements, fewer (a grid axis
    over the columns) for many splits of wide heads (MLA's 512-wide output under 64 splits)."""
    splits_pad = triton.next_power_of_2(splits)
    return max(16, min(triton.next_power_of_2(head_dim), _MAX_MERGE_TILE // splits_pad))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs on ``device``; in the interpreter, an H100's 132 so launch decisions match the GPU's."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def max_splits_for(
    batch: int, num_kv_heads: int, max_context: int, sms: int, min_split_tokens: int = MIN_SPLIT_TOKENS
) -> int:
    """Splits per sequence the grid provides: enough (sequence, KV head, split) programs for two per SM,
    no more than the widest possible context can fill with ``min_split_tokens`` each; a power of two, so
    few variants compile. Shapes only: the lengths themselves stay on the device."""
    wanted = triton.cdiv(2 * sms, max(1, batch * num_kv_heads))
    fillable = max(1, triton.cdiv(max_context, min_split_tokens))
    return min(triton.next_power_of_2(min(wanted, fillable)), MAX_SPLITS)


def decode_warps(accumulator: int, cache_bytes: int) -> int:
    """Warps of a decode program whose fp32 accumulator holds ``accumulator`` elements (its head tile x
    head_dim, padded). sm_90 compiles (Triton 3.9), registers bf16 / fp8, 0 stack unless said:
    - up to _MAX_FOUR_WARP_ACCUMULATOR, 4 warps: 16x512 194 / 252, 32x256 140 / 168, 64x128 125 / 128;
    - a full _MAX_GROUP_X_HEAD_DIM on 4 warps uses stack: 88 / 80 B at 32x512, 272 / 248 B at 16x1024,
      24 B at 128x128 fp8. It takes 16 warps, 32 accumulator elements a thread as in mla_decode's 32-head
      tiles (32x512 94, 16x1024 105, 64x256 108, 128x128 92); fp8 caches 8, where 16 left stack (16 B at
      32x512, 160 B at 64x256) and 8 does not (32x512 173, 16x1024 249, 64x256 182, 128x128 127)."""
    if accumulator <= _MAX_FOUR_WARP_ACCUMULATOR:
        return 4
    return 16 if cache_bytes > 1 else 8


def paged_decode_launch_config(group: int, head_dim: int, cache_bytes: int) -> dict:
    """Head tile, token tile, warps and pipeline depth of the decode kernel.

    A group whose [group x head_dim] fp32 accumulator fits _MAX_GROUP_X_HEAD_DIM is one head tile; 64
    tokens a tile keeps a 128-wide bf16 K tile at 16 KB, wider heads or groups take 32. A wider group takes
    head tiles of _MAX_GROUP_X_HEAD_DIM elements (32 heads of 512, 64 of 256). Warps follow the tile's
    accumulator (decode_warps): 4 for every group up to half the limit, 16 (fp8: 8) for a full tile, one
    group (32 heads of 512, 16 of 1024) or a head tile. 16-bit caches pipeline their loads two deep
    (cp.async, 16 bytes a lane); fp8 caches load directly: pipelined, Triton moves fp8 tiles 8 bytes a
    lane, unpipelined 16, and with fewer registers (see the static report).
    """
    group_pad = max(_MIN_HEAD_TILE, triton.next_power_of_2(group))
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    stages = 1 if cache_bytes == 1 else 2
    if group_pad * head_dim_pad <= _MAX_GROUP_X_HEAD_DIM:
        block_n = 64 if head_dim_pad <= 128 and group_pad <= 32 else 32
        return {
            "HEAD_TILE": group_pad,
            "HEAD_DIM_PAD": head_dim_pad,
            "BLOCK_N": block_n,
            "num_warps": decode_warps(group_pad * head_dim_pad, cache_bytes),
            "num_stages": stages,
        }
    head_tile = max(_MIN_HEAD_TILE, _MAX_GROUP_X_HEAD_DIM // head_dim_pad)
    return {
        "HEAD_TILE": head_tile,
        "HEAD_DIM_PAD": head_dim_pad,
        "BLOCK_N": 32,
        "num_warps": decode_warps(head_tile * head_dim_pad, cache_bytes),
        "num_stages": stages,
    }


#: Knobs of paged_decode_launch_config a per-GPU table (kernels/configs/) may override.
TUNABLE = ("BLOCK_N", "num_warps", "num_stages")


def paged_decode_config_key(q_dtype: torch.dtype, cache_dtype: torch.dtype, group: int, head_dim: int) -> str:
    """The shape key of a launch in the per-GPU tables: what the launch configuration depends on (lengths,
    batch and page size do not change the best tile; the split count follows from them on its own)."""
    return f"q={dtype_name(q_dtype)} kv={dtype_name(cache_dtype)} group={group} head_dim={head_dim}"


def paged_decode_choice(q: torch.Tensor, k_cache: torch.Tensor) -> _configs.LaunchChoice:
    """The launch configuration paged_decode takes for these inputs (metadata only) and where it came from:
    the running GPU's tuned table when it has an entry for the key, the heuristic otherwise."""
    group = q.shape[1] // max(1, k_cache.shape[2])
    head_dim = q.shape[2]
    heuristic = paged_decode_launch_config(group, head_dim, k_cache.element_size())
    key = paged_decode_config_key(q.dtype, k_cache.dtype, group, head_dim)
    return _configs.choose("paged_decode", key, q.device, heuristic, TUNABLE)


@dataclass(frozen=True)
class PagedDecodeWorkspace:
    """Split-KV scratch owned by the caller: a serving engine allocates it once and passes it to every
    step, so a decode step (and a CUDA graph captured around it) allocates nothing.

    Invariants: both fp32, contiguous, on one device; room for ``batch x num_q_heads x max_splits`` partial
    rows of head_dim (partial_out) and as many log-sum-exps (partial_lse). A launch uses the leading part
    for its own split count, so a workspace sized for more sequences, heads or splits serves smaller calls.
    """

    partial_out: torch.Tensor  # fp32 [batch, num_q_heads, max_splits, head_dim]
    partial_lse: torch.Tensor  # fp32 [batch, num_q_heads, max_splits]

    @property
    def rows(self) -> int:
        """Partial rows (one per sequence, query head and split) it holds."""
        return self.partial_lse.numel()


def paged_decode_workspace(
    batch: int, num_q_heads: int, head_dim: int, *, max_splits: int = MAX_SPLITS, device=None
) -> PagedDecodeWorkspace:
    """A workspace for up to ``batch`` sequences of ``num_q_heads`` heads. The launcher takes at most
    MAX_SPLITS splits; ``max_splits_for(batch, num_kv_heads, block_table_width * block_size, sm_count)``
    gives the count it takes for a block table of that width (a group served in head tiles, more programs
    a sequence, takes at most that), or pass num_splits to the call; a caller may size for either instead
    to hold less."""
    device = check_workspace_args(
        batch, ("num_q_heads", num_q_heads), ("head_dim", head_dim), max_splits, device
    )
    check_int("head_dim", head_dim, 1, _MAX_GROUP_X_HEAD_DIM // _MIN_HEAD_TILE)  # what paged_decode takes
    return PagedDecodeWorkspace(
        torch.empty(batch, num_q_heads, max_splits, head_dim, dtype=torch.float32, device=device),
        torch.empty(batch, num_q_heads, max_splits, dtype=torch.float32, device=device),
    )


def check_workspace_args(batch, heads: tuple, width: tuple, max_splits, device) -> torch.device:
    """A workspace constructor's arguments, ``heads`` and ``width`` as (its name, value): sizes some decode
    call can use (a batch may be empty; heads and width not), the resolved device."""
    check_int("batch", batch, 0)
    check_int(*heads, 1)
    check_int(*width, 1)
    check_int("max_splits", max_splits, 1, MAX_SPLITS)
    return check_device("device", device)


def check_workspace(workspace, rows: int, head_dim: int, device: torch.device) -> None:
    """A given workspace holds ``rows`` partial rows of ``head_dim`` fp32 on ``device`` (metadata only)."""
    if not isinstance(workspace, PagedDecodeWorkspace):
        raise ValueError(
            "workspace: expected a PagedDecodeWorkspace (see paged_decode_workspace), got "
            f"{type(workspace).__name__}"
        )
    for name, tensor, needed in (
        ("partial_out", workspace.partial_out, rows * head_dim),
        ("partial_lse", workspace.partial_lse, rows),
    ):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32 or tensor.device != device:
            got = (
                f"{dtype_name(tensor.dtype)} on {tensor.device}"
                if isinstance(tensor, torch.Tensor)
                else type(tensor).__name__
            )
            raise ValueError(f"workspace: expected {name} an fp32 tensor on {device}, got {got}")
        if not tensor.is_contiguous() or tensor.numel() < needed:
            raise ValueError(
                f"workspace: {name} holds {tensor.numel()} elements (contiguous: {tensor.is_contiguous()}); "
                f"this call needs {needed} contiguous (batch x num_q_heads x splits"
                f"{' x head_dim' if name == 'partial_out' else ''})"
            )


def decode_out(out, shape: tuple, q: torch.Tensor, what: str) -> torch.Tensor:
    """The caller's ``out`` (checked: 3-D, q's dtype and device, ``shape``, contiguous) or a fresh one."""
    if out is None:
        return torch.empty(shape, dtype=q.dtype, device=q.device)
    check_tensor("out", out, ndim=3, dtypes=(q.dtype,), device=q.device)
    check_shape("out", out, shape, what)
    check_contiguous("out", out)
    return out


def check_decode_memory(out: torch.Tensor | None, workspace, inputs: dict) -> None:
    """What a decode writes into caller-owned memory (``out`` as given, and a given workspace's partials)
    shares no memory with anything else it writes or with its ``inputs`` (name -> tensor), from metadata
    only: partials over each other gave inf, and an out over q or a cache would change what later programs
    read. ``out`` None: the launcher allocates it, so it overlaps nothing (the check, a few microseconds of
    host time, is skipped with it on the plain eager path). Run after check_workspace."""
    if out is None and workspace is None:
        return
    written = {"out": out}
    if workspace is not None:
        written["workspace.partial_out"] = workspace.partial_out
        written["workspace.partial_lse"] = workspace.partial_lse
    check_disjoint(written, inputs)


def check_tables(block_tables, seq_lens, batch: int, device: torch.device) -> None:
    """Metadata of a decode batch's block tables [batch, max_blocks] int32 (rows contiguous) and lengths
    [batch] int32 (contiguous), on ``device``; no device data read."""
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=device)
    check_shape("block_tables", block_tables, (batch, None), "[batch, max_blocks]")
    if block_tables.stride(1) != 1 and block_tables.shape[1] > 1:
        raise ValueError(
            f"block_tables: expected rows contiguous (stride 1), got strides {block_tables.stride()}"
        )
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=device)
    check_shape("seq_lens", seq_lens, (batch,), "[batch]")
    check_contiguous("seq_lens", seq_lens)


def check_softmax_scale(scale, width: int) -> float:
    """The softmax scale: ``width ** -0.5`` when None, else a positive finite float."""
    if scale is None:
        return width**-0.5
    if not is_positive_finite(scale):
        raise ValueError(f"scale: expected a positive finite float, got {scale!r}")
    return scale


def plan_splits(
    num_splits, batch: int, programs: int, max_context: int, device, min_split_tokens: int = MIN_SPLIT_TOKENS
) -> tuple[int, int]:
    """(splits the grid provides, forced splits or 0) for a decode of ``batch`` sequences of ``programs``
    programs each: ``num_splits`` forces a count (checked), None derives it from shapes (max_splits_for)."""
    if num_splits is None:
        return max_splits_for(batch, programs, max_context, sm_count(device), min_split_tokens), 0
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits: expected None or an integer in [1, {MAX_SPLITS}], got {num_splits!r}")
    return num_splits, num_splits


def split_partials(workspace, out: torch.Tensor, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial_out, partial_lse) for ``out`` [batch, heads, head_dim] under ``splits``: the caller's
    workspace (checked, metadata only), fresh fp32 buffers without one, or ``out`` itself for one split
    (never touched: MAX_SPLITS == 1 compiles the partial stores out)."""
    batch, heads, head_dim = out.shape
    if workspace is not None:
        check_workspace(workspace, batch * heads * splits, head_dim, out.device)
    if splits == 1:
        return out, out
    if workspace is not None:
        return workspace.partial_out, workspace.partial_lse
    return (
        torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=out.device),
        torch.empty(batch, heads, splits, dtype=torch.float32, device=out.device),
    )


def decode_buffers(out, workspace, splits: int, shape: tuple, what: str, inputs: dict):
    """(out, partial_out, partial_lse) for a decode of ``splits`` splits: the caller's ``out`` or a fresh one
    in q's dtype (decode_out; q is ``inputs["q"]``), its partials (split_partials), and the check that the
    caller-owned memory it writes overlaps none of its ``inputs`` (check_decode_memory); metadata only."""
    written = decode_out(out, shape, inputs["q"], what)
    partial_out, partial_lse = split_partials(workspace, written, splits)
    check_decode_memory(out, workspace, inputs)
    return written, partial_out, partial_lse


def merge_splits(seq_lens, partial_out, partial_lse, out, forced: int, splits: int, min_split_tokens: int):
    """Launches the merge of a split decode's partials into ``out`` [batch, heads, head_dim] (sequences
    with one split were written by the decode kernel and are skipped on the device)."""
    batch, heads, head_dim = out.shape
    dim_block = merge_dim_block(splits, head_dim)
    _merge_splits_kernel[(batch, heads, triton.cdiv(head_dim, dim_block))](
        seq_lens,
        partial_out,
        partial_lse,
        out,
        forced,
        NUM_Q_HEADS=heads,
        HEAD_DIM=head_dim,
        DIM_BLOCK=dim_block,
        MAX_SPLITS=splits,
        SPLITS_PAD=triton.next_power_of_2(splits),
        MIN_SPLIT_TOKENS=min_split_tokens,
        num_warps=4,
    )


def launch_split_decode(
    kernel, grid, inputs: dict, buffers, scales: tuple, split_plan: tuple, config, **constants
):
    """Launches a split-KV decode kernel, paged_decode's or mla_decode's, and past one split the merge of its
    partials; returns out. The two kernels share their leading arguments: ``inputs`` (q first, the caches,
    block_tables, seq_lens, in the kernel's order), out and its partials (``buffers``, as decode_buffers
    returns them), ``scales`` (the log2 softmax scale, then the cache scales), the forced split count, and
    q's and the table's strides. split_plan: (splits, forced, min_split_tokens); ``constants``: the
    kernel's own compile-time shape arguments. A batch of none launches nothing."""
    q, block_tables, seq_lens = inputs["q"], inputs["block_tables"], inputs["seq_lens"]
    out, partial_out, partial_lse = buffers
    splits, forced, min_split_tokens = split_plan
    if q.shape[0] == 0:
        return out
    kernel[grid](
        *inputs.values(),
        out,
        partial_out,
        partial_lse,
        *scales,
        forced,
        q.stride(0),
        q.stride(1),
        block_tables.stride(0),
        **constants,
        BLOCK_N=config["BLOCK_N"],
        MAX_SPLITS=splits,
        MIN_SPLIT_TOKENS=min_split_tokens,
        INTERPRETER_UPCAST=INTERPRETED,
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    if splits > 1:
        merge_splits(seq_lens, partial_out, partial_lse, out, forced, splits, min_split_tokens)
    return out


def check_paged_shapes(q, k_cache, v_cache) -> tuple[int, int, int, int, int]:
    """Metadata of q [batch, num_q_heads, head_dim] and the caches [num_blocks, block_size, num_kv_heads,
    head_dim] against each other; returns (batch, num_q_heads, head_dim, block_size, num_kv_heads)."""
    check_tensor("q", q, ndim=3, dtypes=Q_DTYPES)
    batch, num_q_heads, head_dim = q.shape
    if q.stride(2) != 1 and head_dim > 1:  # a size-1 dimension's stride is never used
        raise ValueError(f"q: expected head_dim contiguous (stride 1), got strides {q.stride()}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, cache, ndim=4, dtypes=(q.dtype, torch.float8_e4m3fn), device=q.device)
        check_contiguous(name, cache)
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if num_q_heads == 0 or head_dim == 0:
        raise ValueError(f"q: expected num_q_heads and head_dim >= 1, got shape {tuple(q.shape)}")
    if block_size == 0 or num_kv_heads == 0:
        raise ValueError(
            f"k_cache: expected block_size and num_kv_heads >= 1, got shape {tuple(k_cache.shape)}"
        )
    if cache_head_dim != head_dim:
        raise ValueError(f"k_cache: expected head_dim {head_dim} (as q), got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"v_cache: expected k_cache's shape {tuple(k_cache.shape)} and dtype "
            f"{dtype_name(k_cache.dtype)}, got {tuple(v_cache.shape)} and {dtype_name(v_cache.dtype)}"
        )
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"q: num_q_heads {num_q_heads} is not a multiple of the caches' num_kv_heads {num_kv_heads}"
        )
    return batch, num_q_heads, head_dim, block_size, num_kv_heads


def paged_decode(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    *,
    scale=None,
    k_scale=None,
    v_scale=None,
    num_splits=None,
    out=None,
    workspace=None,
) -> torch.Tensor:
    """Decode attention of q against each sequence's paged K/V; returns out [batch, num_q_heads, head_dim].

    Validates metadata only; ``check_paged_inputs`` checks lengths and block ids against the cache (it reads
    device data, so call it outside timed and captured paths). ``workspace`` (paged_decode_workspace) holds
    the split partials; with it and ``out`` given, the call allocates nothing (a serving engine's graph path).
    out and the partials may share no memory with each other or with the inputs (checked from metadata).
    """
    batch, num_q_heads, head_dim, block_size, num_kv_heads = check_paged_shapes(q, k_cache, v_cache)
    group = num_q_heads // num_kv_heads
    check_tables(block_tables, seq_lens, batch, q.device)
    config = paged_decode_choice(q, k_cache).config
    if config["HEAD_TILE"] * config["HEAD_DIM_PAD"] > _MAX_GROUP_X_HEAD_DIM:
        raise ValueError(
            f"q: head_dim {head_dim} exceeds what one program holds ({_MAX_GROUP_X_HEAD_DIM} accumulator "
            f"elements at {_MIN_HEAD_TILE} query heads, the fewest a program serves)"
        )
    head_tiles = triton.cdiv(group, config["HEAD_TILE"])
    scale = check_softmax_scale(scale, head_dim)
    k_scale, v_scale, scales_in_memory = check_fp8_scales(k_scale, v_scale, k_cache.dtype, q.device)
    splits, forced = plan_splits(
        num_splits, batch, num_kv_heads * head_tiles, block_tables.shape[1] * block_size, q.device
    )
    inputs = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens)
    buffers = decode_buffers(out, workspace, splits, tuple(q.shape), "like q", inputs)
    # Head tiles of one (sequence, KV head, split) are neighbours on axis 0: they share its rows through L2.
    return launch_split_decode(
        _paged_decode_kernel,
        (batch * head_tiles, num_kv_heads, splits),
        inputs,
        buffers,
        (scale * LOG2_E, k_scale, v_scale),
        (splits, forced, MIN_SPLIT_TOKENS),
        config,
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        HEAD_TILE=config["HEAD_TILE"],
        HEAD_TILES=head_tiles,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=config["HEAD_DIM_PAD"],
        BLOCK_SIZE=block_size,
        SCALES_IN_MEMORY=scales_in_memory,
    )


def check_paged_inputs(k_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Opt-in checks that read device data (so they sync): every length fits the block table's width and
    every block id a sequence uses lies in [0, num_blocks). Keep it off timed and captured paths."""
    check_tensor("k_cache", k_cache, ndim=4)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=k_cache.device)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=k_cache.device)
    check_shape("seq_lens", seq_lens, (block_tables.shape[0],), "[batch] like block_tables")
    num_blocks, block_size = k_cache.shape[:2]
    if block_size == 0:
        raise ValueError(f"k_cache: expected block_size >= 1, got shape {tuple(k_cache.shape)}")
    capacity = block_tables.shape[1] * block_size
    lens = seq_lens.long()
    if bool((lens < 0).any()) or bool((lens > capacity).any()):
        bad = int(lens[(lens < 0) | (lens > capacity)][0])
        raise ValueError(
            f"seq_lens: expected lengths in [0, {capacity}] (block table width x block_size), got {bad}"
        )
    pages_used = (lens + block_size - 1) // block_size
    used = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] < pages_used[:, None]
    ids = block_tables[used].long()
    if bool(((ids < 0) | (ids >= num_blocks)).any()):
        bad = int(ids[(ids < 0) | (ids >= num_blocks)][0])
        raise ValueError(
            f"block_tables: expected block ids in [0, {num_blocks}) for the pages in use, got {bad}"
        )
