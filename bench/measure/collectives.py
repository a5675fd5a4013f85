"""The multi-rank runners: what each rank of a group does to check and to time EP dispatch/combine and the
TP all-reduce (``decodebench dist``, ``decodebench run`` on CPU, tests/test_ep.py). The shapes, scenarios
and byte models they run are the operators' (bench/operators/ep.py, bench/operators/all_reduce.py).

Timing follows the single-GPU harness: on a GPU, CUDA events on each rank around each stage, every EP call
after a barrier and an L2 flush (by reading), and the CUDA-graph replay beside eager where the path can be
captured; the all-reduce calls after a barrier only, without a flush (small messages stay in L2, as they
do in an engine's step); on a CPU, the host clock (gloo, interpreted kernels: the path, not a measurement).
"""

import functools
import os
import signal
import statistics
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

import kernels.ep
import kernels.moe
import reference.ep
from bench.measure.distributed import Rank, gather_floats, guard
from bench.measure.nvtx import nvtx_range
from bench.measure.timing import capture_graph, flush_l2, time_cuda
from bench.operators.all_reduce import SIZES, AllReduceResult
from bench.operators.ep import (
    SCENARIOS,
    STAGES,
    EPShape,
    expected_out,
    expert_outputs,
    expert_outputs_on_device,
    route_inputs,
    stage_bytes,
)
from bench.operators.moe import route_kwargs
from bench.testing import assert_bitwise_equal, assert_close

# --- EP: correctness on every rank ------------------------------------------------------------------------


def ep_check(rank: Rank, scenarios=SCENARIOS, seed: int = 7, rerun: bool = True) -> list[str]:
    """Every scenario in both modes, with and without dedup, against the reference, the first scenario's
    reruns bit-identical (``rerun``; capacity mode's through an EPWorkspace), then bad input raising
    ValueError on every rank before any collective. Returns a line per check; raises on a mismatch."""
    lines = []
    for number, scenario in enumerate(scenarios):
        inputs = scenario.inputs(rank.world, seed)
        for dedup in (False, True):
            expected = _expected(rank, scenario, inputs, dedup)
            for mode in kernels.ep.MODES:
                runs = 2 if rerun and number == 0 else 1
                lines.append(
                    _check_against(rank, scenario, inputs, expected, mode=mode, dedup=dedup, runs=runs)
                )
    lines += ep_check_bad_input(rank)
    return lines


def _expected(rank: Rank, scenario, inputs, dedup: bool) -> tuple:
    """This rank's (recv_x, handle, out) by the reference, the experts being expert_outputs."""
    xs, weights, ids = inputs
    experts = scenario.experts_per_rank * rank.world
    dispatched = reference.ep.ep_dispatch(xs, weights, ids, experts, align=scenario.align, dedup=dedup)
    ys = [
        expert_outputs(x, h.expert_offsets.tolist(), r * scenario.experts_per_rank)
        for r, (x, h) in enumerate(dispatched)
    ]
    outs = reference.ep.ep_combine(ys, [h for _, h in dispatched], weights)
    return *dispatched[rank.rank], outs[rank.rank]


