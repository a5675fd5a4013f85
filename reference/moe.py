"""Plain-torch twin of kernels/moe.py: MoE top-k routing, in fp32.

Same signature and semantics as the kernel. Choices are ranked by their selection score, highest first,
ties to the lower expert id (a stable sort, so runs are deterministic):

- softmax top-k (Mixtral, Qwen3): scores = softmax(logits); the top_k scores, renormalised to sum to 1.
- top-k then softmax (gpt-oss, ``softmax_after_topk``): the top_k logits, softmaxed among themselves.
- DeepSeek-V3/R1 grouped (``scoring="sigmoid"``, ``num_groups``, ``topk_groups``, ``bias``): scores =
  sigmoid(logits); bias is added only to choose; groups are ranked by the sum of their top-2 biased scores
  and the best ``topk_groups`` kept; the top_k biased scores among them choose the experts; the weights are
  the unbiased scores, renormalised, times ``scale``.
"""

import torch


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values along the last axis, ties to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


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
        group_scores = torch.sort(grouped, dim=-1, descending=True).values[..., :2].sum(-1)
        kept = torch.zeros(tokens, num_groups, dtype=torch.bool, device=x.device)
        kept.scatter_(1, _top(group_scores, topk_groups), True)
        choice = choice.masked_fill(~kept.repeat_interleave(experts // num_groups, dim=1), float("-inf"))
    ids = _top(choice, top_k)
    weights = torch.gather(scores, 1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * scale, ids.to(torch.int32)
