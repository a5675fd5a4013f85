"""mla_decode's operator: DeepSeek-R1's absorbed MLA decode at each tensor-parallel degree, paged latent
caches with NaN in every slot no sequence owns, byte and FLOP models, the check against the reference, the
peers timed beside it and its tuning candidates.

MLA sits near the ridge point: per cached token, 2 x heads x (qk_dim + v_head_dim) FLOPs against qk_dim
cache bytes. At TP 8 (16 heads a rank) that is 30 FLOP/byte in bf16, bandwidth-bound; at TP 1 (128 heads)
about 240, compute-bound on an H200 and near the knee on an H100. Reports put each shape's arithmetic
intensity beside the measured ridge (matmul ceiling / copy bandwidth) and say which one binds.

Peers: the same absorbed MLA decode step by other implementations.

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

from dataclasses import dataclass

import torch

import kernels.mla_attention
from bench.operators.base import Case, Inputs, Peer, PeerUnavailable, Prepared, TuneSpec, pow2_between
from bench.operators.paged_attention import (
    REASONING_MIX,
    PagedBatch,
    cheap_launch,
    check_decode_output,
    flashinfer_page_lists,
    flex_paged_prepare,
    flex_physical,
    flex_unsupported,
    fragmented_block_tables,
    fused_sdpa_refusal,
    live_slots,
)
from bench.serving.models import MLA_MODELS, MODELS
from bench.testing import FP8, Guarded, device_generator, generator, randn

DEEPSEEK = MLA_MODELS["DeepSeek-R1"]
#: FlashMLA's page size, and DeepSeek's serving engines'.
MLA_BLOCK_SIZE = 64


@dataclass(frozen=True)
class MLADecodeShape(PagedBatch):
    """One decode step of a batch. ``lengths`` holds each sequence's cached tokens.

    ``shared_pages``: the first pages of every sequence are the same blocks. ``num_splits`` is passed through
    (None: the launcher chooses). fp8 caches get a one-element tensor kv_scale, or a float with
    ``float_scale``. ``scale`` None: the kernel's default, qk_dim ** -0.5.
    """

    num_heads: int
    qk_dim: int = DEEPSEEK.cached_width
    v_head_dim: int = DEEPSEEK.kv_lora_rank
    block_size: int = MLA_BLOCK_SIZE
    scale: float | None = None
    float_scale: bool = False

    def heads_label(self) -> str:
        return f"h={self.num_heads} {self.qk_dim}/{self.v_head_dim}"


def byte_model(shape: MLADecodeShape) -> int:
    """What must move: each live token's latent row once per sequence (all heads share it), q in and out
    back in q's dtype, and fp8's per-tensor scale when it lives in memory."""
    q_bytes = shape.dtype.itemsize
    per_sequence = shape.num_heads * (shape.qk_dim + shape.v_head_dim) * q_bytes
    cache = sum(shape.lengths) * shape.qk_dim * shape.cache_dtype.itemsize
    scale = 4 if shape.cache_dtype == FP8 and not shape.float_scale else 0
    return shape.batch * per_sequence + cache + scale


def flop_model(shape: MLADecodeShape) -> int:
    """q.kv over qk_dim and p.v over v_head_dim: two FLOPs a multiply-add, per head and token."""
    return 2 * shape.num_heads * (shape.qk_dim + shape.v_head_dim) * sum(shape.lengths)


def build(shape: MLADecodeShape, device, seed: int, guarded: bool = False) -> Inputs:
    """Random q and latent cache; every slot past a sequence's length (and every block nobody owns) holds
    NaN. With ``guarded``, out starts poisoned inside sentinel fences."""
    gen = device_generator(seed, device)
    table, num_blocks = fragmented_block_tables(shape, generator(seed))
    cache_shape = (num_blocks, shape.block_size, 1, shape.qk_dim)
    cache = randn(cache_shape, torch.float32, device, gen, scale=2.0 if shape.cache_dtype == FP8 else 1.0)
    live = live_slots(table, shape.lengths, shape.block_size, num_blocks, device)
    cache.view(-1, shape.qk_dim)[~live] = float("nan")
    args = {
        "q": randn((shape.batch, shape.num_heads, shape.qk_dim), shape.dtype, device, gen),
        "kv_cache": cache.to(shape.cache_dtype),
        "block_tables": table.to(device),
        "seq_lens": torch.tensor(shape.lengths, dtype=torch.int32, device=device),
        "v_head_dim": shape.v_head_dim,
        "scale": shape.scale,
        "num_splits": shape.num_splits,
    }
    if shape.cache_dtype == FP8:
        args["kv_scale"] = 0.5 if shape.float_scale else torch.tensor([0.5], device=device)
    guards = {}
    if guarded:
        guards["out"] = Guarded.empty((shape.batch, shape.num_heads, shape.v_head_dim), shape.dtype, device)
        args["out"] = guards["out"].tensor
    return Inputs(args, ("out",), guards)


def compare(actual: Inputs, expected: Inputs, shape: MLADecodeShape) -> float:
    return check_decode_output(actual, expected, shape.lengths, shape.dtype, "mla_decode")


def deepseek(tp: int, lengths, **kw) -> MLADecodeShape:
    """DeepSeek-R1's attention on one rank of TP ``tp``: 128 / tp heads over the whole latent (replicated),
    with the model's softmax scale."""
    name = "DeepSeek-R1" if tp == 1 else f"DeepSeek-R1 TP{tp}"
    heads = MODELS["DeepSeek-R1"].q_heads_per_rank(tp)
    return MLADecodeShape(name, tuple(lengths), heads, scale=DEEPSEEK.softmax_scale, **kw)


