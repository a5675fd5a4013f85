"""KV-cache block allocation on the GPU: a device-resident block pool that decode steps use with no host sync.

State (KVBlockPool), all on the device:
    block_tables  int32 [max_seqs, max_blocks_per_seq]  sequence s's pages; -1 past them
    seq_lens      int32 [max_seqs]
    ref_counts    int32 [num_blocks]                    0 for a free block
    free_stack    int32 [num_blocks]                    free_stack[:free_count] are free; the top is last
    free_count    int32 [1]

Each operation is one launch of one program (a serving step has at most a few thousand sequences, which one
program covers in a few vector passes, and one program needs no grid-wide synchronisation):

- ``allocate``: per-sequence page needs, their prefix sums, one all-or-nothing check against the free count,
  then each new page pops free_stack[top - (its prefix offset)]: the same blocks, in the same (sequence,
  page) order, as the host reference. The new tokens' slots come back for write_kv.
- ``fork``: destinations share their sources' full blocks (reference counts), and take a fresh block for a
  partly filled last page; the (src, dst) block pairs are returned for ``copy_blocks``.
- ``free``: reference counts drop; a block reaching zero goes back on the stack at its last use in (sequence,
  page) order (found with atomic max, which is order-free), so pushes are deterministic too.

Failures (out of blocks, bad ids, a full block-table row) are reported in ``ok``, a one-element device tensor
the caller reads when it chooses; a failed allocate or fork changes no state. Scratch arrays (marks per
sequence, last use per block) are kept at their neutral values between calls.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels._checks import check_contiguous, check_device, check_int, check_tensor
from kernels._pool_reads import BlockPoolReads

_MAX_TILE = 4096  # elements of one [sequences x pages-or-tokens] tile
_NEVER = tl.constexpr(2**31 - 1)  # offsets marks below zero, so the smallest listing index wins


@dataclass
class KVBlockPool(BlockPoolReads):
    """Blocks of ``block_size`` token slots for up to ``max_seqs`` sequences of ``max_blocks_per_seq`` pages.

    Invariants: each block is on the free stack (free_stack[:free_count]) with ref_count 0, or referenced by
    ref_count > 0 table entries, never both; sequence s's pages are block_tables[s, :cdiv(seq_lens[s],
    block_size)] and its entries past them are -1. Block ids and lengths are int32 on the device, so
    num_blocks and max_blocks_per_seq x block_size stay below 2^31 (the constructor checks).
    """

    num_blocks: int
    block_size: int
    max_seqs: int
    max_blocks_per_seq: int
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    ref_counts: torch.Tensor
    free_stack: torch.Tensor
    free_count: torch.Tensor
    seq_marks: torch.Tensor  # int32 [max_seqs] scratch: 0 between calls
    last_use: torch.Tensor  # int32 [num_blocks] scratch: -1 between calls

    def __init__(self, num_blocks: int, block_size: int, max_seqs: int, max_blocks_per_seq: int, device=None):
        for name, value in (
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("max_seqs", max_seqs),
            ("max_blocks_per_seq", max_blocks_per_seq),
        ):
            check_int(name, value, 1)
        # Block ids, lengths and positions are int32 on the device.
        if num_blocks >= 2**31:
            raise ValueError(
                f"num_blocks: block ids are int32, so expected fewer than 2^31, got {num_blocks}"
            )
        if max_seqs * max_blocks_per_seq >= 2**31:
            raise ValueError("max_blocks_per_seq: max_seqs x max_blocks_per_seq must stay below 2^31")
        if max_blocks_per_seq * block_size >= 2**31:
            raise ValueError(
                f"block_size: a sequence's length (max_blocks_per_seq x block_size) is int32, so their "
                f"product must stay below 2^31, got {max_blocks_per_seq} x {block_size}"
            )
        # None: the GPU where there is one (not torch's default device, usually the CPU)
        device = check_device("device", device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.num_blocks, self.block_size = num_blocks, block_size
        self.max_seqs, self.max_blocks_per_seq = max_seqs, max_blocks_per_seq
        self.block_tables = torch.full((max_seqs, max_blocks_per_seq), -1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.ref_counts = torch.zeros(num_blocks, dtype=torch.int32, device=device)
        self.free_stack = torch.arange(num_blocks - 1, -1, -1, dtype=torch.int32, device=device)
        self.free_count = torch.tensor([num_blocks], dtype=torch.int32, device=device)
        self.seq_marks = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.last_use = torch.full((num_blocks,), -1, dtype=torch.int32, device=device)

    @property
    def device(self) -> torch.device:
        return self.seq_lens.device

    def kernel_state(self) -> tuple[torch.Tensor, ...]:
        """The tensors every pool kernel takes, in their order: STATE's, then the marks scratch."""
        return (*(getattr(self, name) for name in self.STATE), self.seq_marks)

    def clone(self) -> "KVBlockPool":
        """An independent copy (tensors cloned on the same device)."""
        copy = object.__new__(KVBlockPool)
        copy.__dict__.update(
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        )
        return copy

    def copy_(self, other: "KVBlockPool") -> None:
        """Takes ``other``'s state in place (device copies, no sync): how a benchmark puts a pool back."""
        for name, value in vars(other).items():
            if isinstance(value, torch.Tensor):
                getattr(self, name).copy_(value)


