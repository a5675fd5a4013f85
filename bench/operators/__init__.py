"""The case registry: one Case per kernel launcher, in the order reports list them."""

from bench.cases.base import Case, Inputs, StaticOnly
from bench.cases.ep import EP_STATIC
from bench.cases.kv_alloc import ALLOCATE, COPY_BLOCKS
from bench.cases.kv_cache import WRITE_KV
from bench.cases.mla_attention import MLA_DECODE
from bench.cases.moe import COMBINE, DISPATCH, ROUTE
from bench.cases.paged_attention import PAGED_DECODE

CASES: dict[str, Case] = {
    case.name: case
    for case in (WRITE_KV, PAGED_DECODE, MLA_DECODE, ALLOCATE, COPY_BLOCKS, ROUTE, DISPATCH, COMBINE)
}

#: Kernels with a static report but no single-process case (their launchers need a process group).
STATIC_ONLY: dict[str, StaticOnly] = {EP_STATIC.name: EP_STATIC}


def static_cases() -> list:
    """Everything the static report and the proxies cover: every case, then the static-only kernels."""
    return [*CASES.values(), *STATIC_ONLY.values()]


__all__ = ["CASES", "STATIC_ONLY", "Case", "Inputs", "StaticOnly", "static_cases"]