def _check_against(rank: Rank, scenario, inputs, expected, *, mode: str, dedup: bool, runs: int) -> str:
    """One scenario in one mode, ``runs`` times: its layout, send_rows and out against the reference, and
    every rerun's out bit-identical to the first. Capacity mode's reruns go through an EPWorkspace (the
    path a CUDA graph captures), so the last run's layout is the workspace's."""
    me, experts = rank.rank, scenario.experts_per_rank * rank.world
    # The reference ran on the host; the kernels run on the rank's device (a GPU's under NCCL).
    x, w, ids = (t[me].to(rank.device) for t in inputs)
    ref_x, ref_handle, want = expected
    kwargs = {"max_tokens_per_rank": max(scenario.tokens)} if mode == "capacity" else {}
    label = f"{scenario.name} {mode}{' dedup' if dedup else ''}"
    done = []
    for run in range(runs):
        if mode == "capacity" and run:
            kwargs["workspace"] = kernels.ep.EPWorkspace.for_shape(
                *ids.shape,
                experts,
                scenario.hidden,
                world_size=rank.world,
                max_tokens_per_rank=max(scenario.tokens),
                align=scenario.align,
                dtype=scenario.dtype,
                device=rank.device,
                dedup=dedup,
            )
        with guard(rank, label):
            recv_x, handle = kernels.ep.ep_dispatch(
                x, w, ids, experts, align=scenario.align, mode=mode, dedup=dedup, **kwargs
            )
            offsets = handle.expert_offsets.tolist()
            out = kernels.ep.ep_combine(
                expert_outputs(recv_x, offsets, me * scenario.experts_per_rank), handle
            )
        done.append(out)
    where, device = f"rank {me} {label}", rank.device
    counts, offsets_ref = ref_handle.tokens_per_expert.to(device), ref_handle.expert_offsets.to(device)
    assert_bitwise_equal(handle.tokens_per_expert, counts, f"{where} counts")
    assert_bitwise_equal(handle.expert_offsets, offsets_ref, f"{where} offsets")
    for e, count in enumerate(ref_handle.tokens_per_expert.tolist()):
        start = offsets[e]
        rows = ref_x[start : start + count].to(device)
        assert_bitwise_equal(recv_x[start : start + count], rows, f"{where} rows")
    sent = handle.send_rows.tolist()
    if sent != ref_handle.send_rows:
        raise AssertionError(f"{where} send_rows: {sent}, expected {ref_handle.send_rows}")
    assert_close(out, want.to(device), f"{where} out", dtype=scenario.dtype)
    for again in done[1:]:
        assert_bitwise_equal(again, out, f"{where} rerun")
    return f"{where}: {sum(ref_handle.tokens_per_expert.tolist())} rows in, {sum(sent)} sent, out matches"