# --- kernels ------------------------------------------------------------------------------------------------


@triton.jit
def _load_requests(requests, start, SEQ_BLOCK: tl.constexpr, UNIFORM: tl.constexpr):
    """Requests start .. start + SEQ_BLOCK of an allocate (``requests``: ids_ptr, counts_ptr, uniform_count,
    n, max_seqs): which are listed, their ids (0 where invalid), counts, and which are invalid."""
    ids_ptr, counts_ptr, uniform_count, n, max_seqs = requests
    offs = start + tl.arange(0, SEQ_BLOCK)
    live = offs < n
    ids = tl.load(ids_ptr + offs, mask=live, other=0)
    if UNIFORM:
        counts = tl.where(live, uniform_count, 0)
    else:
        counts = tl.load(counts_ptr + offs, mask=live, other=0)
    valid = (ids >= 0) & (ids < max_seqs) & (counts >= 0)
    return live, tl.where(live & valid, ids, 0), counts, live & ~valid


@triton.jit
def _allocate_kernel(
    seq_ids_ptr,  # [num_seqs] int32
    counts_ptr,  # [num_seqs] int32 new tokens per sequence; unread when UNIFORM
    uniform_count,  # new tokens for every sequence when UNIFORM
    num_seqs,
    num_tokens,  # the caller's sum of the counts: slot_mapping's length
    block_tables_ptr,  # [max_seqs, max_blocks] int32
    seq_lens_ptr,  # [max_seqs] int32
    ref_counts_ptr,  # [num_blocks] int32
    free_stack_ptr,  # [num_blocks] int32
    free_count_ptr,  # [1] int32
    marks_ptr,  # [max_seqs] int32 scratch, 0 on entry and exit
    slot_mapping_ptr,  # [num_tokens] int64 out
    ok_ptr,  # [1] bool out
    max_seqs,
    max_blocks,
    BLOCK_SIZE: tl.constexpr,
    SEQ_BLOCK: tl.constexpr,  # sequences per pass
    PAGE_BLOCK: tl.constexpr,  # new pages per sequence per inner step
    TOKEN_BLOCK: tl.constexpr,  # new tokens per sequence per inner step
    UNIFORM: tl.constexpr,
):
    requests = (seq_ids_ptr, counts_ptr, uniform_count, num_seqs, max_seqs)
    # Pass 1: validity, duplicates, and the totals the all-or-nothing check needs.
    bad = tl.zeros([SEQ_BLOCK], dtype=tl.int1)
    need_total = 0
    token_total = tl.full((), 0, tl.int64)
    for start in range(0, num_seqs, SEQ_BLOCK):
        live, ids, counts, invalid = _load_requests(requests, start, SEQ_BLOCK, UNIFORM)
        tl.atomic_add(marks_ptr + ids, 1, mask=live & ~invalid)  # counted twice: listed twice
        lens = tl.load(seq_lens_ptr + ids, mask=live & ~invalid, other=0)
        # Counts are device data: one past its row's room is refused before lens + counts can wrap int32
        # (the pool keeps max_blocks x BLOCK_SIZE below 2^31), and the total is summed in int64.
        too_many = live & ~invalid & (counts > max_blocks * BLOCK_SIZE - lens)
        old_pages = tl.cdiv(lens, BLOCK_SIZE)
        new_pages = tl.cdiv(tl.where(too_many, lens, lens + counts), BLOCK_SIZE)
        bad = bad | invalid | too_many | (live & (new_pages > max_blocks))
        need_total += tl.sum(tl.where(live & ~invalid, new_pages - old_pages, 0))
        token_total += tl.sum(counts.to(tl.int64))
    tl.debug_barrier()
    for start in range(0, num_seqs, SEQ_BLOCK):
        live, ids, counts, invalid = _load_requests(requests, start, SEQ_BLOCK, UNIFORM)
        bad = bad | (live & ~invalid & (tl.load(marks_ptr + ids, mask=live & ~invalid, other=0) > 1))
    tl.debug_barrier()
    for start in range(0, num_seqs, SEQ_BLOCK):
        live, ids, counts, invalid = _load_requests(requests, start, SEQ_BLOCK, UNIFORM)
        tl.store(marks_ptr + ids, 0, mask=live & ~invalid)

    free = tl.load(free_count_ptr)
    ok = (tl.max(bad.to(tl.int32), axis=0) == 0) & (need_total <= free) & (token_total == num_tokens)
    tl.store(ok_ptr, ok)
    if ok:
        # Stored before pass 2, which reads only ``free``: Triton 3.6's ptxas otherwise keeps the scalar
        # store's thread predicate alive across the loop and parks it on the stack.
        tl.store(free_count_ptr, free - need_total)
        # Pass 2: pop pages and write slots, carrying the prefix offsets from pass to pass.
        page_carry = 0
        token_carry = 0
        top = free - 1
        for start in range(0, num_seqs, SEQ_BLOCK):
            live, ids, counts, invalid = _load_requests(requests, start, SEQ_BLOCK, UNIFORM)
            lens = tl.load(seq_lens_ptr + ids, mask=live, other=0)
            old_pages = tl.cdiv(lens, BLOCK_SIZE)
            need = tl.where(live, tl.cdiv(lens + counts, BLOCK_SIZE) - old_pages, 0)
            page_offset = page_carry + tl.cumsum(need, axis=0) - need
            token_offset = token_carry + tl.cumsum(counts, axis=0) - counts
            rows = block_tables_ptr + ids.to(tl.int64) * max_blocks
            for j in range(0, tl.max(need, axis=0), PAGE_BLOCK):
                page = j + tl.arange(0, PAGE_BLOCK)
                fresh = live[:, None] & (page[None, :] < need[:, None])
                block = tl.load(
                    free_stack_ptr + top - (page_offset[:, None] + page[None, :]), mask=fresh, other=0
                )
                tl.store(rows[:, None] + old_pages[:, None] + page[None, :], block, mask=fresh)
                tl.store(ref_counts_ptr + block, 1, mask=fresh)
            for t in range(0, tl.max(counts, axis=0), TOKEN_BLOCK):
                token = t + tl.arange(0, TOKEN_BLOCK)
                new = live[:, None] & (token[None, :] < counts[:, None])
                position = lens[:, None] + token[None, :]
                page = position // BLOCK_SIZE
                existing = page < old_pages[:, None]
                # Pages this call adds are read from the stack, not back from the table it just wrote.
                old_block = tl.load(rows[:, None] + page, mask=new & existing, other=0)
                new_block = tl.load(
                    free_stack_ptr + top - (page_offset[:, None] + page - old_pages[:, None]),
                    mask=new & ~existing,
                    other=0,
                )
                block = tl.where(existing, old_block, new_block)
                slot = block.to(tl.int64) * BLOCK_SIZE + position % BLOCK_SIZE
                tl.store(slot_mapping_ptr + token_offset[:, None] + token[None, :], slot, mask=new)
            tl.store(seq_lens_ptr + ids, lens + counts, mask=live)
            page_carry += tl.sum(need, axis=0)
            token_carry += tl.sum(counts, axis=0)
    else:
        for start in range(0, num_tokens, SEQ_BLOCK):
            offs = start + tl.arange(0, SEQ_BLOCK)
            tl.store(slot_mapping_ptr + offs, tl.full([SEQ_BLOCK], -1, tl.int64), mask=offs < num_tokens)


