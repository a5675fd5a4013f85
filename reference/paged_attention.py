"""Plain-torch twin of kernels/paged_attention.py: decode attention over a paged KV cache, in fp32.

Same signature and semantics. Each sequence's pages are gathered through its block table, dequantised
(fp8 caches: times k_scale / v_scale), and attended to with a softmax in fp32; a zero-length sequence gives
zeros. ``num_splits`` and ``workspace`` change how the kernel divides the work and where it keeps its
partials, not the result, so they are ignored here.
It reads lengths on the host (a loop over sequences): a reference, not a fast path.
"""

import torch


def per_tensor_scale(scale) -> torch.Tensor | float:
    """An fp8 cache's per-tensor scale as a factor (None: 1)."""
    if scale is None:
        return 1.0
    return scale.reshape(()).float() if isinstance(scale, torch.Tensor) else float(scale)


def sequence_rows(cache, block_tables, b: int, length: int, scale) -> torch.Tensor:
    """Sequence ``b``'s first ``length`` cached token rows, gathered through its block table and dequantised
    to fp32 (an fp8 cache's per-tensor ``scale``): [length, *cache.shape[2:]]."""
    pages = block_tables[b, : -(-length // cache.shape[1])].long()
    return cache[pages].flatten(0, 1)[:length].float() * per_tensor_scale(scale)


def written(result: torch.Tensor, like: torch.Tensor, out) -> torch.Tensor:
    """The fp32 ``result`` in ``like``'s dtype, copied into ``out`` when the caller gave one."""
    result = result.to(like.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


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
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    result = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    for b, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        k = sequence_rows(k_cache, block_tables, b, length, k_scale)  # [length, kv_heads, head_dim]
        v = sequence_rows(v_cache, block_tables, b, length, v_scale)
        queries = q[b].float().view(num_kv_heads, group, head_dim)
        scores = torch.einsum("hgd,nhd->hgn", queries, k) * scale
        weights = torch.softmax(scores, dim=-1)
        result[b] = torch.einsum("hgn,nhd->hgd", weights, v).reshape(num_q_heads, head_dim)
    return written(result, q, out)
