"""`decodebench dist`: the multi-rank benchmarks, on one host or under torchrun.

    decodebench dist --nproc N ep|allreduce|check [--backend nccl|gloo] [options]   (starts the ranks on
                                              this host: every socket, NCCL's and gloo's, on 127.0.0.1)
    torchrun --nproc-per-node N -m bench dist ep|allreduce|check [--backend nccl|gloo] [options]

torchrun is for several nodes, where its rendezvous does it: the same command on every node with ``--nnodes
M --rdzv-backend c10d --rdzv-endpoint HOST:PORT`` (its stores listen on every interface: a network the nodes
share). Each rank times its own stages (CUDA events on a GPU, the
host clock on a CPU); rank 0 gathers them, reports the slowest rank per call (a collective ends when its
last rank does) beside the ranks' mean, prints the tables and writes the JSON (the suite's schema, with world
size, backend, NCCL version and the interconnect in machine_info).
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

from tabulate import tabulate

from bench.commands.arguments import (
    MAX_SECONDS,
    UsageError,
    names_from,
    non_negative_int,
    output_file,
    positive_int,
    positive_ints,
    positive_number,
)
from bench.format import us
from bench.measure import collectives, distributed, results
from bench.measure.timing import Timing
from bench.operators import all_reduce, ep
from bench.serving.models import MOE_MODELS


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def _machine(rank: distributed.Rank) -> dict:
    return {
        "world_size": rank.world,
        "backend": rank.backend,
        "nccl": distributed.nccl_version(),
        "interconnect": distributed.interconnect(),
    }


def _wire_note(rank: distributed.Rank) -> str:
    if rank.world == 1:
        return "world size 1: every row stays on this rank, so no wire was measured (the GPU path was)"
    if rank.device.type == "cpu":
        return "gloo on CPU processes with kernels interpreted: the path and its bytes, not GPU timings"
    return "measured"


# --- ep -----------------------------------------------------------------------------------------------------


def _clock(device) -> dict:
    """What the ranks' times were read on: CUDA events on GPUs, the host clock under gloo on CPUs (compare
    refuses to set one against the other)."""
    if device.type == "cuda":
        return {"timer": "cuda-events", "clock": "cuda-events"}
    return {"timer": "host", "clock": "wall-clock (gloo, interpreted kernels)"}


def _ep_info(shape: ep.EPShape, stage: str, mean_ms: float, verified: bool, device) -> dict:
    """What every EP results entry of a stage says: the point, the ranks' mean, the check and the clock."""
    return {
        "kernel": "ep",
        "stage": stage,
        "shape": f"{shape.label} [{stage.replace(' (CUDA graph)', ', CUDA graph')}]",
        "mode": shape.mode,
        "world_size": shape.world,
        "tokens_per_rank": shape.tokens,
        "load": shape.load,
        "verified": verified,
        "mean_rank_s": mean_ms * 1e-3,
        **_clock(device),
    }


def _total_entry(
    shape: ep.EPShape, stage: str, per_call: list[float], mean_ms: float, verified: bool, device
) -> dict:
    """The results entry of a whole EP step (route and dispatch + combine as one call, eager or replayed from
    a CUDA graph): the slowest rank per call, the ranks' mean beside it."""
    info = _ep_info(shape, stage, mean_ms, verified, device)
    return results.entry(f"ep[{shape.label}] {stage}", "ep", Timing.from_samples(per_call), info)


