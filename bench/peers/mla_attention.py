"""Peers of ``mla_decode``: the same absorbed MLA decode step by other implementations.

- ``torch-gather-dense``: what a PyTorch user writes without a kernel: gather each sequence's pages through
  the block table (inside the timing: that is paging's cost in eager torch), then two batched matmuls in q's
  dtype and a softmax in fp32.
- ``sdpa-contiguous``: torch's scaled_dot_product_attention over the same latent stored contiguously per
  sequence, the value a view of its first v_head_dim columns (what paging costs); on a GPU only where one
  of torch's fused backends takes the shape (otherwise skipped, with torch's reasons).
- ``flex-attention-paged``: FlexAttention's experimental PagedAttention over the latent (compiled on a GPU).
- ``flashinfer-mla``: FlashInfer's MLA paged decode (BatchMLAPagedAttentionWrapper), where it is installed.

What each cannot take is decided up front from the shape and the installed version (PeerUnavailable, with
the reason); any other error surfaces. Each check brings the peer's output to [batch, heads, v_head_dim] and
holds it to the case's own comparison.
"""

import torch

from bench.peers import Peer, PeerUnavailable, Prepared
from bench.peers.paged_attention import (
    flashinfer_page_lists,
    flex_paged_prepare,
    flex_physical,
    flex_unsupported,
    fused_sdpa_refusal,
)

FP8 = torch.float8_e4m3fn


def _check_as_out(out: torch.Tensor, expected, shape) -> float:
    """``out`` [batch, heads, v_head_dim] through mla_decode's own compare, as if the kernel returned it."""
    from bench.cases.base import Inputs
    from bench.cases.mla_attention import compare  # here: the case module imports this one

    return compare(Inputs({}, ("out",), result=out.contiguous()), expected, shape)


def _softmax_scale(shape) -> float:
    return shape.qk_dim**-0.5 if shape.scale is None else shape.scale


def _one_length(shape) -> int:
    if len(set(shape.lengths)) != 1 or shape.lengths[0] == 0:
        raise PeerUnavailable("needs one nonzero length for all sequences (padding would add bytes)")
    return shape.lengths[0]


def _kv_scale(inputs) -> torch.Tensor | float:
    scale = inputs.args.get("kv_scale")
    return 1.0 if scale is None else scale


# --- eager torch: gather, then dense ------------------------------------------------------------------------


def gather_prepare(inputs, shape) -> Prepared:
    length = _one_length(shape)
    a = inputs.args
    q, cache, v_dim = a["q"], a["kv_cache"], shape.v_head_dim
    pages = a["block_tables"][:, : shape.pages[0]].long()
    kv_scale, scale = _kv_scale(inputs), _softmax_scale(shape)

    def call():
        rows = cache[pages].flatten(1, 3)[:, :length].to(q.dtype)  # [batch, length, qk_dim]
        scores = torch.matmul(q, rows.transpose(1, 2)).float() * (scale * kv_scale)
        weights = torch.softmax(scores, dim=-1).to(q.dtype)  # [batch, heads, length]
        return torch.matmul(weights, rows[..., :v_dim]) * kv_scale

    return Prepared(call)


def gather_check(result, expected, shape) -> float:
    return _check_as_out(result.to(shape.dtype), expected, shape)


# --- torch SDPA over a contiguous copy ----------------------------------------------------------------------


def sdpa_prepare(inputs, shape) -> Prepared:
    """The contiguous latent [batch, 1, length, qk_dim] is made here, outside the timing; the value is a
    view of its leading columns, so SDPA is handed the same bytes the kernel reads."""
    if shape.cache_dtype == FP8:
        raise PeerUnavailable("scaled_dot_product_attention takes no fp8 K/V")
    length = _one_length(shape)
    import torch.nn.functional as F

    a = inputs.args
    q = a["q"][:, :, None, :]
    refusal = fused_sdpa_refusal(q, 1, shape.v_head_dim, length)  # before the copy, and before torch's
    if refusal:  # math fallback could allocate its hundreds of GB
        raise PeerUnavailable(refusal)
    pages = a["block_tables"][:, : shape.pages[0]].long()
    k = a["kv_cache"][pages].flatten(1, 2)[:, :length].transpose(1, 2).contiguous()  # [b, 1, len, qk_dim]
    v, scale = k[..., : shape.v_head_dim], _softmax_scale(shape)
    return Prepared(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True))