@triton.jit
def _load_pairs(src_ptr, dst_ptr, start, num_pairs, max_seqs, PAIR_BLOCK: tl.constexpr):
    """Pairs start .. start + PAIR_BLOCK of a fork: which are listed, their ids, and which are in range."""
    offs = start + tl.arange(0, PAIR_BLOCK)
    live = offs < num_pairs
    src = tl.load(src_ptr + offs, mask=live, other=0)
    dst = tl.load(dst_ptr + offs, mask=live, other=0)
    return live, src, dst, live & (src >= 0) & (src < max_seqs) & (dst >= 0) & (dst < max_seqs)


@triton.jit
def _fork_kernel(
    src_ptr,  # [num_pairs] int32
    dst_ptr,  # [num_pairs] int32
    num_pairs,
    block_tables_ptr,  # [max_seqs, max_blocks] int32
    seq_lens_ptr,  # [max_seqs] int32
    ref_counts_ptr,  # [num_blocks] int32
    free_stack_ptr,  # [num_blocks] int32
    free_count_ptr,  # [1] int32
    marks_ptr,  # [max_seqs] int32 scratch, 0 on entry and exit
    copies_ptr,  # [num_pairs, 2] int32 out: (src_block, dst_block) to copy, or (-1, -1)
    ok_ptr,  # [1] bool out
    max_seqs,
    max_blocks,
    BLOCK_SIZE: tl.constexpr,
    PAIR_BLOCK: tl.constexpr,
    PAGE_BLOCK: tl.constexpr,
):
    # Pass 1: destinations counted into marks; sources and destinations checked; copies needed counted.
    bad = tl.zeros([PAIR_BLOCK], dtype=tl.int1)
    need_total = 0
    for start in range(0, num_pairs, PAIR_BLOCK):
        live, src, dst, valid = _load_pairs(src_ptr, dst_ptr, start, num_pairs, max_seqs, PAIR_BLOCK)
        bad = bad | (live & ~valid)
        tl.atomic_add(marks_ptr + dst, 1, mask=valid)
        src_len = tl.load(seq_lens_ptr + src, mask=valid, other=0)
        dst_len = tl.load(seq_lens_ptr + dst, mask=valid, other=0)
        bad = bad | (valid & (dst_len != 0))
        need_total += tl.sum(tl.where(valid & (src_len % BLOCK_SIZE != 0), 1, 0), axis=0)
    tl.debug_barrier()
    for start in range(0, num_pairs, PAIR_BLOCK):
        live, src, dst, valid = _load_pairs(src_ptr, dst_ptr, start, num_pairs, max_seqs, PAIR_BLOCK)
        # A destination listed twice, or a source that is also a destination: refused.
        bad = bad | (valid & (tl.load(marks_ptr + dst, mask=valid, other=0) > 1))
        bad = bad | (valid & (tl.load(marks_ptr + src, mask=valid, other=0) > 0))
    tl.debug_barrier()
    for start in range(0, num_pairs, PAIR_BLOCK):
        offs = start + tl.arange(0, PAIR_BLOCK)
        live = offs < num_pairs
        dst = tl.load(dst_ptr + offs, mask=live, other=-1)
        tl.store(marks_ptr + dst, 0, mask=live & (dst >= 0) & (dst < max_seqs))

    free = tl.load(free_count_ptr)
    ok = (tl.max(bad.to(tl.int32), axis=0) == 0) & (need_total <= free)
    tl.store(ok_ptr, ok)
    carry = 0
    for start in range(0, num_pairs, PAIR_BLOCK):
        offs = start + tl.arange(0, PAIR_BLOCK)
        live = offs < num_pairs
        copy_src = tl.full([PAIR_BLOCK], -1, tl.int32)
        copy_dst = tl.full([PAIR_BLOCK], -1, tl.int32)
        if ok:
            src = tl.load(src_ptr + offs, mask=live, other=0)
            dst = tl.load(dst_ptr + offs, mask=live, other=0)
            length = tl.load(seq_lens_ptr + src, mask=live, other=0)
            full = length // BLOCK_SIZE
            partial = live & (length % BLOCK_SIZE != 0)
            src_rows = block_tables_ptr + src.to(tl.int64) * max_blocks
            dst_rows = block_tables_ptr + dst.to(tl.int64) * max_blocks
            for j in range(0, tl.max(full, axis=0), PAGE_BLOCK):
                page = j + tl.arange(0, PAGE_BLOCK)
                shared = live[:, None] & (page[None, :] < full[:, None])
                block = tl.load(src_rows[:, None] + page[None, :], mask=shared, other=0)
                tl.store(dst_rows[:, None] + page[None, :], block, mask=shared)
                tl.atomic_add(ref_counts_ptr + block, 1, mask=shared)
            order = carry + tl.cumsum(partial.to(tl.int32), axis=0) - partial.to(tl.int32)
            fresh = tl.load(free_stack_ptr + free - 1 - order, mask=partial, other=0)
            last = tl.load(src_rows + full, mask=partial, other=0)
            tl.store(dst_rows + full, fresh, mask=partial)
            tl.store(ref_counts_ptr + fresh, 1, mask=partial)
            tl.store(seq_lens_ptr + dst, length, mask=live)
            copy_src = tl.where(partial, last, -1)
            copy_dst = tl.where(partial, fresh, -1)
            carry += tl.sum(partial.to(tl.int32), axis=0)
        tl.store(copies_ptr + offs.to(tl.int64) * 2, copy_src, mask=live)
        tl.store(copies_ptr + offs.to(tl.int64) * 2 + 1, copy_dst, mask=live)
    if ok:
        tl.store(free_count_ptr, free - need_total)