def _ep_rows(shape: ep.EPShape, everyone: list[dict], reps: int, device) -> tuple[list[list], list[dict]]:
    """A table row and a results entry per stage the shape ran (on ``device``'s clock): the slowest rank per
    call, the mean."""
    rows, entries = [], []
    stages = [s for s in ep.STAGES if any(r["samples"][0][ep.STAGES.index(s)] for r in everyone)]
    # route, then the whole dispatch + combine call (the stages and the host work between them)
    route = ep.STAGES.index("route")
    totals = [[s[route] + call for s, call in zip(r["samples"], r["call_samples"])] for r in everyone]
    slowest_total = statistics.median(max(t[i] for t in totals) for i in range(reps))
    mean_total = statistics.median(statistics.fmean(t[i] for t in totals) for i in range(reps))
    skew = slowest_total / mean_total if mean_total else 1.0
    verified = all(r["verified"] for r in everyone)
    for stage in stages:
        column = ep.STAGES.index(stage)
        per_call = [max(r["samples"][i][column] for r in everyone) for i in range(reps)]
        mean = statistics.median(
            statistics.fmean(r["samples"][i][column] for r in everyone) for i in range(reps)
        )
        slowest = statistics.median(per_call)
        figures = [r["bytes"][stage] for r in everyone]
        nbytes = max(f["bytes"] for f in figures)
        useful = max(f.get("useful", f["bytes"]) for f in figures)
        kind = "host" if figures[0].get("host") else ("wire" if figures[0].get("wire") else "memory")
        gbps = nbytes / (slowest * 1e-3) / 1e9 if slowest else 0.0
        dedup = max(f.get("dedup", 0) for f in figures)
        rows.append(
            [
                stage,
                us(slowest * 1e-3),
                us(mean * 1e-3),
                f"{slowest / mean:.2f}" if mean else "-",
                f"{nbytes:,}",
                f"{useful:,}" if kind == "wire" else "",
                f"{dedup:,}" if dedup else "",
                kind,
                f"{gbps:.2f}",
            ]
        )
        info = {
            **_ep_info(shape, stage, mean, verified, device),
            "bytes": nbytes,
            "bytes_kind": kind,
            "useful_bytes": useful,
            "dedup_wire_bytes": dedup or None,
            "gbps": round(gbps, 3),
            "stage_skew": round(slowest / mean, 3) if mean else None,
            "call_skew": round(skew, 3),
        }
        entries.append(results.entry(f"ep[{shape.label}] {stage}", "ep", Timing.from_samples(per_call), info))
    rows.append(["total", us(slowest_total * 1e-3), us(mean_total * 1e-3), f"{skew:.2f}"] + [""] * 5)
    entries.append(
        _total_entry(
            shape, "total", [max(t[i] for t in totals) for i in range(reps)], mean_total, verified, device
        )
    )
    graphs = [r["graph_samples"] for r in everyone]
    if all(graphs):
        per_call = [max(g[i] for g in graphs) for i in range(min(map(len, graphs)))]
        graph_mean = statistics.median(statistics.fmean(g[i] for g in graphs) for i in range(len(per_call)))
        graph_slowest = statistics.median(per_call)
        graph_verified = all(r["graph_verified"] for r in everyone)
        graph_row = ["total, CUDA graph", us(graph_slowest * 1e-3), us(graph_mean * 1e-3), ""]
        rows.append(graph_row + [""] * 4 + ["" if graph_verified else "WRONG RESULT"])
        graph = _total_entry(shape, "total (CUDA graph)", per_call, graph_mean, graph_verified, device)
        entries.append(graph)
    else:
        notes = dict.fromkeys(r["graph_note"] for r in everyone if r["graph_note"])  # each rank's, once
        rows.append(["total, CUDA graph", "", "", ""] + [""] * 4 + ["; ".join(notes)])
    return rows, entries


