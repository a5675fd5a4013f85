"""Plain-torch twin of kernels/moe.py: MoE top-k routing, in fp32.

Same signature and semantics as the kernel. Choices are ranked by their selection score, highest first,
NaN after -inf, equal scores (-inf and NaN included; -0.0 equals 0.0) to the lower expert id, so a token's
top_k ids are always distinct and runs deterministic. A NaN score is never preferred to a number: a token
with fewer than top_k scores that are numbers takes the rest in id order among the NaNs. Weights follow the
scores as computed (a +inf or NaN logit makes every softmax score of its token NaN, its weights too); a token
never changes another token's result.

- softmax top-k (Mixtral, Qwen3): scores = softmax(logits); the top_k scores, renormalised to sum to 1.
- top-k then softmax (gpt-oss, ``softmax_after_topk``): the top_k logits, softmaxed among themselves.
- group-limited (``num_groups``, ``topk_groups``, optionally ``bias``): bias is added only to choose; the
  best ``topk_groups`` groups are kept; the top_k selection scores among them choose the experts (the other
  groups' experts choose as -inf: after every kept expert scoring above -inf, ties by id); the weights are
  the unbiased scores, renormalised if asked, times ``scale``. Groups rank, ties to the lower group id:
  - with a bias, by the sum of their top-2 biased scores: DeepSeek-V3/R1 (``scoring="sigmoid"``; arXiv
    2412.19437's node-limited routing), as SGLang's biased_grouped_topk and vLLM's grouped_topk (given an
    e_score_correction_bias) rank them;
  - without, by their best score: DeepSeek-V2's group_limited_greedy (softmax scores; arXiv 2405.04434's
    device-limited routing), as vLLM's grouped_topk and SGLang's grouped_topk rank them with no bias.
"""

from dataclasses import dataclass

import torch


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values along the last axis, NaN after -inf, ties to the lower index."""
    nan = values.isnan()
    # torch sorts NaN first when descending: rank NaN as -inf, then move the NaNs behind (stable sorts).
    order = torch.sort(values.masked_fill(nan, float("-inf")), dim=-1, descending=True, stable=True).indices
    nan_last = torch.sort(nan.gather(-1, order).to(torch.uint8), dim=-1, stable=True).indices
    return order.gather(-1, nan_last)[..., :k]


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
    """Returns (weights fp32 [tokens, top_k], ids int32 [tokens, top_k])."""
    x = logits.float()
    if softmax_after_topk:
        ids = _top(x, top_k)
        weights = torch.softmax(torch.gather(x, 1, ids), dim=-1)
        return weights * scale, ids.to(torch.int32)
    scores = torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)
    choice = scores + bias.float() if bias is not None else scores.clone()
    if num_groups is not None and num_groups > 1:
        tokens, experts = choice.shape
        grouped = choice.view(tokens, num_groups, experts // num_groups)
        best = 2 if bias is not None else 1  # sum of the top-2 with a bias; the best score without
        group_scores = torch.gather(grouped, -1, _top(grouped, best)).sum(-1)  # in the same order, NaN last
        kept = torch.zeros(tokens, num_groups, dtype=torch.bool, device=x.device)
        kept.scatter_(1, _top(group_scores, topk_groups), True)
        choice = choice.masked_fill(~kept.repeat_interleave(experts // num_groups, dim=1), float("-inf"))
    ids = _top(choice, top_k)
    weights = torch.gather(scores, 1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * scale, ids.to(torch.int32)


@dataclass(frozen=True)
class DispatchPlan:
    """Where dispatch put each row (same fields and invariants as kernels.moe.DispatchPlan)."""

    tokens_per_expert: torch.Tensor  # int32 [experts]
    expert_offsets: torch.Tensor  # int32 [experts + 1]; expert e's segment starts at a multiple of align
    row_token: torch.Tensor  # int32 [max_rows]: each row's source token, -1 for padding
    slot_row: torch.Tensor  # int32 [tokens, top_k]: the row token t's c-th choice landed in
    align: int


def max_rows(num_tokens: int, top_k: int, num_experts: int, align: int) -> int:
    return num_tokens * top_k + num_experts * (align - 1)


def dispatch(x, ids, num_experts, *, align=1, workspace=None):
    """Copies token t's row to one row per choice, grouped by expert in (token, choice) order, each expert's
    segment starting at a multiple of ``align``; returns (x_sorted [max_rows, hidden], plan). Padding rows
    are zero here (the kernel leaves them unwritten). A choice whose id is outside [0, num_experts) is
    dropped: slot_row -1, no row. ``workspace`` (the kernel's caller-owned buffers) is ignored: the
    reference allocates its own."""
    plan = dispatch_plan(ids, num_experts, align=align)
    x_sorted = torch.zeros(plan.row_token.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    real = plan.row_token >= 0
    x_sorted[real] = x[plan.row_token[real].long()]
    return x_sorted, plan


def dispatch_plan(ids, num_experts, *, align=1, workspace=None):
    """dispatch's plan alone (the kernel's dispatch_plan: no rows copied); ``workspace`` is ignored."""
    tokens, top_k = ids.shape
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    experts = torch.where(valid, flat, num_experts)  # dropped choices sort after every expert
    counts = torch.bincount(flat[valid], minlength=num_experts)
    padded = (counts + align - 1) // align * align
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    offsets[1:] = torch.cumsum(padded, 0)
    order = torch.sort(experts, stable=True).indices  # pairs by expert, then by (token, choice)
    order = order[valid[order]]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=ids.device) - starts[flat[order]]
    rows = torch.full_like(flat, -1)
    rows[order] = offsets[flat[order]] + rank
    total = max_rows(tokens, top_k, num_experts, align)
    row_token = torch.full((total,), -1, dtype=torch.int32, device=ids.device)
    pair_token = torch.arange(flat.numel(), device=ids.device) // top_k
    row_token[rows[valid]] = pair_token[valid].to(torch.int32)
    return DispatchPlan(
        counts.to(torch.int32),
        offsets.to(torch.int32),
        row_token,
        rows.view(tokens, top_k).to(torch.int32),
        align,
    )


def combine(y_sorted, weights, plan, *, out=None):
    """out[t] = sum over choices c of weights[t, c] * y_sorted[slot_row[t, c]], in fp32, in y's dtype; a
    dropped choice (slot_row -1) adds weights[t, c] * 0. With ``out``, written there and returned."""
    slot_row = plan.slot_row.long()
    rows = y_sorted[slot_row.clamp(min=0)].float()  # [tokens, top_k, hidden]
    rows = rows.masked_fill((slot_row < 0)[..., None], 0.0)
    result = (rows * weights.float()[..., None]).sum(1).to(y_sorted.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out
