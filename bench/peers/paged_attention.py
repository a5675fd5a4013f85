"""Peers of ``paged_decode``: the same decode step by other implementations.

- ``sdpa-contiguous``: torch's scaled_dot_product_attention over the same tokens stored contiguously per
  sequence (what paging costs), on a GPU only where a fused backend takes the shape (fused_sdpa_refusal).
- ``flex-attention-paged``: torch's FlexAttention through its experimental PagedAttention (compiled on a GPU,
  one shape at a time, so that torch picks its decode kernel).
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
    q = a["q"][:, :, None, :]
    refusal = fused_sdpa_refusal(q, shape.num_kv_heads, shape.head_dim, length)
    if refusal:
        raise PeerUnavailable(refusal)
    pages = a["block_tables"][:, : shape.pages[0]].long()

    def contiguous(cache):  # [batch, kv_heads, length, head_dim]
        return cache[pages].flatten(1, 2)[:, :length].transpose(1, 2).contiguous()

    k, v = contiguous(a["k_cache"]), contiguous(a["v_cache"])
    scale = shape.head_dim**-0.5
    return Prepared(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True))


# Devices where the SDPA peers must run on a fused backend. On a GPU torch's math fallback upcasts to fp32
# and repeats K and V for every query head (MLA at batch 32, 8K context, 128 heads: about 220 GB); on the
# CPU it is the CPU's own path, at the small shapes the dry run and the tests take.
FUSED_SDPA_ONLY_ON = ("cuda",)
# The key length of the probe fused_sdpa_refusal runs: which backend takes a call depends on dtypes, head
# dims and head counts, not on the length, so a short one decides it for the real one.
_PROBE_KEYS = 16


def fused_sdpa_refusal(q: torch.Tensor, kv_heads: int, v_dim: int, length: int) -> str | None:
    """Why no fused SDPA backend (flash, memory-efficient, cuDNN) takes ``q`` [batch, heads, 1, qk_dim] over
    ``kv_heads`` heads of K (qk_dim wide) and V (``v_dim`` wide, K's leading columns), or None when one does
    or when ``q``'s device is not in FUSED_SDPA_ONLY_ON. Torch itself decides, on a probe of _PROBE_KEYS
    keys run with the math backend disabled, before anything of the real size is allocated."""
    if q.device.type not in FUSED_SDPA_ONLY_ON:
        return None
    import warnings

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, heads, _, qk_dim = q.shape
    k = q.new_zeros(batch, kv_heads, _PROBE_KEYS, qk_dim)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with warnings.catch_warnings(record=True) as told, sdpa_kernel(fused):
        warnings.simplefilter("always")
        try:
            F.scaled_dot_product_attention(q, k, k[..., :v_dim], enable_gqa=True)
            return None
        except RuntimeError as error:
            why = [str(w.message).split(" (Triggered internally")[0] for w in told] or [str(error)]
    math_gb = batch * heads * length * (qk_dim + v_dim) * 4 / 1e9  # K and V repeated per head, in fp32
    return (
        f"no fused SDPA backend takes q/k {qk_dim} and v {v_dim} with {heads} query heads over {kv_heads} "
        f"KV heads ({'; '.join(w for w in why if 'not used because' not in w)[:300]}); torch's math "
        f"fallback would upcast to fp32 and repeat K and V for every head (about {math_gb:.0f} GB here)"
    )


def sdpa_check(result, expected, shape) -> float:
    return _check_as_out(result[:, :, 0, :], expected, shape)  # [b, h, 1, d] -> [b, h, d]


# --- FlexAttention paged decode -----------------------------------------------------------------------------

# FlexAttention's block sizes, query by key. Torch's decode kernel (torch/_inductor/kernel/flex/
# flex_decoding.py) takes a query group of the heads sharing a KV head as its BLOCK_M rows (a power of two,
# at least 16) and drops every configuration whose BLOCK_M does not divide the sparse query block: a query
# block of 128 serves groups up to 128. The key block is the page: PagedAttention maps one block per page.
FLEX_Q_BLOCK = 128
# Shared memory one thread block may take on the lent GPUs (H100, H200: 227 KB).
_SHARED_BYTES = 227 * 1024
# The decode kernel's default key tile on sm_90 (torch's flex decode heuristics: 64 keys, one stage).
_FLEX_DECODE_BLOCK_N = 64


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def flex_unsupported(
    cache_dtype, lengths, block_size: int, head_dim: int, group: int, device, v_dim: int | None = None
) -> str | None:
    """Why FlexAttention cannot take this decode, or None. On a GPU the compiled decode kernel (torch's
    inductor lowering of flex decoding) tiles one page per key block with tl.dot, which needs a power-of-two
    page of 16 columns or more and 16-wide heads; it serves a group of query heads per KV head only when the
    group is a power of two no larger than FLEX_Q_BLOCK; and its query tile (the group, padded to a power of
    two of at least 16, by head_dim padded to a power of two) with one key and value tile must fit in shared
    memory. That last is an estimate from the kernel's tiles, to be confirmed on the first lent GPU."""
    if cache_dtype == FP8:
        return "FlexAttention takes no fp8 K/V"
    if max(lengths) == 0:
        return "FlexAttention needs at least one key"
    if device.type != "cuda":
        return None
    if block_size < 16 or block_size & (block_size - 1):
        return f"compiled FlexAttention takes power-of-two pages of 16 tokens or more, not {block_size}"
    if head_dim < 16:
        return f"compiled FlexAttention takes head_dim 16 or more, not {head_dim}"
    if group & (group - 1) or group > FLEX_Q_BLOCK:
        return (
            f"compiled FlexAttention decode needs a power-of-two query group of {FLEX_Q_BLOCK} or fewer, "
            f"not {group}"
        )
    rows, keys = max(group, 16), min(_FLEX_DECODE_BLOCK_N, block_size)
    width = _pow2(head_dim) + _pow2(v_dim or head_dim)
    tiles = (rows * _pow2(head_dim) + keys * width) * cache_dtype.itemsize
    if tiles > _SHARED_BYTES:
        return (
            f"compiled FlexAttention decode's tiles ({rows} query rows, {keys} keys, {head_dim} wide) take "
            f"about {tiles // 1024} KB of shared memory, over the {_SHARED_BYTES // 1024} KB a block has"
        )
    return None


def compiled_flex_attention():
    """flex_attention compiled for one shape. Not ``dynamic=True``: with batch and heads symbolic, torch does
    not choose its decode kernel, and the general one cannot take one-row queries. Each shape compiles anew
    (a paged mask is a new function each time, and its shapes are baked in): dynamo is reset first, so its
    recompile limit, past which it would run flex_attention eagerly and unfused, is never reached."""
    from torch.nn.attention.flex_attention import flex_attention

    torch.compiler.reset()
    return torch.compile(flex_attention, dynamic=False)


def flex_physical(cache: torch.Tensor) -> torch.Tensor:
    """A paged cache [num_blocks, block_size, kv_heads, dim] as FlexAttention's physical layout [1, kv_heads,
    blocks x page, dim] (same block ids). FlexAttention reads whole pages, so slots past a length must not
    hold NaN: the copy has them zeroed."""
    num_blocks, block_size, num_kv_heads, dim = cache.shape
    return cache.nan_to_num(0.0).permute(2, 0, 1, 3).reshape(1, num_kv_heads, -1, dim).contiguous()


def flex_paged_prepare(q, k, v, block_tables, seq_lens, pages, block_size: int, scale: float) -> Prepared:
    """FlexAttention's paged decode of q [batch, heads, dim] over physical k and v (flex_physical): its page
    table is set from the block tables and the logical block mask (key < length; blocks of FLEX_Q_BLOCK
    queries by one page) converted to pages. On a GPU flex_attention is compiled for this shape
    (compiled_flex_attention); the first call, which pays the compile, is verify_and_prepare's untimed one."""
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
        within_length,
        batch,
        None,
        1,
        max(pages) * block_size,
        device=str(device),
        BLOCK_SIZE=(FLEX_Q_BLOCK, block_size),
    )
    mask = paged.convert_logical_block_mask(logical, kv_len=lengths)
    attend = compiled_flex_attention() if device.type == "cuda" else flex_attention
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
