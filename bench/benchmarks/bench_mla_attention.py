"""mla_decode over DeepSeek-R1's absorbed MLA at TP 1, 2, 4 and 8 (128, 64, 32, 16 heads over one 576-wide
latent): batch 1 to 256, context 1K to 64K, a reasoning mix of lengths, pages of 16 and 64, bf16 and fp8
caches; against the torch reference and the peers (eager gather + dense, contiguous SDPA, FlexAttention,
FlashInfer MLA), each skipped with its reason where it cannot run. extra_info carries TFLOP/s beside GB/s and
which ceiling binds at each shape.
Run: ``pytest bench/benchmarks/bench_mla_attention.py --benchmark-json out.json`` on a GPU."""

import pytest

from bench.benchmarks.cases import benchmark_every_impl
from bench.measure.timing import CUDA_CLOCK
from bench.operators.mla_attention import MLA_DECODE

pytestmark = [pytest.mark.gpu, pytest.mark.benchmark(timer=CUDA_CLOCK)]
CASE = MLA_DECODE
test_mla_decode = benchmark_every_impl(CASE)
