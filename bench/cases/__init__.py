"""The case registry: one Case per kernel launcher, in the order reports list them."""

from bench.cases.base import Case, Inputs
from bench.cases.kv_alloc import ALLOCATE, COPY_BLOCKS
from bench.cases.kv_cache import WRITE_KV
from bench.cases.mla_attention import MLA_DECODE
from bench.cases.moe import COMBINE, DISPATCH, ROUTE
from bench.cases.paged_attention import PAGED_DECODE

CASES: dict[str, Case] = {
    case.name: case
    for case in (WRITE_KV, PAGED_DECODE, MLA_DECODE, ALLOCATE, COPY_BLOCKS, ROUTE, DISPATCH, COMBINE)
}

__all__ = ["CASES", "Case", "Inputs"]
