"""Plain-torch twin of kernels/moe_gemm.py: the grouped expert GEMM as a loop over experts, in fp32.

Same signature and semantics as the kernel: expert e's rows, expert_offsets[e] + [0, tokens_per_expert[e]),
times w[e].T (fp8 weights dequantised block by block: each 128 x 128 block of w times its scale), with
silu(gate) * up for "silu_and_mul" (gate the first N // 2 rows of w, up the rest), written in a's dtype.
Rows whose row_token is -1 are not written: zero in a new output, left as they were in a given one.
"""

import torch


def dequantize(w: torch.Tensor, w_scale: torch.Tensor | None) -> torch.Tensor:
    """w [E, N, K] in fp32: fp8 codes times their 128 x 128 block's scale; other dtypes widened."""
    if w_scale is None:
        return w.float()
    _, n, k = w.shape
    scales = w_scale.float().repeat_interleave(128, dim=1).repeat_interleave(128, dim=2)[:, :n, :k]
    return w.float() * scales


def grouped_gemm(a, w, plan, *, gather=False, activation=None, w_scale=None, out=None):
    """Returns out [max_rows, N] (N // 2 with silu_and_mul) in a's dtype."""
    weights = dequantize(w, w_scale)
    num_rows = plan.row_token.shape[0]
    columns = w.shape[1] // 2 if activation == "silu_and_mul" else w.shape[1]
    result = torch.zeros(num_rows, columns, dtype=a.dtype, device=a.device) if out is None else out
    offsets, counts = plan.expert_offsets.tolist(), plan.tokens_per_expert.tolist()
    for expert, (start, count) in enumerate(zip(offsets, counts)):
        rows = torch.arange(start, start + count, device=a.device)
        rows = rows[plan.row_token[rows] >= 0]
        sources = plan.row_token[rows].long() if gather else rows
        product = a[sources].float() @ weights[expert].T
        if activation == "silu_and_mul":
            gate, up = product[:, :columns], product[:, columns:]
            product = torch.nn.functional.silu(gate) * up
        result[rows] = product.to(a.dtype)
    return result
