"""Expert parallelism in one process: every rank's inputs in, every rank's outputs out (lists indexed by
rank), for tests. The twin of kernels/ep.py: the same layout and the same sums, with no process group.

Rank r of W owns experts [r * L, (r + 1) * L), L = num_experts / W. Rank r's recv_x holds, for each local
expert in order, the rows routed to it from source ranks 0..W-1 in turn, each source's rows in its (token,
choice) order, every expert's segment starting on a multiple of ``align`` (padding rows zero here; undefined
in the kernel). ep_combine weighs each token's choices in fp32 in choice order.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class ReferenceHandle:
    """Where recv_x's rows came from: sources[i] = (source rank, token, choice) of row i, (-1, -1, -1) for
    padding; tokens_per_expert int32 [L], expert_offsets int32 [L + 1]."""

    tokens_per_expert: torch.Tensor
    expert_offsets: torch.Tensor
    sources: list[tuple[int, int, int]]


def ep_dispatch(
    xs: list[torch.Tensor], weights: list[torch.Tensor], ids: list[torch.Tensor], num_experts: int, *, align=1
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
            tokens_per_expert=torch.tensor(counts, dtype=torch.int32), expert_offsets=offsets, sources=sources
        )
        per_rank.append((recv_x, handle))
    return per_rank


def ep_combine(
    ys: list[torch.Tensor], handles: list[ReferenceHandle], weights: list[torch.Tensor]
) -> list[torch.Tensor]:
    """out for every rank: out[t] = sum over t's choices c, in order, of weights[t, c] x the row its expert
    returned, in fp32, cast to y's dtype."""
    choice_rows = {}
    for rank, handle in enumerate(handles):
        for row, source in enumerate(handle.sources):
            if source[0] >= 0:
                choice_rows[source] = ys[rank][row]
    outs = []
    for src, w in enumerate(weights):
        tokens, top_k = w.shape
        hidden = ys[0].shape[1]
        acc = torch.zeros(tokens, hidden, dtype=torch.float32)
        for choice in range(top_k):
            if tokens:
                rows = torch.stack([choice_rows[(src, token, choice)] for token in range(tokens)])
                acc += w[:, choice, None] * rows.float()
        outs.append(acc.to(ys[0].dtype))
    return outs
