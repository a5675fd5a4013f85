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


def flex_unsupported(cache_dtype, lengths, block_size: int, head_dim: int, group: int, device) -> str | None:
    """Why FlexAttention cannot take this decode, or None. On a GPU the compiled kernel (torch's inductor
    lowering of flex decoding) tiles one page per key block with tl.dot, which needs 16 columns and 16-wide
    heads, and serves a group of query heads per KV head only when the group is a power of two (the general
    kernel cannot take our one-row query blocks)."""
    if cache_dtype == FP8:
        return "FlexAttention takes no fp8 K/V"
    if max(lengths) == 0:
        return "FlexAttention needs at least one key"
    if device.type == "cuda":
        if block_size < 16:
            return f"compiled FlexAttention takes pages of 16 tokens or more, not {block_size}"
        if head_dim < 16:
            return f"compiled FlexAttention takes head_dim 16 or more, not {head_dim}"
        if group & (group - 1):
            return f"compiled FlexAttention decode needs a power-of-two query group, not {group}"
    return None


def flex_physical(cache: torch.Tensor) -> torch.Tensor:
    """A paged cache [num_blocks, block_size, kv_heads, dim] as FlexAttention's physical layout [1, kv_heads,
    blocks x page, dim] (same block ids). FlexAttention reads whole pages, so slots past a length must not
    hold NaN: the copy has them zeroed."""
    num_blocks, block_size, num_kv_heads, dim = cache.shape
    return cache.nan_to_num(0.0).permute(2, 0, 1, 3).reshape(1, num_kv_heads, -1, dim).contiguous()


def flex_paged_prepare(q, k, v, block_tables, seq_lens, pages, block_size: int, scale: float) -> Prepared:
    """FlexAttention's paged decode of q [batch, heads, dim] over physical k and v (flex_physical): its page
    table is set from the block tables and the logical block mask (key < length) converted to pages. On a
    GPU flex_attention is compiled (once per process, dynamic shapes); the first call, which pays the
    compile, is verify_and_prepare's untimed one."""
    global _compiled_flex
    try:
        from torch.nn.attention.experimental._paged_attention import PagedAttention
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        raise PeerUnavailable(f"this torch has no FlexAttention paged decode ({error})") from None
    device, batch = q.device, q.shape[0]
    num_blocks = k.shape[2] // block_size
    paged = PagedAttention(num_blocks, block_size, batch, device=str(device))
    table = torch.full((batch, num_blocks), -1, dtype=torch.int64, device=device)
    to_logical = torch.full((batch, num_blocks), -1, dtype=torch.int64, device=device)
    for b, count in enumerate(pages):
        ids = block_tables[b, :count].long()
        table[b, :count] = ids
        to_logical[b, ids] = torch.arange(count, device=device)
    paged.page_table, paged.physical_to_logical = table, to_logical
    lengths = seq_lens.long()

    def within_length(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    logical = create_block_mask(
        within_length, batch, None, 1, max(pages) * block_size, device=str(device), BLOCK_SIZE=(1, block_size)
    )
    mask = paged.convert_logical_block_mask(logical, kv_len=lengths)
    attend = flex_attention
    if device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=True)
        attend = _compiled_flex
    q = q[:, :, None, :]
    return Prepared(lambda: attend(q, k, v, block_mask=mask, scale=scale, enable_gqa=True))


def flex_prepare(inputs, shape) -> Prepared:
    """The caches copied once into FlexAttention's physical layout, outside the timing."""
    a = inputs.args
    group = shape.num_q_heads // shape.num_kv_heads
    reason = flex_unsupported(
        shape.cache_dtype, shape.lengths, shape.block_size, shape.head_dim, group, a["q"].device
    )
    if reason:
        raise PeerUnavailable(reason)
    k, v = flex_physical(a["k_cache"]), flex_physical(a["v_cache"])
    return flex_paged_prepare(
        a["q"], k, v, a["block_tables"], a["seq_lens"], shape.pages, shape.block_size, shape.head_dim**-0.5
    )


def flex_check(result, expected, shape) -> float:
    return _check_as_out(result[:, :, 0, :], expected, shape)  # [b, h, 1, d] -> [b, h, d]


# --- FlashInfer batch decode --------------------------------------------------------------------------------


def flashinfer_page_lists(inputs, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's CSR page lists of a decode case's inputs: (indptr, indices, last_page_len) on q's
    device; raises PeerUnavailable where FlashInfer cannot run or express the batch."""
    try:
        import flashinfer  # noqa: F401
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
    return indptr, indices, last_page_len


def flashinfer_prepare(inputs, shape) -> Prepared:
    """Its NHD layout is ours; planned here, outside the timing, as a serving engine plans once per step."""
    indptr, indices, last_page_len = flashinfer_page_lists(inputs, shape)
    import flashinfer

    a, device = inputs.args, inputs.args["q"].device
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
