"""MoE routing: choose each token's experts (route), group the rows by expert (dispatch), and weigh the
experts' outputs back together (combine).

Layouts:
    logits   [tokens, experts]   fp32, fp16 or bf16 (the router's output); rows may be strided
    bias     [experts] fp32      DeepSeek's e_score_correction_bias, used only to choose
    weights  [tokens, top_k] fp32 out
    ids      [tokens, top_k] int32 out, best choice first
    x        [tokens, hidden]    rows to dispatch (fp32, fp16, bf16)
    x_sorted [max_rows, hidden]  dispatch's output: rows grouped by expert (DispatchPlan says where)
    y_sorted [max_rows, hidden]  the experts' outputs in the same rows; combine's input
    out      [tokens, hidden]    combine's output, in y's dtype

Routing rules (as reference/moe.py states them): softmax top-k (Mixtral, Qwen3), top-k then softmax
(gpt-oss), and group-limited routing (``num_groups``, ``topk_groups``): the best ``topk_groups`` groups
kept, the experts chosen among theirs, weighted by unbiased score, optionally renormalised, times
``scale``. How groups rank depends on ``bias``:
    with a bias (DeepSeek-V3/R1's sigmoid routing, arXiv 2412.19437, node-limited routing): by the sum of
        each group's two best biased scores, as SGLang's biased_grouped_topk and vLLM's grouped_topk do
        when given an e_score_correction_bias;
    without (DeepSeek-V2's group_limited_greedy, arXiv 2405.04434, device-limited routing): by each
        group's best score, as vLLM's grouped_topk and SGLang's grouped_topk do with no bias.
The choice order is the reference's: higher selection score first, NaN after -inf, equal scores (-inf and
NaN included; -0.0 equals 0.0) to the lower expert (and group) id.

Selection sorts keys that carry the expert id: each score's order-preserving bits and the id packed into one
int64 (_order_keys), so keys are distinct, a token's k ids cannot repeat, and the tie order is the key's own.
One tl.topk per tile chooses all k (and, for grouped routing, one per group of a [tokens, groups, group size]
view its best two, or a max its best one, and one the kept groups), where k argmax passes used to sweep the
tile k times.

Byte story: each token's logits are read once and its choices written once; a program holds BLOCK_T tokens'
whole rows (its experts padded to a power of two) and chooses in registers.

dispatch copies each token's row once per choice into expert-contiguous order (experts' segments aligned
for block-tiled expert GEMMs); combine weighs each token's rows back together. Byte story: dispatch reads
each token's row once and writes it top_k times (a program holds a token's row while it writes all its
choices); combine reads the top_k rows and writes one. Neither uses atomics on data, so runs are
bit-identical. Up to _FUSED_PAIRS (token, choice) pairs, dispatch is one launch whose every program derives
the layout from all ids itself (a decode step: a few hundred ids); past it, a count launch and a scan launch
precede the copy. dispatch_plan makes the same plan and copies nothing, for an expert GEMM that gathers each
token's row itself (kernels/moe_gemm.py).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import _configs
from kernels._checks import (
    check_buffer,
    check_contiguous,
    check_device,
    check_disjoint,
    check_int,
    check_tensor,
    dtype_name,
    is_positive_finite,
)

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCORINGS = ("softmax", "sigmoid")
MAX_EXPERTS = 1024
ROW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Up to this many (token, choice) pairs, dispatch is one launch (each program reads every id).
_FUSED_PAIRS = 2048
_CHUNK_TOKENS = 16  # tokens per dispatch program (and per counted chunk)
# The fewest tokens a chunk may hold under any configuration: DispatchWorkspace sizes chunk_prefix for it.
MIN_CHUNK_TOKENS = 8
_HIDDEN_TILE = 256  # row elements per inner step
_LOWEST_KEY = tl.constexpr(-(2**63))  # below every routing key: padding columns


@dataclass(frozen=True)
class DispatchPlan:
    """Where dispatch put each row. Invariants: expert e's rows are x_sorted[expert_offsets[e] :
    expert_offsets[e] + tokens_per_expert[e]], in (token, choice) order; expert_offsets[e] is a multiple of
    align and expert_offsets[e + 1] - expert_offsets[e] = tokens_per_expert[e] rounded up to align; every
    other row (an expert's padding, and rows past expert_offsets[-1] up to max_rows) has row_token -1 and
    undefined contents; slot_row[t, c] is the row of token t's c-th choice."""

    tokens_per_expert: torch.Tensor  # int32 [experts]
    expert_offsets: torch.Tensor  # int32 [experts + 1]
    row_token: torch.Tensor  # int32 [max_rows]
    slot_row: torch.Tensor  # int32 [tokens, top_k]
    align: int


def max_rows(num_tokens: int, top_k: int, num_experts: int, align: int) -> int:
    """Rows dispatch allocates: every choice, plus the most padding ``align`` can add (known on the host)."""
    return num_tokens * top_k + num_experts * (align - 1)


@triton.jit
def _order_keys(values, index, INDEX_BITS: tl.constexpr):
    """int64 keys whose descending order is the documented choice order of ``values``: larger first, NaN
    after -inf, -0.0 equal to 0.0, and equal values (NaN and -inf included) to the lower ``index``. The key
    is the value's order-preserving bits << 32 | (2^INDEX_BITS - 1 - index): distinct indices give distinct
    keys, so a top-k of keys cannot repeat an index, and its tie order needs no second pass."""
    values = tl.where(values == 0.0, 0.0, values)  # -0.0 ties with 0.0, as torch compares them
    bits = values.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative: more magnitude, smaller key
    ordered = tl.where(values != values, -2147483648, ordered)  # NaN (either sign) below -inf
    return (ordered.to(tl.int64) << 32) | ((1 << INDEX_BITS) - 1 - index).to(tl.int64)


@triton.jit
def _key_values(keys):
    """The fp32 value a key of _order_keys was made from (NaN for NaN, 0.0 for -0.0)."""
    ordered = (keys >> 32).to(tl.int32)
    return tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(tl.float32, bitcast=True)


@triton.jit
def _key_index(keys, INDEX_BITS: tl.constexpr):
    return ((1 << INDEX_BITS) - 1 - (keys & ((1 << INDEX_BITS) - 1))).to(tl.int32)


@triton.jit
def _finite_max(x, axis: tl.constexpr):
    """Max over ``axis`` ignoring NaN (-inf where all are NaN), as a GPU's max does, with no all-NaN slice
    for the interpreter's numpy to warn about."""
    return tl.max(tl.where(x == x, x, float("-inf")), axis=axis)


@triton.jit
def _route_kernel(
    logits_ptr,  # [num_tokens, NUM_EXPERTS], row stride stride_logits
    bias_ptr,  # [NUM_EXPERTS] fp32; read only when HAS_BIAS
    weights_ptr,  # [num_tokens, TOP_K] fp32 out
    ids_ptr,  # [num_tokens, TOP_K] int32 out
    num_tokens,
    stride_logits,
    scale,
    NUM_EXPERTS: tl.constexpr,
    INDEX_BITS: tl.constexpr,  # 2^INDEX_BITS > NUM_EXPERTS (and > NUM_GROUPS): keys' index field
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,  # power of two >= TOP_K
    NUM_GROUPS: tl.constexpr,  # 1: no group stage
    GROUPS_PAD: tl.constexpr,  # power of two >= NUM_GROUPS
    GROUP_SIZE: tl.constexpr,  # NUM_EXPERTS // NUM_GROUPS
    GROUP_SIZE_PAD: tl.constexpr,  # power of two >= GROUP_SIZE
    TOPK_GROUPS: tl.constexpr,
    TOPK_GROUPS_PAD: tl.constexpr,  # power of two >= TOPK_GROUPS
    SIGMOID: tl.constexpr,  # scores = sigmoid(logits); else softmax(logits)
    SOFTMAX_AFTER_TOPK: tl.constexpr,  # choose on logits, softmax over the chosen (gpt-oss)
    RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # The tile is [BLOCK_T, GROUPS_PAD * GROUP_SIZE_PAD]: group g's j-th expert (id g * GROUP_SIZE + j) in
    # column g * GROUP_SIZE_PAD + j, so a reshape gives the [tokens, groups, group size] view the group stage
    # ranks (without groups: one group of every expert).
    TILE: tl.constexpr = GROUPS_PAD * GROUP_SIZE_PAD
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = tokens < num_tokens
    column = tl.arange(0, TILE)
    if GROUP_SIZE == GROUP_SIZE_PAD:
        experts = column
    else:
        experts = column // GROUP_SIZE_PAD * GROUP_SIZE + column % GROUP_SIZE_PAD
    real = (column // GROUP_SIZE_PAD < NUM_GROUPS) & (column % GROUP_SIZE_PAD < GROUP_SIZE)
    rows = logits_ptr + tokens.to(tl.int64)[:, None] * stride_logits + experts[None, :]
    # Upcast right after the load: bf16 arithmetic is wrong in the interpreter, and routing is fp32.
    x = tl.load(rows, mask=live[:, None] & real[None, :], other=0.0).to(tl.float32)
    x = tl.where(real[None, :], x, float("-inf"))  # padding adds nothing to a softmax

    if SOFTMAX_AFTER_TOPK:
        scores = x
    elif SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        shifted = tl.exp(x - _finite_max(x, 1)[:, None])  # a NaN or +inf logit makes the row NaN, as in torch
        scores = shifted / tl.sum(shifted, axis=1)[:, None]
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + experts, mask=real, other=0.0)[None, :]
    # Padding columns sort below every expert, NaN included (their index field is 0, a real one's is not).
    keys = tl.where(real[None, :], _order_keys(choice, experts, INDEX_BITS), _LOWEST_KEY)

    if NUM_GROUPS > 1:
        # Groups ranked (in the same order, NaN last) by the sum of their two best biased scores with a bias
        # (DeepSeek-V3/R1), by their best score without (DeepSeek-V2); the best TOPK_GROUPS kept: those whose
        # key is at least the TOPK_GROUPS-th best (keys are distinct).
        grouped = tl.reshape(keys, [BLOCK_T, GROUPS_PAD, GROUP_SIZE_PAD])
        if HAS_BIAS:
            group_scores = tl.sum(_key_values(tl.topk(grouped, 2)), axis=2)
        else:
            group_scores = _key_values(tl.max(grouped, axis=2))
        groups = tl.arange(0, GROUPS_PAD)
        group_keys = tl.where(
            (groups < NUM_GROUPS)[None, :], _order_keys(group_scores, groups, INDEX_BITS), _LOWEST_KEY
        )
        ranked = tl.topk(group_keys, TOPK_GROUPS_PAD)
        last = tl.arange(0, TOPK_GROUPS_PAD)[None, :] == TOPK_GROUPS - 1
        last_kept = tl.sum(tl.where(last, ranked, 0), axis=1)
        kept = (group_keys >= last_kept[:, None])[:, :, None]
        kept = tl.reshape(tl.broadcast_to(kept, [BLOCK_T, GROUPS_PAD, GROUP_SIZE_PAD]), [BLOCK_T, TILE])
        # The other groups' experts choose as -inf, as in the reference.
        choice = tl.where(kept, choice, float("-inf"))
        keys = tl.where(real[None, :], _order_keys(choice, experts, INDEX_BITS), _LOWEST_KEY)

    top = tl.topk(keys, K_PAD)  # [BLOCK_T, K_PAD], best first
    slots = tl.arange(0, K_PAD)
    in_k = slots[None, :] < TOP_K
    chosen_ids = _key_index(top, INDEX_BITS)
    if HAS_BIAS or NUM_GROUPS > 1:
        # The weight is the unbiased score (and an expert of a dropped group chose as -inf).
        at = tl.where(in_k, chosen_ids, 0)
        if GROUP_SIZE != GROUP_SIZE_PAD:
            at = at // GROUP_SIZE * GROUP_SIZE_PAD + at % GROUP_SIZE
        chosen = tl.gather(scores, at, axis=1)
    else:
        chosen = _key_values(top)

    if SOFTMAX_AFTER_TOPK:
        top_logit = _finite_max(tl.where(in_k, chosen, float("-inf")), 1)
        chosen = tl.where(in_k, tl.exp(chosen - top_logit[:, None]), 0.0)
        chosen = chosen / tl.sum(chosen, axis=1)[:, None]
    elif RENORMALIZE:
        chosen = tl.where(in_k, chosen, 0.0)
        chosen = chosen / tl.sum(chosen, axis=1)[:, None]
    out = tokens.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    mask = live[:, None] & in_k
    tl.store(weights_ptr + out, chosen * scale, mask=mask)
    tl.store(ids_ptr + out, chosen_ids, mask=mask)


def route_launch_config(num_experts: int, num_groups: int = 1) -> dict:
    """Tokens per program and warps: a program holds BLOCK_T whole rows of logits in their [groups, experts
    per group] view, each side padded to a power of two, 4096 scores at most (16 tokens of 256 experts), so
    the selection over them stays in registers."""
    view = triton.next_power_of_2(num_groups) * triton.next_power_of_2(num_experts // num_groups)
    return {"BLOCK_T": max(1, min(16, 4096 // view)), "num_warps": 4}


def route_choice(logits: torch.Tensor, top_k: int, num_groups: int) -> _configs.LaunchChoice:
    """route's launch configuration for these logits (metadata only) and where it came from."""
    num_experts = logits.shape[1]
    key = f"logits={dtype_name(logits.dtype)} experts={num_experts} top_k={top_k} groups={num_groups}"
    return _configs.choose(
        "route", key, logits.device, route_launch_config(num_experts, num_groups), ("BLOCK_T", "num_warps")
    )


def _check_groups(num_groups, topk_groups, num_experts: int, top_k: int, has_bias: bool) -> int:
    """The number of groups (1: no group stage), checked with topk_groups against the experts and top_k."""
    groups = 1 if num_groups is None else num_groups
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or num_experts % groups:
        raise ValueError(f"num_groups: expected a divisor of the {num_experts} experts, got {num_groups!r}")
    if groups == 1:
        if topk_groups is not None:
            raise ValueError("topk_groups: applies only with num_groups > 1")
        return groups
    if has_bias and num_experts // groups < 2:
        raise ValueError(
            "num_groups: with a bias, groups rank by the sum of their top-2 scores, so each needs 2 experts "
            f"or more; got {num_groups} groups of {num_experts // groups}"
        )
    if isinstance(topk_groups, bool) or not isinstance(topk_groups, int) or not 1 <= topk_groups <= groups:
        raise ValueError(f"topk_groups: expected an integer in [1, {groups}], got {topk_groups!r}")
    if topk_groups * (num_experts // groups) < top_k:
        size = num_experts // groups
        raise ValueError(f"topk_groups: {topk_groups} groups of {size} hold fewer than top_k ({top_k})")
    return groups


def route(
    logits,
    top_k,
    *,
    scoring="softmax",
    renormalize=True,
    num_groups=None,
    topk_groups=None,
    bias=None,
    scale=1.0,
    softmax_after_topk=False,
):
    """Chooses top_k experts per token; returns (weights fp32 [tokens, top_k], ids int32 [tokens, top_k]),
    best first, ties to the lower id, no host sync.

    A token's ids are always distinct, whatever its logits: ranked by selection score, NaN after -inf, equal
    scores (-inf and NaN included) to the lower id, so -inf-masked experts come after the others in id order.
    Weights are the reference's: a +inf or NaN logit under softmax makes that token's scores, and weights,
    NaN; it never changes another token or fails the call.

    Grouped (``num_groups`` > 1): the ``topk_groups`` best groups are kept. With ``bias`` (DeepSeek-V3/R1)
    a group ranks by the sum of its two best biased scores (so it needs 2 experts or more); without
    (DeepSeek-V2) by its best score, as vLLM's grouped_topk does (the module docstring has the sources)."""
    check_tensor("logits", logits, ndim=2, dtypes=LOGIT_DTYPES)
    num_tokens, num_experts = logits.shape
    if logits.stride(1) != 1 and logits.shape[1] > 1:  # a size-1 dimension's stride is never used
        raise ValueError(f"logits: expected experts contiguous (stride 1), got strides {logits.stride()}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"logits: expected 1 to {MAX_EXPERTS} experts, got {num_experts}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected an integer in [1, {num_experts}] (the experts), got {top_k!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring: expected one of {SCORINGS}, got {scoring!r}")
    groups = _check_groups(num_groups, topk_groups, num_experts, top_k, bias is not None)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(torch.float32,), device=logits.device)
        if bias.shape[0] != num_experts or (bias.stride(0) != 1 and num_experts > 1):
            raise ValueError(f"bias: expected a contiguous [{num_experts}] tensor, got {tuple(bias.shape)}")
    for name, flag in (("renormalize", renormalize), ("softmax_after_topk", softmax_after_topk)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}: expected a bool, got {flag!r}")
    if softmax_after_topk and (scoring != "softmax" or groups > 1 or bias is not None):
        raise ValueError("softmax_after_topk: chooses on raw logits; it takes no sigmoid, groups or bias")
    if not is_positive_finite(scale):
        raise ValueError(f"scale: expected a positive finite float, got {scale!r}")

    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    group_size = num_experts // groups
    groups_pad, group_size_pad = triton.next_power_of_2(groups), triton.next_power_of_2(group_size)
    config = route_choice(logits, top_k, groups).config
    block_t = config["BLOCK_T"]
    _route_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits,
        bias if bias is not None else weights,
        weights,
        ids,
        num_tokens,
        logits.stride(0),
        float(scale),
        NUM_EXPERTS=num_experts,
        INDEX_BITS=num_experts.bit_length(),
        TOP_K=top_k,
        K_PAD=triton.next_power_of_2(top_k),
        NUM_GROUPS=groups,
        GROUPS_PAD=groups_pad,
        GROUP_SIZE=group_size,
        GROUP_SIZE_PAD=group_size_pad,
        TOPK_GROUPS=topk_groups or 1,
        TOPK_GROUPS_PAD=triton.next_power_of_2(topk_groups or 1),
        SIGMOID=scoring == "sigmoid",
        SOFTMAX_AFTER_TOPK=softmax_after_topk,
        RENORMALIZE=renormalize,
        HAS_BIAS=bias is not None,
        BLOCK_T=block_t,
        num_warps=config["num_warps"],
    )
    return weights, ids


# --- dispatch and combine -----------------------------------------------------------------------------------


@triton.jit
def _count_chunks_kernel(
    ids_ptr,  # [num_tokens * TOP_K] int32, (token, choice) order
    chunk_counts_ptr,  # [num_chunks, EXPERTS_PAD] int32 out: each chunk's choices per expert
    num_pairs,
    num_experts,
    TOP_K: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,
    CHUNK_TOKENS: tl.constexpr,
    PAIRS_PAD: tl.constexpr,  # power of two >= CHUNK_TOKENS * TOP_K
):
    chunk = tl.program_id(0).to(tl.int64)
    pairs = chunk * CHUNK_TOKENS * TOP_K + tl.arange(0, PAIRS_PAD)
    mask = (tl.arange(0, PAIRS_PAD) < CHUNK_TOKENS * TOP_K) & (pairs < num_pairs)
    ids = tl.load(ids_ptr + pairs, mask=mask, other=0)
    mask = mask & (ids >= 0) & (ids < num_experts)  # an id out of range is dropped, never written through
    counts = tl.histogram(tl.where(mask, ids, 0), EXPERTS_PAD, mask=mask)
    tl.store(chunk_counts_ptr + chunk * EXPERTS_PAD + tl.arange(0, EXPERTS_PAD), counts)


@triton.jit
def _scan_chunks_kernel(
    chunk_counts_ptr,  # [num_chunks, EXPERTS_PAD] int32; rewritten in place as each chunk's exclusive prefix
    tokens_per_expert_ptr,  # [num_experts] int32 out
    expert_offsets_ptr,  # [num_experts + 1] int32 out
    row_token_ptr,  # [max_rows] int32 out: -1 for every padding row
    num_chunks,
    num_experts,
    max_rows,
    align,
    EXPERTS_PAD: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,  # chunks per step
    ALIGN_PAD: tl.constexpr,  # power of two >= align
):
    experts = tl.arange(0, EXPERTS_PAD)
    running = tl.zeros([EXPERTS_PAD], dtype=tl.int32)
    for start in range(0, num_chunks, SCAN_BLOCK):
        chunks = start + tl.arange(0, SCAN_BLOCK)
        where = chunk_counts_ptr + chunks.to(tl.int64)[:, None] * EXPERTS_PAD + experts[None, :]
        counts = tl.load(where, mask=(chunks < num_chunks)[:, None], other=0)
        inclusive = tl.cumsum(counts, axis=0) + running[None, :]
        tl.store(where, inclusive - counts, mask=(chunks < num_chunks)[:, None])
        running += tl.sum(counts, axis=0)
    layout = (tokens_per_expert_ptr, expert_offsets_ptr, row_token_ptr, num_experts, max_rows, align)
    _write_layout(running, experts, layout, ALIGN_PAD)


@triton.jit
def _write_layout(counts, experts, layout, ALIGN_PAD: tl.constexpr):
    """Stores the per-expert counts and aligned offsets, and marks every padding row with -1. ``layout``:
    (tokens_per_expert_ptr, expert_offsets_ptr, row_token_ptr, num_experts, max_rows, align)."""
    tokens_per_expert_ptr, expert_offsets_ptr, row_token_ptr, num_experts, max_rows, align = layout
    real = experts < num_experts
    padded = tl.where(real, tl.cdiv(counts, align) * align, 0)
    ends = tl.cumsum(padded, axis=0)
    tl.store(tokens_per_expert_ptr + experts, counts, mask=real)
    tl.store(expert_offsets_ptr + 1 + experts, ends, mask=real)
    tl.store(expert_offsets_ptr, 0)
    pad = tl.arange(0, ALIGN_PAD)
    # An expert's padding: rows [start + count, end).
    pad_rows = (ends - padded + counts)[:, None] + pad[None, :]
    tl.store(row_token_ptr + pad_rows, -1, mask=real[:, None] & (pad_rows < ends[:, None]))
    # Rows past the last expert's segment.
    used = tl.sum(padded, axis=0)
    for start in range(used, max_rows, 1024):
        rows = start + tl.arange(0, 1024)
        tl.store(row_token_ptr + rows, -1, mask=rows < max_rows)


@triton.jit
def _dispatch_kernel(
    x_ptr,  # [num_tokens, hidden], row stride stride_x
    ids_ptr,  # [num_tokens * TOP_K] int32
    x_sorted_ptr,  # [max_rows, hidden] out, contiguous
    chunk_prefix_ptr,  # [num_chunks, EXPERTS_PAD] int32: choices per expert before each chunk (not FUSED)
    expert_offsets_ptr,  # [num_experts + 1] int32: read if not FUSED, written (program 0) if FUSED
    tokens_per_expert_ptr,  # [num_experts] int32: written by program 0 if FUSED
    row_token_ptr,  # [max_rows] int32 out
    slot_row_ptr,  # [num_tokens * TOP_K] int32 out
    num_tokens,
    num_experts,
    hidden,
    stride_x,
    max_rows,
    align,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,
    CHUNK_TOKENS: tl.constexpr,
    FUSED: tl.constexpr,  # derive the layout from all ids here (one launch) instead of reading it
    ALL_PAIRS_PAD: tl.constexpr,  # FUSED: power of two >= num_tokens * TOP_K
    ALIGN_PAD: tl.constexpr,
    HIDDEN_TILE: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    tokens = chunk * CHUNK_TOKENS + tl.arange(0, CHUNK_TOKENS)
    live = tokens < num_tokens
    experts = tl.arange(0, EXPERTS_PAD)

    # Where each expert's rows for this chunk begin: its segment start plus the choices of earlier chunks.
    if FUSED:
        every = tl.arange(0, ALL_PAIRS_PAD)
        num_pairs = num_tokens * TOP_K
        all_ids = tl.load(ids_ptr + every, mask=every < num_pairs, other=0)
        in_range = (all_ids >= 0) & (all_ids < num_experts)
        all_ids = tl.where(in_range, all_ids, 0)
        totals = tl.histogram(all_ids, EXPERTS_PAD, mask=(every < num_pairs) & in_range)
        before = tl.histogram(all_ids, EXPERTS_PAD, mask=(every < chunk * CHUNK_TOKENS * TOP_K) & in_range)
        padded = tl.where(experts < num_experts, tl.cdiv(totals, align) * align, 0)
        base = tl.cumsum(padded, axis=0) - padded + before
        if chunk == 0:
            layout = (tokens_per_expert_ptr, expert_offsets_ptr, row_token_ptr, num_experts, max_rows, align)
            _write_layout(totals, experts, layout, ALIGN_PAD)
    else:
        base = tl.load(chunk_prefix_ptr + chunk * EXPERTS_PAD + experts)
        base += tl.load(expert_offsets_ptr + experts, mask=experts < num_experts, other=0)

    # Within the chunk, (token, choice) order: a token's choice of e lands after the earlier tokens' choices
    # of e. chosen[t, e]: how many of token t's choices are e.
    chosen = tl.zeros([CHUNK_TOKENS, EXPERTS_PAD], dtype=tl.int32)
    for c in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + tokens * TOP_K + c, mask=live, other=-1)
        chosen += (expert[:, None] == experts[None, :]).to(tl.int32) * (expert < num_experts)[:, None]
    first_row = base[None, :] + tl.cumsum(chosen, axis=0) - chosen  # [CHUNK_TOKENS, EXPERTS_PAD]
    choices = tl.arange(0, K_PAD)
    rows = tl.full([CHUNK_TOKENS, K_PAD], -1, dtype=tl.int32)
    for c in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + tokens * TOP_K + c, mask=live, other=-1)
        valid = (expert >= 0) & (expert < num_experts)  # an id out of range: slot_row -1, nothing written
        gathered = tl.gather(first_row, tl.where(valid, expert, 0)[:, None], axis=1)
        row = tl.where(valid, tl.reshape(gathered, [CHUNK_TOKENS]), -1)
        # A token naming one expert twice (routers never do) still gets one row per choice, in order.
        first_row += ((expert[:, None] == experts[None, :]) & valid[:, None]).to(tl.int32)
        rows = tl.where(choices[None, :] == c, row[:, None], rows)
        tl.store(slot_row_ptr + tokens * TOP_K + c, row, mask=live)
        tl.store(row_token_ptr + row, tokens.to(tl.int32), mask=live & valid)

    # Copy: each token's row is read once and written to its TOP_K rows.
    for start in range(0, hidden, HIDDEN_TILE):
        cols = start + tl.arange(0, HIDDEN_TILE)
        mask = live[:, None] & (cols < hidden)[None, :]
        row_data = tl.load(x_ptr + tokens.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask)
        for c in tl.static_range(TOP_K):
            dest = tl.sum(tl.where(choices[None, :] == c, rows, 0), axis=1)
            keep = mask & (dest >= 0)[:, None]
            tl.store(x_sorted_ptr + dest.to(tl.int64)[:, None] * hidden + cols[None, :], row_data, mask=keep)


@triton.jit
def combine_tile(num_tokens, hidden, TOKENS: tl.constexpr, HIDDEN_TILE: tl.constexpr):
    """This program's [TOKENS, HIDDEN_TILE] tile of a combine's [num_tokens, hidden] output (also ep's sum
    of partials): its tokens (int64, for row addresses), columns, live tokens, and in-bounds mask."""
    tokens = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    cols = tl.program_id(1) * HIDDEN_TILE + tl.arange(0, HIDDEN_TILE)
    live = tokens < num_tokens
    return tokens, cols, live, live[:, None] & (cols < hidden)[None, :]


@triton.jit
def _combine_kernel(
    y_sorted_ptr,  # [max_rows, hidden], contiguous
    weights_ptr,  # [num_tokens, TOP_K] fp32
    slot_row_ptr,  # [num_tokens, TOP_K] int32
    out_ptr,  # [num_tokens, hidden] out, contiguous
    num_tokens,
    hidden,
    TOP_K: tl.constexpr,
    TOKENS: tl.constexpr,
    HIDDEN_TILE: tl.constexpr,
):
    tokens, cols, live, mask = combine_tile(num_tokens, hidden, TOKENS, HIDDEN_TILE)
    acc = tl.zeros([TOKENS, HIDDEN_TILE], dtype=tl.float32)
    for c in tl.static_range(TOP_K):  # a fixed order: bit-identical runs
        row = tl.load(slot_row_ptr + tokens * TOP_K + c, mask=live, other=-1).to(tl.int64)
        weight = tl.load(weights_ptr + tokens * TOP_K + c, mask=live, other=0.0)
        y = tl.load(
            y_sorted_ptr + row[:, None] * hidden + cols[None, :], mask=mask & (row >= 0)[:, None], other=0.0
        )
        acc += weight[:, None] * y.to(tl.float32)
    out = tokens.to(tl.int64)[:, None] * hidden + cols[None, :]
    tl.store(out_ptr + out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check_ids(ids, num_experts, device) -> None:
    check_tensor("ids", ids, ndim=2, dtypes=(torch.int32,), device=device)
    check_contiguous("ids", ids)
    if (
        isinstance(num_experts, bool)
        or not isinstance(num_experts, int)
        or not 1 <= num_experts <= MAX_EXPERTS
    ):
        raise ValueError(f"num_experts: expected an integer in [1, {MAX_EXPERTS}], got {num_experts!r}")


def check_ids_in_range(ids: torch.Tensor, num_experts: int) -> None:
    """Opt-in check that reads the ids (it syncs): every id in [0, num_experts). dispatch does not read
    ids on the host; one out of range is dropped there (slot_row -1, nothing written, combine skips it)."""
    check_tensor("ids", ids, dtypes=(torch.int32, torch.int64), device=getattr(ids, "device", None))
    if ids.is_meta:
        raise ValueError("ids: expected a tensor holding data (CPU or CUDA), got one on meta")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise ValueError(f"num_experts: expected an int, got {num_experts!r}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        bad = ids[(ids < 0) | (ids >= num_experts)][0].item()
        raise ValueError(f"ids: expected expert ids in [0, {num_experts}), got {bad}")


#: Knobs of dispatch_launch_config a per-GPU table (kernels/configs/) may override.
DISPATCH_TUNABLE = ("CHUNK_TOKENS", "HIDDEN_TILE", "num_warps")


def dispatch_launch_config(hidden: int) -> dict:
    """Tokens per program (and per counted chunk), row elements per copy step, warps. A program keeps its
    tokens' [CHUNK_TOKENS, experts] layout in registers while it copies their rows a HIDDEN_TILE at a time."""
    return {
        "CHUNK_TOKENS": _CHUNK_TOKENS,
        "HIDDEN_TILE": min(_HIDDEN_TILE, triton.next_power_of_2(hidden)),
        "num_warps": 4,
    }


def _fused(num_tokens: int, top_k: int) -> bool:
    return num_tokens * top_k <= _FUSED_PAIRS


def dispatch_choice(x: torch.Tensor | None, ids: torch.Tensor, num_experts: int) -> _configs.LaunchChoice:
    """dispatch's launch configuration for these inputs (metadata only) and where it came from. One launch
    (a decode step) and three (count, scan, copy) are keyed apart: their best tiles differ. x None: the
    plan alone (dispatch_plan), whose copy step never runs."""
    num_tokens, top_k = ids.shape
    launches = "one-launch" if _fused(num_tokens, top_k) else "three-launches"
    rows = "plan-only" if x is None else f"x={dtype_name(x.dtype)} hidden={x.shape[1]}"
    key = f"{rows} experts={num_experts} top_k={top_k} {launches}"
    heuristic = dispatch_launch_config(_HIDDEN_TILE if x is None else x.shape[1])
    return _configs.choose("dispatch", key, ids.device, heuristic, DISPATCH_TUNABLE)


def check_dispatch_sizes(num_tokens, top_k, num_experts, hidden, align, dtype) -> None:
    """A workspace constructor's sizes: ones some dispatch call takes (ValueError naming the argument)."""
    check_int("num_tokens", num_tokens, 0)
    check_int("top_k", top_k, 1)
    check_int("num_experts", num_experts, 1, MAX_EXPERTS)
    check_int("hidden", hidden, 1)
    check_int("align", align, 1, 1024)
    if not isinstance(dtype, torch.dtype) or dtype not in ROW_DTYPES:
        allowed = ", ".join(dtype_name(d) for d in ROW_DTYPES)
        raise ValueError(f"dtype: expected one of ({allowed}), got {dtype!r}")
    rows = max_rows(num_tokens, top_k, num_experts, align)
    if rows >= 2**31:
        raise ValueError(
            f"num_tokens: {num_tokens} x top_k {top_k} make {rows} rows; row ids are int32 (< 2^31)"
        )


@dataclass(frozen=True)
class DispatchWorkspace:
    """dispatch's outputs and scratch, owned by the caller: a serving engine allocates one per captured
    batch size, so a decode step (and the CUDA graph around it) allocates nothing. dispatch writes into it
    and returns its tensors (x_sorted, and a plan over the others): each call overwrites the last one's.

    Invariants (for num_tokens, top_k, num_experts, hidden, align and x's dtype, all contiguous, on x's
    device): x_sorted [max_rows, hidden]; tokens_per_expert int32 [num_experts]; expert_offsets int32
    [num_experts + 1]; row_token int32 [max_rows]; slot_row int32 [num_tokens, top_k]; chunk_prefix int32,
    flat, room for one row of next_power_of_2(num_experts) counts per chunk of MIN_CHUNK_TOKENS tokens
    (empty where one launch does it all); no two share memory. for_shape refuses (ValueError naming the
    argument) sizes no dispatch call takes.
    """

    x_sorted: torch.Tensor  # [max_rows, hidden] in x's dtype
    tokens_per_expert: torch.Tensor  # int32 [num_experts]
    expert_offsets: torch.Tensor  # int32 [num_experts + 1]
    row_token: torch.Tensor  # int32 [max_rows]
    slot_row: torch.Tensor  # int32 [num_tokens, top_k]
    chunk_prefix: torch.Tensor  # int32 flat, >= cdiv(num_tokens, MIN_CHUNK_TOKENS) x experts_pad; or empty

    @classmethod
    def for_shape(
        cls,
        num_tokens: int,
        top_k: int,
        num_experts: int,
        hidden: int,
        *,
        align: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
    ) -> "DispatchWorkspace":
        check_dispatch_sizes(num_tokens, top_k, num_experts, hidden, align, dtype)
        device = check_device("device", device)
        rows = max_rows(num_tokens, top_k, num_experts, align)
        prefix = 0
        if not _fused(num_tokens, top_k):
            prefix = triton.cdiv(num_tokens, MIN_CHUNK_TOKENS) * triton.next_power_of_2(num_experts)

        def ints(*size):
            return torch.empty(*size, dtype=torch.int32, device=device)

        return cls(
            torch.empty(rows, hidden, dtype=dtype, device=device),
            ints(num_experts),
            ints(num_experts + 1),
            ints(rows),
            ints(num_tokens, top_k),
            ints(prefix),
        )


def _check_dispatch_workspace(workspace, expected: dict, prefix_needed: int, device) -> None:
    """Every buffer of a given workspace has the shape and dtype this call needs (metadata only)."""
    if not isinstance(workspace, DispatchWorkspace):
        raise ValueError(
            "workspace: expected a DispatchWorkspace (see DispatchWorkspace.for_shape), got "
            f"{type(workspace).__name__}"
        )
    for name, (shape, dtype) in expected.items():
        check_buffer(
            "workspace",
            getattr(workspace, name),
            shape,
            dtype,
            device,
            what=f"{name} ",
            hint=" (DispatchWorkspace.for_shape sizes it)",
        )
    prefix = workspace.chunk_prefix
    if (
        not isinstance(prefix, torch.Tensor)
        or prefix.dtype != torch.int32
        or prefix.device != device
        or not prefix.is_contiguous()
        or prefix.numel() < prefix_needed
    ):
        raise ValueError(
            f"workspace: expected chunk_prefix contiguous int32 on {device} with room for {prefix_needed} "
            "counts (DispatchWorkspace.for_shape sizes it)"
        )


def dispatch(x, ids, num_experts, *, align=1, workspace=None):
    """Copies each token's row once per choice into expert-contiguous order; returns (x_sorted [max_rows,
    hidden], plan). Rows of one expert are in (token, choice) order; each expert's segment starts at a
    multiple of ``align``; padding rows are marked -1 in plan.row_token. No host sync: x_sorted has
    max_rows(...) rows, the most the padding can need. ids must lie in [0, num_experts) (see
    check_ids_in_range). With ``workspace`` (DispatchWorkspace.for_shape) the outputs are its buffers and
    the call allocates nothing; its buffers may share no memory with each other or with x and ids (checked
    from metadata: ValueError naming both)."""
    check_tensor("x", x, ndim=2, dtypes=ROW_DTYPES)
    _check_ids(ids, num_experts, x.device)
    if x.stride(1) != 1 and x.shape[1] > 1:
        raise ValueError(f"x: expected rows contiguous (stride 1), got strides {x.stride()}")
    if ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"ids: expected [{x.shape[0]}, top_k] (a row per token of x), got {tuple(ids.shape)}"
        )
    if x.shape[1] == 0:
        raise ValueError(f"x: expected [tokens, hidden] with hidden >= 1, got {tuple(x.shape)}")
    return _dispatch(x, ids, num_experts, align, workspace)


def dispatch_plan(ids, num_experts, *, align=1, workspace=None) -> DispatchPlan:
    """dispatch's plan without its copy: the layout a gather fused into the expert GEMM reads
    (kernels/moe_gemm.grouped_gemm with gather=True), the same fields dispatch's plan holds. With
    ``workspace`` the plan's tensors are its buffers (its x_sorted is left alone, of any width)."""
    _check_ids(ids, num_experts, None)
    return _dispatch(None, ids, num_experts, align, workspace)[1]


def _dispatch(x, ids, num_experts, align, workspace):
    """dispatch's launches after its checks of x and ids; x None lays out the plan and copies nothing."""
    if isinstance(align, bool) or not isinstance(align, int) or not 1 <= align <= 1024:
        raise ValueError(f"align: expected an integer in [1, 1024], got {align!r}")
    num_tokens, top_k = ids.shape
    if top_k == 0:
        raise ValueError(f"ids: expected [tokens, top_k] with top_k >= 1, got {tuple(ids.shape)}")
    rows = max_rows(num_tokens, top_k, num_experts, align)
    if rows >= 2**31:
        raise ValueError(f"ids: {tuple(ids.shape)} make {rows} rows with padding; row ids are int32 (< 2^31)")
    config = dispatch_choice(x, ids, num_experts).config
    chunk_tokens = config["CHUNK_TOKENS"]
    experts_pad = triton.next_power_of_2(num_experts)
    chunks = max(1, triton.cdiv(num_tokens, chunk_tokens))
    fused = _fused(num_tokens, top_k)
    x_sorted, plan, chunk_prefix = _dispatch_buffers(
        x, ids, num_experts, align, workspace, 0 if fused else chunks * experts_pad
    )
    if fused:
        chunk_prefix = plan.expert_offsets  # unread when fused
    else:
        chunk_prefix = _count_and_scan(ids, num_experts, plan, chunk_prefix, chunk_tokens, chunks)
    # Without x the copy loop runs no step (hidden 0): ids and row_token stand in for the row pointers.
    hidden = 0 if x is None else x.shape[1]
    _dispatch_kernel[(chunks,)](
        ids if x is None else x,
        ids,
        plan.row_token if x is None else x_sorted,
        chunk_prefix,
        plan.expert_offsets,
        plan.tokens_per_expert,
        plan.row_token,
        plan.slot_row,
        num_tokens,
        num_experts,
        hidden,
        0 if x is None else x.stride(0),
        rows,
        align,
        TOP_K=top_k,
        K_PAD=triton.next_power_of_2(top_k),
        EXPERTS_PAD=experts_pad,
        CHUNK_TOKENS=chunk_tokens,
        FUSED=fused,
        ALL_PAIRS_PAD=triton.next_power_of_2(max(1, num_tokens * top_k)) if fused else 1,
        ALIGN_PAD=triton.next_power_of_2(align),
        HIDDEN_TILE=config["HIDDEN_TILE"],
        num_warps=config["num_warps"],
    )
    return x_sorted, plan


def _dispatch_buffers(x, ids, num_experts: int, align: int, workspace, prefix_needed: int):
    """(x_sorted or None, plan, chunk_prefix or None): new ones, or the workspace's, checked (metadata only)
    for shape and for sharing no memory with each other or with x and ids."""
    num_tokens, top_k = ids.shape
    rows = max_rows(num_tokens, top_k, num_experts, align)
    device = ids.device
    if workspace is None:

        def ints(*size):
            return torch.empty(*size, dtype=torch.int32, device=device)

        x_sorted = None if x is None else torch.empty(rows, x.shape[1], dtype=x.dtype, device=device)
        counts, offsets = ints(num_experts), ints(num_experts + 1)
        plan = DispatchPlan(counts, offsets, ints(rows), ints(num_tokens, top_k), align)
        return x_sorted, plan, None
    expected = {
        "tokens_per_expert": ((num_experts,), torch.int32),
        "expert_offsets": ((num_experts + 1,), torch.int32),
        "row_token": ((rows,), torch.int32),
        "slot_row": ((num_tokens, top_k), torch.int32),
    }
    if x is not None:
        expected["x_sorted"] = ((rows, x.shape[1]), x.dtype)
    _check_dispatch_workspace(workspace, expected, prefix_needed, device)
    w = workspace
    buffers = {f"workspace.{name}": getattr(w, name) for name in (*expected, "chunk_prefix")}
    check_disjoint(buffers, {"x": x, "ids": ids})  # buffers over each other or the inputs: ValueError
    plan = DispatchPlan(w.tokens_per_expert, w.expert_offsets, w.row_token, w.slot_row, align)
    return (None if x is None else w.x_sorted), plan, w.chunk_prefix


def _count_and_scan(ids, num_experts: int, plan: DispatchPlan, chunk_prefix, chunk_tokens: int, chunks: int):
    """Past one launch: count each chunk's choices per expert, then scan them into each chunk's prefix and
    the plan's counts, offsets and padding rows. Returns the prefix buffer the copy reads."""
    num_tokens, top_k = ids.shape
    experts_pad = triton.next_power_of_2(num_experts)
    if chunk_prefix is None:
        chunk_prefix = torch.empty(chunks, experts_pad, dtype=torch.int32, device=ids.device)
    _count_chunks_kernel[(chunks,)](
        ids,
        chunk_prefix,
        num_tokens * top_k,
        num_experts,
        TOP_K=top_k,
        EXPERTS_PAD=experts_pad,
        CHUNK_TOKENS=chunk_tokens,
        PAIRS_PAD=triton.next_power_of_2(chunk_tokens * top_k),
        num_warps=4,
    )
    _scan_chunks_kernel[(1,)](
        chunk_prefix,
        plan.tokens_per_expert,
        plan.expert_offsets,
        plan.row_token,
        chunks,
        num_experts,
        plan.row_token.shape[0],
        plan.align,
        EXPERTS_PAD=experts_pad,
        SCAN_BLOCK=16,
        ALIGN_PAD=triton.next_power_of_2(plan.align),
        num_warps=8,
    )
    return chunk_prefix


#: Knobs of combine_launch_config a per-GPU table (kernels/configs/) may override.
COMBINE_TUNABLE = ("TOKENS", "HIDDEN_TILE", "num_warps")


def combine_launch_config(hidden: int) -> dict:
    """Tokens and row elements per program, warps: 4 tokens x 256 elements, so a decode step of a few
    tokens still spreads its rows over hidden / 256 programs."""
    return {"TOKENS": 4, "HIDDEN_TILE": min(_HIDDEN_TILE, triton.next_power_of_2(hidden)), "num_warps": 4}


def combine_choice(y_sorted: torch.Tensor, weights: torch.Tensor) -> _configs.LaunchChoice:
    """combine's launch configuration for these inputs (metadata only) and where it came from."""
    hidden, top_k = y_sorted.shape[1], weights.shape[1]
    key = f"y={dtype_name(y_sorted.dtype)} hidden={hidden} top_k={top_k}"
    return _configs.choose("combine", key, y_sorted.device, combine_launch_config(hidden), COMBINE_TUNABLE)


def combine(y_sorted, weights, plan: DispatchPlan, *, out=None):
    """out[t] = sum over choices c of weights[t, c] * y_sorted[plan.slot_row[t, c]], accumulated in fp32 in
    a fixed order, returned in y's dtype. One launch, no atomics, no host sync. ``out``: a caller-owned
    [tokens, hidden] tensor in y's dtype to write (and return), so a decode step under a CUDA graph
    allocates nothing; None allocates it. It may share no memory with y_sorted, weights or the plan (checked
    from metadata: ValueError naming both)."""
    check_tensor("y_sorted", y_sorted, ndim=2, dtypes=ROW_DTYPES)
    check_contiguous("y_sorted", y_sorted)
    check_tensor("weights", weights, ndim=2, dtypes=(torch.float32,), device=y_sorted.device)
    check_contiguous("weights", weights)
    if not isinstance(plan, DispatchPlan):
        raise ValueError(f"plan: expected the DispatchPlan dispatch returned, got {type(plan).__name__}")
    check_tensor("plan", plan.slot_row, ndim=2, dtypes=(torch.int32,), device=y_sorted.device)
    check_contiguous("plan", plan.slot_row)
    if weights.shape != plan.slot_row.shape:
        raise ValueError(
            f"weights: expected {tuple(plan.slot_row.shape)} like the plan, got {tuple(weights.shape)}"
        )
    if y_sorted.shape[0] != plan.row_token.shape[0]:
        raise ValueError(
            f"y_sorted: expected {plan.row_token.shape[0]} rows like the plan, got {y_sorted.shape[0]}"
        )
    num_tokens, top_k = weights.shape
    hidden = y_sorted.shape[1]
    if hidden == 0:
        raise ValueError(f"y_sorted: expected [rows, hidden] with hidden >= 1, got {tuple(y_sorted.shape)}")
    if out is None:
        out = torch.empty(num_tokens, hidden, dtype=y_sorted.dtype, device=y_sorted.device)
    else:
        check_tensor("out", out, ndim=2, dtypes=(y_sorted.dtype,), device=y_sorted.device)
        check_contiguous("out", out)
        if tuple(out.shape) != (num_tokens, hidden):
            raise ValueError(f"out: expected {(num_tokens, hidden)} (tokens, hidden), got {tuple(out.shape)}")
        # Rows of an out over y_sorted (or the plan) would be read after other programs wrote them.
        check_disjoint(
            {"out": out}, {"y_sorted": y_sorted, "weights": weights, "plan.slot_row": plan.slot_row}
        )
    if num_tokens == 0:
        return out
    config = combine_choice(y_sorted, weights).config
    tile, tokens = config["HIDDEN_TILE"], config["TOKENS"]
    _combine_kernel[(triton.cdiv(num_tokens, tokens), triton.cdiv(hidden, tile))](
        y_sorted,
        weights,
        plan.slot_row,
        out,
        num_tokens,
        hidden,
        TOP_K=top_k,
        TOKENS=tokens,
        HIDDEN_TILE=tile,
        num_warps=config["num_warps"],
    )
    return out
