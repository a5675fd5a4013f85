"""Plain host-side twin of kernels/kv_alloc.py: a KV-cache block pool as a serving scheduler keeps it.

Same names, same state and same semantics, decided one Python step at a time:

- ``allocate`` appends tokens to sequences, popping fresh blocks from the top of the free stack in (sequence,
  page) order; ``fork`` shares a source's full blocks with an empty destination and gives it a fresh block
  for a partly filled last page; ``free`` drops a sequence's references and pushes each block whose count
  reaches zero, at that moment (so in (sequence, page) order).
- allocate and fork are all or nothing: out of blocks, a sequence id out of range or listed twice, a
  sequence outgrowing its block-table row, a destination that is not empty or is also a source: ``ok`` is
  False and no state changes. free skips ids out of range and frees a sequence listed twice once.

The state lives in CPU tensors with the kernel pool's layout, so the two can be compared field by field.
"""

import torch

from kernels._pool_reads import BlockPoolReads


class KVBlockPool(BlockPoolReads):
    """Blocks of ``block_size`` token slots for up to ``max_seqs`` sequences of ``max_blocks_per_seq`` pages.

    Invariants: each block is on the free stack (free_stack[:free_count]) with ref_count 0, or referenced by
    ref_count > 0 table entries, never both; sequence s's pages are block_tables[s, :cdiv(seq_lens[s],
    block_size)] and its entries past them are -1.
    """

    def __init__(self, num_blocks: int, block_size: int, max_seqs: int, max_blocks_per_seq: int, device=None):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.max_seqs, self.max_blocks_per_seq = max_seqs, max_blocks_per_seq
        self.block_tables = torch.full((max_seqs, max_blocks_per_seq), -1, dtype=torch.int32)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32)
        self.ref_counts = torch.zeros(num_blocks, dtype=torch.int32)
        self.free_stack = torch.arange(num_blocks - 1, -1, -1, dtype=torch.int32)  # block 0 on top
        self.free_count = torch.tensor([num_blocks], dtype=torch.int32)


def _pages(length: int, block_size: int) -> int:
    return -(-length // block_size)


def _ids(x) -> list[int]:
    return [int(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)]


def _pop(pool: KVBlockPool) -> int:
    pool.free_count[0] -= 1
    return int(pool.free_stack[int(pool.free_count[0])])


def allocate(pool, seq_ids, num_new_tokens, *, num_tokens=None):
    """Appends num_new_tokens[i] tokens (or the same int for all) to seq_ids[i]; returns (slot_mapping, ok)
    with the new tokens' slots sequence by sequence, or all -1 and ok False when it cannot."""
    ids = _ids(seq_ids)
    counts = [int(num_new_tokens)] * len(ids) if isinstance(num_new_tokens, int) else _ids(num_new_tokens)
    total = sum(counts) if num_tokens is None else num_tokens
    slots = torch.full((total,), -1, dtype=torch.int64)
    bs = pool.block_size
    valid = (
        all(0 <= s < pool.max_seqs for s in ids) and len(set(ids)) == len(ids) and min(counts, default=0) >= 0
    )
    valid = valid and sum(counts) == total
    if valid:
        lens = [int(pool.seq_lens[s]) for s in ids]
        need = sum(_pages(n + c, bs) - _pages(n, bs) for n, c in zip(lens, counts))
        valid = all(_pages(n + c, bs) <= pool.max_blocks_per_seq for n, c in zip(lens, counts))
        valid = valid and need <= pool.num_free()
    if not valid:
        return slots, torch.tensor([False])
    token = 0
    for s, c in zip(ids, counts):
        length = int(pool.seq_lens[s])
        for page in range(_pages(length, bs), _pages(length + c, bs)):
            block = _pop(pool)
            pool.block_tables[s, page] = block
            pool.ref_counts[block] = 1
        for position in range(length, length + c):
            slots[token] = int(pool.block_tables[s, position // bs]) * bs + position % bs
            token += 1
        pool.seq_lens[s] = length + c
    return slots, torch.tensor([True])


def fork(pool, src, dst):
    """Each dst (empty) takes its src's tokens: full blocks shared by reference, a partly filled last block
    copied into a fresh one. Returns (copies [pairs, 2] int32 of (src_block, dst_block) or (-1, -1), ok)."""
    sources, targets = _ids(src), _ids(dst)
    copies = torch.full((len(sources), 2), -1, dtype=torch.int32)
    bs = pool.block_size
    in_range = all(0 <= s < pool.max_seqs for s in sources + targets)
    valid = in_range and len(sources) == len(targets) and len(set(targets)) == len(targets)
    valid = valid and not set(sources) & set(targets)
    if valid:
        valid = all(int(pool.seq_lens[d]) == 0 for d in targets)
        partial = sum(1 for s in sources if int(pool.seq_lens[s]) % bs)
        valid = valid and partial <= pool.num_free()
    if not valid:
        return copies, torch.tensor([False])
    for pair, (s, d) in enumerate(zip(sources, targets)):
        length = int(pool.seq_lens[s])
        full = length // bs
        for page in range(full):
            block = int(pool.block_tables[s, page])
            pool.block_tables[d, page] = block
            pool.ref_counts[block] += 1
        if length % bs:
            block = _pop(pool)
            pool.block_tables[d, full] = block
            pool.ref_counts[block] = 1
            copies[pair] = torch.tensor([int(pool.block_tables[s, full]), block], dtype=torch.int32)
        pool.seq_lens[d] = length
    return copies, torch.tensor([True])


def free(pool, seq_ids) -> None:
    """Drops each listed sequence's references; a block whose count reaches zero goes back on the stack."""
    seen = set()
    for s in _ids(seq_ids):
        if not 0 <= s < pool.max_seqs or s in seen:
            continue
        seen.add(s)
        for page in range(_pages(int(pool.seq_lens[s]), pool.block_size)):
            block = int(pool.block_tables[s, page])
            pool.ref_counts[block] -= 1
            if pool.ref_counts[block] == 0:
                pool.free_stack[int(pool.free_count[0])] = block
                pool.free_count[0] += 1
            pool.block_tables[s, page] = -1
        pool.seq_lens[s] = 0


def copy_blocks(k_cache, v_cache, copies) -> None:
    """k_cache[dst] = k_cache[src] (and v) for each (src, dst) row of copies; a row with either id outside
    [0, num_blocks) is skipped."""
    num_blocks = k_cache.shape[0]
    for src_block, dst_block in copies.tolist():
        if 0 <= src_block < num_blocks and 0 <= dst_block < num_blocks:
            k_cache[dst_block] = k_cache[src_block]
            v_cache[dst_block] = v_cache[src_block]
