"""Expert parallelism across ranks: send each token's rows to the ranks that own its experts (ep_dispatch),
and bring the experts' outputs back, weighed together (ep_combine). Rows move with torch.distributed
collectives (NCCL on GPUs, gloo on CPUs) on the caller's process group; Triton kernels lay them out.

Ownership: of W ranks, rank r owns the global experts [r * L, (r + 1) * L), L = E / W (its local experts).

Layouts (T: this rank's tokens, may differ between ranks; k: top_k; H: hidden):
    x         [T, H]       this rank's rows (fp32, fp16, bf16)
    weights   [T, k] fp32  route's weights;  ids [T, k] int32: global expert ids (route's are distinct per
                           token; a repeated id is a row per choice, as in moe.dispatch)
    recv_x    [R, H]       every row sent to this rank's experts: local expert e's rows are
                           recv_x[expert_offsets[e] : expert_offsets[e] + tokens_per_expert[e]], ordered by
                           source rank, then by the source's (token, choice) order; each segment starts on a
                           multiple of ``align``; rows between segments are padding, never read back
    y         [R, H]       the experts' outputs in recv_x's rows (ep_combine's input)
    out       [T, H]       sum over each token's choices of weight x the chosen expert's row

The stages (each in an NVTX range named ep.<stage>, and reported to ``stage_hook``):
    pack       moe.dispatch with E global experts: rows grouped by expert are also grouped by owner rank
               (capacity mode then copies each owner's rows into its fixed-size slab)
    counts     all_to_all_single of the W x L per-expert counts: each rank learns what it will receive
    sync       exact mode only: the counts read on the host, to size the row exchange (the one sync)
    rows       all_to_all_single of the rows (exact: uneven splits; capacity: equal fixed slabs)
    layout     the received rows regrouped per local expert (a Triton kernel reading the counts on device)
    -- the caller runs its experts on recv_x --
    unlayout   the outputs put back in received order;  return: the reverse all_to_all_single
    unpack     capacity mode only: slabs back into pack's order;  combine: moe.combine with route's weights

Modes. ``exact`` sends exactly the rows routed, at the cost of one host sync per call (the receiving side
cannot size its buffer before it knows the counts). ``capacity`` sends fixed slabs of C = max_tokens_per_rank
x k rows per (source, destination) pair: an upper bound (a token puts at most k rows on one rank, all k when
its ids repeat or its experts share the rank), so no row is ever dropped, whatever the ids, no count reaches
the host, and the whole path can be captured in a CUDA graph; the wire carries the padding. With an
EPWorkspace it allocates nothing.

Deduplicated (``dedup=True``, either mode), as DeepEP's normal kernels do: a token's row goes once to each
rank owning at least one of its experts, with that rank's pairs beside it (a meta row: per choice, its place
among the pairs the source sends that rank, in the order the exchange without dedup would send them, or -1;
then the choice's weight). pack is one kernel (_dedup_pack_kernel) writing those rows and a counts matrix
with a column more (rows per destination, which size the exchange); rows carries the meta rows too; layout
copies each received row into each of its pairs' segments, so recv_x, tokens_per_expert, expert_offsets and
recv_counts are exactly as without dedup and the experts' code does not change. Capacity slabs hold C =
max_tokens_per_rank rows (a token sends a rank one row at most). The way back reduces: unlayout sums each
received row's pairs' outputs times their weights in fp32 in choice order and rounds once to y's dtype (a
partial row per (token, rank): the rows that return, as many as went out); combine adds each token's partials
in rank order in fp32 and rounds once. That differs from the single-order sum by rounding only; reruns are
bit-identical and nothing depends on timing.

Byte story: pack reads each row once and writes it k times (dedup: once per destination rank); the wire
carries k rows per token each way (exact; dedup: one per (token, rank), plus 8k bytes of meta per row on the
way out) or W x C rows per rank (capacity); layout and unlayout read and write each received row once (dedup:
read once, written once per pair; the way back reads each pair and writes one row); combine reads k rows per
token (dedup: one per destination rank) and writes one. handle.send_rows counts the rows sent per rank, so
the saving is measured (bench/operators/ep.py reports it beside the bytes).

Accumulation: combine sums each token's choices in fp32 in choice order, as moe.combine does: reruns are
bit-identical and the result does not depend on the world size (dedup: it does, by rounding only).

Checks are metadata only and run on every rank before the first collective: bad input of the same shape on
every rank raises ValueError everywhere and leaves no rank waiting. Buffers sharing memory (a workspace's
with each other or with x, weights and ids; y with a buffer ep_combine writes) are bad input too. A rank
whose input differs from its peers' (or that dies) leaves them in a collective until the process group's
timeout ends it; so does capacity mode's bound, max_tokens_per_rank, exceeded on one rank only (the others'
token counts are within it, so only that rank raises).
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels import moe
from kernels._checks import (
    check_buffer,
    check_contiguous,
    check_device,
    check_disjoint,
    check_int,
    check_tensor,
)

MODES = ("exact", "capacity")
#: Rows a regroup program moves.
_ROWS = 8
#: Tokens a dedup pack program copies (its [tokens, experts] layout stays in registers: 8 at 256 experts,
#: sm_90, where 16 reach the register file's end), and tokens per step of its scan of all the ids.
_PACK_TOKENS = 8
_SCAN_TOKENS = 64
#: Tokens per program of the partials' sum.
_SUM_TOKENS = 4

StageHook = Callable[[str], AbstractContextManager]


@triton.jit
def _segment_of(place, a_counts, bb):
    """(b, place within segment b) of each row's ``place`` among its a's segments, whose counts are
    a_counts [ROWS, B_PAD]."""
    b_ends = tl.cumsum(a_counts, axis=1)
    b = tl.sum((b_ends <= place[:, None]).to(tl.int32), axis=1)
    b_start = tl.sum(tl.where(bb[None, :] == b[:, None], b_ends - a_counts, 0), axis=1)
    return b, place - b_start


@triton.jit
def _column_row(a, b, within_b, column_starts, above, live, bb, B_PAD: tl.constexpr):
    """The grouped row of place ``within_b`` in segment (a, b), segments grouped by column: column b's start,
    then column b's rows from earlier a (``above``: the column's exclusive prefix down the matrix, flat)."""
    column_start = tl.sum(tl.where(bb[None, :] == b[:, None], column_starts[None, :], 0), axis=1)
    flat = tl.where(live, a * B_PAD + b, 0)
    return column_start + tl.gather(above, flat, axis=0) + within_b


@triton.jit
def _regroup_kernel(
    packed_ptr,  # [packed_rows, hidden]: segment (a, b) after a's start and a's earlier segments
    # (DEDUP: a's rows, a row per (token, rank), its pairs in meta)
    grouped_ptr,  # [grouped_rows, hidden]: segment (a, b) where BY_COLUMN or grouped_slab says
    counts_ptr,  # [num_a, counts_stride] int32: rows of segment (a, b) (DEDUP: a's rows in column num_b)
    meta_ptr,  # [packed_rows, 2 * TOP_K] int32 (DEDUP): per choice its place in a's segments, weight bits
    tokens_per_expert_ptr,  # [num_b] int32 out (BY_COLUMN, program 0): rows of column b
    expert_offsets_ptr,  # [num_b + 1] int32 out (BY_COLUMN, program 0): where column b's rows begin
    hidden,
    num_a,
    num_b,
    counts_stride,  # row stride of the counts matrix
    packed_slab,  # rows per a in packed; 0: a's segments follow the previous a's directly
    grouped_slab,  # rows per a in grouped (not BY_COLUMN)
    align,
    A_PAD: tl.constexpr,
    B_PAD: tl.constexpr,
    BY_COLUMN: tl.constexpr,  # grouped by b (b's segments in order of a, each b aligned), not by a
    TO_PACKED: tl.constexpr,  # move grouped -> packed (the way back) instead of packed -> grouped
    DEDUP: tl.constexpr,  # (BY_COLUMN) a packed row is one (token, rank) row: copied to each of its pairs'
    # places, and on the way back its pairs' rows weighed and summed into it
    TOP_K: tl.constexpr,  # DEDUP: pairs per meta row
    K_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    HIDDEN_TILE: tl.constexpr,
):
    """Moves ROWS rows of the packed buffer's index space to (or from) their grouped place. Each program
    finds its rows' segments and destinations from the whole counts matrix, so nothing scans the counts
    first and no count reaches the host; rows are spread evenly, however skewed the segments are."""
    aa = tl.arange(0, A_PAD)
    bb = tl.arange(0, B_PAD)
    in_matrix = (aa < num_a)[:, None] & (bb < num_b)[None, :]
    counts = tl.load(counts_ptr + aa[:, None] * counts_stride + bb[None, :], mask=in_matrix, other=0)
    if DEDUP:
        row_totals = tl.load(counts_ptr + aa * counts_stride + num_b, mask=aa < num_a, other=0)
    else:
        row_totals = tl.sum(counts, axis=1)  # [A_PAD]

    # Each row's a, and its place within a's rows.
    j = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    if packed_slab > 0:
        a = j // packed_slab
        within_a = j % packed_slab
    else:
        a_ends = tl.cumsum(row_totals, axis=0)
        a = tl.sum((a_ends[None, :] <= j[:, None]).to(tl.int32), axis=1)
        a_start = tl.sum(tl.where(aa[None, :] == a[:, None], a_ends - row_totals, 0), axis=1)
        within_a = j - a_start
    a_total = tl.sum(tl.where(aa[None, :] == a[:, None], row_totals, 0), axis=1)
    live = (a < num_a) & (within_a < a_total)
    if packed_slab > 0:
        live = live & (within_a < packed_slab)
    a_counts = tl.load(
        counts_ptr + a.to(tl.int64)[:, None] * counts_stride + bb[None, :],
        mask=live[:, None] & (bb < num_b)[None, :],
        other=0,
    )  # [ROWS, B_PAD]: row a of the matrix, per row

    if BY_COLUMN:
        columns = tl.sum(counts, axis=0)  # [B_PAD]
        padded = tl.where(bb < num_b, tl.cdiv(columns, align) * align, 0)
        column_ends = tl.cumsum(padded, axis=0)
        above = tl.reshape(tl.cumsum(counts, axis=0) - counts, [A_PAD * B_PAD])
        if not TO_PACKED and tl.program_id(0) == 0:
            tl.store(tokens_per_expert_ptr + bb, columns, mask=bb < num_b)
            tl.store(expert_offsets_ptr + 1 + bb, column_ends, mask=bb < num_b)
            tl.store(expert_offsets_ptr, 0)
        if not DEDUP:
            b, within_b = _segment_of(within_a, a_counts, bb)
            grouped_row = _column_row(a, b, within_b, column_ends - padded, above, live, bb, B_PAD)
    else:
        grouped_row = a * grouped_slab + within_a
        live = live & (within_a < grouped_slab)  # never false (slab_rows bounds every a's rows): no OOB

    if DEDUP:
        # Each pair's grouped row (-1: none) and weight, from the row's meta.
        slots = tl.arange(0, K_PAD)
        meta_rows = meta_ptr + j.to(tl.int64) * (2 * TOP_K)
        pair_rows = tl.full([ROWS, K_PAD], -1, dtype=tl.int64)
        pair_weights = tl.zeros([ROWS, K_PAD], dtype=tl.float32)
        for c in tl.static_range(TOP_K):
            place = tl.load(meta_rows + c, mask=live, other=-1)
            b, within_b = _segment_of(place, a_counts, bb)
            valid = live & (place >= 0) & (b < num_b)
            row = _column_row(a, b, within_b, column_ends - padded, above, valid, bb, B_PAD)
            pair_rows = tl.where(
                slots[None, :] == c, tl.where(valid, row, -1).to(tl.int64)[:, None], pair_rows
            )
            if TO_PACKED:
                bits = tl.load(meta_rows + TOP_K + c, mask=valid, other=0)
                pair_weights = tl.where(
                    slots[None, :] == c, bits.to(tl.float32, bitcast=True)[:, None], pair_weights
                )

    if tl.sum(live.to(tl.int32), axis=0) > 0:
        packed_rows = j.to(tl.int64)[:, None] * hidden
        for start in range(0, hidden, HIDDEN_TILE):
            cols = start + tl.arange(0, HIDDEN_TILE)[None, :]
            mask = live[:, None] & (cols < hidden)
            if DEDUP:
                if TO_PACKED:
                    acc = tl.zeros([ROWS, HIDDEN_TILE], dtype=tl.float32)
                    for c in tl.static_range(TOP_K):  # a fixed order: bit-identical runs
                        dest = tl.sum(tl.where(slots[None, :] == c, pair_rows, 0), axis=1).to(tl.int64)
                        weight = tl.sum(tl.where(slots[None, :] == c, pair_weights, 0.0), axis=1)
                        keep = mask & (dest >= 0)[:, None]
                        y = tl.load(grouped_ptr + dest[:, None] * hidden + cols, mask=keep, other=0.0)
                        acc += weight[:, None] * y.to(tl.float32)
                    tl.store(packed_ptr + packed_rows + cols, acc.to(packed_ptr.dtype.element_ty), mask=mask)
                else:
                    data = tl.load(packed_ptr + packed_rows + cols, mask=mask)
                    for c in tl.static_range(TOP_K):
                        dest = tl.sum(tl.where(slots[None, :] == c, pair_rows, 0), axis=1).to(tl.int64)
                        keep = mask & (dest >= 0)[:, None]
                        tl.store(grouped_ptr + dest[:, None] * hidden + cols, data, mask=keep)
            else:
                grouped_rows = grouped_row.to(tl.int64)[:, None] * hidden
                if TO_PACKED:
                    data = tl.load(grouped_ptr + grouped_rows + cols, mask=mask)
                    tl.store(packed_ptr + packed_rows + cols, data, mask=mask)
                else:
                    data = tl.load(packed_ptr + packed_rows + cols, mask=mask)
                    tl.store(grouped_ptr + grouped_rows + cols, data, mask=mask)


def _regroup(
    packed: torch.Tensor,
    grouped: torch.Tensor,
    counts: torch.Tensor,
    *,
    packed_rows: int,
    packed_slab: int = 0,
    grouped_slab: int = 0,
    align: int = 1,
    by_column: bool = False,
    to_packed: bool = False,
    tokens_per_expert: torch.Tensor | None = None,
    expert_offsets: torch.Tensor | None = None,
    meta: torch.Tensor | None = None,
) -> None:
    """One _regroup_kernel launch over ``packed_rows`` rows of packed's index space (known on the host: the
    rows received in exact mode, the slabs' rows in capacity mode). ``meta`` (dedup, by column): each packed
    row's pairs, int32 [packed_rows, 2 * top_k]; counts then has a last column, each a's packed rows."""
    dedup = meta is not None
    num_a, num_b = counts.shape[0], counts.shape[1] - dedup
    hidden = packed.shape[1]
    top_k = meta.shape[1] // 2 if dedup else 1
    _regroup_kernel[(max(1, triton.cdiv(packed_rows, _ROWS)),)](
        packed,
        grouped,
        counts,
        meta if dedup else counts,
        tokens_per_expert if by_column else counts,
        expert_offsets if by_column else counts,
        hidden,
        num_a,
        num_b,
        counts.stride(0),
        packed_slab,
        grouped_slab,
        align,
        A_PAD=triton.next_power_of_2(num_a),
        B_PAD=triton.next_power_of_2(num_b),
        BY_COLUMN=by_column,
        TO_PACKED=to_packed,
        DEDUP=dedup,
        TOP_K=top_k,
        K_PAD=triton.next_power_of_2(top_k),
        ROWS=_ROWS,
        # A dedup row's pairs each hold their own row addresses (and on the way back an fp32 sum): a
        # narrower tile keeps it all in registers.
        HIDDEN_TILE=min(256 if dedup else 1024, triton.next_power_of_2(hidden)),
        num_warps=4,
    )


@triton.jit
def _choices(ids_ptr, tokens, num_tokens, num_experts, local, TOP_K: tl.constexpr, K_PAD: tl.constexpr):
    """Each token's choices, [tokens, K_PAD]: the expert id, its owner rank (-1 for none: padding, or an id
    out of range, dropped as moe.dispatch drops it) and whether it is the token's first choice there."""
    slots = tl.arange(0, K_PAD)
    ids = tl.load(
        ids_ptr + tokens.to(tl.int64)[:, None] * TOP_K + slots[None, :],
        mask=(tokens < num_tokens)[:, None] & (slots < TOP_K)[None, :],
        other=-1,
    )
    valid = (ids >= 0) & (ids < num_experts)
    owner = tl.where(valid, ids // local, -1)
    earlier = (owner[:, :, None] == owner[:, None, :]) & (slots[None, None, :] < slots[None, :, None])
    first = valid & (tl.sum(earlier.to(tl.int32), axis=2) == 0)
    return ids, owner, first


@triton.jit
def _column(matrix, slots, c: tl.constexpr):
    """Column c of a [tokens, K_PAD] matrix."""
    return tl.sum(tl.where(slots[None, :] == c, matrix, 0), axis=1)


@triton.jit
def _dedup_pack_kernel(
    x_ptr,  # [num_tokens, hidden], row stride stride_x
    ids_ptr,  # [num_tokens, TOP_K] int32: global expert ids
    weights_ptr,  # [num_tokens, TOP_K] fp32
    send_ptr,  # [send_rows, hidden] out: a row per (token, rank); rank r's from r * slab (0: after r - 1's)
    meta_ptr,  # [send_rows, 2 * TOP_K] int32 out: per choice its place among the pairs sent to the row's
    # rank (-1: another rank's), then the choice's weight's bits
    send_counts_ptr,  # [world, local + 1] int32 out (program 0): pairs per (rank, expert), rows per rank
    token_rows_ptr,  # [num_tokens, world] int32 out: the row of (token, rank); -1 where no expert is there
    num_tokens,
    hidden,
    stride_x,
    num_experts,
    local,
    world,
    slab,  # rows per destination rank (capacity mode's slabs); 0: each rank's rows right after the last's
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,
    WORLD_PAD: tl.constexpr,
    CHUNK_TOKENS: tl.constexpr,
    SCAN_TOKENS: tl.constexpr,
    HIDDEN_TILE: tl.constexpr,
):
    """Writes each of CHUNK_TOKENS tokens' row once to each rank owning one of its experts, in token order
    per rank, with its meta row. A pair's place is where the exchange without dedup would send it: among
    its rank's pairs, by expert, then (token, choice). Every program scans all the ids for the counts before
    its tokens (as moe.dispatch's one-launch path does): no pass runs first and nothing reaches the host.
    That is T / CHUNK_TOKENS scans of T x k ids: nothing at decode sizes, 512 scans of 32K ids at 4,096
    tokens of top-8, where a count-and-scan pass first (moe.dispatch's, past 2,048 pairs) would save it."""
    first_token = tl.program_id(0) * CHUNK_TOKENS
    experts = tl.arange(0, EXPERTS_PAD)
    ranks = tl.arange(0, WORLD_PAD)
    slots = tl.arange(0, K_PAD)

    # Pairs per expert and rows per rank: of all tokens, and of the tokens before this program's.
    pairs_total = tl.zeros([EXPERTS_PAD], dtype=tl.int32)
    pairs_before = tl.zeros([EXPERTS_PAD], dtype=tl.int32)
    rows_total = tl.zeros([WORLD_PAD], dtype=tl.int32)
    rows_before = tl.zeros([WORLD_PAD], dtype=tl.int32)
    for start in range(0, num_tokens, SCAN_TOKENS):
        scanned = start + tl.arange(0, SCAN_TOKENS)
        ids, owner, first = _choices(ids_ptr, scanned, num_tokens, num_experts, local, TOP_K, K_PAD)
        valid = owner >= 0
        earlier = (scanned < first_token)[:, None]
        flat_ids = tl.reshape(tl.where(valid, ids, 0), [SCAN_TOKENS * K_PAD])
        flat_owners = tl.reshape(tl.where(first, owner, 0), [SCAN_TOKENS * K_PAD])
        pairs_total += tl.histogram(flat_ids, EXPERTS_PAD, mask=tl.reshape(valid, [SCAN_TOKENS * K_PAD]))
        pairs_before += tl.histogram(
            flat_ids, EXPERTS_PAD, mask=tl.reshape(valid & earlier, [SCAN_TOKENS * K_PAD])
        )
        rows_total += tl.histogram(flat_owners, WORLD_PAD, mask=tl.reshape(first, [SCAN_TOKENS * K_PAD]))
        rows_before += tl.histogram(
            flat_owners, WORLD_PAD, mask=tl.reshape(first & earlier, [SCAN_TOKENS * K_PAD])
        )
    if tl.program_id(0) == 0:
        owned = experts // local * (local + 1) + experts % local
        tl.store(send_counts_ptr + owned, pairs_total, mask=experts < num_experts)
        tl.store(send_counts_ptr + ranks * (local + 1) + local, rows_total, mask=ranks < world)

    # Where this program's first pair of each expert goes among its rank's pairs, and its first row to
    # each rank in the send buffer.
    pairs_start = tl.cumsum(pairs_total, axis=0) - pairs_total
    place_base = pairs_start - tl.gather(pairs_start, experts // local * local, axis=0) + pairs_before
    if slab > 0:
        row_base = ranks * slab + rows_before
    else:
        row_base = tl.cumsum(rows_total, axis=0) - rows_total + rows_before

    tokens = first_token + tl.arange(0, CHUNK_TOKENS)
    live = tokens < num_tokens
    ids, owner, first = _choices(ids_ptr, tokens, num_tokens, num_experts, local, TOP_K, K_PAD)
    # chosen[t, e]: how many of token t's choices are e; touched[t, r]: whether t sends rank r a row.
    chosen = tl.zeros([CHUNK_TOKENS, EXPERTS_PAD], dtype=tl.int32)
    touched = tl.zeros([CHUNK_TOKENS, WORLD_PAD], dtype=tl.int32)
    for c in tl.static_range(TOP_K):
        expert, rank = _column(ids, slots, c), _column(owner, slots, c)
        chosen += ((expert[:, None] == experts[None, :]) & (rank >= 0)[:, None]).to(tl.int32)
        is_first = _column(first.to(tl.int32), slots, c) > 0
        touched += ((rank[:, None] == ranks[None, :]) & is_first[:, None]).to(tl.int32)
    place_of = place_base[None, :] + tl.cumsum(chosen, axis=0) - chosen  # [CHUNK_TOKENS, EXPERTS_PAD]
    row_of = row_base[None, :] + tl.cumsum(touched, axis=0) - touched  # [CHUNK_TOKENS, WORLD_PAD]
    tl.store(
        token_rows_ptr + tokens.to(tl.int64)[:, None] * world + ranks[None, :],
        tl.where(touched > 0, row_of, -1),
        mask=live[:, None] & (ranks < world)[None, :],
    )

    # Each choice's place, and the row of each token's first choice on a rank (-1 for the others).
    places = tl.full([CHUNK_TOKENS, K_PAD], -1, dtype=tl.int32)
    rows = tl.full([CHUNK_TOKENS, K_PAD], -1, dtype=tl.int32)
    for c in tl.static_range(TOP_K):
        expert, rank = _column(ids, slots, c), _column(owner, slots, c)
        valid = rank >= 0
        place = tl.reshape(tl.gather(place_of, tl.where(valid, expert, 0)[:, None], axis=1), [CHUNK_TOKENS])
        # A token naming one expert twice (routers never do) gets one pair per choice, in order.
        place_of += ((expert[:, None] == experts[None, :]) & valid[:, None]).to(tl.int32)
        row = tl.reshape(tl.gather(row_of, tl.where(valid, rank, 0)[:, None], axis=1), [CHUNK_TOKENS])
        is_first = live & (_column(first.to(tl.int32), slots, c) > 0)
        places = tl.where(slots[None, :] == c, tl.where(valid, place, -1)[:, None], places)
        rows = tl.where(slots[None, :] == c, tl.where(is_first, row, -1)[:, None], rows)

    # Meta rows: the pairs of the row's rank, each in its choice's slot.
    in_k = (slots < TOP_K)[None, :]
    weights = tl.load(
        weights_ptr + tokens.to(tl.int64)[:, None] * TOP_K + slots[None, :],
        mask=live[:, None] & in_k,
        other=0.0,
    )
    weight_bits = weights.to(tl.int32, bitcast=True)
    for c in tl.static_range(TOP_K):
        row = _column(rows, slots, c)
        same_rank = (owner == _column(owner, slots, c)[:, None]) & in_k
        meta_row = meta_ptr + row.to(tl.int64)[:, None] * (2 * TOP_K) + slots[None, :]
        keep = (row >= 0)[:, None] & in_k
        tl.store(meta_row, tl.where(same_rank, places, -1), mask=keep)
        tl.store(meta_row + TOP_K, tl.where(same_rank, weight_bits, 0), mask=keep)

    # Copy: each token's row is read once and written to each of its ranks' rows.
    for start in range(0, hidden, HIDDEN_TILE):
        cols = start + tl.arange(0, HIDDEN_TILE)
        in_row = live[:, None] & (cols < hidden)[None, :]
        data = tl.load(x_ptr + tokens.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=in_row)
        for c in tl.static_range(TOP_K):
            dest = _column(rows, slots, c).to(tl.int64)
            tl.store(
                send_ptr + dest[:, None] * hidden + cols[None, :], data, mask=in_row & (dest >= 0)[:, None]
            )


@triton.jit
def _sum_partials_kernel(
    partials_ptr,  # [partial_rows, hidden]: the partial rows returned, one per (token, rank)
    token_rows_ptr,  # [num_tokens, world] int32: each token's partial from each rank; -1 where none
    out_ptr,  # [num_tokens, hidden] out
    num_tokens,
    hidden,
    world,
    TOKENS: tl.constexpr,
    HIDDEN_TILE: tl.constexpr,
):
    tokens, cols, live, mask = moe.combine_tile(num_tokens, hidden, TOKENS, HIDDEN_TILE)
    acc = tl.zeros([TOKENS, HIDDEN_TILE], dtype=tl.float32)
    for rank in range(world):  # rank order: bit-identical runs
        row = tl.load(token_rows_ptr + tokens * world + rank, mask=live, other=-1).to(tl.int64)
        keep = mask & (row >= 0)[:, None]
        acc += tl.load(partials_ptr + row[:, None] * hidden + cols[None, :], mask=keep, other=0.0).to(
            tl.float32
        )
    tl.store(out_ptr + tokens[:, None] * hidden + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _dedup_pack(x, ids, weights, num_experts: int, world: int, *, send, meta, send_counts, token_rows, slab):
    """One _dedup_pack_kernel launch: a row per (token, destination rank) into ``send``, its pairs into
    ``meta``, send_counts [W, L + 1] and token_rows [T, W] (``slab`` 0: rows packed, exact mode)."""
    num_tokens, top_k = ids.shape
    hidden = x.shape[1]
    _dedup_pack_kernel[(max(1, triton.cdiv(num_tokens, _PACK_TOKENS)),)](
        x,
        ids,
        weights,
        send,
        meta,
        send_counts,
        token_rows,
        num_tokens,
        hidden,
        x.stride(0),
        num_experts,
        num_experts // world,
        world,
        slab,
        TOP_K=top_k,
        K_PAD=triton.next_power_of_2(top_k),
        EXPERTS_PAD=triton.next_power_of_2(num_experts),
        WORLD_PAD=triton.next_power_of_2(world),
        CHUNK_TOKENS=_PACK_TOKENS,
        SCAN_TOKENS=_SCAN_TOKENS,
        HIDDEN_TILE=min(
            256, triton.next_power_of_2(hidden)
        ),  # as moe.dispatch's: its tokens' layout stays put
        num_warps=4,
    )


def _sum_partials(partials: torch.Tensor, token_rows: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """out [T, hidden] in partials' dtype: each token's partials summed in rank order in fp32."""
    num_tokens, world = token_rows.shape
    hidden = partials.shape[1]
    if out is None:
        out = torch.empty(num_tokens, hidden, dtype=partials.dtype, device=partials.device)
    if num_tokens:
        tile = min(256, triton.next_power_of_2(hidden))
        _sum_partials_kernel[(triton.cdiv(num_tokens, _SUM_TOKENS), triton.cdiv(hidden, tile))](
            partials,
            token_rows,
            out,
            num_tokens,
            hidden,
            world,
            TOKENS=_SUM_TOKENS,
            HIDDEN_TILE=tile,
            num_warps=4,
        )
    return out


# --- sizes --------------------------------------------------------------------------------------------------


def slab_rows(max_tokens_per_rank: int, top_k: int, dedup: bool = False) -> int:
    """Capacity mode's rows per (source, destination) slab: max_tokens_per_rank x top_k, every row a rank
    can send, so no slab can overflow whatever the ids. A token's top_k distinct experts would put at most
    min(top_k, local experts) rows on one rank, but ids may repeat within a token (moe.dispatch and exact
    mode take them: a row per choice), and telling the two apart would read the ids on the host. The bound
    costs padding only where local experts < top_k: none for DeepSeek-R1 (256 experts, top-8) up to EP32,
    nor for Qwen3-235B-A22B (128, top-8) up to EP16. With ``dedup`` a token sends a rank one row at most:
    max_tokens_per_rank."""
    return max_tokens_per_rank if dedup else max_tokens_per_rank * top_k


def recv_x_rows(received: int, local_experts: int, align: int) -> int:
    """recv_x's rows for ``received`` rows at most: each local expert's segment may add align - 1 rows."""
    return received + local_experts * (align - 1)


@dataclass(frozen=True, kw_only=True)
class EPSizes:
    """What capacity mode's buffers are sized by: calls of ``num_tokens`` tokens, ``top_k`` choices each, rows
    ``hidden`` wide in ``dtype``, over ``num_experts`` experts spread on ``world_size`` ranks, no rank sending
    more than ``max_tokens_per_rank`` tokens; each local expert's segment starts at a multiple of ``align``;
    ``dedup`` sends a token's row once per rank it reaches. ``check`` refuses (ValueError naming the field)
    sizes no call takes: experts that do not divide over the ranks, num_tokens > max_tokens_per_rank, and
    what moe.DispatchWorkspace.for_shape refuses; EPWorkspace.for_sizes checks the sizes it is given
    (ep_dispatch builds its call's from inputs it has checked already)."""

    num_tokens: int
    top_k: int
    num_experts: int
    hidden: int
    world_size: int
    max_tokens_per_rank: int
    align: int = 1
    dtype: torch.dtype = torch.bfloat16
    dedup: bool = False

    def check(self) -> None:
        moe.check_dispatch_sizes(
            self.num_tokens, self.top_k, self.num_experts, self.hidden, self.align, self.dtype
        )
        check_int("world_size", self.world_size, 1)
        if self.num_experts % self.world_size:
            raise ValueError(
                f"num_experts: expected a multiple of world_size {self.world_size} (each rank owns as many "
                f"experts), got {self.num_experts}"
            )
        check_int("max_tokens_per_rank", self.max_tokens_per_rank, 1)
        if self.num_tokens > self.max_tokens_per_rank:
            raise ValueError(
                f"max_tokens_per_rank: expected at least num_tokens ({self.num_tokens}; a call's tokens must "
                f"fit the slabs), got {self.max_tokens_per_rank}"
            )
        _check_dedup(self.dedup)

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def slab_rows(self) -> int:
        """C, the rows of each (source, destination) slab (slab_rows)."""
        return slab_rows(self.max_tokens_per_rank, self.top_k, self.dedup)

    def buffers(self) -> dict:
        """{field: (shape, dtype)} of every EPWorkspace buffer but dispatch's: what for_sizes allocates, and
        what a given workspace is checked against without allocating."""
        world, local, hidden, dtype = self.world_size, self.local_experts, self.hidden, self.dtype
        slabs = world * self.slab_rows
        pairs = world * slab_rows(self.max_tokens_per_rank, self.top_k)
        buffers = {
            "send": ((slabs, hidden), dtype),
            "recv": ((slabs, hidden), dtype),
            "recv_x": ((recv_x_rows(pairs, local, self.align), hidden), dtype),
            "recv_counts": ((world, local + self.dedup), torch.int32),
            "tokens_per_expert": ((local,), torch.int32),
            "expert_offsets": ((local + 1,), torch.int32),
            "out": ((self.num_tokens, hidden), dtype),
        }
        if self.dedup:
            buffers |= {
                "send_meta": ((slabs, 2 * self.top_k), torch.int32),
                "recv_meta": ((slabs, 2 * self.top_k), torch.int32),
                "send_counts": ((world, local + 1), torch.int32),
                "token_rows": ((self.num_tokens, world), torch.int32),
            }
        return buffers


@dataclass(frozen=True, kw_only=True)
class EPWorkspace:
    """Capacity mode's buffers, owned by the caller (one per captured batch size, as for moe.dispatch): with
    it, ep_dispatch and ep_combine allocate nothing, so the pair can sit in a CUDA graph.

    Invariants (for num_tokens, top_k, num_experts, hidden, world_size W, max_tokens_per_rank M, align, dedup
    and x's dtype; L = num_experts / W, C = slab_rows(M, top_k, dedup); all contiguous, on x's device):
    dispatch is moe.DispatchWorkspace.for_shape(num_tokens, top_k, num_experts, hidden, align=1) (None with
    dedup); send and recv [W * C, hidden]; recv_x [recv_x_rows(W * M * top_k, L, align), hidden];
    recv_counts int32 [W, L] ([W, L + 1] with dedup); tokens_per_expert int32 [L]; expert_offsets int32
    [L + 1]; out [num_tokens, hidden]; with dedup only (else None): send_meta and recv_meta int32
    [W * C, 2 * top_k], send_counts int32 [W, L + 1], token_rows int32 [num_tokens, W]; no two buffers
    (dispatch's included) share memory. Each call overwrites the last one's contents. for_sizes allocates
    them for an EPSizes (for_shape for its fields), which refuses sizes no call takes.
    """

    dispatch: moe.DispatchWorkspace | None  # pack's rows; unpack writes the returned outputs back over them
    send: torch.Tensor  # [W * C, hidden]: pack's slabs; the return exchange lands here
    recv: torch.Tensor  # [W * C, hidden]: the received slabs; unlayout writes the outputs back here
    recv_x: torch.Tensor  # [W * M * top_k + L * (align - 1), hidden]
    recv_counts: torch.Tensor  # int32 [W, L] (dedup: [W, L + 1], each source's rows last)
    tokens_per_expert: torch.Tensor  # int32 [L]
    expert_offsets: torch.Tensor  # int32 [L + 1]
    out: torch.Tensor  # [num_tokens, hidden]
    send_meta: torch.Tensor | None = None  # dedup: int32 [W * C, 2 * top_k], each sent row's pairs
    recv_meta: torch.Tensor | None = None  # dedup: int32 [W * C, 2 * top_k], each received row's pairs
    send_counts: torch.Tensor | None = (
        None  # dedup: int32 [W, L + 1], pairs per (rank, expert), rows per rank
    )
    token_rows: torch.Tensor | None = None  # dedup: int32 [num_tokens, W], each (token, rank)'s slab row

    @classmethod
    def for_shape(
        cls,
        num_tokens: int,
        top_k: int,
        num_experts: int,
        hidden: int,
        *,
        world_size: int,
        max_tokens_per_rank: int,
        align: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
        dedup: bool = False,
    ) -> "EPWorkspace":
        """for_sizes of these sizes (EPSizes, which checks them)."""
        sizes = EPSizes(
            num_tokens=num_tokens,
            top_k=top_k,
            num_experts=num_experts,
            hidden=hidden,
            world_size=world_size,
            max_tokens_per_rank=max_tokens_per_rank,
            align=align,
            dtype=dtype,
            dedup=dedup,
        )
        return cls.for_sizes(sizes, device)

    @classmethod
    def for_sizes(cls, sizes: EPSizes, device=None) -> "EPWorkspace":
        """Every buffer calls of ``sizes`` need, on ``device`` (the current CUDA device, else the CPU)."""
        sizes.check()
        device = check_device("device", device)
        buffers = {
            name: torch.empty(shape, dtype=kind, device=device)
            for name, (shape, kind) in sizes.buffers().items()
        }
        dispatch = None
        if not sizes.dedup:
            dispatch = moe.DispatchWorkspace.for_shape(
                sizes.num_tokens,
                sizes.top_k,
                sizes.num_experts,
                sizes.hidden,
                dtype=sizes.dtype,
                device=device,
            )
        return cls(dispatch=dispatch, **buffers)


@dataclass(frozen=True, kw_only=True)
class EPHandle:
    """What ep_combine needs to bring the experts' outputs home. Invariants: tokens_per_expert int32 [L]
    and expert_offsets int32 [L + 1] describe recv_x (the module docstring), on x's device;
    recv_counts[s, e] is how many rows source rank s sent for local expert e (with dedup: pairs, each a
    row of recv_x); send_counts [W, L] the same for what this rank sent to each rank (with dedup [W, L + 1],
    the rows per rank last); recv_rows is recv_x's row count. Exact mode: send_splits[r] / recv_splits[s]
    are the rows sent to rank r / received from rank s (host ints) and capacity is None; capacity mode:
    capacity is C, each slab's rows, and both splits are None. Without dedup, plan is this rank's pack
    (moe.DispatchPlan over the global experts, align 1); with dedup it is None and dedup_counts (the counts
    stage's output: recv_counts, then each source's rows), recv_meta (each received row's pairs) and
    token_rows (int32 [T, W]: the row each (token, rank) went to, -1 where none) take its place."""

    tokens_per_expert: torch.Tensor  # int32 [L]
    expert_offsets: torch.Tensor  # int32 [L + 1]
    recv_counts: torch.Tensor  # int32 [W, L]
    send_counts: torch.Tensor  # int32 [W, L] (dedup: [W, L + 1])
    plan: moe.DispatchPlan | None
    weights: torch.Tensor  # fp32 [T, k]
    mode: str
    group: object
    world_size: int
    align: int
    recv_rows: int
    hidden: int
    dtype: torch.dtype
    capacity: int | None = None
    send_splits: tuple[int, ...] | None = None
    recv_splits: tuple[int, ...] | None = None
    workspace: EPWorkspace | None = None
    stage_hook: StageHook | None = None
    dedup: bool = False
    dedup_counts: torch.Tensor | None = None  # int32 [W, L + 1]
    recv_meta: torch.Tensor | None = None  # int32 [received rows, 2k]
    token_rows: torch.Tensor | None = None  # int32 [T, W]

    @property
    def send_rows(self) -> torch.Tensor:
        """int32 [W] on x's device: the rows this rank sent to each rank (itself included), padding not
        counted: one per (token, choice) pair, or with dedup one per (token, rank) pair."""
        if self.dedup:
            return self.send_counts[:, -1]
        return self.send_counts.sum(1, dtype=torch.int32)


@contextmanager
def _stage(name: str, hook: StageHook | None, device: torch.device):
    """An NVTX range (on CUDA) and the caller's hook around one stage."""
    ranged = device.type == "cuda"
    if ranged:
        torch.cuda.nvtx.range_push(f"ep.{name}")
    try:
        with hook(name) if hook is not None else nullcontext():
            yield
    finally:
        if ranged:
            torch.cuda.nvtx.range_pop()


# --- checks -------------------------------------------------------------------------------------------------


def _world_size(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: expected an initialized torch.distributed process group, got none")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ValueError(
            "group: expected None (the default group) or a torch.distributed.ProcessGroup, got "
            f"{type(group).__name__}"
        )
    return dist.get_world_size(group)


def _check_dedup(dedup) -> None:
    if not isinstance(dedup, bool):
        raise ValueError(f"dedup: expected a bool, got {dedup!r}")


def _check_workspace(workspace, buffers: dict, device, inputs: dict, dedup: bool) -> None:
    """Every buffer of the caller's workspace has the shape, dtype and device this call needs, and shares no
    memory with another (its dispatch part's included) or with the ``inputs`` (metadata only); moe.dispatch
    checks the dispatch part's shapes itself (a dedup call has no dispatch part)."""
    if not isinstance(workspace, EPWorkspace):
        raise ValueError(
            "workspace: expected an EPWorkspace (EPWorkspace.for_shape sizes it), got "
            f"{type(workspace).__name__}"
        )
    if not dedup and not isinstance(workspace.dispatch, moe.DispatchWorkspace):
        raise ValueError(
            "workspace.dispatch: expected a moe.DispatchWorkspace (EPWorkspace.for_shape sizes it), got "
            f"{type(workspace.dispatch).__name__}"
        )
    for field, (shape, dtype) in buffers.items():
        check_buffer(f"workspace.{field}", getattr(workspace, field), shape, dtype, device)
    check_disjoint(_workspace_buffers(workspace, dedup), inputs)


def _workspace_buffers(workspace: EPWorkspace, dedup: bool) -> dict:
    """Every buffer of an EPWorkspace a call of this kind uses, by its name, the dispatch part's (without
    dedup) as workspace.dispatch.<field>."""
    buffers = {
        f"workspace.{field.name}": getattr(workspace, field.name)
        for field in fields(workspace)
        if field.name != "dispatch" and getattr(workspace, field.name) is not None
    }
    if not dedup:
        for field in fields(workspace.dispatch):
            buffers[f"workspace.dispatch.{field.name}"] = getattr(workspace.dispatch, field.name)
    return buffers


def _check_inputs(x, weights, ids, num_experts, world: int, align, mode, group) -> None:
    """ep_dispatch's rows, routing and shared settings (metadata only)."""
    check_tensor("x", x, ndim=2, dtypes=moe.ROW_DTYPES)
    device = x.device
    check_tensor("ids", ids, ndim=2, dtypes=(torch.int32,), device=device)
    check_contiguous("ids", ids)
    check_tensor("weights", weights, ndim=2, dtypes=(torch.float32,), device=device)
    check_contiguous("weights", weights)
    if ids.shape[0] != x.shape[0] or ids.shape[1] == 0:
        raise ValueError(
            f"ids: expected [{x.shape[0]}, top_k >= 1] (a row per token of x), got {tuple(ids.shape)}"
        )
    if weights.shape != ids.shape:
        raise ValueError(f"weights: expected {tuple(ids.shape)} like ids, got {tuple(weights.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"x: expected [tokens, hidden] with hidden >= 1, got {tuple(x.shape)}")
    if x.stride(1) != 1 and x.shape[1] > 1:  # as moe.dispatch requires
        raise ValueError(f"x: expected rows contiguous (stride 1), got strides {x.stride()}")
    check_int("num_experts", num_experts, 1, moe.MAX_EXPERTS)
    if num_experts % world:
        raise ValueError(
            f"num_experts: expected a multiple of the world size {world} (each rank owns as many experts), "
            f"got {num_experts}"
        )
    check_int("align", align, 1, 1024)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        raise ValueError(f"x: the group's backend is NCCL, which moves CUDA tensors; got one on {device}")


def _check_mode(
    x, weights, ids, *, num_experts, world, align, mode, dedup, max_tokens_per_rank, workspace
) -> int | None:
    """Capacity mode's slab rows C (None in exact mode), its bound and workspace checked (metadata only)."""
    if mode == "exact":
        if max_tokens_per_rank is not None:
            raise ValueError("max_tokens_per_rank: sizes capacity mode's slabs; exact mode takes none")
        if workspace is not None:
            raise ValueError(
                "workspace: capacity mode's; exact mode sizes its buffers from the exchanged counts"
            )
        return None
    num_tokens, top_k = ids.shape
    check_int("max_tokens_per_rank", max_tokens_per_rank, 1)
    if num_tokens > max_tokens_per_rank:
        raise ValueError(
            f"x: {num_tokens} tokens on this rank, more than max_tokens_per_rank={max_tokens_per_rank} "
            "(the bound every rank sizes its slabs with)"
        )
    if workspace is not None:
        sizes = EPSizes(
            num_tokens=num_tokens,
            top_k=top_k,
            num_experts=num_experts,
            hidden=x.shape[1],
            world_size=world,
            max_tokens_per_rank=max_tokens_per_rank,
            align=align,
            dtype=x.dtype,
            dedup=dedup,
        )
        inputs = {"x": x, "weights": weights, "ids": ids}
        _check_workspace(workspace, sizes.buffers(), x.device, inputs, dedup)
    return slab_rows(max_tokens_per_rank, top_k, dedup)


# --- dispatch: the stages both modes share ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Call:
    """One ep_dispatch call, checked: its inputs and settings, as every stage sees them."""

    x: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor
    num_experts: int
    group: object
    world: int
    align: int
    mode: str
    dedup: bool
    capacity: int | None  # C, capacity mode's slab rows; None in exact mode
    workspace: EPWorkspace | None
    stage_hook: StageHook | None

    @property
    def local(self) -> int:
        return self.num_experts // self.world

    @property
    def hidden(self) -> int:
        return self.x.shape[1]

    def stage(self, name: str):
        return _stage(name, self.stage_hook, self.x.device)

    def rows(self, n: int) -> torch.Tensor:
        return torch.empty(n, self.hidden, dtype=self.x.dtype, device=self.x.device)

    def ints(self, *shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.int32, device=self.x.device)


def _checked_call(
    x, weights, ids, num_experts, *, group, align, mode, dedup, max_tokens_per_rank, workspace, stage_hook
):
    """Every check ep_dispatch makes, metadata only, before any collective: the call, or ValueError."""
    world = _world_size(group)
    if stage_hook is not None and not callable(stage_hook):
        raise ValueError(
            f"stage_hook: expected None or a callable taking a stage name and returning a context manager, "
            f"got {type(stage_hook).__name__}"
        )
    _check_inputs(x, weights, ids, num_experts, world, align, mode, group)
    _check_dedup(dedup)
    capacity = _check_mode(
        x,
        weights,
        ids,
        num_experts=num_experts,
        world=world,
        align=align,
        mode=mode,
        dedup=dedup,
        max_tokens_per_rank=max_tokens_per_rank,
        workspace=workspace,
    )
    return _Call(
        x=x,
        weights=weights,
        ids=ids,
        num_experts=num_experts,
        group=group,
        world=world,
        align=align,
        mode=mode,
        dedup=dedup,
        capacity=capacity,
        workspace=workspace,
        stage_hook=stage_hook,
    )


@dataclass(frozen=True, kw_only=True)
class _Packed:
    """What the pack stage leaves for the exchanges."""

    rows: torch.Tensor  # the rows to send: grouped by destination (exact), or in its slab (capacity)
    counts: torch.Tensor  # int32 [W, L]: rows per (destination, local expert); dedup [W, L + 1], rows last
    plan: moe.DispatchPlan | None = None  # without dedup: moe.dispatch's
    meta: torch.Tensor | None = None  # dedup: int32 [rows, 2k], each row's pairs
    token_rows: torch.Tensor | None = None  # dedup: int32 [T, W]


def _pack(call: _Call) -> _Packed:
    """The pack stage. Without dedup: moe.dispatch over the global experts, rows grouped by expert and so
    by owner rank (capacity mode: then into their slabs). With dedup: _dedup_pack_kernel."""
    workspace, world = call.workspace, call.world
    with call.stage("pack"):
        if call.dedup:
            return _pack_dedup(call)
        rows, plan = moe.dispatch(
            call.x, call.ids, call.num_experts, workspace=workspace.dispatch if workspace else None
        )
        counts = plan.tokens_per_expert.view(world, call.local)
        if call.mode == "capacity":
            slabs = workspace.send if workspace else call.rows(world * call.capacity)
            _regroup(rows, slabs, counts, packed_rows=call.ids.numel(), grouped_slab=call.capacity)
            rows = slabs
        return _Packed(rows=rows, counts=counts, plan=plan)


def _pack_dedup(call: _Call) -> _Packed:
    """A row per (token, destination rank), its pairs beside it: exact mode packs them (T x min(k, W) rows
    at most), capacity mode puts them in slabs of C rows."""
    workspace, world, (num_tokens, top_k) = call.workspace, call.world, call.ids.shape
    if workspace is not None:
        rows, meta = workspace.send, workspace.send_meta
        counts, token_rows = workspace.send_counts, workspace.token_rows
    else:
        slots = world * call.capacity if call.mode == "capacity" else num_tokens * min(top_k, world)
        rows, meta = call.rows(slots), call.ints(slots, 2 * top_k)
        counts, token_rows = call.ints(world, call.local + 1), call.ints(num_tokens, world)
    _dedup_pack(
        call.x,
        call.ids,
        call.weights,
        call.num_experts,
        world,
        send=rows,
        meta=meta,
        send_counts=counts,
        token_rows=token_rows,
        slab=call.capacity or 0,
    )
    return _Packed(rows=rows, counts=counts, meta=meta, token_rows=token_rows)


def _exchange_counts(call: _Call, send_counts: torch.Tensor) -> torch.Tensor:
    """The counts stage: each rank's counts matrix row r to rank r; returns what each source sent this rank
    (recv_counts [W, L], or with dedup [W, L + 1], each source's rows last)."""
    with call.stage("counts"):
        if call.workspace is not None:
            recv_counts = call.workspace.recv_counts
        else:
            recv_counts = call.ints(*send_counts.shape)
        dist.all_to_all_single(recv_counts.view(-1), send_counts.view(-1), group=call.group)
    return recv_counts


def _exchange_rows(call: _Call, packed: _Packed, splits=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows stage: (recv, recv_meta), the rows (and with dedup their meta rows) each source sent this
    rank; ``splits``: exact mode's (send_splits, recv_splits), None for capacity mode's equal slabs."""
    workspace = call.workspace
    with call.stage("rows"):
        recv = _all_to_all(call, packed.rows, workspace.recv if workspace else None, splits, call.rows)
        recv_meta = None
        if call.dedup:
            width = packed.meta.shape[1]
            into = workspace.recv_meta if workspace else None
            recv_meta = _all_to_all(call, packed.meta, into, splits, lambda n: call.ints(n, width))
    return recv, recv_meta


def _all_to_all(call: _Call, sent, into, splits, allocate) -> torch.Tensor:
    """One all_to_all_single of rows: equal slabs into ``into`` (None: allocate(rows)), or with exact mode's
    ``splits`` into a buffer of the rows received."""
    if splits is None:
        recv = into if into is not None else allocate(sent.shape[0])
        dist.all_to_all_single(recv, sent, group=call.group)
        return recv
    send_splits, recv_splits = splits
    recv = allocate(sum(recv_splits))
    sent = sent[: sum(send_splits)]
    dist.all_to_all_single(recv, sent, list(recv_splits), list(send_splits), group=call.group)
    return recv


def _layout(
    call: _Call, recv, recv_counts, recv_meta, *, packed_slab: int, recv_rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layout stage: the received rows regrouped per local expert (with dedup, each copied to each of
    its pairs' places); returns (recv_x, tokens_per_expert, expert_offsets)."""
    workspace = call.workspace
    if workspace is not None:
        tokens_per_expert, expert_offsets = workspace.tokens_per_expert, workspace.expert_offsets
    else:
        tokens_per_expert, expert_offsets = call.ints(call.local), call.ints(call.local + 1)
    with call.stage("layout"):
        recv_x = workspace.recv_x if workspace else call.rows(recv_rows)
        _regroup(
            recv,
            recv_x,
            recv_counts,
            packed_slab=packed_slab,
            align=call.align,
            by_column=True,
            packed_rows=recv.shape[0],
            tokens_per_expert=tokens_per_expert,
            expert_offsets=expert_offsets,
            meta=recv_meta,
        )
    return recv_x, tokens_per_expert, expert_offsets


def _handle(call: _Call, packed: _Packed, recv_x, recv_counts, recv_meta, laid_out, **by_mode) -> "EPHandle":
    """The handle both modes return; ``laid_out``: _layout's tokens_per_expert and expert_offsets;
    ``by_mode``: the mode's own fields (capacity, or the splits)."""
    tokens_per_expert, expert_offsets = laid_out
    return EPHandle(
        tokens_per_expert=tokens_per_expert,
        expert_offsets=expert_offsets,
        recv_counts=recv_counts[:, : call.local] if call.dedup else recv_counts,
        send_counts=packed.counts,
        plan=packed.plan,
        weights=call.weights,
        mode=call.mode,
        group=call.group,
        world_size=call.world,
        align=call.align,
        recv_rows=recv_x.shape[0],
        hidden=call.hidden,
        dtype=call.x.dtype,
        workspace=call.workspace,
        stage_hook=call.stage_hook,
        dedup=call.dedup,
        dedup_counts=recv_counts if call.dedup else None,
        recv_meta=recv_meta,
        token_rows=packed.token_rows,
        **by_mode,
    )


# --- dispatch: the two modes --------------------------------------------------------------------------------


def _dispatch_exact(call: _Call) -> tuple[torch.Tensor, "EPHandle"]:
    """Exact mode: the rows routed and no more, sized by one host read of the exchanged counts."""
    world, local, align = call.world, call.local, call.align
    packed = _pack(call)
    recv_counts = _exchange_counts(call, packed.counts)
    with call.stage("sync"):
        sent = packed.counts[:, local] if call.dedup else packed.counts.sum(1, dtype=torch.int32)
        host = torch.cat([sent, recv_counts.view(-1)]).tolist()
    width = recv_counts.shape[1]
    received = [host[world + s * width : world + (s + 1) * width] for s in range(world)]
    send_splits = tuple(host[:world])
    recv_splits = tuple(counts[local] if call.dedup else sum(counts) for counts in received)
    columns = [sum(counts[e] for counts in received) for e in range(local)]
    recv, recv_meta = _exchange_rows(call, packed, (send_splits, recv_splits))
    recv_rows = sum(-(-c // align) * align for c in columns)
    recv_x, *laid_out = _layout(call, recv, recv_counts, recv_meta, packed_slab=0, recv_rows=recv_rows)
    return recv_x, _handle(
        call,
        packed,
        recv_x,
        recv_counts,
        recv_meta,
        laid_out,
        send_splits=send_splits,
        recv_splits=recv_splits,
    )


def _dispatch_capacity(call: _Call) -> tuple[torch.Tensor, "EPHandle"]:
    """Capacity mode: fixed slabs of C rows per (source, destination), so no count reaches the host."""
    packed = _pack(call)
    recv_counts = _exchange_counts(call, packed.counts)
    recv, recv_meta = _exchange_rows(call, packed)
    pairs = call.world * slab_rows(call.capacity, call.ids.shape[1]) if call.dedup else recv.shape[0]
    recv_x, *laid_out = _layout(
        call,
        recv,
        recv_counts,
        recv_meta,
        packed_slab=call.capacity,
        recv_rows=recv_x_rows(pairs, call.local, call.align),
    )
    return recv_x, _handle(call, packed, recv_x, recv_counts, recv_meta, laid_out, capacity=call.capacity)


def ep_dispatch(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    num_experts: int,
    *,
    group=None,
    align: int = 1,
    mode: str = "exact",
    max_tokens_per_rank: int | None = None,
    workspace: EPWorkspace | None = None,
    stage_hook: StageHook | None = None,
    dedup: bool = False,
) -> tuple[torch.Tensor, EPHandle]:
    """Sends each of this rank's rows to the ranks owning its chosen experts; returns (recv_x, handle) with
    recv_x laid out per local expert (the module docstring). Every rank of ``group`` must call it, with the
    same num_experts, top_k, hidden, x's dtype, mode, max_tokens_per_rank and dedup (they size what crosses
    the wire); ``align`` shapes only the receiver's own layout and may differ. In capacity mode a rank
    with more than max_tokens_per_rank tokens raises ValueError on that rank alone (token counts differ
    by design): its peers wait in the first collective until the process group's timeout. ``dedup``: one
    row per (token, destination rank) on the wire, expanded there (the module docstring).
    ``stage_hook(name)``, if given, returns a context manager entered around each stage (the benchmarks
    time them with it)."""
    call = _checked_call(
        x,
        weights,
        ids,
        num_experts,
        group=group,
        align=align,
        mode=mode,
        dedup=dedup,
        max_tokens_per_rank=max_tokens_per_rank,
        workspace=workspace,
        stage_hook=stage_hook,
    )
    return _dispatch_exact(call) if mode == "exact" else _dispatch_capacity(call)


# --- combine ------------------------------------------------------------------------------------------------


def _check_combine(y, handle) -> None:
    """ep_combine's checks (metadata only), before any collective."""
    if not isinstance(handle, EPHandle):
        raise ValueError(f"handle: expected the EPHandle ep_dispatch returned, got {type(handle).__name__}")
    check_tensor("y", y, ndim=2, dtypes=(handle.dtype,), device=handle.tokens_per_expert.device)
    check_contiguous("y", y)
    if tuple(y.shape) != (handle.recv_rows, handle.hidden):
        raise ValueError(
            f"y: expected {(handle.recv_rows, handle.hidden)} (recv_x's shape), got {tuple(y.shape)}"
        )
    _world_size(handle.group)
    if handle.workspace is not None:  # y is read while these are written (recv_x, not among them, may be y)
        written = ("recv", "send", "out") + (() if handle.dedup else ("dispatch.x_sorted",))
        buffers = _workspace_buffers(handle.workspace, handle.dedup)
        check_disjoint({"y": y}, {f"workspace.{name}": buffers[f"workspace.{name}"] for name in written})


def ep_combine(y: torch.Tensor, handle: EPHandle) -> torch.Tensor:
    """Brings the experts' outputs (``y``, in recv_x's rows) back to the ranks that sent the rows, and
    returns out [T, hidden] in x's dtype: each token's choices weighed and summed in fp32 in choice order
    (with dedup: per destination rank there, then the ranks' partials in rank order here). Every rank of
    the group must call it with the handle its ep_dispatch returned."""
    _check_combine(y, handle)
    world, workspace, exact = handle.world_size, handle.workspace, handle.mode == "exact"

    def stage(name):
        return _stage(name, handle.stage_hook, y.device)

    def rows(n):
        return torch.empty(n, handle.hidden, dtype=y.dtype, device=y.device)

    received = sum(handle.recv_splits) if exact else world * handle.capacity
    with stage("unlayout"):
        back = workspace.recv if workspace else rows(received)
        _regroup(
            back,
            y,
            handle.dedup_counts if handle.dedup else handle.recv_counts,
            packed_slab=0 if exact else handle.capacity,
            align=handle.align,
            by_column=True,
            to_packed=True,
            packed_rows=received,
            tokens_per_expert=handle.tokens_per_expert,
            expert_offsets=handle.expert_offsets,
            meta=handle.recv_meta,
        )
    with stage("return"):
        if exact:
            sent = sum(handle.send_splits)
            returned = rows(sent if handle.dedup else handle.plan.slot_row.numel())
            splits = list(handle.send_splits), list(handle.recv_splits)
            dist.all_to_all_single(returned[:sent], back, *splits, group=handle.group)
        else:
            returned = workspace.send if workspace else rows(world * handle.capacity)
            dist.all_to_all_single(returned, back, group=handle.group)
    out = workspace.out if workspace else None
    if handle.dedup:
        with stage("combine"):
            return _sum_partials(returned, handle.token_rows, out)
    if not exact:
        with stage("unpack"):
            slabs, pairs = returned, handle.plan.slot_row.numel()
            returned = workspace.dispatch.x_sorted if workspace else rows(pairs)
            _regroup(
                returned,
                slabs,
                handle.send_counts,
                grouped_slab=handle.capacity,
                to_packed=True,
                packed_rows=pairs,
            )
    with stage("combine"):
        return moe.combine(returned, handle.weights, handle.plan, out=out)