def run_ep(rank: distributed.Rank, args) -> list[dict]:
    tokens = args.tokens or (ep.CPU_TOKENS_PER_RANK if rank.device.type == "cpu" else ep.TOKENS_PER_RANK)
    shapes = ep.shapes(rank.world, tokens, args.models, args.loads, args.modes)  # not empty: check_args
    entries, modes, machine = [], [], None
    for shape in shapes:
        mine = collectives.time_ep(rank, shape, reps=args.reps, warmup=args.warmup)
        everyone = _gather(rank, mine)
        if rank.rank != 0:
            continue
        modes.append(collectives.ep_mode_row(shape, everyone))
        rows, shape_entries = _ep_rows(shape, everyone, args.reps, rank.device)
        entries += shape_entries
        if args.out:  # after every shape: a run its deadline ends keeps what it measured
            machine = machine or _machine(rank)
            results.write(Path(args.out), entries, machine)
        check = "verified" if shape_entries[0]["extra_info"]["verified"] else "WRONG RESULT"
        print(f"\n### {shape.label} ({check})\n")
        headers = ["stage", "slowest us", "mean us", "skew", "bytes", "useful", "dedup", "kind", "GB/s"]
        print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), flush=True)
    if modes:
        print(f"\n### The modes side by side (the busiest rank; {_wire_note(rank)})\n")
        print(tabulate(modes, headers=collectives.EP_MODE_HEADERS, tablefmt="github", disable_numparse=True))
    return entries


def _gather(rank: distributed.Rank, mine: dict) -> list[dict]:
    import torch.distributed as dist

    everyone = [None] * rank.world
    dist.all_gather_object(everyone, mine)
    return everyone


# --- allreduce ----------------------------------------------------------------------------------------------


