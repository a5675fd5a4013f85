"""paged_decode's operator: decode shapes from the model presets and reasoning lengths, paged caches with NaN
in every slot no sequence owns, byte and FLOP models, the check against the reference, the peers timed beside
it and its tuning candidates.

Peers: the same decode step by other implementations.

- ``sdpa-contiguous``: torch's scaled_dot_product_attention over the same tokens stored contiguously per
  sequence (what paging costs), on a GPU only where a fused backend takes the shape (fused_sdpa_refusal).
- ``flex-attention-paged``: torch's FlexAttention through its experimental PagedAttention (compiled on a GPU,
  one shape at a time, so that torch picks its decode kernel).
- ``flashinfer``: FlashInfer's batch decode over the same paged cache, where it is installed.

What each cannot take is decided up front from the shape and the installed version (PeerUnavailable, with
the reason); any other error surfaces. Each check brings the peer's output to the kernel's layout [batch,
q_heads, head_dim] and holds it to the case's own comparison (q's dtype tolerance, finite, zeros for empty
sequences). mla_attention.py reuses the paged tables, the output check and the peers' helpers from here.
"""

from dataclasses import KW_ONLY, dataclass, replace

import torch

import kernels.paged_attention
from bench.operators.base import Case, Inputs, Peer, PeerUnavailable, Prepared, TuneSpec, pow2_between
from bench.serving.models import BLOCK_SIZES, DEFAULT_BLOCK_SIZE, MODELS
from bench.testing import (
    DTYPE_LABELS,
    FP8,
    Guarded,
    assert_close,
    device_generator,
    generator,
    max_error,
    randn,
)


