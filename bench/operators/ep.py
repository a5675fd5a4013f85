"""Expert parallelism's operator: the scenarios checked against reference/ep.py, the benchmark shapes
(DeepSeek-R1 and Qwen3-235B-A22B routing, tokens per rank 1 to 4096, uniform and skewed loads, both modes),
each rank's inputs, a byte model per stage, and the regroup kernel's static shapes. What each rank runs with
them is bench/measure/collectives.py.

Each rank builds every rank's inputs from one seed, so each can compute the whole reference itself and no
inputs cross the wire except through the code under test.
"""

from dataclasses import dataclass

import torch

import kernels.ep
from bench.operators.base import StaticOnly
from bench.operators.moe import log_popularity, routing_ids
from bench.serving.models import MOE_MODELS, MoEModel
from bench.testing import generator, randn

# --- correctness: scenarios against the reference -----------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One check on W ranks: rank r holds tokens[r % len(tokens)] tokens. routing: "uniform"; "one-rank"
    (every choice among the last rank's experts, so the others' experts get no rows); "zipf" (skewed);
    "repeated" (uniform with replacement: a token may choose an expert twice, as route never does)."""

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
                chosen = routing_ids(tokens, experts, self.top_k, self.routing, gen)
            ids.append(chosen)
            weights.append(torch.softmax(torch.randn(tokens, self.top_k, generator=gen), dim=1))
            xs.append(randn((tokens, self.hidden), self.dtype, "cpu", gen))
        return xs, weights, ids


#: Checked by tests (2 and 4 ranks) and by ``decodebench run`` on CPU: different token counts per rank (one
#: with none), odd widths, align 1 to 64, bf16 and fp32 rows, every choice on one rank, ids repeated within
#: a token with fewer local experts than top_k (capacity mode's slabs must still hold every row).
SCENARIOS = (
    Scenario("uneven", (5, 17, 0, 9), 3, 2, 40),
    Scenario("one-rank-bf16-align64", (7, 3), 4, 3, 24, align=64, dtype=torch.bfloat16, routing="one-rank"),
    Scenario("zipf-align8", (12, 4), 2, 2, 33, align=8, routing="zipf"),
    Scenario("repeated-ids", (6, 5), 1, 3, 17, routing="repeated"),
)


def expert_outputs(recv_x: torch.Tensor, offsets: list[int], first_expert: int) -> torch.Tensor:
    """A stand-in for the experts: local expert e scales its rows by (its global id + 1) / 8 (exact in
    every dtype), so a row that reached the wrong expert changes the result."""
    y = recv_x.clone()
    for e in range(len(offsets) - 1):
        y[offsets[e] : offsets[e + 1]] *= (first_expert + e + 1) / 8
    return y


# --- benchmark: shapes, inputs, bytes per stage ----------------------------------------------------------

MODELS = ("DeepSeek-R1", "Qwen3-235B-A22B")
TOKENS_PER_RANK = (1, 4, 16, 64, 256, 1024, 4096)
CPU_TOKENS_PER_RANK = (1, 8)  # gloo on CPU, kernels interpreted: the path shown, not a measurement
LOADS = ("uniform", "zipf")
#: Every stage in call order; "sync" is exact mode's, "unpack" capacity mode's.
STAGES = ("route", "pack", "counts", "sync", "rows", "layout", "unlayout", "return", "unpack", "combine")


@dataclass(frozen=True)
class EPShape:
    """One EP benchmark point: a model's routing on ``world`` ranks, ``tokens`` per rank."""

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
    def local_experts(self) -> int:
        return self.model.num_experts // self.world

    @property
    def slab_rows(self) -> int:
        return kernels.ep.slab_rows(self.tokens, self.model.top_k)


def shapes(world: int, tokens=TOKENS_PER_RANK, models=MODELS, loads=LOADS, modes=kernels.ep.MODES):
    """Every combination whose experts divide over ``world`` ranks."""
    return [
        EPShape(MOE_MODELS[name], world, t, load, mode)
        for name in models
        if MOE_MODELS[name].num_experts % world == 0
        for load in loads
        for mode in modes
        for t in tokens
    ]


