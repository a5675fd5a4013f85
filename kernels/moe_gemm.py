"""Grouped expert GEMM: every expert's rows of a dispatch plan times that expert's weights, in one launch.

Layouts:
    a        gather=False: dispatch's x_sorted [max_rows, K], rows grouped by expert as the plan says
             gather=True:  the tokens' x [tokens, K]; row r of the product reads a[plan.row_token[r]]
    w        [E, N, K] (out x in, as nn.Linear): bf16 or fp16 (a's dtype), or float8_e4m3fn with
    w_scale  [E, cdiv(N, 128), cdiv(K, 128)] fp32: DeepSeek-V3's 128 x 128 block scales, each block of w
             dequantised as w x its scale
    plan     kernels.moe.DispatchPlan: expert e's rows are expert_offsets[e] + [0, tokens_per_expert[e])
    out      [max_rows, N] in a's dtype; [max_rows, N // 2] for activation="silu_and_mul", where
             out = silu(a @ w[:, :N // 2].T) * (a @ w[:, N // 2:].T) (gate then up, vLLM's w13 layout)

Rows whose row_token is -1 (an expert's alignment padding, rows past the last segment) are not written.

Tiles follow the segments, not the row grid: expert e takes cdiv(tokens_per_expert[e], BLOCK_M) M tiles,
whatever the plan's alignment, and a program finds its expert by a prefix sum of those tile counts over the
plan's counts, on the device. The grid is sized from shapes alone (tokens x top_k // BLOCK_M plus one tile per
expert that may be touched), so the launcher reads no device data; programs past the last tile return at once.
An untouched expert has no tile: no program reads its weights. At decode each touched expert is one M tile and
its [N, K] weights are read once (each N tile's rows by one program). At prefill the grid runs in groups of
GROUP_M M tiles that sweep every N tile together (the grouped order of Triton's matmul tutorial): a group's
rows stay in L2 while its N tiles read them, and each weight tile serves the group's M tiles from L2, so DRAM
should see the rows about once and the weights about once a group (arithmetic, not measured: no GPU has run
it). M tiles first for each N tile, the old order, read the rows again for every N tile: by the same
arithmetic 32 times at DeepSeek-R1's gate-up, 30 GB for a rank's 8K-token EP8 prefill where the byte model
has 2. Each output
element is one program's fp32 dot over K in a fixed order: no atomics, bit-identical runs. gather=True reads
each token's row straight from x (dispatch's copy is skipped: kernels.moe.dispatch_plan gives the plan alone).

fp8 weights (DeepSeek-V3, arXiv:2412.19437): a K step never crosses a 128-column scale block (BLOCK_K
divides 128), so the step's dot of a with the fp8 tile (widened to a's dtype, which holds every e4m3
value) takes one scale per output row after it, in fp32.

Byte and FLOP model (bench/operators/moe_gemm.py holds it: byte_model, flop_model), with R = the rows
routed (real rows: tokens x top_k less dropped choices) and T = the experts touched:
    bytes = T x N x K x w_bytes (+ T x cdiv(N, 128) x cdiv(K, 128) x 4 for fp8 scales)
            + R x K x a_bytes (rows read; gather=True reads each token's row top_k times, from L2 after
              the first) + R x N_out x a_bytes (rows written)
    FLOPs = 2 x R x N x K (N the weight's rows: silu_and_mul counts the gate and the up halves)
At decode the weights dominate: DeepSeek-R1's gate-up at one token reads 8 experts x 4096 x 7168 fp8 bytes
(235 MB) for 2 x 8 x 4096 x 7168 FLOPs, 2 FLOPs a weight byte (one a bf16 byte), where an H200 balances
about 200 (990 dense bf16 TFLOP/s over 4.8 TB/s): the GEMM runs at memory bandwidth until each touched
expert holds about a hundred rows (two hundred with bf16 weights).
"""

import torch
import triton
import triton.language as tl

from kernels import INTERPRETED, _configs
from kernels._checks import check_contiguous, check_disjoint, check_tensor, dtype_name
from kernels.moe import DispatchPlan, max_rows

A_DTYPES = (torch.float16, torch.bfloat16)
FP8 = torch.float8_e4m3fn
ACTIVATIONS = (None, "silu_and_mul")
#: DeepSeek-V3's weight block: one fp32 scale per 128 output rows x 128 input columns.
SCALE_BLOCK = 128
# M tiles a launch group sweeps the N tiles with (the module docstring): Triton's matmul tutorial's 8.
_GROUP_M = 8


