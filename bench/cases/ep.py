"""Expert parallelism's case: scenarios checked against reference/ep.py on every rank, the benchmark shapes
(DeepSeek-R1 and Qwen3-235B-A22B routing, tokens per rank 1 to 4096, uniform and skewed loads, both modes),
a byte model per stage, and the per-stage run the benchmark times.

Each rank builds every rank's inputs from one seed, so each can compute the whole reference itself and no
inputs cross the wire except through the code under test.
"""

import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

import kernels.ep
import kernels.moe
import reference.ep
from bench.cases.base import StaticOnly
from bench.cases.moe import log_popularity, routing_ids
from bench.measure.distributed import Rank, guard
from bench.measure.timing import flush_l2, time_cuda
from bench.models import MOE_MODELS, MoEModel
from bench.testing import assert_bitwise_equal, assert_close, generator, randn

# --- correctness: scenarios against the reference -----------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One check on W ranks: rank r holds tokens[r % len(tokens)] tokens. routing: "uniform"; "one-rank"
    (every choice among the last rank's experts, so the others' experts get no rows); "zipf" (skewed)."""

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
            if self.routing == "one-rank":
                chosen = routing_ids(tokens, self.experts_per_rank, self.top_k, "uniform", gen)
                chosen += (world - 1) * self.experts_per_rank
            else:
                chosen = routing_ids(tokens, experts, self.top_k, self.routing, gen)
            ids.append(chosen)
            weights.append(torch.softmax(torch.randn(tokens, self.top_k, generator=gen), dim=1))
            xs.append(randn((tokens, self.hidden), self.dtype, "cpu", gen))
        return xs, weights, ids


#: Checked by tests (2 and 4 ranks) and by ``decodebench run`` on CPU: different token counts per rank (one
#: with none), odd widths, align 1 to 64, bf16 and fp32 rows, every choice on one rank.
SCENARIOS = (
    Scenario("uneven", (5, 17, 0, 9), 3, 2, 40),
    Scenario("one-rank-bf16-align64", (7, 3), 4, 3, 24, align=64, dtype=torch.bfloat16, routing="one-rank"),
    Scenario("zipf-align8", (12, 4), 2, 2, 33, align=8, routing="zipf"),
)


def expert_outputs(recv_x: torch.Tensor, offsets: list[int], first_expert: int) -> torch.Tensor:
    """A stand-in for the experts: local expert e scales its rows by (its global id + 1) / 8 (exact in
    every dtype), so a row that reached the wrong expert changes the result."""
    y = recv_x.clone()
    for e in range(len(offsets) - 1):
        y[offsets[e] : offsets[e + 1]] *= (first_expert + e + 1) / 8
    return y


def check(rank: Rank, scenarios=SCENARIOS, seed: int = 7) -> list[str]:
    """Every scenario in both modes against the reference, reruns bit-identical, then bad input raising
    ValueError on every rank before any collective. Returns a line per check; raises on a mismatch."""
    lines = []
    for scenario in scenarios:
        xs, weights, ids = scenario.inputs(rank.world, seed)
        experts = scenario.experts_per_rank * rank.world
        expected = reference.ep.ep_dispatch(xs, weights, ids, experts, align=scenario.align)
        ref_offsets = [h.expert_offsets.tolist() for _, h in expected]
        first = rank.rank * scenario.experts_per_rank
        ref_ys = [
            expert_outputs(x, off, r * scenario.experts_per_rank)
            for r, ((x, _), off) in enumerate(zip(expected, ref_offsets))
        ]
        want = reference.ep.ep_combine(ref_ys, [h for _, h in expected], weights)[rank.rank]
        ref_x, ref_handle = expected[rank.rank]
        me = rank.rank
        for mode in kernels.ep.MODES:
            kwargs = {"max_tokens_per_rank": max(scenario.tokens)} if mode == "capacity" else {}
            runs = []
            for _ in range(2):
                with guard(rank, f"{scenario.name} {mode}"):
                    recv_x, handle = kernels.ep.ep_dispatch(
                        xs[me], weights[me], ids[me], experts, align=scenario.align, mode=mode, **kwargs
                    )
                    offsets = handle.expert_offsets.tolist()
                    y = expert_outputs(recv_x, offsets, first)
                    out = kernels.ep.ep_combine(y, handle)
                runs.append((recv_x, handle, out))
            recv_x, handle, out = runs[0]
            where = f"rank {me} {scenario.name} {mode}"
            assert_bitwise_equal(handle.tokens_per_expert, ref_handle.tokens_per_expert, f"{where} counts")
            assert_bitwise_equal(handle.expert_offsets, ref_handle.expert_offsets, f"{where} offsets")
            for e, count in enumerate(ref_handle.tokens_per_expert.tolist()):
                start = offsets[e]
                assert_bitwise_equal(
                    recv_x[start : start + count], ref_x[start : start + count], f"{where} rows"
                )
            assert_close(out, want, f"{where} out", dtype=scenario.dtype)
            again = runs[1]
            assert_bitwise_equal(again[2], out, f"{where} rerun")
            lines.append(f"{where}: {sum(ref_handle.tokens_per_expert.tolist())} rows in, out matches")
    lines += check_bad_input(rank)
    return lines


def check_bad_input(rank: Rank) -> list[str]:
    """Each bad call raises ValueError naming the argument on every rank; a good exchange afterwards shows
    that no rank was left inside a collective."""
    x = torch.randn(3, 8)
    weights = torch.full((3, 2), 0.5)
    ids = torch.zeros(3, 2, dtype=torch.int32)
    ids[:, 1] = 1
    experts = 2 * rank.world
    bad = {
        "num_experts": lambda: kernels.ep.ep_dispatch(x, weights, ids, experts + 1),
        "x": lambda: kernels.ep.ep_dispatch(x.to(torch.int32), weights, ids, experts),
        "ids": lambda: kernels.ep.ep_dispatch(x, weights, ids[:2], experts),
        "weights": lambda: kernels.ep.ep_dispatch(x, weights.double(), ids, experts),
        "max_tokens_per_rank": lambda: kernels.ep.ep_dispatch(x, weights, ids, experts, mode="capacity"),
    }
    lines = []
    for name, call in bad.items():
        try:
            call()
        except ValueError as error:
            if not str(error).startswith(f"{name}:"):
                raise AssertionError(
                    f"rank {rank.rank}: expected an error naming {name}, got {error}"
                ) from None
            lines.append(f"rank {rank.rank} bad {name}: ValueError ({str(error)[:60]}...)")
        else:
            raise AssertionError(f"rank {rank.rank}: bad {name} was accepted")
    recv_x, handle = kernels.ep.ep_dispatch(x, weights, ids, experts)
    kernels.ep.ep_combine(recv_x, handle)
    return lines


# --- benchmark: shapes, bytes per stage, the timed run ------------------------------------------------------

MODELS = ("DeepSeek-R1", "Qwen3-235B-A22B")
TOKENS_PER_RANK = (1, 4, 16, 64, 256, 1024, 4096)
CPU_TOKENS_PER_RANK = (1, 16)  # gloo on CPU, kernels interpreted: the path shown, not a measurement
LOADS = ("uniform", "zipf")
#: Every stage in call order; "sync" is exact mode's, "unpack" capacity mode's.
STAGES = ("route", "pack", "counts", "sync", "rows", "layout", "unlayout", "return", "unpack", "combine")
COLLECTIVES = ("counts", "rows", "return")


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
        return kernels.ep.slab_rows(self.tokens, self.model.top_k, self.model.num_experts, self.world)


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


class StageClock:
    """Each stage's duration in one call: CUDA events around it on a GPU (the device time between them,
    including any wait on a peer inside a collective), the host clock on a CPU. Pass it as stage_hook."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object, object]] = []

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self.marks.append((name, start, end))

    def durations_ms(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {name: start.elapsed_time(end) for name, start, end in self.marks}
        return {name: (end - start) * 1e3 for name, start, end in self.marks}


def _route_inputs(shape: EPShape, rank: int, device, seed: int):
    """This rank's router logits (skewed by a popularity every rank shares), bias and rows."""
    m = shape.model
    shared = generator(seed)
    skew = log_popularity(m.num_experts, shape.load, shared)
    gen = generator(seed + 1 + rank)
    logits = (torch.randn(shape.tokens, m.num_experts, generator=gen) * 2.0 + skew).to(device, torch.bfloat16)
    bias = (torch.randn(m.num_experts, generator=shared) * 0.1).to(device) if m.bias else None
    x = randn((shape.tokens, m.hidden), shape.dtype, device, gen)
    return logits, bias, x


def _identity_experts_ok(out: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> bool:
    """With identity experts every token comes back as its row times the sum of its weights."""
    want = (x.float() * weights.sum(1, keepdim=True)).to(out.dtype)
    try:
        assert_close(out.cpu(), want.cpu(), "ep out", dtype=x.dtype)
    except AssertionError:
        return False
    return True


def run_shape(rank: Rank, shape: EPShape, *, reps: int, warmup: int, seed: int = 11) -> dict:
    """Times every stage of route + ep_dispatch + ep_combine (the experts: identity) on this rank, ``reps``
    times after ``warmup`` calls, each call after a barrier and, on a GPU, an L2 flush. Verifies the result
    (identity experts: out = x times the sum of its weights). Returns this rank's samples and bytes."""
    m = shape.model
    logits, bias, x = _route_inputs(shape, rank.rank, rank.device, seed)
    route_kwargs = {
        "scoring": m.scoring,
        "num_groups": m.num_groups,
        "topk_groups": m.topk_groups,
        "scale": m.scale,
        "softmax_after_topk": m.softmax_after_topk,
        "bias": bias,
    }
    capacity = {"max_tokens_per_rank": shape.tokens} if shape.mode == "capacity" else {}
    samples = []
    for i in range(warmup + reps):
        torch.distributed.barrier()
        if rank.device.type == "cuda":
            flush_l2()
        clock = StageClock(rank.device)
        with guard(rank, shape.label):
            with clock("route"):
                weights, ids = kernels.moe.route(logits, m.top_k, **route_kwargs)
            recv_x, handle = kernels.ep.ep_dispatch(
                x, weights, ids, m.num_experts, mode=shape.mode, stage_hook=clock, **capacity
            )
            out = kernels.ep.ep_combine(recv_x, handle)
        if i >= warmup:
            times = clock.durations_ms()
            samples.append([times.get(stage, 0.0) for stage in STAGES])
    verified = _identity_experts_ok(out, x, weights)
    if shape.mode == "exact":
        graph, graph_error = None, "none: exact mode reads the counts on the host"
    elif rank.device.type != "cuda":
        graph, graph_error = None, "none: no CUDA device"
    else:
        graph, graph_error = _graph_replay_ms(rank, shape, logits, x, route_kwargs, reps)
    owners = (ids.long() // shape.local_experts).cpu()
    sent = torch.bincount(owners.reshape(-1), minlength=shape.world).tolist()
    received = handle.recv_counts.sum(1).tolist()
    distinct = sum(len(set(row) - {rank.rank}) for row in owners.tolist())
    return {
        "samples": samples,
        "bytes": stage_bytes(shape, rank.rank, sent, received, distinct),
        "verified": verified,
        "graph_samples": graph,
        "graph_note": graph_error,
    }


def _graph_replay_ms(rank: Rank, shape: EPShape, logits, x, route_kwargs: dict, reps: int):
    """Capacity mode end to end (route, ep_dispatch, ep_combine into an EPWorkspace) captured in one CUDA
    graph and replayed: (samples in ms, None), or (None, why it could not be captured). Every rank makes
    the same number of calls (one warm-up, fixed reps): their collectives pair up."""
    m = shape.model
    workspace = kernels.ep.EPWorkspace.for_shape(
        shape.tokens,
        m.top_k,
        m.num_experts,
        m.hidden,
        world_size=shape.world,
        max_tokens_per_rank=shape.tokens,
        dtype=shape.dtype,
        device=rank.device,
    )

    def call():
        weights, ids = kernels.moe.route(logits, m.top_k, **route_kwargs)
        recv_x, handle = kernels.ep.ep_dispatch(
            x,
            weights,
            ids,
            m.num_experts,
            mode="capacity",
            max_tokens_per_rank=shape.tokens,
            workspace=workspace,
        )
        kernels.ep.ep_combine(recv_x, handle)

    try:
        with guard(rank, f"{shape.label} (CUDA graph)"):
            timing = time_cuda(
                call,
                label=f"ep graph {shape.label}",
                warmup_ms=0,
                min_reps=reps,
                max_reps=reps,
                cuda_graph=True,
            )
    except Exception as error:  # capture refused (an NCCL or driver without graph support): say why
        return None, f"not captured: {type(error).__name__}: {str(error)[:160]}"
    return list(timing.samples_ms), None


def dispatch_with_a_dead_rank(rank: Rank, victim: int = 1) -> None:
    """A fault drill: ``victim`` is killed (SIGKILL, no goodbye) just before ep_dispatch; every other rank
    must end with a PeerFailure naming it, not wait forever."""
    x, weights = torch.randn(4, 8), torch.full((4, 2), 0.5)
    ids = torch.tensor([[0, 1]] * 4, dtype=torch.int32) + 2 * ((rank.rank + 1) % rank.world)
    if rank.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    with guard(rank, "ep_dispatch"):
        recv_x, handle = kernels.ep.ep_dispatch(x, weights, ids, 2 * rank.world)
        kernels.ep.ep_combine(recv_x, handle)


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


def _regroup_launches(shape: RegroupShape, device="cpu") -> list:
    from bench.measure.static import capture_launches

    m, world = shape.model, shape.world
    local = m.num_experts // world
    rows = shape.tokens * m.top_k
    slab = kernels.ep.slab_rows(shape.tokens, m.top_k, m.num_experts, world)
    packed = torch.empty(world * slab, m.hidden, dtype=torch.bfloat16, device=device)
    grouped = torch.empty(
        kernels.ep.recv_x_rows(world * slab, local, 128), m.hidden, dtype=torch.bfloat16, device=device
    )
    counts = torch.zeros(world, local, dtype=torch.int32, device=device)  # a real launch moves nothing
    tokens_per_expert = torch.empty(local, dtype=torch.int32, device=device)
    offsets = torch.empty(local + 1, dtype=torch.int32, device=device)
    with capture_launches(kernels.ep) as launches:
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
    return launches


EP_STATIC = StaticOnly(
    name="ep",
    module="ep",
    static_shapes=lambda: [RegroupShape(MOE_MODELS["DeepSeek-R1"], 8, v) for v in ("layout", "pack")],
    launches=_regroup_launches,
)