def sdpa_check(result, expected, shape) -> float:
    return _check_as_out(result[:, :, 0, :], expected, shape)  # [b, h, 1, v] -> [b, h, v]


# --- FlexAttention paged decode -----------------------------------------------------------------------------


def flex_prepare(inputs, shape) -> Prepared:
    """The latent copied once into FlexAttention's physical layout; the value a view of its leading columns.
    All heads share the one latent, so the query group is the head count."""
    a = inputs.args
    reason = flex_unsupported(
        shape.cache_dtype,
        shape.lengths,
        shape.block_size,
        shape.qk_dim,
        shape.num_heads,
        a["q"].device,
        v_dim=shape.v_head_dim,
    )
    if reason:
        raise PeerUnavailable(reason)
    k = flex_physical(a["kv_cache"])
    v = k[..., : shape.v_head_dim]
    return flex_paged_prepare(
        a["q"], k, v, a["block_tables"], a["seq_lens"], shape.pages, shape.block_size, _softmax_scale(shape)
    )


def flex_check(result, expected, shape) -> float:
    return _check_as_out(result[:, :, 0, :], expected, shape)


# --- FlashInfer MLA paged decode ----------------------------------------------------------------------------


def flashinfer_prepare(inputs, shape) -> Prepared:
    """FlashInfer keeps the compressed KV and the rope key as two paged arrays; they are split from our
    latent rows here (same bytes in all), the query likewise, and the wrapper planned, outside the
    timing."""
    indptr, indices, _ = flashinfer_page_lists(inputs, shape)
    if shape.cache_dtype == FP8:
        raise PeerUnavailable(
            "fp8 latent caches through FlashInfer's MLA wrapper are not wired in this suite"
        )
    if shape.v_head_dim != 512 or shape.qk_dim != 576:
        raise PeerUnavailable(f"FlashInfer's MLA decode takes 512 + 64 wide rows, not {shape.qk_dim}")
    import flashinfer

    a, device = inputs.args, inputs.args["q"].device
    cache = a["kv_cache"].squeeze(2)
    ckv, kpe = cache[..., :512].contiguous(), cache[..., 512:].contiguous()
    q_nope, q_pe = a["q"][..., :512].contiguous(), a["q"][..., 512:].contiguous()
    workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=device)
    wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(workspace)
    qo_indptr = torch.arange(shape.batch + 1, dtype=torch.int32, device=device)
    lengths = a["seq_lens"].to(torch.int32)
    wrapper.plan(
        qo_indptr,
        indptr,
        indices,
        lengths,
        shape.num_heads,
        512,
        64,
        shape.block_size,
        False,  # causal: one query token attends to every cached token
        _softmax_scale(shape),
        shape.dtype,
        shape.cache_dtype,
    )
    return Prepared(lambda: wrapper.run(q_nope, q_pe, ckv, kpe))


def flashinfer_check(result, expected, shape) -> float:
    return _check_as_out(result, expected, shape)  # [b, h, 512]


PEERS = {
    "torch-gather-dense": Peer("torch-gather-dense", gather_prepare, gather_check),
    "sdpa-contiguous": Peer("sdpa-contiguous", sdpa_prepare, sdpa_check),
    "flex-attention-paged": Peer("flex-attention-paged", flex_prepare, flex_check),
    "flashinfer-mla": Peer("flashinfer-mla", flashinfer_prepare, flashinfer_check),
}