@triton.jit
def _listed(seq_ids_ptr, offs, num_seqs, max_seqs):
    """The ids at listings ``offs`` of a free, and which are valid (listed and in range)."""
    ids = tl.load(seq_ids_ptr + offs, mask=offs < num_seqs, other=-1)
    return ids, (offs < num_seqs) & (ids >= 0) & (ids < max_seqs)


@triton.jit
def _freed_rows(listing, start, BLOCK_SIZE: tl.constexpr, SEQ_BLOCK: tl.constexpr):
    """For the listings start .. start + SEQ_BLOCK of a free (``listing``: seq_ids_ptr, num_seqs, max_seqs,
    marks_ptr, seq_lens_ptr, block_tables_ptr, max_blocks): their offsets and ids, whether each frees its
    sequence (the first listing of a valid id), the sequence's page count, and its block-table row."""
    seq_ids_ptr, num_seqs, max_seqs, marks_ptr, seq_lens_ptr, block_tables_ptr, max_blocks = listing
    offs = start + tl.arange(0, SEQ_BLOCK)
    ids, valid = _listed(seq_ids_ptr, offs, num_seqs, max_seqs)
    first = valid & (tl.load(marks_ptr + ids, mask=valid, other=0) == offs - _NEVER)
    pages = tl.where(first, tl.cdiv(tl.load(seq_lens_ptr + ids, mask=first, other=0), BLOCK_SIZE), 0)
    rows = block_tables_ptr + tl.where(first, ids, 0).to(tl.int64) * max_blocks
    return offs, ids, first, pages, rows


