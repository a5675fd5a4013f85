"""Peers of ``paged_decode``: the same decode step by other implementations.

- ``sdpa-contiguous``: torch's scaled_dot_product_attention over the same tokens stored contiguously per
  sequence (what paging costs).
- ``flex-attention-paged``: torch's FlexAttention through its experimental PagedAttention (compiled on a GPU).
- ``flashinfer``: FlashInfer's batch decode over the same paged cache, where it is installed.

What each cannot take is decided up front from the shape and the installed version (PeerUnavailable, with
the reason); any other error surfaces. Each check brings the peer's output to the kernel's layout [batch,
q_heads, head_dim] and holds it to the case's own comparison (q's dtype tolerance, finite, zeros for empty
sequences).
"""

import torch

from bench.peers import Peer, PeerUnavailable, Prepared

FP8 = torch.float8_e4m3fn


def _check_as_out(out: torch.Tensor, expected, shape) -> float:
    """``out`` [batch, q_heads, head_dim] through paged_decode's own compare, as if the kernel returned it."""
    from bench.cases.base import Inputs
    from bench.cases.paged_attention import compare  # here: the case module imports this one

    return compare(Inputs({}, ("out",), result=out.contiguous()), expected, shape)


# --- torch SDPA over contiguous copies ----------------------------------------------------------------------


def sdpa_prepare(inputs, shape) -> Prepared:
    """The contiguous copy [batch, kv_heads, length, head_dim] is made here, outside the timing."""
    if shape.cache_dtype == FP8:
        raise PeerUnavailable("scaled_dot_product_attention takes no fp8 K/V")
    if len(set(shape.lengths)) != 1 or shape.lengths[0] == 0:
        raise PeerUnavailable("needs one nonzero length for all sequences (padding would add bytes)")
    import torch.nn.functional as F

    a, length = inputs.args, shape.lengths[0]
    pages = a["block_tables"][:, : shape.pages[0]].long()

    def contiguous(cache):  # [batch, kv_heads, length, head_dim]
        return cache[pages].flatten(1, 2)[:, :length].transpose(1, 2).contiguous()

    k, v, q = contiguous(a["k_cache"]), contiguous(a["v_cache"]), a["q"][:, :, None, :]
    scale = shape.head_dim**-0.5
    return Prepared(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True))


def sdpa_check(result, expected, shape) -> float:
    return _check_as_out(result[:, :, 0, :], expected, shape)  # [b, h, 1, d] -> [b, h, d]


# --- FlexAttention paged decode -----------------------------------------------------------------------------

_compiled_flex = None


def _flex_unsupported(shape, device: torch.device) -> str | None:
    """Why FlexAttention cannot take this shape, or None. On a GPU the compiled kernel (torch's inductor
    lowering of flex decoding) tiles one page per key block with tl.dot, which needs 16 columns and 16-wide
    heads, and serves a group of query heads per KV head only when the group is a power of two (the general
    kernel cannot take our one-row query blocks)."""
    if shape.cache_dtype == FP8:
        return "FlexAttention takes no fp8 K/V"
    if max(shape.lengths) == 0:
        return "FlexAttention needs at least one key"
    if device.type == "cuda":
        group = shape.num_q_heads // shape.num_kv_heads
        if shape.block_size < 16:
            return f"compiled FlexAttention takes pages of 16 tokens or more, not {shape.block_size}"
        if shape.head_dim < 16:
            return f"compiled FlexAttention takes head_dim 16 or more, not {shape.head_dim}"
        if group & (group - 1):
            return f"compiled FlexAttention decode needs a power-of-two query group, not {group}"
    return None


