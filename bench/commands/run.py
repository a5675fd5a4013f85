"""`decodebench run`: on a GPU, every kernel timed at its default shapes (verified first, CUDA-graph replay
beside eager, reference and peers); without one, verification in the interpreter and the CPU-side reports.
Two paths, one function each: nothing in the CPU path pretends to be a measurement."""

import sys
import time
import traceback
from pathlib import Path

from bench.commands.arguments import kernels_named, output_file
from bench.measure import reports, results, runner, static
from bench.measure.device import copy_bandwidth_gbps, machine_info
from bench.operators import STATIC_ONLY


def register(sub) -> None:
    parser = sub.add_parser("run", help="benchmark (GPU) or verify and report (no GPU)")
    parser.add_argument("--kernel", action="append", help="limit to this kernel (repeatable)")
    parser.add_argument(
        "--no-graph",
        action="store_true",
        help="time eager calls only (default: CUDA-graph replay beside eager)",
    )
    parser.add_argument(
        "--out", type=output_file, help="write the results (pytest-benchmark JSON) to this file"
    )
    parser.set_defaults(func=main)


def main(args) -> int:
    cases = kernels_named(args.kernel)
    if machine_info().gpu == "cpu":
        return run_cpu(cases, () if args.kernel else list(STATIC_ONLY.values()))
    return run_gpu(cases, graph=not args.no_graph, out=args.out)


def failures(entries: list[dict]) -> list[str]:
    """Names of entries that disagreed with the reference, and of peers that failed, each peer once per case
    and shape (the kernel's graph and eager entries carry the same peer record)."""
    bad = []
    for e in entries:
        info = e["extra_info"]
        if info.get("verified") is False:
            bad.append(e["name"])
        at = f"{info.get('kernel', e['name'])} {info.get('shape', '')}".strip()
        bad += [f"{peer} ({at})" for peer in info.get("peers_failed") or {}]
    return list(dict.fromkeys(bad))


def measure_or_log(case, shape, errors: Path | None, **measure_kw) -> list[dict] | None:
    """runner.measure for one shape; where it raises, the traceback goes to ``errors`` (appended; stderr
    without one) and None comes back, so that the shapes after it still run: one bad shape must not cost the
    rest of a run, nor a lease."""
    try:
        return runner.measure(case, shape, **measure_kw)
    except Exception:
        report = f"## {case.name} {shape.label}\n{traceback.format_exc()}\n"
        if errors is None:
            print(report, file=sys.stderr)
        else:
            with open(errors, "a") as log:
                log.write(report)
        return None


def run_gpu(cases, graph: bool = True, out: str | None = None) -> int:
    """Every default shape, each in its own try (measure_or_log); with ``out`` the results are written
    after every shape, what raised to <out stem>-errors.txt beside them."""
    info = machine_info()
    print(f"{info.gpu} ({info.capability}, {info.sm_count} SMs), torch {info.torch}, triton {info.triton}")
    copy_gbps = copy_bandwidth_gbps()
    print(f"copy bandwidth measured now: {copy_gbps:.0f} GB/s (read + write)\n")
    errors = Path(out).with_name(f"{Path(out).stem}-errors.txt") if out else None
    if out:  # this run's results and tracebacks only: an old file must not pass for this run's
        Path(out).unlink(missing_ok=True)
        errors.unlink(missing_ok=True)
    entries, crashed = [], []
    for case in cases:
        for shape in case.default_shapes():
            measured = measure_or_log(case, shape, errors, graph=graph)
            if measured is None:
                crashed.append(f"{case.name} {shape.label} (raised)")
                continue
            entries += measured
            if out:
                results.write(Path(out), entries, {"copy_gbps": copy_gbps})
    print(reports.results_table(entries))
    if out and entries:
        print(f"\nwritten: {out}" + (f"; what raised: {errors}" if crashed else ""))
    elif out:
        print(f"\nnothing written to {out}: every shape raised (see {errors})")
    failed = crashed + failures(entries)
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def run_cpu(cases, static_only=()) -> int:
    """``static_only``: kernels with a static report but no single-process case (EP's regroup)."""
    start = time.perf_counter()
    print("No CUDA device: kernels run in Triton's interpreter; no timings. Verification, static and traffic")
    print("reports, and projections from each byte model.\n")
    static.start_compiles(
        [case.name for case in [*cases, *static_only]]
    )  # on the cores the interpreter leaves idle
    verified, verified_ok = reports.verification_table(runner.verify_all(cases, "cpu"))
    print("## Verified against the reference (interpreter, small odd shapes)\n")
    print(verified)
    print(
        "\n## Static: compiled here for sm_90 and sm_80 (no GPU), the launch configurations benchmarks use\n"
    )
    print(reports.static_table(runner.static_rows([*cases, *static_only])))
    traffic, traffic_ok = reports.traffic_table(runner.traffic_rows(cases))
    print("\n## Traffic: bytes loaded + stored under the interpreter against the byte model\n")
    print(traffic)
    print(
        "\n## Projections, not measurements: modelled bytes / each GPU's published copy bandwidth "
        "(anchors: docs/facts.md#gpu-anchors-published-not-measured-here)\n"
    )
    print(reports.projection_table(runner.projections(cases)))
    print("\n(A launch costs a few microseconds more; small decode steps are bound by that, not by bytes.)")
    ranks_ok = _across_ranks()
    print(f"\n{time.perf_counter() - start:.1f} s")
    if not verified_ok:
        print("\nFAILED: a kernel disagrees with its reference", file=sys.stderr)
    if not traffic_ok:
        print("\nFAILED: a kernel moves more than its byte model allows", file=sys.stderr)
    if not ranks_ok:
        print("\nFAILED: a multi-rank check failed (above)", file=sys.stderr)
    return 0 if verified_ok and traffic_ok and ranks_ok else 1


def _across_ranks(world: int = 2) -> bool:
    """The multi-rank path on this machine: ``world`` gloo processes on 127.0.0.1 run EP dispatch/combine
    against its reference (both modes, bad input on every rank) and the all-reduce. Per-stage times and
    bytes: ``decodebench dist --nproc 2 ep``."""
    from bench.commands.dist import checks
    from bench.measure.distributed import spawn

    print(f"\n## Across ranks: {world} gloo processes on 127.0.0.1 (EP against its reference, all-reduce)\n")
    outcomes = spawn(checks, world)
    for outcome in outcomes:
        if outcome.error:
            print(f"rank {outcome.rank}: FAILED: {outcome.error}")
        else:
            print(f"rank {outcome.rank}: {len(outcome.result)} checks passed")
    if outcomes and outcomes[0].result:
        print("\n".join(f"  {line}" for line in outcomes[0].result))
    return all(o.error is None and o.exitcode == 0 for o in outcomes)
