"""MoE top-k routing: choose each token's experts and their weights, in one launch.

Layouts:
    logits   [tokens, experts]   fp32, fp16 or bf16 (the router's output); rows may be strided
    bias     [experts] fp32      DeepSeek's e_score_correction_bias, used only to choose
    weights  [tokens, top_k] fp32 out
    ids      [tokens, top_k] int32 out, best choice first

Routing rules (as reference/moe.py states them): softmax top-k (Mixtral, Qwen3), top-k then softmax
(gpt-oss), and DeepSeek-V3/R1's grouped sigmoid routing (groups ranked by the sum of their top-2 biased
scores, the best ``topk_groups`` kept, experts chosen by biased score, weighted by unbiased score,
renormalised, times ``scale``). Ties go to the lower expert (and group) id: Triton's argmax keeps the first.

Byte story: each token's logits are read once and its choices written once; a program holds BLOCK_T tokens'
whole rows (256 experts at most here), so choosing k experts is k passes over registers, not memory.

dispatch and combine (grouping rows by expert and weighting them back) are not built yet.
"""

import torch
import triton
import triton.language as tl

from kernels._checks import check_tensor

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCORINGS = ("softmax", "sigmoid")
MAX_EXPERTS = 1024


@triton.jit
def _pick(values, index, at):
    """values[row, at[row]] for each row of a [rows, cols] tile (index: the column ids)."""
    return tl.sum(tl.where(index[None, :] == at[:, None], values, 0.0), axis=1)


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
    EXPERTS_PAD: tl.constexpr,  # power of two >= NUM_EXPERTS
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,  # power of two >= TOP_K
    NUM_GROUPS: tl.constexpr,  # 1: no group stage
    GROUPS_PAD: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    SIGMOID: tl.constexpr,  # scores = sigmoid(logits); else softmax(logits)
    SOFTMAX_AFTER_TOPK: tl.constexpr,  # choose on logits, softmax over the chosen (gpt-oss)
    RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, EXPERTS_PAD)
    live = tokens < num_tokens
    real = experts < NUM_EXPERTS
    rows = logits_ptr + tokens.to(tl.int64)[:, None] * stride_logits + experts[None, :]
    # Upcast right after the load: bf16 arithmetic is wrong in the interpreter, and routing is fp32.
    x = tl.load(rows, mask=live[:, None] & real[None, :], other=0.0).to(tl.float32)
    x = tl.where(real[None, :], x, float("-inf"))  # padding experts never win; rows past the tokens hold 0s

    if SOFTMAX_AFTER_TOPK:
        scores = x
    elif SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        shifted = tl.exp(x - tl.max(x, axis=1)[:, None])
        scores = shifted / tl.sum(shifted, axis=1)[:, None]
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + experts, mask=real, other=0.0)[None, :]
    choice = tl.where(real[None, :], choice, float("-inf"))

    if NUM_GROUPS > 1:
        # Rank groups by the sum of their two best biased scores; keep the best TOPK_GROUPS.
        group_of = experts // (NUM_EXPERTS // NUM_GROUPS)
        groups = tl.arange(0, GROUPS_PAD)
        group_scores = tl.full([BLOCK_T, GROUPS_PAD], float("-inf"), tl.float32)
        for g in tl.static_range(NUM_GROUPS):
            member = tl.where((group_of == g)[None, :], choice, float("-inf"))
            best = tl.argmax(member, axis=1, tie_break_left=True)
            second = tl.max(tl.where(experts[None, :] == best[:, None], float("-inf"), member), axis=1)
            top2 = tl.max(member, axis=1) + second
            group_scores = tl.where(groups[None, :] == g, top2[:, None], group_scores)
        kept = tl.zeros([BLOCK_T, EXPERTS_PAD], dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUPS):
            best_group = tl.argmax(group_scores, axis=1, tie_break_left=True)
            kept = kept | (group_of[None, :] == best_group[:, None])
            group_scores = tl.where(groups[None, :] == best_group[:, None], float("-inf"), group_scores)
        choice = tl.where(kept, choice, float("-inf"))

    slots = tl.arange(0, K_PAD)
    chosen_ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    chosen = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        best = tl.argmax(choice, axis=1, tie_break_left=True)
        chosen_ids = tl.where(slots[None, :] == k, best[:, None], chosen_ids)
        chosen = tl.where(slots[None, :] == k, _pick(scores, experts, best)[:, None], chosen)
        choice = tl.where(experts[None, :] == best[:, None], float("-inf"), choice)

    in_k = slots[None, :] < TOP_K
    if SOFTMAX_AFTER_TOPK:
        chosen = tl.where(
            in_k, tl.exp(chosen - tl.max(tl.where(in_k, chosen, float("-inf")), axis=1)[:, None]), 0.0
        )
        chosen = chosen / tl.sum(chosen, axis=1)[:, None]
    elif RENORMALIZE:
        chosen = tl.where(in_k, chosen, 0.0)
        chosen = chosen / tl.sum(chosen, axis=1)[:, None]
    out = tokens.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    mask = live[:, None] & in_k
    tl.store(weights_ptr + out, chosen * scale, mask=mask)
    tl.store(ids_ptr + out, chosen_ids, mask=mask)


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
    best first, ties to the lower id. No host sync."""
    check_tensor("logits", logits, ndim=2, dtypes=LOGIT_DTYPES)
    num_tokens, num_experts = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"logits: expected experts contiguous (stride 1), got strides {logits.stride()}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"logits: expected 1 to {MAX_EXPERTS} experts, got {num_experts}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected an integer in [1, {num_experts}] (the experts), got {top_k!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring: expected one of {SCORINGS}, got {scoring!r}")
    groups = 1 if num_groups is None else num_groups
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or num_experts % groups:
        raise ValueError(f"num_groups: expected a divisor of the {num_experts} experts, got {num_groups!r}")
    if groups > 1:
        if num_experts // groups < 2:
            raise ValueError("num_groups: groups rank by their top-2 scores, so each needs 2 experts or more")
        if not isinstance(topk_groups, int) or not 1 <= topk_groups <= groups:
            raise ValueError(f"topk_groups: expected an integer in [1, {groups}], got {topk_groups!r}")
        if topk_groups * (num_experts // groups) < top_k:
            raise ValueError(
                f"topk_groups: {topk_groups} groups of {num_experts // groups} hold fewer than top_k"
            )
    elif topk_groups is not None:
        raise ValueError("topk_groups: applies only with num_groups > 1")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(torch.float32,), device=logits.device)
        if bias.shape[0] != num_experts or bias.stride(0) != 1:
            raise ValueError(f"bias: expected a contiguous [{num_experts}] tensor, got {tuple(bias.shape)}")
    if softmax_after_topk and (scoring != "softmax" or groups > 1 or bias is not None):
        raise ValueError("softmax_after_topk: chooses on raw logits; it takes no sigmoid, groups or bias")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale: expected a float, got {scale!r}")

    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    experts_pad = triton.next_power_of_2(num_experts)
    block_t = max(1, min(16, 4096 // experts_pad))
    _route_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits,
        bias if bias is not None else weights,
        weights,
        ids,
        num_tokens,
        logits.stride(0),
        float(scale),
        NUM_EXPERTS=num_experts,
        EXPERTS_PAD=experts_pad,
        TOP_K=top_k,
        K_PAD=triton.next_power_of_2(top_k),
        NUM_GROUPS=groups,
        GROUPS_PAD=triton.next_power_of_2(groups),
        TOPK_GROUPS=topk_groups or 1,
        SIGMOID=scoring == "sigmoid",
        SOFTMAX_AFTER_TOPK=softmax_after_topk,
        RENORMALIZE=renormalize,
        HAS_BIAS=bias is not None,
        BLOCK_T=block_t,
        num_warps=4,
    )
    return weights, ids
