"""paged_decode's case: decode shapes from the model presets and reasoning lengths, paged caches with NaN in
every slot no sequence owns, byte and FLOP models, and the check against the reference."""

from dataclasses import dataclass

import torch

import kernels.paged_attention
import reference.paged_attention
from bench.cases.base import Case, Inputs
from bench.peers.paged_attention import PEERS
from bench.serving.models import BLOCK_SIZES, DEFAULT_BLOCK_SIZE, MODELS
from bench.testing import Guarded, assert_close, generator, max_error, randn

_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8"}
FP8 = torch.float8_e4m3fn


class PagedBatch:
    """What the decode shapes over a paged cache share, from their fields ``lengths`` (each sequence's
    cached tokens), ``block_size``, ``num_splits`` and ``spare_pages`` (block-table columns past the
    longest sequence)."""

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def pages(self) -> list[int]:
        return [-(-n // self.block_size) for n in self.lengths]

    def context_label(self) -> str:
        lengths = set(self.lengths)
        return f"ctx={self.lengths[0]}" if len(lengths) == 1 else f"ctx={min(lengths)}..{max(lengths)}"

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

    name: str
    lengths: tuple[int, ...]
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int = DEFAULT_BLOCK_SIZE
    dtype: torch.dtype = torch.bfloat16
    cache_dtype: torch.dtype = torch.bfloat16
    shared_pages: int = 0
    num_splits: int | None = None
    spare_pages: int = 1  # block-table columns past the longest sequence (the table is as wide as capacity)

    @property
    def label(self) -> str:
        return (
            f"{self.name} b={self.batch} {self.context_label()} {self.num_q_heads}/{self.num_kv_heads}x"
            f"{self.head_dim} page={self.block_size} {_SHORT[self.cache_dtype]}{self.launch_label()}"
        )


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
    gen = generator(seed, device if torch.device(device).type == "cuda" else "cpu")
    table, num_blocks = fragmented_block_tables(shape, generator(seed))
    cache_shape = (num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
    caches = []
    for _ in range(2):
        cache = randn(cache_shape, torch.float32, device, gen, scale=2.0 if shape.cache_dtype == FP8 else 1.0)
        live = live_slots(table, shape.lengths, shape.block_size, num_blocks, device)
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
    for name, guard in actual.guards.items():
        guard.check(name)
    out = actual.args["out"] if actual.args.get("out") is not None else actual.result
    if actual.result is not None and actual.result.data_ptr() != out.data_ptr():
        raise AssertionError(f"{kernel}: returned a tensor other than out")
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


#: The attention geometries the issue names: Llama-3.1-8B (32/8), Llama-3.1-70B under TP 8 (8/1),
#: Qwen3-32B (64/8), gpt-oss-120b (64/8 of 64).
PRESETS = [_model("Llama-3.1-8B"), _model("Llama-3.1-70B", tp=8), _model("Qwen3-32B"), _model("gpt-oss-120b")]
#: A group too wide for one program (64 query heads per KV head of 512, served in head tiles): the
#: configuration SGLang's grouped-decode test runs (test/srt/test_triton_attention_kernels.py).
WIDE_GROUP = ("GQA-64x512", 128, 2, 512)

# Reasoning lengths (shared/facts.md): MATH-500-like outputs of 1K to 3K tokens, AIME-like of 10K to 12K
# with a tail to 32K; prompts are short beside them. A fixed spread, so runs compare.
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
    """The launch configurations the benchmarks use, and the wide group's head tiles (bf16 and fp8, split:
    no preset has such a group). Launches depend on shapes and the block table's width, not on lengths, so
    each keeps its table width (and so its split count) with 16-token sequences: the capture then builds
    kilobytes, not gigabytes."""
    llama8, llama70_tp8, qwen, oss = PRESETS

    def launch(preset, batch, context, **kw):
        pages = -(-context // DEFAULT_BLOCK_SIZE)
        return _shape(preset, [16] * batch, spare_pages=pages - 1, **kw)

    return [
        launch(llama8, 32, 8192),
        launch(llama8, 1, 65536),
        launch(llama8, 32, 8192, cache_dtype=FP8),
        launch(llama70_tp8, 32, 8192),
        launch(qwen, 32, 8192),
        launch(oss, 32, 8192),
        launch(WIDE_GROUP, 2, 8192),
        launch(WIDE_GROUP, 2, 8192, cache_dtype=FP8),
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


PAGED_DECODE = Case(
    name="paged_decode",
    module="paged_attention",
    kernel=kernels.paged_attention.paged_decode,
    reference=reference.paged_attention.paged_decode,
    build=build,
    byte_model=byte_model,
    flop_model=flop_model,
    sweep=sweep,
    default_shapes=default_shapes,
    small_shapes=small_shapes,
    static_shapes=static_shapes,
    traffic_shapes=traffic_shapes,
    compare=compare,
    peers=PEERS,  # bench/peers/paged_attention.py
    # The reference loops over sequences in Python and gathers every page in fp32: past ~1 GB of cache
    # (256K tokens of Llama-3.1-8B) one call takes seconds.
    reference_max_bytes=1 << 30,
    launch_config=launch_config,
)
