"""paged_decode over Llama-3.1-8B (32/8), Llama-3.1-70B under TP 8 (8/1), Qwen3-32B (64/8) and gpt-oss-120b
(64/8 of 64): batch 1 to 256, context 1K to 128K, one 64K stream, a reasoning mix of lengths, a page-size
sweep, bf16 and fp8 caches; against the torch reference and the peers (contiguous SDPA, FlexAttention,
FlashInfer), each skipped with its reason where it cannot run.
Run: ``pytest bench/benchmarks/bench_paged_attention.py --benchmark-json out.json`` on a GPU."""

import pytest

from bench.benchmarks.cases import benchmark_every_impl
from bench.measure.timing import CUDA_CLOCK
from bench.operators.paged_attention import PAGED_DECODE

pytestmark = [pytest.mark.gpu, pytest.mark.benchmark(timer=CUDA_CLOCK)]
CASE = PAGED_DECODE
test_paged_decode = benchmark_every_impl(CASE)