@triton.jit
def _accumulate_tile(acc, x, w_rows, w_scales, ks, k0, w_mask, col_live, FP8: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += x [BLOCK_M, BLOCK_K] @ the weight tile at w_rows (one pointer a column)
    and ks, transposed; fp8 weights scaled by their 128-wide K block's scale, one a column."""
    w = tl.load(w_rows[:, None] + ks[None, :], mask=w_mask, other=0.0).to(x.dtype)
    if FP8:
        scale = tl.load(w_scales + k0 // 128, mask=col_live, other=0.0)
        acc += tl.dot(x, tl.trans(w)) * scale[None, :]
    else:
        acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # [max_rows, K] (or [tokens, K] when GATHER), row stride stride_a, columns contiguous
    w_ptr,  # [NUM_EXPERTS, N, K] contiguous; N = 2 x N_OUT when SILU_AND_MUL, else N_OUT
    w_scale_ptr,  # [NUM_EXPERTS, cdiv(N, 128), cdiv(K, 128)] fp32, contiguous; read only when FP8
    tokens_per_expert_ptr,  # [NUM_EXPERTS] int32
    expert_offsets_ptr,  # [NUM_EXPERTS + 1] int32
    row_token_ptr,  # [max_rows] int32: a row's token, -1 for padding
    out_ptr,  # [max_rows, N_OUT] contiguous, in a's dtype
    N_OUT,
    K,
    stride_a,
    m_tiles,  # the grid's M tiles (a bound from shapes: programs past the plan's last tile return)
    NUM_EXPERTS: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,  # power of two >= NUM_EXPERTS
    GATHER: tl.constexpr,  # a is x: row r reads a[row_token[r]]
    SILU_AND_MUL: tl.constexpr,  # two accumulators (gate, up); out = silu(gate) * up
    FP8: tl.constexpr,  # w is fp8 e4m3 with 128 x 128 block scales
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides 128 when FP8: a K step stays inside one scale block
    GROUP_M: tl.constexpr,  # M tiles that sweep the N tiles together (the module docstring)
    INTERPRETER_UPCAST: tl.constexpr,  # interpreter only: bf16 dots are wrong there, so dot in fp32
):
    # This M tile's expert: experts take cdiv(count, BLOCK_M) tiles each, in expert order.
    experts = tl.arange(0, EXPERTS_PAD)
    counts = tl.load(tokens_per_expert_ptr + experts, mask=experts < NUM_EXPERTS, other=0)
    tiles = tl.cdiv(counts, BLOCK_M)
    tile_ends = tl.cumsum(tiles, axis=0)
    # One grid axis, in groups: GROUP_M M tiles (fewer in the last group) take each N tile in turn.
    pid = tl.program_id(0)
    per_group = GROUP_M * tl.cdiv(N_OUT, BLOCK_N)
    first = (pid // per_group) * GROUP_M
    group_m = tl.minimum(m_tiles - first, GROUP_M)
    tile = first + (pid % per_group) % group_m
    n_tile = (pid % per_group) // group_m
    if tile >= tl.sum(tiles, axis=0):
        return  # past the last segment's tiles: the grid's bound is loose by design
    expert = tl.sum((tile_ends <= tile).to(tl.int32), axis=0)
    mine = experts == expert
    first_tile = tl.sum(tl.where(mine, tile_ends - tiles, 0), axis=0)
    count = tl.sum(tl.where(mine, counts, 0), axis=0)

    local = (tile - first_tile).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(expert_offsets_ptr + expert) + local
    tokens = tl.load(row_token_ptr + rows, mask=local < count, other=-1)
    row_live = tokens >= 0
    if GATHER:
        a_rows = a_ptr + tokens.to(tl.int64) * stride_a
    else:
        a_rows = a_ptr + rows.to(tl.int64) * stride_a

    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_live = cols < N_OUT
    n_rows = N_OUT * 2 if SILU_AND_MUL else N_OUT
    w_expert = w_ptr + expert.to(tl.int64) * n_rows * K
    gate_rows = w_expert + cols.to(tl.int64) * K
    up_rows = w_expert + (cols + N_OUT).to(tl.int64) * K
    scale_k_blocks = tl.cdiv(K, 128)
    scale_expert = w_scale_ptr + expert.to(tl.int64) * tl.cdiv(n_rows, 128) * scale_k_blocks
    gate_scales = scale_expert + (cols // 128) * scale_k_blocks
    up_scales = scale_expert + ((cols + N_OUT) // 128) * scale_k_blocks

    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_live = ks < K
        x = tl.load(a_rows[:, None] + ks[None, :], mask=row_live[:, None] & k_live[None, :], other=0.0)
        if INTERPRETER_UPCAST:
            x = x.to(tl.float32)  # and every weight tile with it (.to(x.dtype))
        w_mask = col_live[:, None] & k_live[None, :]
        gate = _accumulate_tile(gate, x, gate_rows, gate_scales, ks, k0, w_mask, col_live, FP8)
        if SILU_AND_MUL:
            up = _accumulate_tile(up, x, up_rows, up_scales, ks, k0, w_mask, col_live, FP8)

    result = gate
    if SILU_AND_MUL:
        result = gate * tl.sigmoid(gate) * up
    out = out_ptr + rows.to(tl.int64)[:, None] * N_OUT + cols[None, :]
    tl.store(out, result.to(out_ptr.dtype.element_ty), mask=row_live[:, None] & col_live[None, :])


#: Knobs of grouped_gemm_launch_config a per-GPU table (kernels/configs/) may override.
TUNABLE = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def grouped_gemm_launch_config(rows_per_expert: int) -> dict:
    """Tiles, warps and pipeline depth. BLOCK_M follows the rows an expert gets on average (shapes only:
    tokens x top_k / experts): 16, the dots' smallest M, at decode, up to 64 at prefill, so a decode step's
    tile wastes few rows. 64 x 64 weight tiles, three deep: 16-byte loads of contiguous K."""
    block_m = min(64, max(16, triton.next_power_of_2(max(1, rows_per_expert))))
    return {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def grouped_gemm_choice(a, w, plan: DispatchPlan, activation) -> _configs.LaunchChoice:
    """The launch configuration for these inputs (metadata only) and where it came from."""
    experts, (tokens, top_k) = w.shape[0], plan.slot_row.shape
    rows_per_expert = triton.cdiv(tokens * top_k, experts)
    heuristic = grouped_gemm_launch_config(rows_per_expert)
    bucket = heuristic["BLOCK_M"]
    key = (
        f"a={dtype_name(a.dtype)} w={dtype_name(w.dtype)} experts={experts} n={w.shape[1]} k={w.shape[2]} "
        f"activation={activation} rows_per_expert<={bucket}"
    )
    return _configs.choose("grouped_gemm", key, a.device, heuristic, TUNABLE)


def check_plan(plan, num_experts: int, device: torch.device) -> tuple[int, int, int]:
    """A DispatchPlan for ``num_experts`` experts on ``device`` whose fields agree with one another (metadata
    only); returns (tokens, top_k, max_rows)."""
    if not isinstance(plan, DispatchPlan):
        raise ValueError(
            f"plan: expected the DispatchPlan kernels.moe.dispatch returns, got {type(plan).__name__}"
        )
    for name in ("tokens_per_expert", "expert_offsets", "row_token", "slot_row"):
        tensor = getattr(plan, name)
        check_tensor(f"plan.{name}", tensor, dtypes=(torch.int32,), device=device)
        check_contiguous(f"plan.{name}", tensor)
    if plan.slot_row.dim() != 2 or plan.row_token.dim() != 1:
        raise ValueError(
            f"plan: expected slot_row [tokens, top_k] and row_token [max_rows], got "
            f"{tuple(plan.slot_row.shape)} and {tuple(plan.row_token.shape)}"
        )
    if tuple(plan.tokens_per_expert.shape) != (num_experts,) or tuple(plan.expert_offsets.shape) != (
        num_experts + 1,
    ):
        raise ValueError(
            f"plan: expected tokens_per_expert [{num_experts}] and expert_offsets [{num_experts + 1}] (w's "
            f"experts), got {tuple(plan.tokens_per_expert.shape)} and {tuple(plan.expert_offsets.shape)}"
        )
    align = plan.align
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(f"plan: expected align a positive int, got {align!r}")
    tokens, top_k = plan.slot_row.shape
    rows = max_rows(tokens, top_k, num_experts, align)
    if plan.row_token.shape[0] != rows:
        raise ValueError(
            f"plan: row_token holds {plan.row_token.shape[0]} rows; {tokens} tokens x top_k {top_k} over "
            f"{num_experts} experts aligned to {align} make {rows} (a plan from another shape)"
        )
    return tokens, top_k, rows


def check_weights(
    w, w_scale, activation, *, k: int, dtype: torch.dtype, device: torch.device, names=("w", "w_scale")
) -> int:
    """w [E, N, K] of ``k`` input columns (``dtype``, or fp8 with its block scales) on ``device``, for the
    activation; returns the output's columns (N, or N // 2 for silu_and_mul). Metadata only. ``names``:
    the weight's and its scales' argument names in the messages (moe_layer's w13 and w2)."""
    name, scale_name = names
    check_tensor(name, w, ndim=3, dtypes=(dtype, FP8), device=device)
    check_contiguous(name, w)
    experts, n, w_k = w.shape
    if w_k != k:
        raise ValueError(f"{name}: expected K = {k} (its input's columns) in [E, N, K], got {tuple(w.shape)}")
    if experts == 0 or n == 0 or k == 0:
        raise ValueError(f"{name}: expected [E, N, K] with each >= 1, got {tuple(w.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if activation == "silu_and_mul" and n % 2:
        raise ValueError(f"{name}: silu_and_mul takes gate and up halves of N, so N must be even; got {n}")
    if w.dtype != FP8:
        if w_scale is not None:
            raise ValueError(f"{scale_name}: block scales apply only to float8_e4m3fn weights")
        return n // 2 if activation == "silu_and_mul" else n
    blocks = (experts, triton.cdiv(n, SCALE_BLOCK), triton.cdiv(k, SCALE_BLOCK))
    if w_scale is None:
        raise ValueError(f"{scale_name}: float8_e4m3fn {name} needs its block scales, fp32 {blocks}")
    check_tensor(scale_name, w_scale, dtypes=(torch.float32,), device=device)
    if tuple(w_scale.shape) != blocks or not w_scale.is_contiguous():
        raise ValueError(
            f"{scale_name}: expected contiguous fp32 {blocks} (E, cdiv(N, 128), cdiv(K, 128)), got "
            f"{tuple(w_scale.shape)} (contiguous: {w_scale.is_contiguous()})"
        )
    return n // 2 if activation == "silu_and_mul" else n


def check_out(out, rows: int, columns: int, a: torch.Tensor, reads: dict):
    """The output: a caller's [rows, columns] tensor in a's dtype, sharing no memory with what the call
    ``reads`` (checked from metadata), or a new one."""
    if out is None:
        return torch.empty(rows, columns, dtype=a.dtype, device=a.device)
    check_tensor("out", out, ndim=2, dtypes=(a.dtype,), device=a.device)
    check_contiguous("out", out)
    if tuple(out.shape) != (rows, columns):
        raise ValueError(f"out: expected {(rows, columns)} (max_rows x N_out), got {tuple(out.shape)}")
    check_disjoint({"out": out}, reads)
    return out


def grouped_gemm(a, w, plan, *, gather=False, activation=None, w_scale=None, out=None) -> torch.Tensor:
    """Each expert's rows of ``plan`` times its weights: out [max_rows, N] (N // 2 with silu_and_mul) in
    a's dtype, fp32 accumulation, deterministic; rows of padding (row_token -1) are not written. One
    launch, no host sync; with ``out`` given the call allocates nothing (a CUDA graph captures it)."""
    check_tensor("a", a, ndim=2, dtypes=A_DTYPES)
    if a.stride(1) != 1 and a.shape[1] > 1:
        raise ValueError(f"a: expected rows contiguous (stride 1), got strides {a.stride()}")
    if not isinstance(gather, bool):
        raise ValueError(f"gather: expected a bool, got {gather!r}")
    columns = check_weights(w, w_scale, activation, k=a.shape[1], dtype=a.dtype, device=a.device)
    tokens, top_k, rows = check_plan(plan, w.shape[0], a.device)
    planned, what = (tokens, "tokens (gather=True: a is x)") if gather else (rows, "max_rows (a is x_sorted)")
    if a.shape[0] != planned:
        raise ValueError(f"plan: made for {planned} {what}, but a has {a.shape[0]} rows (another shape)")
    reads = {"a": a, "w": w, "w_scale": w_scale, "plan.row_token": plan.row_token}
    reads |= {"plan.expert_offsets": plan.expert_offsets, "plan.tokens_per_expert": plan.tokens_per_expert}
    out = check_out(out, rows, columns, a, reads)

    config = grouped_gemm_choice(a, w, plan, activation).config
    block_m, block_k = config["BLOCK_M"], config["BLOCK_K"]
    if w.dtype == FP8:
        block_k = min(block_k, SCALE_BLOCK)  # a K step must stay inside one scale block
    pairs = tokens * top_k
    # Each touched expert's last tile may be partial: at most pairs // BLOCK_M full tiles plus one a expert.
    m_tiles = pairs // block_m + min(w.shape[0], pairs)
    if m_tiles == 0:
        return out
    programs = m_tiles * triton.cdiv(columns, config["BLOCK_N"])
    if programs >= 2**31:
        raise ValueError(
            f"a: {pairs} rows x {columns} columns take {programs} programs, past one launch's 2^31"
        )
    _grouped_gemm_kernel[(programs,)](
        a,
        w,
        w_scale if w_scale is not None else w,
        plan.tokens_per_expert,
        plan.expert_offsets,
        plan.row_token,
        out,
        columns,
        a.shape[1],
        a.stride(0),
        m_tiles,
        NUM_EXPERTS=w.shape[0],
        EXPERTS_PAD=triton.next_power_of_2(w.shape[0]),
        GATHER=gather,
        SILU_AND_MUL=activation == "silu_and_mul",
        FP8=w.dtype == FP8,
        BLOCK_M=block_m,
        BLOCK_N=config["BLOCK_N"],
        BLOCK_K=block_k,
        GROUP_M=_GROUP_M,
        INTERPRETER_UPCAST=INTERPRETED,
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return out