@dataclass(frozen=True)
class PagedBatch:
    """What the decode shapes over a paged cache share: ``name``, ``lengths`` (each sequence's cached
    tokens) and, keyword-only after a shape's own fields, the dtypes, ``shared_pages``, ``num_splits`` and
    ``spare_pages``. Each shape declares its ``block_size`` (their defaults differ) and names its heads in
    ``heads_label()``."""

    name: str
    lengths: tuple[int, ...]
    _: KW_ONLY
    dtype: torch.dtype = torch.bfloat16
    cache_dtype: torch.dtype = torch.bfloat16
    shared_pages: int = 0
    num_splits: int | None = None
    spare_pages: int = 1  # block-table columns past the longest sequence (the table is as wide as capacity)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def pages(self) -> list[int]:
        return [-(-n // self.block_size) for n in self.lengths]

    def context_label(self) -> str:
        lengths = set(self.lengths)
        return f"ctx={self.lengths[0]}" if len(lengths) == 1 else f"ctx={min(lengths)}..{max(lengths)}"

    @property
    def label(self) -> str:
        return (
            f"{self.name} b={self.batch} {self.context_label()} {self.heads_label()} page={self.block_size} "
            f"{DTYPE_LABELS[self.cache_dtype]}{self.launch_label()}"
        )

    def launch_label(self) -> str:
        """Forced splits and a block table wider than the lengths need (what changes the launch)."""
        splits = f" splits={self.num_splits}" if self.num_splits else ""
        wide = self.spare_pages > 1
        return splits + (f" table={(max(self.pages) + self.spare_pages) * self.block_size}" if wide else "")


@dataclass(frozen=True)
class PagedDecodeShape(PagedBatch):
    """One decode step of a batch. ``lengths`` holds each sequence's cached tokens.

    ``shared_pages``: the first pages of every sequence are the same blocks (a shared prompt, as parallel
    samples of one question have). ``num_splits`` is passed through (None: the launcher chooses).
    """

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int = DEFAULT_BLOCK_SIZE

    def heads_label(self) -> str:
        return f"{self.num_q_heads}/{self.num_kv_heads}x{self.head_dim}"


def byte_model(shape: PagedDecodeShape) -> int:
    """Bytes that must cross DRAM: per sequence, q, the K and V of its live tokens once, and out. A group
    served in head tiles loads its KV head's rows once per tile, the later tiles from L2 (they are grid
    neighbours): those are not DRAM bytes, and tests/test_traffic.py counts them apart."""
    q_bytes = shape.dtype.itemsize
    kv_bytes = shape.cache_dtype.itemsize
    per_sequence = 2 * shape.num_q_heads * shape.head_dim * q_bytes  # q in, out back (q's dtype)
    kv = sum(shape.lengths) * shape.num_kv_heads * 2 * shape.head_dim * kv_bytes
    return shape.batch * per_sequence + kv


def flop_model(shape: PagedDecodeShape) -> int:
    """q.K and p.V: two multiply-adds per query head, token and dimension."""
    return 4 * shape.num_q_heads * shape.head_dim * sum(shape.lengths)


def fragmented_block_tables(shape, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Fragmented block tables (blocks in random order), the first ``shared_pages`` shared by all; and the
    block count. ``shape`` has batch, pages, shared_pages and spare_pages (the decode cases' shapes)."""
    width = max(shape.pages) + shape.spare_pages
    own = [max(0, p - shape.shared_pages) for p in shape.pages]
    num_blocks = shape.shared_pages + sum(own) + 1  # one block no sequence owns: stays NaN
    order = torch.randperm(num_blocks, generator=gen, device=gen.device).tolist()
    shared, rest = order[: shape.shared_pages], order[shape.shared_pages :]
    table = torch.zeros(shape.batch, width, dtype=torch.int32)
    for b, pages in enumerate(shape.pages):
        ids = shared[: min(pages, shape.shared_pages)] + rest[: own[b]]
        rest = rest[own[b] :]
        table[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        # Columns past a sequence's pages point at a real block whose slots it does not own (NaN there).
        table[b, len(ids) :] = order[-1]
    return table, num_blocks


def live_slots(table: torch.Tensor, lengths, block_size: int, num_blocks: int, device) -> torch.Tensor:
    """[num_blocks x block_size] bool: the cache slots some sequence owns (the rest get NaN)."""
    live = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=device)
    for b, length in enumerate(lengths):
        token = torch.arange(length, device=device)
        live[table[b].to(device).long()[token // block_size] * block_size + token % block_size] = True
    return live


def build(shape: PagedDecodeShape, device, seed: int, guarded: bool = False) -> Inputs:
    """Random q and caches; every cache slot past a sequence's length (and every block nobody owns) holds NaN,
    so a kernel that reads one shows it. With ``guarded``, out starts poisoned inside sentinel fences."""
    gen = device_generator(seed, device)
    table, num_blocks = fragmented_block_tables(shape, generator(seed))
    cache_shape = (num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
    caches = []
    live = live_slots(table, shape.lengths, shape.block_size, num_blocks, device)  # k's and v's alike
    for _ in range(2):
        cache = randn(cache_shape, torch.float32, device, gen, scale=2.0 if shape.cache_dtype == FP8 else 1.0)
        cache.view(-1, shape.num_kv_heads, shape.head_dim)[~live] = float("nan")
        caches.append(cache.to(shape.cache_dtype))
    args = {
        "q": randn((shape.batch, shape.num_q_heads, shape.head_dim), shape.dtype, device, gen),
        "k_cache": caches[0],
        "v_cache": caches[1],
        "block_tables": table.to(device),
        "seq_lens": torch.tensor(shape.lengths, dtype=torch.int32, device=device),
        "num_splits": shape.num_splits,
    }
    if shape.cache_dtype == FP8:
        args["k_scale"] = torch.tensor([0.5], device=device)
        args["v_scale"] = torch.tensor([1.5], device=device)
    guards = {}
    if guarded:
        guards["out"] = Guarded.empty(tuple(args["q"].shape), shape.dtype, device)
        args["out"] = guards["out"].tensor
    return Inputs(args, ("out",), guards)


def check_decode_output(actual: Inputs, expected: Inputs, lengths, dtype: torch.dtype, kernel: str) -> float:
    """A decode kernel's output within ``dtype``'s tolerance of the fp32 reference, finite everywhere
    (zero-length sequences give zeros), returned and written to ``out`` alike, sentinels intact."""
    out = actual.written_out(kernel)
    if not torch.isfinite(out.float()).all():
        raise AssertionError(
            "out: holds NaN or inf (a masked slot leaked, or an empty sequence divided by 0)"
        )
    empty = torch.tensor(lengths, device=out.device) == 0
    if empty.any() and out[empty].abs().max() != 0:
        raise AssertionError("out: a zero-length sequence did not give zeros")
    assert_close(out, expected.result, "out", dtype=dtype)
    return max_error(out, expected.result)


def compare(actual: Inputs, expected: Inputs, shape: PagedDecodeShape) -> float:
    return check_decode_output(actual, expected, shape.lengths, shape.dtype, "paged_decode")


def _model(name: str, tp: int = 1) -> tuple[str, int, int, int]:
    model = MODELS[name]
    label = name if tp == 1 else f"{name} TP{tp}"
    return label, model.q_heads_per_rank(tp), model.kv_heads_per_rank(tp), model.head_dim


#: The attention geometries benchmarked: Llama-3.1-8B (32/8), Llama-3.1-70B under TP 8 (8/1),
#: Qwen3-32B (64/8), gpt-oss-120b (64/8 of 64).
PRESETS = [_model("Llama-3.1-8B"), _model("Llama-3.1-70B", tp=8), _model("Qwen3-32B"), _model("gpt-oss-120b")]
#: A group too wide for one program (64 query heads per KV head of 512, served in head tiles): the
#: configuration SGLang's grouped-decode test runs (test/srt/test_triton_attention_kernels.py).
WIDE_GROUP = ("GQA-64x512", 128, 2, 512)
#: Groups that fill one program's accumulator (group x head_dim = the head-tile size) in one tile: they
#: take the head tiles' warps, where 4 warps spilled.
FULL_GROUPS = [("GQA-32x512", 64, 2, 512), ("MQA-16x1024", 16, 1, 1024)]

# Reasoning lengths (docs/facts.md#reasoning-workloads): MATH-500-like outputs of 1K to 3K tokens,
# AIME-like of 10K to 12K with a tail to 32K; prompts are short beside them. A fixed spread, so runs compare.
REASONING_MIX = (
    1024,
    1536,
    2048,
    2560,
    3072,
    10240,
    11264,
    12288,
    16384,
    32768,
    2048,
    12288,
    1024,
    3072,
    10240,
    24576,
)


def _shape(preset, lengths, **kw) -> PagedDecodeShape:
    name, hq, hkv, d = preset
    return PagedDecodeShape(name, tuple(lengths), hq, hkv, d, **kw)


def sweep() -> list[PagedDecodeShape]:
    """bf16 caches for every preset over batch x context (at most 2M cached tokens: 8 GB of Llama-3.1-8B
    cache), one 64K stream and a reasoning mix; fp8 for Llama-3.1-8B; a page-size sweep."""
    shapes = []
    grid = [(b, n) for b in (1, 8, 32, 256) for n in (1024, 8192, 32768, 131072) if b * n <= 2 * 1024 * 1024]
    for preset in PRESETS:
        dtypes = (torch.bfloat16, FP8) if preset is PRESETS[0] else (torch.bfloat16,)
        for cache_dtype in dtypes:
            shapes += [_shape(preset, [n] * b, cache_dtype=cache_dtype) for b, n in grid]
            shapes.append(_shape(preset, [65536], cache_dtype=cache_dtype))
            shapes.append(_shape(preset, REASONING_MIX * 2, cache_dtype=cache_dtype))
    shapes += [_shape(PRESETS[0], [8192] * 32, block_size=size) for size in BLOCK_SIZES]
    return list(dict.fromkeys(shapes))


def default_shapes() -> list[PagedDecodeShape]:
    llama8 = PRESETS[0]
    return [
        _shape(llama8, [1024] * 32),
        _shape(llama8, [8192] * 32),
        _shape(llama8, [32768] * 32),
        _shape(llama8, [8192] * 32, cache_dtype=FP8),
        _shape(llama8, [65536]),
        _shape(llama8, [65536], cache_dtype=FP8),
        _shape(PRESETS[1], [8192] * 32),
        _shape(PRESETS[3], [8192] * 32),
        _shape(llama8, REASONING_MIX * 2),
    ]


def small_shapes() -> list[PagedDecodeShape]:
    """Interpreter sizes: MHA, GQA, MQA, odd head_dim, page sizes 1 to 128, empty and ragged sequences,
    shared blocks, fp8, forced and derived splits."""
    S = PagedDecodeShape
    return [
        S("gqa", (37, 100, 0), 8, 2, 64, block_size=16),
        S("mha", (5, 20), 4, 4, 128, block_size=1),
        S("mqa odd", (41,), 6, 1, 96, block_size=8, dtype=torch.float16, cache_dtype=torch.float16),
        S("shared", (70, 33, 64), 16, 2, 64, block_size=32, shared_pages=2),
        S("fp8", (90, 1), 8, 2, 64, block_size=64, cache_dtype=FP8),
        S("split", (300, 17, 0), 32, 8, 128, block_size=16, num_splits=3),
        S("long", (1200,), 4, 1, 64, block_size=128),
        S("wide", (130, 0), 8, 2, 256, block_size=128, num_splits=2),
    ]


def static_shapes() -> list[PagedDecodeShape]:
    """The launch configurations the benchmarks use, the wide group's head tiles and the groups that fill
    one program (bf16 and fp8, split: no preset has such groups). Launches depend on shapes and the block
    table's width, not on lengths, so each keeps its table width (and so its split count) with 16-token
    sequences: the capture then builds kilobytes, not gigabytes."""
    llama8, llama70_tp8, qwen, oss = PRESETS

    def launch(preset, batch, context, **kw):
        pages = -(-context // DEFAULT_BLOCK_SIZE)
        return _shape(preset, [16] * batch, spare_pages=pages - 1, **kw)

    wide_groups = [WIDE_GROUP, *FULL_GROUPS]
    wide = [launch(g, 2, 8192, cache_dtype=dtype) for g in wide_groups for dtype in (torch.bfloat16, FP8)]
    return [
        launch(llama8, 32, 8192),
        launch(llama8, 1, 65536),
        launch(llama8, 32, 8192, cache_dtype=FP8),
        launch(llama70_tp8, 32, 8192),
        launch(qwen, 32, 8192),
        launch(oss, 32, 8192),
        *wide,
    ]


def traffic_shapes() -> list[PagedDecodeShape]:
    """Shapes whose traffic should meet the byte model: not the forced-split stress shapes, whose short
    sequences cut many ways spend more on partial results than on K and V (by design of the test); and the
    benchmarks' bf16 Llama-3.1-8B launch configurations. The others differ from those kept only in group
    size, head_dim or cache dtype, which the small shapes cover (fp8, MQA): 30 s of interpreter time for no
    new access pattern, in a CI budget of 5 minutes; the static report still compiles them all. The wide
    group's head tiles re-read K and V from L2 by design: tests/test_traffic.py holds a small one to the
    byte model with those re-reads counted apart."""
    benchmark_launches = [s for s in static_shapes() if s.name == "Llama-3.1-8B" and s.cache_dtype != FP8]
    return [s for s in small_shapes() if s.num_splits is None] + benchmark_launches


def launch_config(inputs: Inputs) -> dict:
    a = inputs.args
    return kernels.paged_attention.paged_decode_choice(a["q"], a["k_cache"]).as_info()


# --- peers --------------------------------------------------------------------------------------------------


def _check_as_out(out: torch.Tensor, expected, shape) -> float:
    """``out`` [batch, q_heads, head_dim] through paged_decode's own compare, as if the kernel returned it."""
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
# and repeats K and V for every query head (MLA at batch 32, 8K context, 128 heads: 146 GB of them); on the
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


# --- tuning -------------------------------------------------------------------------------------------------


def cheap_launch(shape):
    """16-token sequences in a block table as wide as the shape's: the same split count and constexprs (the
    tuner compiles and verifies candidates on it; mla_decode's shapes take it too)."""
    width = max(shape.pages) + shape.spare_pages
    pages = -(-16 // shape.block_size)
    return replace(shape, lengths=(16,) * shape.batch, spare_pages=width - pages, shared_pages=0)


TUNE = TuneSpec(
    "_paged_decode_kernel",
    kernels.paged_attention.TUNABLE,
    (
        # fp8 caches load unpipelined by default: try 2 and 3 deep; 16-bit ones: 1 and 3.
        lambda h: {"num_stages": 1},
        lambda h: {"num_stages": 2},
        lambda h: {"num_stages": 3},
        lambda h: {"BLOCK_N": h["BLOCK_N"] // 2},
        lambda h: {"BLOCK_N": h["BLOCK_N"] * 2},
        lambda h: {"num_warps": 8},
    ),
    {
        "BLOCK_N": pow2_between(16, 128),
        "num_warps": pow2_between(2, 16),
        "num_stages": range(1, 4).__contains__,
    },
    cheap_launch,
)


PAGED_DECODE = Case.by_convention(
    globals(),
    "paged_decode",
    # The reference loops over sequences in Python and gathers every page in fp32: past ~1 GB of cache
    # (256K tokens of Llama-3.1-8B) one call takes seconds.
    reference_max_bytes=1 << 30,
)
