"""Plain-torch twin of kernels/mla_attention.py: absorbed MLA decode over a paged latent cache, in fp32.

Same signature and semantics. Each sequence's pages are gathered through its block table, dequantised (fp8
caches: times kv_scale), and every head attends to the gathered rows with a softmax in fp32: the whole row
is the key, its first v_head_dim columns the value. A zero-length sequence gives zeros. ``num_splits`` and
``workspace`` change how the kernel divides the work, not the result, so they are ignored here.
It reads lengths on the host (a loop over sequences): a reference, not a fast path.
"""

import torch

from reference.paged_attention import sequence_rows, written


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
    batch, num_heads, qk_dim = q.shape
    scale = qk_dim**-0.5 if scale is None else scale
    result = torch.zeros(batch, num_heads, v_head_dim, dtype=torch.float32, device=q.device)
    for b, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        rows = sequence_rows(kv_cache, block_tables, b, length, kv_scale)[:, 0]  # [length, qk_dim]
        weights = torch.softmax(q[b].float() @ rows.T * scale, dim=-1)  # [num_heads, length]
        result[b] = weights @ rows[:, :v_head_dim]
    return written(result, q, out)
