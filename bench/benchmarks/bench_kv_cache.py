"""write_kv over decode steps (batch 1 to 256) and prefill chunks (to 8192 tokens), Llama-3.1-8B/70B
(8 KV heads of 128, and 1 under TP 8) and DeepSeek-R1's 576-wide latent, bf16 and fp8 caches, against the
torch reference. Run: ``pytest bench/benchmarks/bench_kv_cache.py --benchmark-json out.json`` on a GPU."""

import pytest

from bench.benchmarks.cases import benchmark_every_impl
from bench.measure.timing import CUDA_CLOCK
from bench.operators.kv_cache import WRITE_KV

pytestmark = [pytest.mark.gpu, pytest.mark.benchmark(timer=CUDA_CLOCK)]
# conftest.py runs ``shape`` over this case's sweep (or its default shapes: --sweep default)
CASE = WRITE_KV


test_write_kv = benchmark_every_impl(CASE)