@triton.jit
def _page_tile(rows, first, pages, j, PAGE_BLOCK: tl.constexpr):
    """Pages j .. j + PAGE_BLOCK of each freed row: their indices, which are in use, and their blocks."""
    page = j + tl.arange(0, PAGE_BLOCK)
    used = first[:, None] & (page[None, :] < pages[:, None])
    return page, used, tl.load(rows[:, None] + page[None, :], mask=used, other=0)


@triton.jit
def _use(offs, page, max_blocks):
    """Each (listing, page)'s place in (listing, page) order: what last_use keeps the largest of."""
    return offs[:, None] * max_blocks + page[None, :]


@triton.jit
def _released_here(ref_counts_ptr, last_use_ptr, block, used, use):
    """A block goes back on the stack at its last use, once its count is zero."""
    released = used & (tl.load(ref_counts_ptr + block, mask=used, other=1) == 0)
    return released & (tl.load(last_use_ptr + block, mask=used, other=-1) == use)


@triton.jit
def _released_tile(
    ref_counts_ptr, last_use_ptr, rows, first, pages, offs, j, max_blocks, PAGE_BLOCK: tl.constexpr
):
    """Pages j .. j + PAGE_BLOCK of each freed row: their blocks, and which go back on the stack here (int32
    flags, pass 2)."""
    page, used, block = _page_tile(rows, first, pages, j, PAGE_BLOCK)
    released = _released_here(ref_counts_ptr, last_use_ptr, block, used, _use(offs, page, max_blocks))
    return block, released.to(tl.int32)


@triton.jit
def _sweep_freed(
    listing,
    start,
    ref_counts_ptr,
    last_use_ptr,
    BLOCK_SIZE: tl.constexpr,
    SEQ_BLOCK: tl.constexpr,
    PAGE_BLOCK: tl.constexpr,
    CLEAR: tl.constexpr,
):
    """Every page of listings start .. start + SEQ_BLOCK that free. Pass 1 (CLEAR off): drop its reference;
    each block keeps its last use in (listing, page) order. Pass 3 (CLEAR on): clear the row entries and the
    last uses, then the lengths."""
    seq_ids_ptr, num_seqs, max_seqs, marks_ptr, seq_lens_ptr, block_tables_ptr, max_blocks = listing
    offs, ids, first, pages, rows = _freed_rows(listing, start, BLOCK_SIZE, SEQ_BLOCK)
    for j in range(0, tl.max(pages, axis=0), PAGE_BLOCK):
        page, used, block = _page_tile(rows, first, pages, j, PAGE_BLOCK)
        if CLEAR:
            tl.store(last_use_ptr + block, -1, mask=used)
            tl.store(rows[:, None] + page[None, :], -1, mask=used)
        else:
            tl.atomic_add(ref_counts_ptr + block, -1, mask=used)
            tl.atomic_max(last_use_ptr + block, _use(offs, page, max_blocks), mask=used)
    if CLEAR:
        tl.store(seq_lens_ptr + ids, 0, mask=first)