def run_allreduce(rank: distributed.Rank, args) -> list[dict]:
    sizes = args.sizes or (all_reduce.CPU_SIZES if rank.device.type == "cpu" else all_reduce.SIZES)
    found, skipped = collectives.time_all_reduce(rank, sizes, reps=args.reps, warmup=args.warmup)
    if rank.rank != 0:
        return []
    rows, entries = [], []
    for result in found:
        figures = result.figures(rank.world)
        rows.append(
            [
                result.impl,
                result.size,
                figures["latency_us"],
                figures["algbw_gbps"],
                figures["busbw_gbps"],
                "yes" if result.verified else "WRONG",
            ]
        )
        info = {
            "kernel": "all_reduce",
            "impl": result.impl,
            "shape": f"{result.size} B",
            "bytes": result.size,
            "world_size": rank.world,
            "mean_rank_s": result.mean_rank_ms * 1e-3,
            "verified": result.verified,
            **figures,
            **_clock(rank.device),
        }
        timing = Timing.from_samples(result.samples_ms)
        entries.append(
            results.entry(f"all_reduce[{result.impl} {result.size} B]", "all_reduce", timing, info)
        )
    headers = ["impl", "bytes", "latency us", "algbw GB/s", "busbw GB/s", "verified"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    for impl, reason in skipped.items():
        print(f"skipped {impl}: {reason}")
    return entries


def checks(rank: distributed.Rank) -> list[str]:
    """EP against its reference (every scenario, both modes, bad input) and the all-reduce's sums."""
    return collectives.ep_check(rank) + collectives.all_reduce_check(rank)


def run_check(rank: distributed.Rank, args) -> list[dict]:
    lines = checks(rank)
    everyone = _gather(rank, lines)
    if rank.rank == 0:
        for rank_lines in everyone:
            print("\n".join(rank_lines))
        print(f"\nep: every check passed on {rank.world} ranks ({rank.backend})")
    return []


CASES = {"ep": run_ep, "allreduce": run_allreduce, "check": run_check}


def check_args(args, world: int) -> None:
    """What parsing could not judge alone, checked before any rank starts: the backend against this
    machine, and (ep) a model whose experts divide over ``world`` ranks."""
    if args.backend == "nccl" and not _has_cuda():
        raise UsageError("--backend nccl: no CUDA device here; use --backend gloo")
    if args.case == "ep" and not ep.shapes(world, (1,), args.models, args.loads, args.modes):
        raise UsageError(
            f"--models: none of {', '.join(args.models)} has experts dividing over {world} ranks"
        )


def register(sub) -> None:
    parser = sub.add_parser(
        "dist", help="multi-rank benchmarks (--nproc, or under torchrun): EP dispatch/combine, all-reduce"
    )
    parser.add_argument("case", choices=("ep", "allreduce", "check"))
    parser.add_argument("--nproc", type=positive_int, help="start this many ranks here, on loopback only")
    parser.add_argument("--backend", choices=("nccl", "gloo"), help="default: nccl with CUDA, else gloo")
    parser.add_argument(
        "--tokens",
        type=positive_ints,
        help="ep: tokens per rank, comma-separated (default: 1..4096; CPU 1,8)",
    )
    parser.add_argument(
        "--models",
        type=names_from(MOE_MODELS),
        default=",".join(ep.MODELS),
        help="ep: MoE presets, comma-separated",
    )
    parser.add_argument(
        "--loads",
        type=names_from(ep.LOADS),
        default=",".join(ep.LOADS),
        help="ep: routing loads (uniform, zipf)",
    )
    parser.add_argument(
        "--modes", type=names_from(ep.MODES), default=",".join(ep.MODES), help="ep: " + ", ".join(ep.MODES)
    )
    parser.add_argument(
        "--sizes", type=positive_ints, help="allreduce: bytes, comma-separated (default 8 KB .. 64 MB)"
    )
    parser.add_argument(
        "--reps", type=positive_int, default=None, help="timed calls per point (default 20; CPU 2)"
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=None, help="untimed calls first (default 5; CPU 1)"
    )
    parser.add_argument(
        "--timeout", type=positive_number(MAX_SECONDS), default=120.0, help="process-group timeout, seconds"
    )
    parser.add_argument(
        "--out", type=output_file, help="rank 0 writes the results (the suite's JSON schema) here"
    )
    parser.set_defaults(func=main)


def main(args) -> int:
    if distributed.under_torchrun():
        check_args(args, int(os.environ.get("WORLD_SIZE", "1")))
        rank = distributed.init_from_env(args.backend, timeout_s=args.timeout)
        try:
            run_rank(rank, args)
        finally:
            rank.close()
        return 0
    if not args.nproc:
        raise UsageError(
            "run it under torchrun (torchrun --nproc-per-node N -m bench dist ...) or "
            "give --nproc N to have it started"
        )
    check_args(args, args.nproc)
    backend = args.backend or ("nccl" if _has_cuda() else "gloo")
    if backend == "nccl" and args.nproc > _cuda_devices():
        raise UsageError(
            f"--nproc {args.nproc}: NCCL puts a rank on each GPU, and this host has {_cuda_devices()}"
        )
    # The ranks on this host, started here with every socket on 127.0.0.1 (torchrun's stores listen on
    # every interface, whatever address they are given); each rank runs what a torchrun rank would.
    settings = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})
    outcomes = distributed.spawn(
        run_rank,
        args.nproc,
        args=(settings,),
        backend=backend,
        timeout_s=args.timeout,
        deadline_s=24 * 3600.0,
    )
    failed = [o for o in outcomes if o.error or o.exitcode != 0]
    for outcome in failed:
        print(f"rank {outcome.rank}: {outcome.error or f'exit code {outcome.exitcode}'}", file=sys.stderr)
    return 1 if failed else 0


def run_rank(rank: distributed.Rank, args) -> None:
    """One rank's part of ``decodebench dist CASE``: the case, then (rank 0) the tables and the JSON."""
    cpu = rank.device.type == "cpu"
    args.reps = args.reps or (2 if cpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    if rank.rank == 0:
        print(
            f"{args.case}: {rank.world} ranks, {rank.backend} on {rank.device.type}; {_wire_note(rank)}",
            flush=True,
        )
    entries = CASES[args.case](rank, args)
    if rank.rank == 0 and args.out and entries:
        path = results.write(Path(args.out), entries, _machine(rank))
        print(f"\nwritten: {path}", flush=True)
    # A wrong result fails the run (gpu-check's dist step reads the exit code), after every collective.
    wrong = [e["name"] for e in entries or () if e["extra_info"].get("verified") is False]
    if wrong:
        raise RuntimeError(f"{args.case}: wrong result at {', '.join(wrong)}")