def ep_check_bad_input(rank: Rank) -> list[str]:
    """Each bad call raises ValueError naming the argument on every rank; a good exchange afterwards shows
    that no rank was left inside a collective. On the rank's device (a GPU's under NCCL)."""
    device = rank.device
    x = torch.randn(3, 8, device=device)
    weights = torch.full((3, 2), 0.5, device=device)
    ids = torch.zeros(3, 2, dtype=torch.int32, device=device)
    ids[:, 1] = 1
    experts = 2 * rank.world
    bad = {
        "num_experts": lambda: kernels.ep.ep_dispatch(x, weights, ids, experts + 1),
        "x": lambda: kernels.ep.ep_dispatch(x.to(torch.int32), weights, ids, experts),
        "ids": lambda: kernels.ep.ep_dispatch(x, weights, ids[:2], experts),
        "weights": lambda: kernels.ep.ep_dispatch(x, weights.double(), ids, experts),
        "max_tokens_per_rank": lambda: kernels.ep.ep_dispatch(x, weights, ids, experts, mode="capacity"),
        "dedup": lambda: kernels.ep.ep_dispatch(x, weights, ids, experts, dedup="yes"),
        # A workspace sized without dedup: its slabs hold top_k times the rows a dedup call sends.
        "workspace.send": lambda: kernels.ep.ep_dispatch(
            x,
            weights,
            ids,
            experts,
            mode="capacity",
            max_tokens_per_rank=4,
            dedup=True,
            workspace=kernels.ep.EPWorkspace.for_shape(
                3, 2, experts, 8, world_size=rank.world, max_tokens_per_rank=4, dtype=x.dtype, device=device
            ),
        ),
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


def _matches(out: torch.Tensor, want: torch.Tensor) -> bool:
    """out within its dtype's tolerance of want (expected_out's), compared on the host."""
    try:
        assert_close(out.cpu(), want.cpu(), "ep out", dtype=want.dtype)
    except AssertionError:
        return False
    return True


def _mode_kwargs(shape: EPShape) -> dict:
    mode = {"mode": shape.kernel_mode, "dedup": shape.dedup}
    if shape.kernel_mode == "capacity":
        mode["max_tokens_per_rank"] = shape.tokens
    return mode


def time_ep(rank: Rank, shape: EPShape, *, reps: int, warmup: int, seed: int = 11) -> dict:
    """Times route + ep_dispatch + ep_combine (the experts: identity, left out of the time) on this rank,
    ``reps`` times after ``warmup`` calls, each call after a barrier and, on a GPU, an L2 flush: each
    stage, and the whole dispatch + combine call (stages plus the host work between them). Then one untimed
    call with expert_outputs_on_device as the experts, checked against expected_out (a row laid out at the
    wrong expert changes it; identity experts would hide it). Returns this rank's samples and bytes."""
    m = shape.model
    logits, bias, x = route_inputs(shape, rank.rank, rank.device, seed)
    routing = route_kwargs(m) | {"bias": bias}
    mode = _mode_kwargs(shape)
    samples, calls = [], []
    for i in range(warmup + reps):
        torch.distributed.barrier()
        if rank.device.type == "cuda":
            flush_l2()
        clock = StageClock(rank.device)
        with guard(rank, shape.label), nvtx_range(f"ep[{shape.label}]", color="blue"):
            with clock("route"):
                weights, ids = kernels.moe.route(logits, m.top_k, **routing)
            with clock("call"):
                recv_x, handle = kernels.ep.ep_dispatch(
                    x, weights, ids, m.num_experts, stage_hook=clock, **mode
                )
                kernels.ep.ep_combine(recv_x, handle)
        if i >= warmup:
            times = clock.durations_ms()
            samples.append([times.get(stage, 0.0) for stage in STAGES])
            calls.append(times["call"])
    want = expected_out(x, weights, ids)
    with guard(rank, f"{shape.label} (checked)"):
        recv_x, handle = kernels.ep.ep_dispatch(x, weights, ids, m.num_experts, **mode)
        first = rank.rank * shape.local_experts
        out = kernels.ep.ep_combine(expert_outputs_on_device(recv_x, handle.expert_offsets, first), handle)
    if shape.kernel_mode == "exact":
        graph, graph_note, graph_verified = None, "none: exact mode reads the counts on the host", False
    elif rank.device.type != "cuda":
        graph, graph_note, graph_verified = None, "none: no CUDA device", False
    else:
        graph, graph_note, graph_verified = _graph_replay_ms(rank, shape, logits, x, routing, want, reps)
    # Rows as the call counted them (what dedup saves is measured), and what dedup would send (a model).
    sent = handle.send_rows.tolist()
    received = (handle.dedup_counts[:, -1] if handle.dedup else handle.recv_counts.sum(1)).tolist()
    received_pairs = int(handle.recv_counts.sum())
    owners = (ids.long() // shape.local_experts).cpu()
    distinct = sum(len(set(row) - {rank.rank}) for row in owners.tolist())
    return {
        "samples": samples,
        "call_samples": calls,
        "sent_rows": sent,
        "bytes": stage_bytes(shape, rank.rank, sent, received, distinct, received_pairs),
        "verified": _matches(out, want),
        "graph_samples": graph,
        "graph_note": graph_note,
        "graph_verified": graph_verified,
    }


#: Columns of ep_mode_row: the modes side by side, one row per shape.
EP_MODE_HEADERS = (
    "model",
    "EP",
    "load",
    "tokens/rank",
    "mode",
    "remote rows",
    "wire bytes",
    "padding bytes",
    "dispatch+combine us",
)


def ep_mode_row(shape: EPShape, everyone: list[dict]) -> list:
    """One shape's row beside the other modes' (time_ep's results from every rank), each figure the
    busiest rank's: the rows it sent other ranks (as ep_dispatch counted them), the bytes both exchanges put
    on the wire (dedup's meta rows included) and the slabs' padding among them, and the slowest rank's
    dispatch + combine time per call (the whole call, host work between stages included; route, which every
    mode shares, left out), the median over calls."""
    remote = max(
        sum(n for r, n in enumerate(mine["sent_rows"]) if r != rank) for rank, mine in enumerate(everyone)
    )
    exchanges = [[mine["bytes"][stage] for stage in ("rows", "return")] for mine in everyone]
    wire = max(sum(f["bytes"] for f in figures) for figures in exchanges)
    padding = max(sum(f["bytes"] - f["useful"] for f in figures) for figures in exchanges)
    calls = range(len(everyone[0]["call_samples"]))
    us = statistics.median(max(mine["call_samples"][i] for mine in everyone) for i in calls) * 1e3
    row = [shape.model.name, shape.world, shape.load, shape.tokens, shape.mode, remote]
    return row + [f"{wire:,}", f"{padding:,}", f"{us:,.1f}"]


def _graph_replay_ms(rank: Rank, shape: EPShape, logits, x, routing: dict, want, reps: int):
    """Capacity mode end to end (route, ep_dispatch, ep_combine into an EPWorkspace) captured in CUDA graphs:
    one with identity experts, replayed ``reps`` times and timed; one with expert_outputs_on_device as the
    experts, replayed once, its workspace.out checked against ``want``. Returns (samples in ms, None,
    verified), or (None, why it could not be captured, False). The ranks agree (an all-gather) on whether
    every rank captured before any replays, so all time the graph or none does, and their collectives
    pair up; an eager collective that fails (a peer gone) raises PeerFailure. A replayed collective is
    watched by no process-group timeout: a peer gone during a replay leaves the others to the launcher
    (distributed.spawn stops them a timeout after a rank fails). A capture refused on one rank during its
    warm-up call, before that call's collectives, still leaves the peers in them until the group's
    timeout."""
    m = shape.model
    workspace = kernels.ep.EPWorkspace.for_sizes(shape.sizes, rank.device)
    first = rank.rank * shape.local_experts

    def call(experts):
        weights, ids = kernels.moe.route(logits, m.top_k, **routing)
        recv_x, handle = kernels.ep.ep_dispatch(
            x, weights, ids, m.num_experts, workspace=workspace, **_mode_kwargs(shape)
        )
        y = expert_outputs_on_device(recv_x, handle.expert_offsets, first) if experts else recv_x
        kernels.ep.ep_combine(y, handle)

    note = None
    with guard(rank, f"{shape.label} (CUDA graph)"):
        try:
            timed, checked = capture_graph(lambda: call(False)), capture_graph(lambda: call(True))
        except Exception as error:  # capture refused (an NCCL or driver without graph support): say why
            note = f"not captured on rank {rank.rank}: {type(error).__name__}: {str(error)[:160]}"
        failed = [r for r, ok in enumerate(gather_floats(rank, [float(note is None)])) if ok[0] != 1.0]
        if failed:
            note = note or f"not captured: rank(s) {', '.join(map(str, failed))} could not capture"
            return None, note, False
        timing = time_cuda(timed, label=f"ep graph {shape.label}", warmup_ms=0, min_reps=reps, max_reps=reps)
        checked()
        torch.cuda.synchronize()
    return list(timing.samples_ms), None, _matches(workspace.out, want)


def dispatch_with_a_dead_rank(rank: Rank, victim: int = 1, dedup: bool = False) -> None:
    """A fault drill: ``victim`` is killed (SIGKILL, no goodbye) just before ep_dispatch; every other rank
    must end with a PeerFailure naming it, not wait forever."""
    x, weights = torch.randn(4, 8), torch.full((4, 2), 0.5)
    ids = torch.tensor([[0, 1]] * 4, dtype=torch.int32) + 2 * ((rank.rank + 1) % rank.world)
    if rank.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    with guard(rank, "ep_dispatch"):
        recv_x, handle = kernels.ep.ep_dispatch(x, weights, ids, 2 * rank.world, dedup=dedup)
        kernels.ep.ep_combine(recv_x, handle)


# --- the TP all-reduce -------------------------------------------------------------------------------------


def _timer(rank: Rank):
    if rank.device.type == "cuda":

        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

    else:

        def timed(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

    return timed


def _one_shot(rank: Rank, numel: int):
    """torch's symmetric-memory one-shot all-reduce on a buffer of ``numel`` bf16, or the reason it cannot
    run here."""
    if rank.device.type != "cuda":
        return None, "needs CUDA devices (symmetric memory maps peers' GPU buffers)"
    if rank.world < 2:
        return None, "needs 2+ GPUs connected by NVLink (world size 1)"
    try:
        import torch.distributed._symmetric_memory as symm_mem

        buffer = symm_mem.empty(numel, dtype=torch.bfloat16, device=rank.device)
        group = dist.group.WORLD
        symm_mem.rendezvous(buffer, group.group_name)
        op = torch.ops.symm_mem.one_shot_all_reduce

        def call():
            return op(buffer, "sum", group.group_name)

        call()
        return (buffer, call), None
    except Exception as error:  # alpha API: absent, or the machine lacks the links it needs
        return None, f"symmetric memory unavailable: {type(error).__name__}: {str(error)[:120]}"


def time_all_reduce(
    rank: Rank, sizes=SIZES, *, reps: int = 20, warmup: int = 5
) -> tuple[list[AllReduceResult], dict]:
    """Every size with the backend's all-reduce and with the one-shot one; returns the results and the
    reasons any implementation was skipped."""
    timed = _timer(rank)
    results, skipped = [], {}
    for size in sizes:
        numel = size // 2
        data = torch.empty(numel, dtype=torch.bfloat16, device=rank.device)
        impls = {rank.backend: (data, functools.partial(dist.all_reduce, data))}
        one_shot, reason = _one_shot(rank, numel)
        if one_shot is None:
            skipped["symm-mem one-shot"] = reason
        else:
            impls["symm-mem one-shot"] = one_shot
        for impl, (buffer, call) in impls.items():
            with guard(rank, f"all-reduce {impl} {size} B"):
                buffer.fill_(rank.rank + 1)
                result = call()
                summed = result if isinstance(result, torch.Tensor) else buffer
                verified = bool((summed == rank.world * (rank.world + 1) / 2).all())
                mine = []
                for i in range(warmup + reps):
                    dist.barrier()
                    with nvtx_range(f"all_reduce[{impl} {size} B]", color="blue"):
                        ms = timed(call)
                    if i >= warmup:
                        mine.append(ms)
                everyone = gather_floats(rank, mine + [float(verified)])
            per_call = [max(r[i] for r in everyone) for i in range(reps)]
            means = sorted(sum(r[i] for r in everyone) / rank.world for i in range(reps))
            ok = all(r[-1] == 1.0 for r in everyone)
            results.append(
                AllReduceResult(
                    impl=impl, size=size, samples_ms=per_call, mean_rank_ms=means[reps // 2], verified=ok
                )
            )
    return results, skipped


def all_reduce_check(rank: Rank, sizes=(8 * 1024, 100_002)) -> list[str]:
    """The backend's all-reduce sums correctly at a few sizes (one odd), timed path included."""
    found, _ = time_all_reduce(rank, sizes, reps=1, warmup=0)
    wrong = [f"{r.impl} {r.size} B" for r in found if not r.verified]
    if wrong:
        raise AssertionError(f"rank {rank.rank}: all-reduce summed wrong at {', '.join(wrong)}")
    return [f"rank {rank.rank} all-reduce {r.impl} {r.size} B: sums match" for r in found]
