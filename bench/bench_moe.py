"""route for DeepSeek-R1 (256 experts, top-8, grouped sigmoid), Qwen3-30B-A3B and Qwen3-235B-A22B (128,
top-8), Mixtral-8x7B (8, top-2) and gpt-oss-120b (128, top-4 then softmax), at 1 to 16384 tokens (decode
batches and prefill chunks), against the torch reference.
Run: ``pytest bench/bench_moe.py --benchmark-json out.json`` on a GPU. dispatch and combine: not built yet."""

import pytest

from bench.cases.moe import ROUTE
from bench.timing import CUDA_CLOCK

pytestmark = [pytest.mark.gpu, pytest.mark.benchmark(timer=CUDA_CLOCK)]
CASE = ROUTE  # bench/conftest.py runs ``shape`` over its sweep (or its default shapes: --sweep default)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_route(gpu_benchmark, shape, impl):
    gpu_benchmark(ROUTE, shape, impl)
