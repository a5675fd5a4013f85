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

Byte story: pack reads each row once and writes it k times; the wire carries k rows per token each way
(exact) or W x C rows per rank (capacity); layout and unlayout read and write each received row once;
combine reads k rows per token and writes one. A deduplicating dispatch (one row per token and destination
rank, expanded there) would put fewer bytes on the wire when a token's experts share a rank; the benchmark
reports what it would save (bench/operators/ep.py).

Accumulation: combine sums each token's choices in fp32 in choice order, as moe.combine does: reruns are
bit-identical and the result does not depend on the world size.

Checks are metadata only and run on every rank before the first collective: bad input of the same shape on
every rank raises ValueError everywhere and leaves no rank waiting. Buffers sharing memory (a workspace's
with each other or with x, weights and ids; y with a buffer ep_combine writes) are bad input too. A rank
whose input differs from its peers' (or that dies) leaves them in a collective until the process group's
timeout ends it.
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

StageHook = Callable[[str], AbstractContextManager]


@triton.jit
def _regroup_kernel(
    packed_ptr,  # [packed_rows, hidden]: segment (a, b) after a's start and a's earlier segments
    grouped_ptr,  # [grouped_rows, hidden]: segment (a, b) where BY_COLUMN or grouped_slab says
    counts_ptr,  # [num_a, num_b] int32: rows of segment (a, b)
    tokens_per_expert_ptr,  # [num_b] int32 out (BY_COLUMN, program 0): rows of column b
    expert_offsets_ptr,  # [num_b + 1] int32 out (BY_COLUMN, program 0): where column b's rows begin
    hidden,
    num_a,
    num_b,
    packed_slab,  # rows per a in packed; 0: a's segments follow the previous a's directly
    grouped_slab,  # rows per a in grouped (not BY_COLUMN)
    align,
    A_PAD: tl.constexpr,
    B_PAD: tl.constexpr,
    BY_COLUMN: tl.constexpr,  # grouped by b (b's segments in order of a, each b aligned), not by a
    TO_PACKED: tl.constexpr,  # move grouped -> packed (the way back) instead of packed -> grouped
    ROWS: tl.constexpr,
    HIDDEN_TILE: tl.constexpr,
):
    """Moves ROWS rows of the packed buffer's index space to (or from) their grouped place. Each program
    finds its rows' segments and destinations from the whole counts matrix, so nothing scans the counts
    first and no count reaches the host; rows are spread evenly, however skewed the segments are."""
    aa = tl.arange(0, A_PAD)
    bb = tl.arange(0, B_PAD)
    in_matrix = (aa < num_a)[:, None] & (bb < num_b)[None, :]
    counts = tl.load(counts_ptr + aa[:, None] * num_b + bb[None, :], mask=in_matrix, other=0)
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

    # Its segment b within a, and its place within the segment.
    a_counts = tl.load(
        counts_ptr + a.to(tl.int64)[:, None] * num_b + bb[None, :],
        mask=live[:, None] & (bb < num_b)[None, :],
        other=0,
    )  # [ROWS, B_PAD]: row a of the matrix, per row
    b_ends = tl.cumsum(a_counts, axis=1)
    b = tl.sum((b_ends <= within_a[:, None]).to(tl.int32), axis=1)
    b_start = tl.sum(tl.where(bb[None, :] == b[:, None], b_ends - a_counts, 0), axis=1)
    within_b = within_a - b_start

    if BY_COLUMN:
        columns = tl.sum(counts, axis=0)  # [B_PAD]
        padded = tl.where(bb < num_b, tl.cdiv(columns, align) * align, 0)
        column_ends = tl.cumsum(padded, axis=0)
        column_start = tl.sum(tl.where(bb[None, :] == b[:, None], column_ends - padded, 0), axis=1)
        # Rows of column b from earlier a: the column's exclusive prefix down the matrix, at (a, b).
        above = tl.reshape(tl.cumsum(counts, axis=0) - counts, [A_PAD * B_PAD])
        flat = tl.where(live, a * B_PAD + b, 0)
        earlier_in_b = tl.gather(above, flat, axis=0)
        grouped_row = column_start + earlier_in_b + within_b
        if not TO_PACKED and tl.program_id(0) == 0:
            tl.store(tokens_per_expert_ptr + bb, columns, mask=bb < num_b)
            tl.store(expert_offsets_ptr + 1 + bb, column_ends, mask=bb < num_b)
            tl.store(expert_offsets_ptr, 0)
    else:
        grouped_row = a * grouped_slab + within_a
        live = live & (within_a < grouped_slab)  # never false (slab_rows bounds every a's rows): no OOB
    if packed_slab > 0:
        live = live & (within_a < packed_slab)

    if tl.sum(live.to(tl.int32), axis=0) > 0:
        packed_rows = j.to(tl.int64)[:, None] * hidden
        grouped_rows = grouped_row.to(tl.int64)[:, None] * hidden
        for start in range(0, hidden, HIDDEN_TILE):
            cols = start + tl.arange(0, HIDDEN_TILE)[None, :]
            mask = live[:, None] & (cols < hidden)
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
) -> None:
    """One _regroup_kernel launch over ``packed_rows`` rows of packed's index space (known on the host: the
    rows received in exact mode, the slabs' rows in capacity mode)."""
    num_a, num_b = counts.shape
    hidden = packed.shape[1]
    _regroup_kernel[(max(1, triton.cdiv(packed_rows, _ROWS)),)](
        packed,
        grouped,
        counts,
        tokens_per_expert if by_column else counts,
        expert_offsets if by_column else counts,
        hidden,
        num_a,
        num_b,
        packed_slab,
        grouped_slab,
        align,
        A_PAD=triton.next_power_of_2(num_a),
        B_PAD=triton.next_power_of_2(num_b),
        BY_COLUMN=by_column,
        TO_PACKED=to_packed,
        ROWS=_ROWS,
        HIDDEN_TILE=min(1024, triton.next_power_of_2(hidden)),
        num_warps=4,
    )


