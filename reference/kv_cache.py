"""Plain-torch twin of kernels/kv_cache.py: write new tokens' K and V into a paged KV cache.

Same signature and semantics: key[t] goes to cache slot slot_mapping[t] (slot = block * block_size + offset),
slots outside [0, num_blocks * block_size) are skipped, fp8 e4m3 caches store clamp(x / scale, +-448).
It trusts its inputs; argument checking is the kernel launcher's job.
"""

import torch

FP8_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def _quantize(x: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    if dtype != torch.float8_e4m3fn:
        return x.to(dtype)
    scale = 1.0 if scale is None else scale
    if isinstance(scale, torch.Tensor):
        scale = scale.reshape(()).to(device=x.device, dtype=torch.float32)
    # torch's fp8 cast does not saturate (out of range becomes NaN), so clamp first, as the kernel does.
    return (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(dtype)


def _write(x: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, live: torch.Tensor, scale) -> None:
    rows = cache.view(-1, cache.shape[2], cache.shape[3])  # [num_slots, num_kv_heads, head_dim]
    rows[slots[live]] = _quantize(x[live], scale, cache.dtype)


def write_kv(key, value, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None) -> None:
    """Writes key[t] (and value[t]) into slot slot_mapping[t] of k_cache (and v_cache) in place."""
    slots = slot_mapping.long()
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    live = (slots >= 0) & (slots < num_slots)
    _write(key, k_cache, slots, live, k_scale)
    if value is not None:
        _write(value, v_cache, slots, live, v_scale)