TPS = (1, 2, 4, 8)


def sweep() -> list[MLADecodeShape]:
    """bf16 caches at every TP degree over batch x context (at most 2M cached tokens: 2.4 GB of latent),
    a 64K stream and a reasoning mix; fp8 at TP 8 (bandwidth-bound) and TP 1 (compute-bound); pages of 16
    beside 64."""
    shapes = []
    grid = [(b, n) for b in (1, 8, 32, 128, 256) for n in (1024, 8192, 32768, 65536) if b * n <= 2 * 1024**2]
    for tp in TPS:
        for cache_dtype in (torch.bfloat16, FP8) if tp in (1, 8) else (torch.bfloat16,):
            shapes += [deepseek(tp, [n] * b, cache_dtype=cache_dtype) for b, n in grid]
            shapes.append(deepseek(tp, REASONING_MIX * 2, cache_dtype=cache_dtype))
        shapes += [deepseek(tp, [8192] * 32, block_size=16), deepseek(tp, [65536], block_size=16)]
    return list(dict.fromkeys(shapes))


def default_shapes() -> list[MLADecodeShape]:
    """The issue's targets: TP 8 at batch 32 and 8K / 32K (bandwidth), TP 1 (compute), fp8 beside bf16 at
    both ends, one 64K stream (split-KV), TP 2 and 4, the reasoning mix, pages of 16."""
    return [
        deepseek(8, [8192] * 32),
        deepseek(8, [8192] * 32, cache_dtype=FP8),
        deepseek(8, [32768] * 32),
        deepseek(8, [65536]),
        deepseek(4, [8192] * 32),
        deepseek(2, [8192] * 32),
        deepseek(1, [8192] * 32),
        deepseek(1, [8192] * 32, cache_dtype=FP8),
        deepseek(8, REASONING_MIX * 2),
        deepseek(8, [8192] * 32, block_size=16),
    ]


def small_shapes() -> list[MLADecodeShape]:
    """Interpreter sizes: DeepSeek's widths at 16 heads, odd head counts, widths that are not powers of two
    and rows that are all value, page sizes 1 to 64, empty and ragged sequences, shared blocks, fp8 with
    tensor and float scales, forced and derived splits, two head tiles (128 heads)."""
    S = MLADecodeShape
    return [
        S("deepseek tp8", (37, 100, 0), 16, block_size=16, scale=DEEPSEEK.softmax_scale),
        S(
            "odd",
            (41, 9),
            20,
            qk_dim=100,
            v_head_dim=72,
            block_size=8,
            dtype=torch.float16,
            cache_dtype=torch.float16,
        ),
        S("page1", (5, 20), 3, qk_dim=64, v_head_dim=64, block_size=1),
        S("shared", (70, 33, 64), 16, qk_dim=96, v_head_dim=64, block_size=32, shared_pages=2),
        S("fp8", (90, 1), 16, block_size=64, cache_dtype=FP8),
        S(
            "fp8 float",
            (50,),
            8,
            qk_dim=144,
            v_head_dim=128,
            block_size=16,
            cache_dtype=FP8,
            float_scale=True,
        ),
        S("split", (300, 17, 0), 16, qk_dim=80, v_head_dim=64, block_size=16, num_splits=3),
        S("long", (1200,), 4, qk_dim=72, v_head_dim=64, block_size=64),
        S("128 heads", (40, 7), 128, block_size=16),
    ]


