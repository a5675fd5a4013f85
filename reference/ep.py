"""Expert parallelism in one process: every rank's inputs in, every rank's outputs out (lists indexed by
rank), for tests. The twin of kernels/ep.py: the same layout and the same sums, with no process group.

Rank r of W owns experts [r * L, (r + 1) * L), L = num_experts / W. Rank r's recv_x holds, for each local
expert in order, the rows routed to it from source ranks 0..W-1 in turn, each source's rows in its (token,
choice) order, every expert's segment starting on a multiple of ``align`` (padding rows zero here; undefined
in the kernel). ep_combine weighs each token's choices in fp32 in choice order. An id of -1 (padding) or out
of [0, num_experts) is dropped, as the kernels drop it: no row is sent, and the choice adds nothing.

With ``dedup`` the layout is the same (what moves on the wire is not modelled here, only what each rank
sends: send_rows); ep_combine then sums, per (token, rank), that rank's choices of the token in fp32 in choice
order, rounds the partial to y's dtype (the row that travels back), and adds each token's partials in rank
order in fp32, rounding once.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class ReferenceHandle:
    """Where recv_x's rows came from: sources[i] = (source rank, token, choice) of row i, (-1, -1, -1) for
    padding; tokens_per_expert int32 [L], expert_offsets int32 [L + 1]; send_rows[r]: the rows this rank
    sends rank r (one per (token, choice) pair; with dedup one per (token, rank) pair)."""

    tokens_per_expert: torch.Tensor
    expert_offsets: torch.Tensor
    sources: list[tuple[int, int, int]]
    send_rows: list[int]
    dedup: bool = False


def send_rows(ids: torch.Tensor, num_experts: int, world: int, dedup: bool = False) -> list[int]:
    """The rows a rank with routing ``ids`` sends each rank: its (token, choice) pairs there, or with dedup
    its tokens with at least one expert there."""
    owners = (ids.long() // (num_experts // world)).tolist()
    if dedup:
        return [sum(rank in set(row) for row in owners) for rank in range(world)]
    return [sum(row.count(rank) for row in owners) for rank in range(world)]


def ep_dispatch(
    xs: list[torch.Tensor],
    weights: list[torch.Tensor],
    ids: list[torch.Tensor],
    num_experts: int,
    *,
    align=1,
    dedup=False,
) -> list[tuple[torch.Tensor, ReferenceHandle]]:
    """(recv_x, handle) for every rank. ``weights`` are unused here (ep_combine takes them), as in the kernel,
    where dispatch keeps them for combine."""
    world = len(xs)
    local = num_experts // world
    hidden, dtype = xs[0].shape[1], xs[0].dtype
    per_rank = []
    for rank in range(world):
        rows, sources, counts = [], [], []
        for expert in range(rank * local, (rank + 1) * local):
            segment = [
                (src, token, choice)
                for src in range(world)
                for token, choice in (ids[src] == expert).nonzero().tolist()
            ]
            counts.append(len(segment))
            padding = -len(segment) % align
            sources += segment + [(-1, -1, -1)] * padding
            rows += [xs[s][t] for s, t, _ in segment] + [torch.zeros(hidden, dtype=dtype)] * padding
        recv_x = torch.stack(rows) if rows else torch.zeros(0, hidden, dtype=dtype)
        padded = [-(-c // align) * align for c in counts]
        offsets = torch.tensor([0] + padded, dtype=torch.int64).cumsum(0).to(torch.int32)
        handle = ReferenceHandle(
            tokens_per_expert=torch.tensor(counts, dtype=torch.int32),
            expert_offsets=offsets,
            sources=sources,
            send_rows=send_rows(ids[rank], num_experts, world, dedup),
            dedup=dedup,
        )
        per_rank.append((recv_x, handle))
    return per_rank


def ep_combine(
    ys: list[torch.Tensor], handles: list[ReferenceHandle], weights: list[torch.Tensor]
) -> list[torch.Tensor]:
    """out for every rank: out[t] = sum over t's choices c, in order, of weights[t, c] x the row its expert
    returned, in fp32, cast to y's dtype (with dedup: summed per rank, then over ranks; the module
    docstring)."""
    choice_rows = {}
    for rank, handle in enumerate(handles):
        for row, source in enumerate(handle.sources):
            if source[0] >= 0:
                choice_rows[source] = (rank, ys[rank][row])
    hidden, dtype = ys[0].shape[1], ys[0].dtype
    outs = []
    for src, w in enumerate(weights):
        tokens, top_k = w.shape
        acc = torch.zeros(tokens, hidden, dtype=torch.float32)
        for token in range(tokens):
            # A choice no rank received (an id of -1 or out of range, dropped as the kernels drop it) adds
            # nothing.
            kept = [c for c in range(top_k) if (src, token, c) in choice_rows]
            chosen = [(c, *choice_rows[src, token, c]) for c in kept]
            if handles[0].dedup:
                for rank in sorted({rank for _, rank, _ in chosen}):
                    partial = torch.zeros(hidden, dtype=torch.float32)
                    for choice, owner, row in chosen:
                        if owner == rank:
                            partial += w[token, choice] * row.float()
                    acc[token] += partial.to(dtype).float()
            else:
                for choice, _, row in chosen:
                    acc[token] += w[token, choice] * row.float()
        outs.append(acc.to(dtype))
    return outs