@triton.jit
def _free_kernel(
    seq_ids_ptr,  # [num_seqs] int32
    num_seqs,
    block_tables_ptr,  # [max_seqs, max_blocks] int32
    seq_lens_ptr,  # [max_seqs] int32
    ref_counts_ptr,  # [num_blocks] int32
    free_stack_ptr,  # [num_blocks] int32
    free_count_ptr,  # [1] int32
    marks_ptr,  # [max_seqs] int32 scratch, 0 on entry and exit
    last_use_ptr,  # [num_blocks] int32 scratch, -1 on entry and exit
    max_seqs,
    max_blocks,
    BLOCK_SIZE: tl.constexpr,
    SEQ_BLOCK: tl.constexpr,
    PAGE_BLOCK: tl.constexpr,
):
    listing = (seq_ids_ptr, num_seqs, max_seqs, marks_ptr, seq_lens_ptr, block_tables_ptr, max_blocks)
    # A sequence listed twice is freed by its first listing: its mark becomes that index - _NEVER (< 0).
    for start in range(0, num_seqs, SEQ_BLOCK):
        offs = start + tl.arange(0, SEQ_BLOCK)
        ids, valid = _listed(seq_ids_ptr, offs, num_seqs, max_seqs)
        tl.atomic_min(marks_ptr + ids, tl.where(valid, offs - _NEVER, 0), mask=valid)
    tl.debug_barrier()
    # Pass 1: drop references; each block remembers its last use in (listing, page) order.
    for start in range(0, num_seqs, SEQ_BLOCK):
        _sweep_freed(listing, start, ref_counts_ptr, last_use_ptr, BLOCK_SIZE, SEQ_BLOCK, PAGE_BLOCK, False)
    tl.debug_barrier()
    # Pass 2: push each released block, at a position given by a prefix count in (listing, page) order:
    # first each listing's count of releases (for its offset), then the pushes.
    top = tl.load(free_count_ptr)
    for start in range(0, num_seqs, SEQ_BLOCK):
        offs, ids, first, pages, rows = _freed_rows(listing, start, BLOCK_SIZE, SEQ_BLOCK)
        tile = (ref_counts_ptr, last_use_ptr, rows, first, pages, offs)
        released_per_seq = tl.zeros([SEQ_BLOCK], dtype=tl.int32)
        for j in range(0, tl.max(pages, axis=0), PAGE_BLOCK):
            _, flags = _released_tile(*tile, j, max_blocks, PAGE_BLOCK)
            released_per_seq += tl.sum(flags, axis=1)
        seq_offset = tl.cumsum(released_per_seq, axis=0) - released_per_seq
        running = tl.zeros([SEQ_BLOCK], dtype=tl.int32)
        for j in range(0, tl.max(pages, axis=0), PAGE_BLOCK):
            block, flags = _released_tile(*tile, j, max_blocks, PAGE_BLOCK)
            position = top + seq_offset[:, None] + running[:, None] + tl.cumsum(flags, axis=1) - flags
            tl.store(free_stack_ptr + position, block, mask=flags != 0)
            running += tl.sum(flags, axis=1)
        top += tl.sum(released_per_seq, axis=0)
    tl.debug_barrier()
    # Pass 3: clear the rows and the last uses and the lengths; then the marks.
    for start in range(0, num_seqs, SEQ_BLOCK):
        _sweep_freed(listing, start, ref_counts_ptr, last_use_ptr, BLOCK_SIZE, SEQ_BLOCK, PAGE_BLOCK, True)
    tl.debug_barrier()
    for start in range(0, num_seqs, SEQ_BLOCK):
        offs = start + tl.arange(0, SEQ_BLOCK)
        ids, valid = _listed(seq_ids_ptr, offs, num_seqs, max_seqs)
        tl.store(marks_ptr + ids, 0, mask=valid)
    tl.store(free_count_ptr, top)


