"""Global-memory traffic of a kernel, counted under Triton's interpreter, held against its byte model.

The interpreter executes every tl.load and tl.store through one builder object; wrapping its masked load and
store (and atomics) counts the bytes each one moves, with no GPU. Within one instruction of one program,
lanes that name the same address count once: the hardware serves them with one transaction (a scalar or
broadcast load, such as every lane of a tile reading its page's block id). Across instructions, programs
and loop iterations every access counts, so re-reads show. The ratio to the byte model
shows re-reads and wasted traffic; ``unique_bytes`` (distinct addresses) tells re-reads from extra data.
What it cannot show: cache-line granularity and DRAM versus L2 (Nsight Compute measures those on a GPU).
"""

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from kernels import INTERPRETED


@dataclass
class Traffic:
    loaded_bytes: int = 0
    stored_bytes: int = 0
    load_instructions: int = 0
    store_instructions: int = 0
    _loaded: list = field(default_factory=list, repr=False)  # address arrays, for unique_bytes
    _stored: list = field(default_factory=list, repr=False)

    @property
    def total_bytes(self) -> int:
        return self.loaded_bytes + self.stored_bytes

    def unique_bytes(self) -> int:
        """Bytes at distinct addresses (loads and stores counted apart): the floor any kernel must move."""
        total = 0
        for chunks in (self._loaded, self._stored):
            if chunks:
                addresses, sizes = (np.concatenate(x) for x in zip(*chunks))
                _, first = np.unique(addresses, return_index=True)
                total += int(sizes[first].sum())
        return total

    def loaded_from(self, tensor) -> int:
        """Bytes loaded (every access counted) from addresses inside ``tensor``'s storage."""
        start = tensor.untyped_storage().data_ptr()
        end = start + tensor.untyped_storage().nbytes()
        total = 0
        for addresses, sizes in self._loaded:
            inside = (addresses >= start) & (addresses < end)
            total += int(sizes[inside].sum())
        return total

    def ratio(self, model_bytes: int) -> float:
        return self.total_bytes / model_bytes if model_bytes else float("inf")


def _live(ptrs, mask) -> tuple[np.ndarray, int]:
    """Distinct addresses the unmasked lanes of one instruction touch, and the element size."""
    addresses = np.asarray(ptrs.data).reshape(-1)
    live = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.asarray(ptrs.data).shape).reshape(-1)
    return np.unique(addresses[live]), int(ptrs.get_element_ty().primitive_bitwidth // 8)


@contextmanager
def count_traffic():
    """Counts the bytes every kernel launched inside the block loads and stores (interpreter only)."""
    if not INTERPRETED:
        raise RuntimeError("traffic counting needs Triton's interpreter: run with TRITON_INTERPRET=1")
    from triton.runtime.interpreter import interpreter_builder as builder

    traffic = Traffic()
    original_load, original_store = builder.create_masked_load, builder.create_masked_store
    original_rmw, original_cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def record(kind: str, ptrs, mask):
        addresses, size = _live(ptrs, mask)
        sizes = np.full(addresses.shape, size, dtype=np.int64)
        if kind in ("load", "atomic"):
            traffic.loaded_bytes += addresses.size * size
            traffic.load_instructions += 1
            traffic._loaded.append((addresses, sizes))
        if kind in ("store", "atomic"):
            traffic.stored_bytes += addresses.size * size
            traffic.store_instructions += 1
            traffic._stored.append((addresses, sizes))

    def load(ptrs, mask, *args, **kwargs):
        record("load", ptrs, mask)
        return original_load(ptrs, mask, *args, **kwargs)

    def store(ptrs, value, mask, *args, **kwargs):
        record("store", ptrs, mask)
        return original_store(ptrs, value, mask, *args, **kwargs)

    def rmw(op, ptrs, value, mask, *args, **kwargs):
        record("atomic", ptrs, mask)
        return original_rmw(op, ptrs, value, mask, *args, **kwargs)

    def cas(ptrs, cmp, value, *args, **kwargs):
        ones = type("Mask", (), {"data": np.ones(np.asarray(ptrs.data).shape, dtype=bool)})()
        record("atomic", ptrs, ones)
        return original_cas(ptrs, cmp, value, *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store = load, store
    builder.create_atomic_rmw, builder.create_atomic_cas = rmw, cas
    try:
        yield traffic
    finally:
        # Drop the instance attributes so the class's methods show through again.
        for name in ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas"):
            builder.__dict__.pop(name, None)


def measure(call: Callable[[], object]) -> Traffic:
    """Runs ``call`` once under the counter and returns what it moved."""
    with count_traffic() as traffic:
        call()
    return traffic