def static_shapes() -> list[MLADecodeShape]:
    """Launch configurations of the benchmarks covering 16, 32, 64 and 128 heads, pages of 16 and 64, bf16
    and fp8 (each value at least once, not every combination: the compile is the CI's longest pole).
    Launches depend on shapes and the block table's width, not on lengths, so each keeps its table width
    (and so its split count) with 16-token sequences."""

    def launch(tp, batch, context, block_size=MLA_BLOCK_SIZE, **kw):
        pages = -(-context // block_size)
        return deepseek(tp, [16] * batch, block_size=block_size, spare_pages=pages - 1, **kw)

    return [
        launch(8, 1, 65536),  # the most splits: the merge at its widest
        launch(8, 32, 8192, cache_dtype=FP8, block_size=16),
        launch(4, 32, 8192, block_size=16),
        launch(2, 32, 8192, cache_dtype=FP8),
        launch(1, 32, 8192),
    ]


def traffic_shapes() -> list[MLADecodeShape]:
    """Shapes whose traffic should meet the byte model: up to 32 heads, one head tile a sequence. Past 32
    heads each tile requests the rows again (the byte story: they come from L2, which the interpreter's
    count cannot see), and the forced-split shape is a stress test of the partials, not of the rows. Of the
    benchmarks' launches, the 64K stream (the most splits); the batch-32 ones make the same accesses 32 times
    over, for 4 s of interpreter time."""
    return [
        s
        for s in small_shapes() + static_shapes()
        if s.num_heads <= 32 and s.num_splits is None and s.batch < 32  # batch 32: 4 s, no new access
    ]


def launch_config(inputs: Inputs) -> dict:
    a = inputs.args
    return kernels.mla_attention.mla_decode_choice(a["q"], a["kv_cache"], a["v_head_dim"]).as_info()


# --- peers --------------------------------------------------------------------------------------------------


def _check_as_out(out: torch.Tensor, expected, shape) -> float:
    """``out`` [batch, heads, v_head_dim] through mla_decode's own compare, as if the kernel returned it."""
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


# --- tuning -------------------------------------------------------------------------------------------------

TUNE = TuneSpec(
    "_mla_decode_kernel",
    kernels.mla_attention.TUNABLE,
    (
        # Bandwidth-bound (16 heads) wants more bytes in flight; compute-bound (64 heads and more, in
        # 32-head tiles) wants the tile shape that keeps the tensor cores fed. No taller tile: the
        # heuristic's 16 serves up to 16 heads in one tile already, and 64 x 512 value columns is past the
        # launcher's accumulator bound (it refuses it).
        lambda h: {"num_stages": 3},
        lambda h: {"num_stages": 1},
        lambda h: {"BLOCK_N": 64},
        lambda h: {"BLOCK_N": 16},
        lambda h: {"num_warps": 16},
        lambda h: {"num_warps": 8},
        lambda h: {"HEAD_BLOCK": h["HEAD_BLOCK"] // 2},
    ),
    {
        "HEAD_BLOCK": pow2_between(16, 64),
        "BLOCK_N": pow2_between(16, 64),
        "num_warps": pow2_between(4, 16),
        "num_stages": range(1, 4).__contains__,
    },
    cheap_launch,  # paged_decode's: the same block-table width and split count with 16-token sequences
)


MLA_DECODE = Case.by_convention(
    globals(),
    "mla_decode",
    # The reference loops over sequences and gathers every page in fp32: past ~1 GB it takes seconds.
    reference_max_bytes=1 << 30,
)