@triton.jit
def _copy_blocks_kernel(
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache_ptr,  # same
    copies_ptr,  # [num_pairs, 2] int32: (src_block, dst_block); either outside [0, num_blocks) skips it
    num_blocks,
    BLOCK_ELEMENTS: tl.constexpr,  # block_size * num_kv_heads * head_dim
    TILE: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * TILE + tl.arange(0, TILE)
    src = tl.load(copies_ptr + pair * 2).to(tl.int64)
    dst = tl.load(copies_ptr + pair * 2 + 1).to(tl.int64)
    # Pairs are device data: one naming a block outside the caches copies nothing, and forms no address.
    valid = (src >= 0) & (src < num_blocks) & (dst >= 0) & (dst < num_blocks)
    src = tl.where(valid, src, 0)
    dst = tl.where(valid, dst, 0)
    mask = offs < tl.where(valid, BLOCK_ELEMENTS, 0)
    k = tl.load(k_cache_ptr + src * BLOCK_ELEMENTS + offs, mask=mask)
    tl.store(k_cache_ptr + dst * BLOCK_ELEMENTS + offs, k, mask=mask)
    v = tl.load(v_cache_ptr + src * BLOCK_ELEMENTS + offs, mask=mask)
    tl.store(v_cache_ptr + dst * BLOCK_ELEMENTS + offs, v, mask=mask)


# --- launchers ----------------------------------------------------------------------------------------------


def _check_pool(pool) -> None:
    if not isinstance(pool, KVBlockPool):
        raise ValueError(f"pool: expected a KVBlockPool, got {type(pool).__name__}")


def _check_ids(name: str, ids, pool: KVBlockPool) -> None:
    check_tensor(name, ids, ndim=1, dtypes=(torch.int32,), device=pool.device)
    check_contiguous(name, ids)


def _tiles(num_seqs: int, per_seq: int) -> tuple[int, int]:
    """(sequences per pass, items per sequence per inner step) within one _MAX_TILE tile."""
    inner = min(triton.next_power_of_2(max(1, per_seq)), _MAX_TILE // 16)
    outer = min(triton.next_power_of_2(max(1, num_seqs)), max(16, _MAX_TILE // inner))
    return outer, inner


def allocate(pool: KVBlockPool, seq_ids, num_new_tokens, *, num_tokens: int | None = None):
    """Appends tokens to sequences; returns (slot_mapping int64 [num_tokens], ok bool [1]), no host sync.

    seq_ids: int32 [n] device tensor. num_new_tokens: an int for every sequence (a decode step passes 1),
    or an int32 [n] device tensor with ``num_tokens`` their sum (the caller knows it: it sized the batch;
    reading it from the device would sync). Slots are listed sequence by sequence. When the pool lacks
    blocks, or an id is out of range or repeated, or a sequence would outgrow its table row, nothing changes,
    ``ok`` is False and every slot is -1 (write_kv skips them).
    """
    _check_pool(pool)
    _check_ids("seq_ids", seq_ids, pool)
    num_seqs = seq_ids.shape[0]
    if isinstance(num_new_tokens, torch.Tensor):
        check_tensor("num_new_tokens", num_new_tokens, ndim=1, dtypes=(torch.int32,), device=pool.device)
        check_contiguous("num_new_tokens", num_new_tokens)
        if num_new_tokens.shape[0] != num_seqs:
            raise ValueError(
                f"num_new_tokens: expected [{num_seqs}] like seq_ids, got {tuple(num_new_tokens.shape)}"
            )
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(
                "num_tokens: expected the counts' sum as an int with per-sequence counts (it sizes "
                f"slot_mapping; reading it from the device would sync), got {num_tokens!r}"
            )
        uniform, counts = 0, num_new_tokens
    elif isinstance(num_new_tokens, int) and not isinstance(num_new_tokens, bool) and num_new_tokens >= 0:
        if num_tokens is not None and num_tokens != num_new_tokens * num_seqs:
            raise ValueError(f"num_tokens: expected {num_new_tokens * num_seqs}, got {num_tokens!r}")
        uniform, counts, num_tokens = num_new_tokens, seq_ids, num_new_tokens * num_seqs
    else:
        raise ValueError(
            f"num_new_tokens: expected a non-negative int or an int32 tensor, got {num_new_tokens!r}"
        )
    slot_mapping = torch.empty(num_tokens, dtype=torch.int64, device=pool.device)
    ok = torch.empty(1, dtype=torch.bool, device=pool.device)
    per_seq = max(num_tokens // max(1, num_seqs), 1)
    seq_block, token_block = _tiles(num_seqs, per_seq)
    _, page_block = _tiles(num_seqs, triton.cdiv(per_seq, pool.block_size) + 1)
    _allocate_kernel[(1,)](
        seq_ids,
        counts,
        uniform,
        num_seqs,
        num_tokens,
        *pool.kernel_state(),
        slot_mapping,
        ok,
        pool.max_seqs,
        pool.max_blocks_per_seq,
        BLOCK_SIZE=pool.block_size,
        SEQ_BLOCK=seq_block,
        PAGE_BLOCK=min(page_block, _MAX_TILE // seq_block),
        TOKEN_BLOCK=min(token_block, _MAX_TILE // seq_block),
        UNIFORM=not isinstance(num_new_tokens, torch.Tensor),
        num_warps=8,
    )
    return slot_mapping, ok


def fork(pool: KVBlockPool, src, dst):
    """Each (empty) dst[i] takes src[i]'s tokens: full blocks shared by reference count, a partly filled last
    block copied into a fresh one. Returns (copies int32 [n, 2] for copy_blocks, ok bool [1]); out of
    blocks, or on a bad pair (id out of range, dst not empty, listed twice, or a source), nothing changes."""
    _check_pool(pool)
    _check_ids("src", src, pool)
    _check_ids("dst", dst, pool)
    if dst.shape != src.shape:
        raise ValueError(f"dst: expected {tuple(src.shape)} like src, got {tuple(dst.shape)}")
    num_pairs = src.shape[0]
    copies = torch.empty(num_pairs, 2, dtype=torch.int32, device=pool.device)
    ok = torch.empty(1, dtype=torch.bool, device=pool.device)
    pair_block, page_block = _tiles(num_pairs, pool.max_blocks_per_seq)
    _fork_kernel[(1,)](
        src,
        dst,
        num_pairs,
        *pool.kernel_state(),
        copies,
        ok,
        pool.max_seqs,
        pool.max_blocks_per_seq,
        BLOCK_SIZE=pool.block_size,
        PAIR_BLOCK=pair_block,
        PAGE_BLOCK=min(page_block, _MAX_TILE // pair_block),
        num_warps=8,
    )
    return copies, ok


def free(pool: KVBlockPool, seq_ids) -> None:
    """Drops the listed sequences' references; blocks reaching zero return to the free stack. Ids out of
    range are skipped; a sequence listed twice is freed once. A listing holds fewer than 2^31 /
    max_blocks_per_seq entries (the kernel orders references by int32 (listing, page) positions; the pool's
    own bound keeps any listing without repeats or stray ids inside it)."""
    _check_pool(pool)
    _check_ids("seq_ids", seq_ids, pool)
    num_seqs = seq_ids.shape[0]
    most = (2**31 - 1) // pool.max_blocks_per_seq
    if num_seqs > most:
        raise ValueError(
            f"seq_ids: expected at most {most} entries ((listing, page) positions are int32 at "
            f"{pool.max_blocks_per_seq} pages a sequence), got {num_seqs}"
        )
    seq_block, page_block = _tiles(num_seqs, pool.max_blocks_per_seq)
    _free_kernel[(1,)](
        seq_ids,
        num_seqs,
        *pool.kernel_state(),
        pool.last_use,
        pool.max_seqs,
        pool.max_blocks_per_seq,
        BLOCK_SIZE=pool.block_size,
        SEQ_BLOCK=seq_block,
        PAGE_BLOCK=min(page_block, _MAX_TILE // seq_block),
        num_warps=8,
    )


def copy_blocks(k_cache, v_cache, copies) -> None:
    """k_cache[dst] = k_cache[src] and v_cache[dst] = v_cache[src] for each (src, dst) row of copies (as fork
    returns them). A row with either id outside [0, num_blocks) is skipped, (-1, -1) among them: the ids are
    device data, never read here, so the kernel checks them and touches no memory outside the caches. One
    launch, no host sync."""
    check_tensor("k_cache", k_cache, ndim=4)
    check_contiguous("k_cache", k_cache)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=k_cache.device)
    check_contiguous("v_cache", v_cache)
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache: expected k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    check_tensor("copies", copies, ndim=2, dtypes=(torch.int32,), device=k_cache.device)
    check_contiguous("copies", copies)
    if copies.shape[1] != 2:
        raise ValueError(f"copies: expected [n, 2] (src_block, dst_block) rows, got {tuple(copies.shape)}")
    elements = k_cache[0].numel() if k_cache.shape[0] else 0
    if copies.shape[0] == 0 or elements == 0:
        return  # no block to copy into (every pair is out of range) or blocks of zero elements
    tile = min(triton.next_power_of_2(elements), 4096)
    _copy_blocks_kernel[(copies.shape[0], triton.cdiv(elements, tile))](
        k_cache, v_cache, copies, k_cache.shape[0], BLOCK_ELEMENTS=elements, TILE=tile, num_warps=4
    )