def stage_bytes(shape: EPShape, rank: int, sent: list[int], received: list[int], distinct: int) -> dict:
    """This rank's bytes per stage: memory traffic for the local stages, bytes put on the wire (to other
    ranks) for the collectives, with the useful share and what a deduplicating dispatch would send.
    ``sent[r]`` / ``received[s]``: rows to rank r / from rank s; ``distinct``: (token, other rank) pairs."""
    m, t, world = shape.model, shape.tokens, shape.world
    row = m.hidden * shape.dtype.itemsize
    pairs = t * m.top_k
    to_others = sum(n for r, n in enumerate(sent) if r != rank)
    from_others = sum(n for s, n in enumerate(received) if s != rank)
    padded = shape.mode == "capacity"
    slabs = (world - 1) * shape.slab_rows * row
    local = shape.local_experts
    return {
        "route": {"bytes": t * (m.num_experts * 2 + m.top_k * 8) + (m.num_experts * 4 if m.bias else 0)},
        "pack": {"bytes": t * row + pairs * row + pairs * 8 + pairs * 4 + (2 * pairs * row if padded else 0)},
        "counts": {"bytes": (world - 1) * local * 4, "wire": True},
        "sync": {"bytes": (world + world * local) * 4, "host": True},
        "rows": {
            "bytes": slabs if padded else to_others * row,
            "useful": to_others * row,
            "dedup": distinct * row,
            "wire": True,
        },
        "layout": {"bytes": 2 * sum(received) * row},
        "unlayout": {"bytes": 2 * sum(received) * row},
        "return": {
            "bytes": slabs if padded else from_others * row,
            "useful": from_others * row,
            "wire": True,
        },
        "unpack": {"bytes": 2 * pairs * row},
        "combine": {"bytes": pairs * row + t * row + pairs * 8},
    }


def route_inputs(shape: EPShape, rank: int, device, seed: int):
    """This rank's router logits (skewed by a popularity every rank shares), bias and rows."""
    m = shape.model
    shared = generator(seed)
    skew = log_popularity(m.num_experts, shape.load, shared)
    gen = generator(seed + 1 + rank)
    logits = (torch.randn(shape.tokens, m.num_experts, generator=gen) * 2.0 + skew).to(device, torch.bfloat16)
    bias = (torch.randn(m.num_experts, generator=shared) * 0.1).to(device) if m.bias else None
    x = randn((shape.tokens, m.hidden), shape.dtype, device, gen)
    return logits, bias, x


# --- static report: the regroup kernel compiled at EP8 DeepSeek-R1 -----------------------------------------


@dataclass(frozen=True)
class RegroupShape:
    """One regroup launch: ``variant`` "layout" (received rows to per-expert segments, exact mode) or "pack"
    (rows by owner rank into capacity mode's slabs); the way back compiles to the mirror of each."""

    model: MoEModel
    world: int
    variant: str
    tokens: int = 256

    @property
    def label(self) -> str:
        return f"{self.model.name} EP{self.world} {self.variant} hidden={self.model.hidden}"


def _regroup_launch(shape: RegroupShape, device="cpu") -> None:
    """The launcher helper's call for this shape (the static report captures its launch)."""
    m, world = shape.model, shape.world
    local = m.num_experts // world
    rows = shape.tokens * m.top_k
    slab = kernels.ep.slab_rows(shape.tokens, m.top_k)
    packed = torch.empty(world * slab, m.hidden, dtype=torch.bfloat16, device=device)
    grouped = torch.empty(
        kernels.ep.recv_x_rows(world * slab, local, 128), m.hidden, dtype=torch.bfloat16, device=device
    )
    counts = torch.zeros(world, local, dtype=torch.int32, device=device)  # a real launch moves nothing
    tokens_per_expert = torch.empty(local, dtype=torch.int32, device=device)
    offsets = torch.empty(local + 1, dtype=torch.int32, device=device)
    if shape.variant == "layout":
        kernels.ep._regroup(
            packed,
            grouped,
            counts,
            packed_rows=rows,
            align=128,
            by_column=True,
            tokens_per_expert=tokens_per_expert,
            expert_offsets=offsets,
        )
    else:
        kernels.ep._regroup(packed, grouped, counts, packed_rows=rows, grouped_slab=slab)


EP_STATIC = StaticOnly(
    name="ep",
    module="ep",
    static_shapes=lambda: [RegroupShape(MOE_MODELS["DeepSeek-R1"], 8, v) for v in ("layout", "pack")],
    launch=_regroup_launch,
)
