"""Host reads of a KV block pool's state: the pool's contract (its tensors, their names, how its token
slots are counted), shared by the device pool (kernels/kv_alloc.py) and its plain-torch twin
(reference/kv_alloc.py), which keep the same tensors under the same names. Torch only (no Triton), so the twin
imports it freely; the allocator's logic, which the twin checks, stays apart in each."""

import torch


class BlockPoolReads:
    """State, usage and free count of a pool with ``num_blocks``, ``block_size``, and the tensors STATE names
    (block_tables, seq_lens, ref_counts, free_stack, free_count) as attributes."""

    STATE = ("block_tables", "seq_lens", "ref_counts", "free_stack", "free_count")

    def state(self) -> dict[str, torch.Tensor]:
        """The pool's tensors on the CPU (the free stack only up to its count: the rest is stale)."""
        state = {name: getattr(self, name).cpu() for name in self.STATE}
        state["free_stack"] = state["free_stack"][: int(state["free_count"][0])]
        return state

    def usage(self) -> dict[str, int]:
        """Where the pool's token slots are (a host read: it syncs). ``tokens``: slots holding token states;
        ``slack``: unused slots in sequences' last blocks; ``free``: slots in free blocks; ``shared``: token
        states stored once for several sequences (forked prefixes), counted once in ``tokens``."""
        lens = self.seq_lens.cpu().long()
        refs = self.ref_counts.cpu().long()
        allocated = int((refs > 0).sum()) * self.block_size
        per_sequence = int(lens.sum())
        pages = (lens + self.block_size - 1) // self.block_size
        referenced = int(pages.sum()) * self.block_size  # slots the tables point at, shared ones once each
        slack = int((pages * self.block_size - lens).sum())
        shared = referenced - allocated  # slots seen by more than one sequence, beyond the first
        return {
            "tokens": per_sequence - shared,
            "slack": slack,
            "free": int(self.free_count[0]) * self.block_size,
            "shared": shared,
            "capacity": self.num_blocks * self.block_size,
        }

    def num_free(self) -> int:
        """Free blocks: a host read (it syncs), for tests and reports."""
        return int(self.free_count[0])