# --- sizes --------------------------------------------------------------------------------------------------


def slab_rows(max_tokens_per_rank: int, top_k: int) -> int:
    """Capacity mode's rows per (source, destination) slab: max_tokens_per_rank x top_k, every row a rank
    can send, so no slab can overflow whatever the ids. A token's top_k distinct experts would put at most
    min(top_k, local experts) rows on one rank, but ids may repeat within a token (moe.dispatch and exact
    mode take them: a row per choice), and telling the two apart would read the ids on the host. The bound
    costs padding only where local experts < top_k: none for DeepSeek-R1 (256 experts, top-8) up to EP32,
    nor for Qwen3-235B-A22B (128, top-8) up to EP16."""
    return max_tokens_per_rank * top_k


def recv_x_rows(received: int, local_experts: int, align: int) -> int:
    """recv_x's rows for ``received`` rows at most: each local expert's segment may add align - 1 rows."""
    return received + local_experts * (align - 1)


@dataclass(frozen=True)
class EPWorkspace:
    """Capacity mode's buffers, owned by the caller (one per captured batch size, as for moe.dispatch): with
    it, ep_dispatch and ep_combine allocate nothing, so the pair can sit in a CUDA graph.

    Invariants (for num_tokens, top_k, num_experts, hidden, world_size W, max_tokens_per_rank, align and
    x's dtype; L = num_experts / W, C = slab_rows(...); all contiguous, on x's device): dispatch is
    moe.DispatchWorkspace.for_shape(num_tokens, top_k, num_experts, hidden, align=1); send and recv
    [W * C, hidden]; recv_x [recv_x_rows(W * C, L, align), hidden]; recv_counts int32 [W, L];
    tokens_per_expert int32 [L]; expert_offsets int32 [L + 1]; out [num_tokens, hidden]; no two buffers
    (dispatch's included) share memory. Each call overwrites the last one's contents. for_shape refuses
    (ValueError naming the argument) sizes no call takes, num_tokens > max_tokens_per_rank among them.
    """

    dispatch: moe.DispatchWorkspace  # pack's rows; unpack writes the returned outputs back over them
    send: torch.Tensor  # [W * C, hidden]: pack's slabs; the return exchange lands here
    recv: torch.Tensor  # [W * C, hidden]: the received slabs; unlayout writes the outputs back here
    recv_x: torch.Tensor  # [W * C + L * (align - 1), hidden]
    recv_counts: torch.Tensor  # int32 [W, L]
    tokens_per_expert: torch.Tensor  # int32 [L]
    expert_offsets: torch.Tensor  # int32 [L + 1]
    out: torch.Tensor  # [num_tokens, hidden]

    @staticmethod
    def layout(
        num_tokens: int,
        top_k: int,
        num_experts: int,
        hidden: int,
        *,
        world_size: int,
        max_tokens_per_rank: int,
        align: int = 1,
        dtype: torch.dtype = torch.bfloat16,
    ) -> dict:
        """{field: (shape, dtype)} of every buffer but dispatch's (what for_shape allocates, what a given
        workspace is checked against without allocating)."""
        local = num_experts // world_size
        slabs = world_size * slab_rows(max_tokens_per_rank, top_k)
        return {
            "send": ((slabs, hidden), dtype),
            "recv": ((slabs, hidden), dtype),
            "recv_x": ((recv_x_rows(slabs, local, align), hidden), dtype),
            "recv_counts": ((world_size, local), torch.int32),
            "tokens_per_expert": ((local,), torch.int32),
            "expert_offsets": ((local + 1,), torch.int32),
            "out": ((num_tokens, hidden), dtype),
        }

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
    ) -> "EPWorkspace":
        moe.check_dispatch_sizes(num_tokens, top_k, num_experts, hidden, align, dtype)
        check_int("world_size", world_size, 1)
        if num_experts % world_size:
            raise ValueError(
                f"num_experts: expected a multiple of world_size {world_size} (each rank owns as many "
                f"experts), got {num_experts}"
            )
        check_int("max_tokens_per_rank", max_tokens_per_rank, 1)
        if num_tokens > max_tokens_per_rank:
            raise ValueError(
                f"max_tokens_per_rank: expected at least num_tokens ({num_tokens}; a call's tokens must fit "
                f"the slabs), got {max_tokens_per_rank}"
            )
        device = check_device("device", device)
        layout = cls.layout(
            num_tokens,
            top_k,
            num_experts,
            hidden,
            world_size=world_size,
            max_tokens_per_rank=max_tokens_per_rank,
            align=align,
            dtype=dtype,
        )
        buffers = {
            name: torch.empty(shape, dtype=kind, device=device) for name, (shape, kind) in layout.items()
        }
        dispatch = moe.DispatchWorkspace.for_shape(
            num_tokens, top_k, num_experts, hidden, dtype=dtype, device=device
        )
        return cls(dispatch, **buffers)


