"""Expert parallelism's operator: the scenarios checked against reference/ep.py, the benchmark shapes
(DeepSeek-R1 and Qwen3-235B-A22B routing, tokens per rank 1 to 4096, uniform and skewed loads, exact and
capacity modes each with and without dedup),
each rank's inputs, a byte model per stage, and the regroup kernel's static shapes. What each rank runs with
them is bench/measure/collectives.py.

Each rank builds every rank's inputs from one seed, so each can compute the whole reference itself and no
inputs cross the wire except through the code under test.
"""

from dataclasses import dataclass

import torch

import kernels.ep
from bench.operators.base import StaticOnly
from bench.operators.moe import RouteShape, load_balancing_bias, log_popularity, routing_ids
from bench.operators.moe import byte_model as route_byte_model
from bench.serving.models import MOE_MODELS, MoEModel
from bench.testing import generator, randn

# --- correctness: scenarios against the reference -----------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One check on W ranks: rank r holds tokens[r % len(tokens)] tokens. routing: "uniform"; "one-rank"
    (every choice among the last rank's experts, so the others' experts get no rows); "zipf" (skewed);
    "repeated" (uniform with replacement: a token may choose an expert twice, as route never does);
    "padded" (uniform, then every third choice -1 and one choice E: ids the kernels drop, as moe.dispatch
    does)."""

    name: str
    tokens: tuple[int, ...]
    experts_per_rank: int
    top_k: int
    hidden: int
    align: int = 1
    dtype: torch.dtype = torch.float32
    routing: str = "uniform"

    def inputs(self, world: int, seed: int):
        """(xs, weights, ids) for every rank, the same on every rank."""
        gen = generator(seed)
        experts = self.experts_per_rank * world
        xs, weights, ids = [], [], []
        for rank in range(world):
            tokens = self.tokens[rank % len(self.tokens)]
            if self.routing == "repeated":
                chosen = torch.randint(experts, (tokens, self.top_k), generator=gen, dtype=torch.int32)
            elif self.routing == "one-rank":
                chosen = routing_ids(tokens, self.experts_per_rank, self.top_k, "uniform", gen)
                chosen += (world - 1) * self.experts_per_rank
            else:
                load = "uniform" if self.routing == "padded" else self.routing
                chosen = routing_ids(tokens, experts, self.top_k, load, gen)
            if self.routing == "padded" and tokens:
                chosen.view(-1)[::3] = -1
                chosen[-1, -1] = experts
            ids.append(chosen)
            weights.append(torch.softmax(torch.randn(tokens, self.top_k, generator=gen), dim=1))
            xs.append(randn((tokens, self.hidden), self.dtype, "cpu", gen))
        return xs, weights, ids


#: Checked by tests (2 and 4 ranks) and by ``decodebench run`` on CPU: different token counts per rank (one
#: with none), odd widths, align 1 to 64, bf16 and fp32 rows, every choice on one rank, ids repeated within
#: a token with fewer local experts than top_k (capacity mode's slabs must still hold every row), padding
#: (-1) and out-of-range ids (dropped: no row sent, the choice adds nothing to out).
SCENARIOS = (
    Scenario(name="uneven", tokens=(5, 17, 0, 9), experts_per_rank=3, top_k=2, hidden=40),
    Scenario(
        name="one-rank-bf16-align64",
        tokens=(7, 3),
        experts_per_rank=4,
        top_k=3,
        hidden=24,
        align=64,
        dtype=torch.bfloat16,
        routing="one-rank",
    ),
    Scenario(
        name="zipf-align8", tokens=(12, 4), experts_per_rank=2, top_k=2, hidden=33, align=8, routing="zipf"
    ),
    Scenario(name="repeated-ids", tokens=(6, 5), experts_per_rank=1, top_k=3, hidden=17, routing="repeated"),
    Scenario(name="padded-ids", tokens=(4, 3), experts_per_rank=2, top_k=2, hidden=9, routing="padded"),
)


def expert_outputs(recv_x: torch.Tensor, offsets: list[int], first_expert: int) -> torch.Tensor:
    """A stand-in for the experts: local expert e scales its rows by (its global id + 1) / 8 (the factor is
    exact in every dtype; the product is rounded to recv_x's dtype), so a row that reached the wrong expert
    changes the result."""
    y = recv_x.clone()
    for e in range(len(offsets) - 1):
        y[offsets[e] : offsets[e + 1]] *= (first_expert + e + 1) / 8
    return y


def expert_outputs_on_device(recv_x: torch.Tensor, expert_offsets: torch.Tensor, first_expert: int):
    """expert_outputs without reading the offsets on the host (so a CUDA graph can hold it): each row's
    expert found by searching expert_offsets on the device. Rows past the last segment (padding, never
    read back) get a factor too."""
    rows = torch.arange(recv_x.shape[0], dtype=expert_offsets.dtype, device=recv_x.device)
    local = torch.searchsorted(expert_offsets[1:].contiguous(), rows, right=True)
    scale = (local + first_expert + 1).to(torch.float32) / 8
    return (recv_x.float() * scale[:, None]).to(recv_x.dtype)


def expected_out(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """This rank's out when the experts are expert_outputs: per token, sum over its choices c in order of
    weights[t, c] x (x[t] x (ids[t, c] + 1) / 8, rounded to x's dtype), in fp32, rounded once. Needs only
    this rank's inputs; ids out of range are not expected (route's never are)."""
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for c in range(ids.shape[1]):
        scale = (ids[:, c].float() + 1) / 8
        acc += weights[:, c, None] * (x.float() * scale[:, None]).to(x.dtype).float()
    return acc.to(x.dtype)


# --- benchmark: shapes, inputs, bytes per stage ----------------------------------------------------------

MODELS = ("DeepSeek-R1", "Qwen3-235B-A22B")
TOKENS_PER_RANK = (1, 4, 16, 64, 256, 1024, 4096)
CPU_TOKENS_PER_RANK = (1, 8)  # gloo on CPU, kernels interpreted: the path shown, not a measurement
LOADS = ("uniform", "zipf")
#: Every stage in call order; "sync" is exact mode's, "unpack" capacity mode's (without dedup).
STAGES = ("route", "pack", "counts", "sync", "rows", "layout", "unlayout", "return", "unpack", "combine")
#: ep_dispatch's modes, each also deduplicated (one row per (token, destination rank) on the wire).
MODES = (*kernels.ep.MODES, *(f"{mode}-dedup" for mode in kernels.ep.MODES))


@dataclass(frozen=True)
class EPShape:
    """One EP benchmark point: a model's routing on ``world`` ranks, ``tokens`` per rank, in one of MODES."""

    model: MoEModel
    world: int
    tokens: int
    load: str = "uniform"
    mode: str = "exact"
    dtype: torch.dtype = torch.bfloat16

    @property
    def label(self) -> str:
        return f"{self.model.name} EP{self.world} tokens/rank={self.tokens} {self.load} {self.mode}"

    @property
    def sizes(self) -> kernels.ep.EPSizes:
        """What this point's capacity-mode buffers are sized by: every rank at most ``tokens`` tokens."""
        m = self.model
        return kernels.ep.EPSizes(
            num_tokens=self.tokens,
            top_k=m.top_k,
            num_experts=m.num_experts,
            hidden=m.hidden,
            world_size=self.world,
            max_tokens_per_rank=self.tokens,
            dtype=self.dtype,
            dedup=self.dedup,
        )

    @property
    def local_experts(self) -> int:
        return self.sizes.local_experts

    @property
    def kernel_mode(self) -> str:
        """ep_dispatch's mode ("exact" or "capacity")."""
        return self.mode.removesuffix("-dedup")

    @property
    def dedup(self) -> bool:
        return self.mode.endswith("-dedup")

    @property
    def slab_rows(self) -> int:
        return self.sizes.slab_rows


def shapes(world: int, tokens=TOKENS_PER_RANK, models=MODELS, loads=LOADS, modes=MODES):
    """Every combination whose experts divide over ``world`` ranks."""
    return [
        EPShape(model=MOE_MODELS[name], world=world, tokens=t, load=load, mode=mode)
        for name in models
        if MOE_MODELS[name].num_experts % world == 0
        for load in loads
        for mode in modes
        for t in tokens
    ]


def stage_bytes(
    shape: EPShape,
    rank: int,
    sent: list[int],
    received: list[int],
    distinct: int,
    received_pairs: int | None = None,
) -> dict:
    """This rank's bytes per stage: memory traffic for the local stages, bytes put on the wire (to other
    ranks) for the collectives, with the useful share and what a deduplicating dispatch would send.
    ``sent[r]`` / ``received[s]``: rows to rank r / from rank s (handle.send_rows: (token, choice) pairs, or
    with dedup (token, rank) pairs); ``distinct``: (token, other rank) pairs; ``received_pairs``: with dedup,
    the (token, choice) pairs the received rows expand to (recv_x's rows)."""
    m, t, world = shape.model, shape.tokens, shape.world
    row = m.hidden * shape.dtype.itemsize
    to_others = sum(n for r, n in enumerate(sent) if r != rank)
    from_others = sum(n for s, n in enumerate(received) if s != rank)
    padded = shape.kernel_mode == "capacity"
    local = shape.local_experts + shape.dedup  # dedup's counts carry the rows per rank too
    figures = {
        "route": {"bytes": route_byte_model(RouteShape(t, m))},  # bf16 logits (route_inputs)
        "counts": {"bytes": (world - 1) * local * 4, "wire": True},
        "sync": {"bytes": (world + world * local) * 4, "host": True},
    }
    rows = _dedup_rows(shape, sent, received, received_pairs) if shape.dedup else _rows(shape, received)
    meta = 2 * m.top_k * 4 if shape.dedup else 0  # a dedup row's pairs travel beside it
    slabs = (world - 1) * shape.slab_rows
    figures["rows"] = {
        "bytes": slabs * (row + meta) if padded else to_others * (row + meta),
        "useful": to_others * (row + meta),
        "dedup": distinct * row,
        "wire": True,
    }
    figures["return"] = {
        "bytes": slabs * row if padded else from_others * row,
        "useful": from_others * row,
        "wire": True,
    }
    return figures | {stage: {"bytes": nbytes * row + extra} for stage, (nbytes, extra) in rows.items()}


def _rows(shape: EPShape, received: list[int]) -> dict:
    """Local stages without dedup: {stage: (rows read and written, other bytes)}."""
    pairs = shape.tokens * shape.model.top_k
    padded = 2 * pairs if shape.kernel_mode == "capacity" else 0  # into the slabs, and back out
    return {
        "pack": (shape.tokens + pairs + padded, pairs * 12),
        "layout": (2 * sum(received), 0),
        "unlayout": (2 * sum(received), 0),
        "unpack": (2 * pairs, 0),
        "combine": (pairs + shape.tokens, pairs * 8),
    }


def _dedup_rows(shape: EPShape, sent: list[int], received: list[int], received_pairs: int) -> dict:
    """Local stages with dedup: {stage: (rows read and written, other bytes)}: pack writes each (token,
    rank) row once with its meta; layout reads each received row once and writes it per pair; the way back
    reads each pair and writes a row per (token, rank); combine reads those and writes a row per token."""
    t, top_k, world = shape.tokens, shape.model.top_k, shape.world
    meta = 2 * top_k * 4
    return {
        "pack": (t + sum(sent), t * top_k * 8 + sum(sent) * meta + t * world * 4),
        "layout": (sum(received) + received_pairs, sum(received) * meta),
        "unlayout": (received_pairs + sum(received), sum(received) * meta),
        "unpack": (0, 0),
        "combine": (sum(sent) + t, t * world * 4),
    }


def route_inputs(shape: EPShape, rank: int, device, seed: int):
    """This rank's router logits (skewed by a popularity every rank shares), bias and rows."""
    m = shape.model
    shared = generator(seed)
    skew = log_popularity(m.num_experts, shape.load, shared)
    gen = generator(seed + 1 + rank)
    logits = (torch.randn(shape.tokens, m.num_experts, generator=gen) * 2.0 + skew).to(device, torch.bfloat16)
    bias = load_balancing_bias(m, shared, device)
    x = randn((shape.tokens, m.hidden), shape.dtype, device, gen)
    return logits, bias, x


# --- static report: the regroup kernel compiled at EP8 DeepSeek-R1 -----------------------------------------

#: Static shapes' variants: the regroup's launches without dedup (the way back compiles to their mirror),
#: then dedup's: its pack kernel, the regroup copying a row to its pairs and reducing them on the way back,
#: and the partials' sum.
VARIANTS = ("layout", "pack", "dedup-pack", "dedup-layout", "dedup-unlayout", "dedup-combine")


@dataclass(frozen=True, kw_only=True)
class RegroupShape:
    """One launch of ``variant`` (VARIANTS): "layout" (received rows to per-expert segments, exact mode),
    "pack" (rows by owner rank into capacity mode's slabs), or dedup's."""

    model: MoEModel
    world: int
    variant: str
    tokens: int = 256

    @property
    def label(self) -> str:
        return f"{self.model.name} EP{self.world} {self.variant} hidden={self.model.hidden}"


def _regroup_launch(shape: RegroupShape, device="cpu") -> None:
    """The launcher helper's call for this shape (the static report captures its launch). The counts are
    zeros, so a real launch of a regroup moves nothing; the dedup pack's ids all name expert 0."""
    m, world, dedup = shape.model, shape.world, shape.variant.startswith("dedup")
    local = m.num_experts // world
    rows = shape.tokens * m.top_k
    slab = kernels.ep.slab_rows(shape.tokens, m.top_k, dedup)

    def buffer(n, width=m.hidden, dtype=torch.bfloat16):  # rows uninitialized, ints zeros
        fill = torch.empty if dtype == torch.bfloat16 else torch.zeros
        return fill(n, width, dtype=dtype, device=device)

    packed, grouped = buffer(world * slab), buffer(kernels.ep.recv_x_rows(world * rows, local, 128))
    counts = buffer(world, local + dedup, torch.int32)
    meta = buffer(world * slab, 2 * m.top_k, torch.int32)
    by_column = {
        "align": 128,
        "by_column": True,
        "tokens_per_expert": buffer(1, local, torch.int32)[0],
        "expert_offsets": buffer(1, local + 1, torch.int32)[0],
    }
    ids = buffer(shape.tokens, m.top_k, torch.int32)
    if shape.variant == "layout":
        kernels.ep._regroup(packed, grouped, counts, packed_rows=rows, **by_column)
    elif shape.variant == "pack":
        kernels.ep._regroup(packed, grouped, counts, packed_rows=rows, grouped_slab=slab)
    elif shape.variant == "dedup-pack":
        weights = buffer(shape.tokens, m.top_k, torch.float32)
        token_rows = buffer(shape.tokens, world, torch.int32)
        x = buffer(shape.tokens)
        kernels.ep._dedup_pack(
            x,
            ids,
            weights,
            m.num_experts,
            world,
            send=packed,
            meta=meta,
            send_counts=counts,
            token_rows=token_rows,
            slab=slab,
        )
    elif shape.variant in ("dedup-layout", "dedup-unlayout"):
        to_packed = shape.variant == "dedup-unlayout"
        kernels.ep._regroup(
            packed, grouped, counts, packed_rows=world * slab, meta=meta, to_packed=to_packed, **by_column
        )
    else:
        kernels.ep._sum_partials(packed, buffer(shape.tokens, world, torch.int32) - 1, buffer(shape.tokens))


EP_STATIC = StaticOnly(
    name="ep",
    module="ep",
    static_shapes=lambda: [
        RegroupShape(model=MOE_MODELS["DeepSeek-R1"], world=8, variant=v) for v in VARIANTS
    ],
    launch=_regroup_launch,
)