def flex_prepare(inputs, shape) -> Prepared:
    """The cache is copied once into FlexAttention's physical layout [1, kv_heads, blocks x page, head_dim]
    (same block ids), its page table is set from the block tables, and the logical block mask (key <
    length) is converted to pages. On a GPU flex_attention is compiled (once per process, dynamic shapes);
    the first call, which pays the compile, is verify_and_prepare's untimed one. FlexAttention reads whole
    pages, so slots past a length must not hold NaN: its copy of the cache has them zeroed."""
    global _compiled_flex
    try:
        from torch.nn.attention.experimental._paged_attention import PagedAttention
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        raise PeerUnavailable(f"this torch has no FlexAttention paged decode ({error})") from None
    a = inputs.args
    device = a["q"].device
    reason = _flex_unsupported(shape, device)
    if reason:
        raise PeerUnavailable(reason)
    num_blocks, block_size, num_kv_heads, head_dim = a["k_cache"].shape
    paged = PagedAttention(num_blocks, block_size, shape.batch, device=str(device))
    table = torch.full((shape.batch, num_blocks), -1, dtype=torch.int64, device=device)
    to_logical = torch.full((shape.batch, num_blocks), -1, dtype=torch.int64, device=device)
    for b, pages in enumerate(shape.pages):
        ids = a["block_tables"][b, :pages].long()
        table[b, :pages] = ids
        to_logical[b, ids] = torch.arange(pages, device=device)
    paged.page_table, paged.physical_to_logical = table, to_logical
    lengths = a["seq_lens"].long()

    def within_length(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    def physical(cache):
        flat = cache.nan_to_num(0.0).permute(2, 0, 1, 3).reshape(1, num_kv_heads, -1, head_dim)
        return flat.contiguous()

    k, v, q = physical(a["k_cache"]), physical(a["v_cache"]), a["q"][:, :, None, :]
    scale = shape.head_dim**-0.5
    logical = create_block_mask(
        within_length,
        shape.batch,
        None,
        1,
        max(shape.pages) * block_size,
        device=str(device),
        BLOCK_SIZE=(1, block_size),
    )
    mask = paged.convert_logical_block_mask(logical, kv_len=lengths)
    attend = flex_attention
    if device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=True)
        attend = _compiled_flex
    return Prepared(lambda: attend(q, k, v, block_mask=mask, scale=scale, enable_gqa=True))


def flex_check(result, expected, shape) -> float:
    return _check_as_out(result[:, :, 0, :], expected, shape)  # [b, h, 1, d] -> [b, h, d]


# --- FlashInfer batch decode --------------------------------------------------------------------------------


def flashinfer_prepare(inputs, shape) -> Prepared:
    """Its NHD layout is ours; planned here, outside the timing, as a serving engine plans once per step."""
    try:
        import flashinfer
    except ImportError:
        raise PeerUnavailable("flashinfer is not installed (pip install 'decodebench[flashinfer]')") from None
    if 0 in shape.lengths:
        raise PeerUnavailable("FlashInfer's page tables cannot express a zero-length sequence")
    a, device = inputs.args, inputs.args["q"].device
    if device.type != "cuda":
        raise PeerUnavailable("FlashInfer runs on CUDA devices only")
    pages = torch.tensor(shape.pages, dtype=torch.int32)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int32), pages.cumsum(0).to(torch.int32)]).to(device)
    indices = torch.cat([a["block_tables"][b, :n] for b, n in enumerate(shape.pages)]).to(torch.int32)
    last_page_len = torch.tensor(
        [n - (p - 1) * shape.block_size for n, p in zip(shape.lengths, shape.pages)], dtype=torch.int32
    ).to(device)
    workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    wrapper.plan(
        indptr,
        indices,
        last_page_len,
        shape.num_q_heads,
        shape.num_kv_heads,
        shape.head_dim,
        shape.block_size,
        q_data_type=shape.dtype,
        kv_data_type=shape.cache_dtype,
    )
    scales = {}
    if shape.cache_dtype == FP8:
        scales = {"k_scale": float(a["k_scale"]), "v_scale": float(a["v_scale"])}  # host reads, here
    q, kv = a["q"], (a["k_cache"], a["v_cache"])
    return Prepared(lambda: wrapper.run(q, kv, **scales))


def flashinfer_check(result, expected, shape) -> float:
    return _check_as_out(result, expected, shape)  # already [b, h, d]


PEERS = {
    "sdpa-contiguous": Peer("sdpa-contiguous", sdpa_prepare, sdpa_check),
    "flex-attention-paged": Peer("flex-attention-paged", flex_prepare, flex_check),
    "flashinfer": Peer("flashinfer", flashinfer_prepare, flashinfer_check),
}