@dataclass(frozen=True)
class EPHandle:
    """What ep_combine needs to bring the experts' outputs home. Invariants: tokens_per_expert int32 [L]
    and expert_offsets int32 [L + 1] describe recv_x (the module docstring), on x's device;
    recv_counts[s, e] is how many rows source rank s sent for local expert e; plan is this rank's pack
    (moe.DispatchPlan over the global experts, align 1); recv_rows is recv_x's row count. Exact mode:
    send_splits[r] / recv_splits[s] are the rows sent to rank r / received from rank s (host ints) and
    capacity is None; capacity mode: capacity is C, each slab's rows, and both splits are None."""

    tokens_per_expert: torch.Tensor  # int32 [L]
    expert_offsets: torch.Tensor  # int32 [L + 1]
    recv_counts: torch.Tensor  # int32 [W, L]
    plan: moe.DispatchPlan
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


def _check_workspace(workspace, layout: dict, device, inputs: dict) -> None:
    """Every buffer of the caller's workspace has the shape, dtype and device this call needs, and shares no
    memory with another (its dispatch part's included) or with the ``inputs`` (metadata only); moe.dispatch
    checks the dispatch part's shapes itself."""
    if not isinstance(workspace, EPWorkspace):
        raise ValueError(
            "workspace: expected an EPWorkspace (EPWorkspace.for_shape sizes it), got "
            f"{type(workspace).__name__}"
        )
    if not isinstance(workspace.dispatch, moe.DispatchWorkspace):
        raise ValueError(
            "workspace.dispatch: expected a moe.DispatchWorkspace (EPWorkspace.for_shape sizes it), got "
            f"{type(workspace.dispatch).__name__}"
        )
    for field, (shape, dtype) in layout.items():
        check_buffer(f"workspace.{field}", getattr(workspace, field), shape, dtype, device)
    check_disjoint(_workspace_buffers(workspace), inputs)


