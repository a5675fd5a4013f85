"""The operator registry: one Case per kernel launcher, in the order reports list them. Each kernel module's
operator module (bench/operators/<module>.py) holds its shapes, inputs, cost models, comparison, peers and
tuning candidates."""

from bench.operators.base import Case, Inputs, StaticOnly
from bench.operators.ep import EP_STATIC
from bench.operators.kv_alloc import ALLOCATE, COPY_BLOCKS, POOL_STATIC
from bench.operators.kv_cache import WRITE_KV
from bench.operators.mla_attention import MLA_DECODE
from bench.operators.moe import COMBINE, DISPATCH, ROUTE
from bench.operators.moe_gemm import GROUPED_GEMM, MOE_LAYER
from bench.operators.paged_attention import PAGED_DECODE

CASES: dict[str, Case] = {
    case.name: case
    for case in (
        WRITE_KV,
        PAGED_DECODE,
        MLA_DECODE,
        ALLOCATE,
        COPY_BLOCKS,
        ROUTE,
        DISPATCH,
        COMBINE,
        GROUPED_GEMM,
        MOE_LAYER,
    )
}

#: Kernels with a static report but no case of their own: EP's (their launchers need a process group), and
#: the pool's fork and free (timed in bench_kv_alloc.py beside allocate).
STATIC_ONLY: dict[str, StaticOnly] = {kernel.name: kernel for kernel in (EP_STATIC, POOL_STATIC)}


def static_cases() -> list:
    """Everything the static report and the proxies cover: every case, then the static-only kernels."""
    return [*CASES.values(), *STATIC_ONLY.values()]


__all__ = ["CASES", "STATIC_ONLY", "Case", "Inputs", "StaticOnly", "static_cases"]