def _workspace_buffers(workspace: EPWorkspace) -> dict:
    """Every buffer of an EPWorkspace by its name, the dispatch part's as workspace.dispatch.<field>."""
    buffers = {f"workspace.{field.name}": getattr(workspace, field.name) for field in fields(workspace)}
    del buffers["workspace.dispatch"]
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
    x, weights, ids, num_experts, world, align, mode, max_tokens_per_rank, workspace
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
        layout = EPWorkspace.layout(
            num_tokens,
            top_k,
            num_experts,
            x.shape[1],
            world_size=world,
            max_tokens_per_rank=max_tokens_per_rank,
            align=align,
            dtype=x.dtype,
        )
        _check_workspace(workspace, layout, x.device, {"x": x, "weights": weights, "ids": ids})
    return slab_rows(max_tokens_per_rank, top_k)


# --- dispatch and combine -----------------------------------------------------------------------------------


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
) -> tuple[torch.Tensor, EPHandle]:
    """Sends each of this rank's rows to the ranks owning its chosen experts; returns (recv_x, handle) with
    recv_x laid out per local expert (the module docstring). Every rank of ``group`` must call it, with the
    same num_experts, align, mode and max_tokens_per_rank. ``stage_hook(name)``, if given, returns a context
    manager entered around each stage (the benchmarks time them with it)."""
    world = _world_size(group)
    if stage_hook is not None and not callable(stage_hook):
        raise ValueError(
            f"stage_hook: expected None or a callable taking a stage name and returning a context manager, "
            f"got {type(stage_hook).__name__}"
        )
    _check_inputs(x, weights, ids, num_experts, world, align, mode, group)
    capacity = _check_mode(x, weights, ids, num_experts, world, align, mode, max_tokens_per_rank, workspace)
    device = x.device
    num_tokens, top_k = ids.shape
    local = num_experts // world
    hidden = x.shape[1]

    def stage(name):
        return _stage(name, stage_hook, device)

    def rows(n):
        return torch.empty(n, hidden, dtype=x.dtype, device=device)

    with stage("pack"):
        packed, plan = moe.dispatch(x, ids, num_experts, workspace=workspace.dispatch if workspace else None)
        by_owner = plan.tokens_per_expert.view(world, local)
        if mode == "capacity":
            send = workspace.send if workspace else rows(world * capacity)
            _regroup(packed, send, by_owner, packed_rows=num_tokens * top_k, grouped_slab=capacity)
    with stage("counts"):
        if workspace is not None:
            recv_counts = workspace.recv_counts
        else:
            recv_counts = torch.empty(world, local, dtype=torch.int32, device=device)
        dist.all_to_all_single(recv_counts.view(-1), plan.tokens_per_expert, group=group)

    if workspace is not None:
        tokens_per_expert, expert_offsets = workspace.tokens_per_expert, workspace.expert_offsets
    else:
        tokens_per_expert = torch.empty(local, dtype=torch.int32, device=device)
        expert_offsets = torch.empty(local + 1, dtype=torch.int32, device=device)
    send_splits = recv_splits = None
    if mode == "exact":
        with stage("sync"):
            host = torch.cat([by_owner.sum(1, dtype=torch.int32), recv_counts.view(-1)]).tolist()
        send_splits = tuple(host[:world])
        received = [host[world + s * local : world + (s + 1) * local] for s in range(world)]
        recv_splits = tuple(sum(counts) for counts in received)
        columns = [sum(counts[e] for counts in received) for e in range(local)]
        recv_total = sum(-(-c // align) * align for c in columns)
        with stage("rows"):
            recv = rows(sum(recv_splits))
            dist.all_to_all_single(
                recv, packed[: sum(send_splits)], list(recv_splits), list(send_splits), group=group
            )
        packed_slab = 0
    else:
        recv_total = recv_x_rows(world * capacity, local, align)
        with stage("rows"):
            recv = workspace.recv if workspace else rows(world * capacity)
            dist.all_to_all_single(recv, send, group=group)
        packed_slab = capacity
    with stage("layout"):
        recv_x = workspace.recv_x if workspace else rows(recv_total)
        _regroup(
            recv,
            recv_x,
            recv_counts,
            packed_slab=packed_slab,
            align=align,
            by_column=True,
            packed_rows=recv.shape[0],
            tokens_per_expert=tokens_per_expert,
            expert_offsets=expert_offsets,
        )
    handle = EPHandle(
        tokens_per_expert,
        expert_offsets,
        recv_counts,
        plan,
        weights,
        mode,
        group,
        world,
        align,
        recv_x.shape[0],
        hidden,
        x.dtype,
        capacity,
        send_splits,
        recv_splits,
        workspace,
        stage_hook,
    )
    return recv_x, handle


def ep_combine(y: torch.Tensor, handle: EPHandle) -> torch.Tensor:
    """Brings the experts' outputs (``y``, in recv_x's rows) back to the ranks that sent the rows, and
    returns out [T, hidden] in x's dtype: each token's choices weighed and summed in fp32 in choice order.
    Every rank of the group must call it with the handle its ep_dispatch returned."""
    if not isinstance(handle, EPHandle):
        raise ValueError(f"handle: expected the EPHandle ep_dispatch returned, got {type(handle).__name__}")
    device = handle.tokens_per_expert.device
    check_tensor("y", y, ndim=2, dtypes=(handle.dtype,), device=device)
    check_contiguous("y", y)
    plan, world, workspace = handle.plan, handle.world_size, handle.workspace
    hidden = handle.hidden
    if tuple(y.shape) != (handle.recv_rows, hidden):
        raise ValueError(f"y: expected {(handle.recv_rows, hidden)} (recv_x's shape), got {tuple(y.shape)}")
    _world_size(handle.group)
    if workspace is not None:  # y is read while these are written (recv_x, not among them, may be y)
        written = ("recv", "send", "out", "dispatch.x_sorted")
        buffers = _workspace_buffers(workspace)
        check_disjoint({"y": y}, {f"workspace.{name}": buffers[f"workspace.{name}"] for name in written})
    local = handle.tokens_per_expert.shape[0]

    def stage(name):
        return _stage(name, handle.stage_hook, device)

    def rows(n):
        return torch.empty(n, hidden, dtype=y.dtype, device=device)

    exact = handle.mode == "exact"
    received = sum(handle.recv_splits) if exact else world * handle.capacity
    with stage("unlayout"):
        back = workspace.recv if workspace else rows(received)
        _regroup(
            back,
            y,
            handle.recv_counts,
            packed_slab=0 if exact else handle.capacity,
            align=handle.align,
            by_column=True,
            to_packed=True,
            packed_rows=received,
            tokens_per_expert=handle.tokens_per_expert,
            expert_offsets=handle.expert_offsets,
        )
    pairs = plan.slot_row.numel()
    with stage("return"):
        if exact:
            returned = rows(pairs)
            sent = sum(handle.send_splits)
            dist.all_to_all_single(
                returned[:sent], back, list(handle.send_splits), list(handle.recv_splits), group=handle.group
            )
        else:
            slabs = workspace.send if workspace else rows(world * handle.capacity)
            dist.all_to_all_single(slabs, back, group=handle.group)
    if not exact:
        with stage("unpack"):
            returned = workspace.dispatch.x_sorted if workspace else rows(pairs)
            _regroup(
                returned,
                slabs,
                plan.tokens_per_expert.view(world, local),
                grouped_slab=handle.capacity,
                to_packed=True,
                packed_rows=pairs,
            )
    with stage("combine"):
        return moe.combine(returned, handle.weights, plan, out=workspace.out if workspace else None)
