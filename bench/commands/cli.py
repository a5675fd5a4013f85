"""decodebench's command line (also ``python -m bench`` from the repo root).

decodebench run [--kernel NAME] [--no-graph] [--out FILE]
    GPU: verify, then time each kernel (graph and eager), reference and peers at default shapes; time,
    GB/s, % of the copy bandwidth measured in the same run, speedups. No GPU: verify every kernel against
    its reference in the interpreter, then the static, traffic and projection reports.
decodebench report FILE...          tables from saved results (decodebench or pytest-benchmark JSON)
decodebench static [--json FILE]    registers, spills, shared memory, access widths at sm_90 and sm_80
decodebench traffic                 bytes moved under the interpreter against each byte model
decodebench profile CASE --tool torch|nsys|ncu   one shape under a profiler, DRAM bytes beside the model
decodebench compare BASE NEW [--fail median:10%]   timing deltas, non-zero exit past the threshold
decodebench proxies [--update]      registers, spills, widths, traffic against the committed baseline
decodebench capacity [--plot PNG]   KV memory holding tokens per allocation policy, reasoning loads
decodebench gpu-check [--out DIR] [--budget S] [--only STEP,...] [--dry-run]
                                    on a lent GPU, within a budget: ceilings, default shapes, static,
                                    ncu, tune, sanitizer, tests, sweep; --dry-run proves it on a CPU
decodebench tune [CASE...] [--dry-run] [--out DIR] [--budget S] [--install]
    GPU: time candidate launch configurations per kernel and shape key; write DIR/tuned-configs.json.
    --dry-run (no GPU): the candidates with their sm_90 static figures, spilling ones dropped.
    --install: merge DIR/tuned-configs.json into kernels/configs/<gpu>.json (a human's step).
"""

import json
import sys
from pathlib import Path

from bench.commands import gpu_check, report
from bench.commands.arguments import (
    Parser,
    UsageError,
    checked,
    names_from,
    non_negative_int,
    output_file,
    output_folder,
    positive_int,
    positive_ints,
    positive_number,
    ready_to_write,
)
from bench.measure.device import machine_info
from bench.measure.results import ResultFileError
from bench.operators import CASES, STATIC_ONLY, static_cases

# Upper bounds past which a number is nonsense and would break the work, not just slow it: no GPU holds
# 10 TiB; numpy's Poisson draw fails far below inf; timeouts and budgets become timedelta and select()
# arguments, which overflow (1e6 s is eleven days).
MAX_GPU_GIB = 1e4
MAX_ARRIVAL_RATE = 1e6
MAX_SECONDS = 1e6


def _cases(names):
    if not names:
        return list(CASES.values())
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise UsageError(f"unknown kernel {', '.join(unknown)}; known: {', '.join(CASES)}")
    return [CASES[n] for n in names]


def _static_cases(names):
    """Cases and static-only kernels (EP's regroup) by name, all of them without names."""
    if not names:
        return static_cases()
    unknown = [n for n in names if n not in STATIC_ONLY and n not in CASES]
    if unknown:
        known = [*CASES, *STATIC_ONLY]
        raise UsageError(f"unknown kernel {', '.join(unknown)}; known: {', '.join(known)}")
    return [STATIC_ONLY[n] if n in STATIC_ONLY else CASES[n] for n in names]


def cmd_run(args) -> int:
    from bench.commands import run

    cases = _cases(args.kernel)
    if machine_info().gpu == "cpu":
        return run.run_cpu(cases, () if args.kernel else list(STATIC_ONLY.values()))
    return run.run_gpu(cases, graph=not args.no_graph, out=args.out)


def cmd_report(args) -> int:
    from bench.measure import results

    documents = [results.load(Path(path)) for path in args.files]  # every file checked before any output
    for path, document in zip(args.files, documents):
        machine = document.get("machine_info", {})
        gpu = machine.get("gpu") or machine.get("node", "?")
        print(
            f"## {path}: {gpu}, torch {machine.get('torch', '?')}, triton {machine.get('triton', '?')}, "
            f"{document.get('datetime', '')}\n"
        )
        print(report.results_table(document["benchmarks"]))
        print()
        if args.plot:
            from bench.commands import plots

            folder = Path(args.plot)
            folder.mkdir(parents=True, exist_ok=True)
            stem = Path(path).stem
            print(plots.roofline(document, folder / f"{stem}-roofline.png"))
            print(plots.decode_bandwidth(document, folder / f"{stem}-decode-gbps.png"))
    return 0


def cmd_static(args) -> int:
    from bench.measure.runner import static_rows

    rows = static_rows(_static_cases(args.kernel))
    print(report.static_table(rows))
    if args.json:
        ready_to_write(args.json).write_text(json.dumps([r.as_dict() for r in rows], indent=1))
    return 0


def cmd_traffic(args) -> int:
    from bench.measure.runner import traffic_rows

    text, ok = report.traffic_table(traffic_rows(_cases(args.kernel)))
    print(text)
    return 0 if ok else 1


def cmd_capacity(args) -> int:
    from bench.serving import capacity
    from bench.serving.models import MODEL_SPECS, MODELS

    for tp in args.tp:
        problem = MODEL_SPECS[args.model].tensor_parallel_problem(tp)
        if problem:
            raise UsageError(problem)
    if not any(capacity.kv_pool_tokens(MODELS[args.model], args.gpu_gib, tp) for tp in args.tp):
        raise UsageError(
            f"--gpu-gib: {args.gpu_gib:g} GiB holds no KV cache beside {args.model}'s weights at TP "
            f"{', '.join(map(str, args.tp))}"
        )
    rows = []
    for workload in args.workload:
        rows += capacity.capacity_table(
            workload, args.model, args.gpu_gib, tuple(args.tp), arrival_rate=args.arrival_rate
        )
    print(capacity.report(rows, args.gpu_gib))
    print()
    print(capacity.replication_report(capacity.latent_replication()))
    if args.plot:
        print(capacity.plot(rows, ready_to_write(args.plot)))
    return 0


def cmd_compare(args) -> int:
    from bench.commands import compare

    threshold = checked(compare.Threshold.parse, args.fail)
    deltas, only_base, only_new = compare.compare(Path(args.base), Path(args.new), threshold)
    print(compare.table(deltas, threshold.stat))
    for label, keys in (("only in BASE", only_base), ("only in NEW", only_new)):
        if keys:
            print(f"\n{label}: " + "; ".join(compare.label(k) for k in keys))
    failed = [d for d in deltas if d.failed]
    if failed:
        print(f"\nFAILED: {len(failed)} of {len(deltas)} entries past {args.fail}", file=sys.stderr)
    return 1 if failed else 0


def cmd_proxies(args) -> int:
    from bench.measure import proxies

    current = proxies.collect(_static_cases(args.kernel))
    if args.update:
        print(f"baseline written: {proxies.save(current)}")
        return 0
    problems = proxies.check(current, proxies.load())
    for problem in problems:
        print(f"REGRESSION {problem}")
    print(
        f"{len(current['static'])} launches and {len(current['traffic'])} traffic shapes checked against "
        f"{proxies.BASELINE.name}: {len(problems)} regressions"
    )
    return 1 if problems else 0


def cmd_tune(args) -> int:
    from bench.commands import tune

    if args.install:
        return tune.install(args.out)
    return tune.run(_cases(args.cases), args.out, args.dry_run, args.budget)


def _shape_of(case, index: int):
    shapes = list(case.default_shapes())
    if not 0 <= index < len(shapes):
        raise UsageError(f"--shape: expected 0 to {len(shapes) - 1} (the case's default shapes), got {index}")
    return shapes[index]


def cmd_profile(args) -> int:
    from bench.measure import profile

    cases = list(CASES.values()) if args.case == "all" else _cases([args.case])
    indices = [
        min(args.shape, len(case.default_shapes()) - 1) if args.case == "all" else args.shape
        for case in cases
    ]
    shapes = [_shape_of(case, index) for case, index in zip(cases, indices)]  # checked before anything runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for case, index, shape in zip(cases, indices, shapes):
        note = ""
        if args.tool == "torch":
            profiles, note = profile.profile_torch(case, shape, args.calls)
        elif args.tool == "nsys":
            profiles = profile.profile_nsys(case.name, index, args.calls, out)
        else:
            profiles = profile.profile_ncu(case.name, index, args.calls, out)
        text = profile.summary(case, shape, profiles, args.calls, note)
        print(text + "\n")
        (out / f"{case.name}-{index}-{args.tool}.md").write_text(text + "\n")
    return 0


def cmd_sanitize_target(args) -> int:
    """One small shape of a case, verified: what compute-sanitizer watches (gpu-check's sanitizer step)."""
    from bench.measure.runner import verify

    (case,) = _cases([args.case])
    device = "cpu" if machine_info().gpu == "cpu" else "cuda"
    checked = verify(case, case.small_shapes()[0], device)
    print(f"{case.name} {checked.shape}: {'verified' if checked.ok else 'FAILED ' + checked.message}")
    return 0 if checked.ok else 1


def cmd_profile_target(args) -> int:
    from bench.measure import profile

    (case,) = _cases([args.case])
    profile.target(case, _shape_of(case, args.shape), args.calls)
    return 0


def dist_models() -> tuple[str, ...]:
    from bench.operators.ep import MODELS

    return MODELS


def cmd_dist(args, argv: list[str]) -> int:
    from bench.commands import dist

    return dist.main(args, argv)


def _add_result_commands(sub) -> None:
    run = sub.add_parser("run", help="benchmark (GPU) or verify and report (no GPU)")
    run.add_argument("--kernel", action="append", help="limit to this kernel (repeatable)")
    run.add_argument(
        "--no-graph",
        action="store_true",
        help="time eager calls only (default: CUDA-graph replay beside eager)",
    )
    run.add_argument("--out", type=output_file, help="write the results (pytest-benchmark JSON) to this file")
    run.set_defaults(func=cmd_run)

    report = sub.add_parser("report", help="tables from saved result files")
    report.add_argument("files", nargs="+")
    report.add_argument(
        "--plot",
        type=output_folder,
        help="also write a roofline and decode GB/s-by-context PNGs to this folder",
    )
    report.set_defaults(func=cmd_report)

    static = sub.add_parser("static", help="AOT-compile for sm_90/sm_80: registers, spills, access widths")
    static.add_argument("--kernel", action="append")
    static.add_argument("--json", type=output_file, help="also write the rows as JSON")
    static.set_defaults(func=cmd_static)

    traffic = sub.add_parser("traffic", help="bytes moved under the interpreter vs the byte model")
    traffic.add_argument("--kernel", action="append")
    traffic.set_defaults(func=cmd_traffic)

    from bench.serving.models import MODELS
    from bench.serving.workloads import WORKLOADS

    capacity = sub.add_parser(
        "capacity", help="KV memory holding tokens under each allocation policy (no GPU)"
    )
    capacity.add_argument("--workload", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    capacity.add_argument("--model", choices=list(MODELS), default="Llama-3.1-8B")
    capacity.add_argument(
        "--gpu-gib",
        type=positive_number(MAX_GPU_GIB),
        default=80.0,
        help="GPU memory (default: an H100's 80)",
    )
    capacity.add_argument("--tp", type=positive_int, nargs="+", default=[1, 2, 4, 8])
    capacity.add_argument(
        "--arrival-rate",
        type=positive_number(MAX_ARRIVAL_RATE),
        help="questions arriving per 16 decoded tokens (Poisson); default: always a queue (saturated)",
    )
    capacity.add_argument("--plot", type=output_file, help="also write the shares as a PNG (plot extra)")
    capacity.set_defaults(func=cmd_capacity)


def _add_profile_commands(sub) -> None:
    prof = sub.add_parser("profile", help="one benchmark shape under ncu, nsys or torch.profiler")
    prof.add_argument("case", help="a kernel (" + ", ".join(CASES) + "), or all")
    prof.add_argument(
        "--shape",
        type=non_negative_int,
        default=0,
        help="index into the case's default shapes (all: capped)",
    )
    prof.add_argument("--tool", choices=("torch", "nsys", "ncu"), default="torch")
    prof.add_argument("--calls", type=positive_int, default=10)
    prof.add_argument(
        "--out", type=output_folder, default="profiles/out", help="folder for the reports and the summary"
    )
    prof.set_defaults(func=cmd_profile)

    target = sub.add_parser("profile-target", help="(run by profile under nsys or ncu)")
    target.add_argument("case")
    target.add_argument("--shape", type=non_negative_int, default=0)
    target.add_argument("--calls", type=positive_int, default=10)
    target.set_defaults(func=cmd_profile_target)

    sanitize = sub.add_parser("sanitize-target", help="(run by gpu-check under compute-sanitizer)")
    sanitize.add_argument("case")
    sanitize.set_defaults(func=cmd_sanitize_target)

    compare = sub.add_parser("compare", help="timings of two result files, failing past a threshold")
    compare.add_argument("base")
    compare.add_argument("new")
    compare.add_argument("--fail", default="median:10%", help="STAT:LIMIT, e.g. median:10%% or min:5us")
    compare.set_defaults(func=cmd_compare)

    proxies = sub.add_parser("proxies", help="check (or --update) the committed CPU-side proxy baseline")
    proxies.add_argument("--kernel", action="append")
    proxies.add_argument("--update", action="store_true", help="write the current proxies as the baseline")
    proxies.set_defaults(func=cmd_proxies)


def _add_gpu_commands(sub) -> None:
    check = sub.add_parser(
        "gpu-check", help="everything a lent GPU should measure, in order, within a budget, to one folder"
    )
    check.add_argument(
        "--out",
        type=output_folder,
        help="folder for everything it writes (default bench/results/<gpu>/<UTC time>)",
    )
    check.add_argument(
        "--budget",
        "--budget-s",
        type=positive_number(MAX_SECONDS),
        default=420.0,
        help="wall-clock budget in seconds (default 420)",
    )
    check.add_argument(
        "--only", type=names_from(gpu_check.STEPS), help="comma-separated steps: " + ",".join(gpu_check.STEPS)
    )
    check.add_argument(
        "--dry-run",
        action="store_true",
        help="every step on this CPU (interpreter, smallest shapes, wall clock)",
    )
    check.set_defaults(func=cmd_gpu_check)

    tune = sub.add_parser("tune", help="launch configurations chosen by timing candidates (per-GPU table)")
    tune.add_argument("cases", nargs="*", help="kernels to tune (default: every tunable one)")
    tune.add_argument(
        "--dry-run", action="store_true", help="no timing: candidates, sm_90 static figures, spills dropped"
    )
    tune.add_argument(
        "--out",
        type=output_folder,
        help="folder for tune.md, tune-timings.json, tuned-configs.json "
        "(default bench/results/<gpu>/tune-<UTC time>; a temporary folder for --dry-run)",
    )
    tune.add_argument(
        "--budget",
        type=positive_number(MAX_SECONDS),
        help="wall-clock seconds; stops cleanly between candidates",
    )
    tune.add_argument(
        "--install",
        action="store_true",
        help="merge --out DIR's tuned-configs.json into kernels/configs/<gpu>.json (no tuning)",
    )
    tune.set_defaults(func=cmd_tune)


def cmd_gpu_check(args) -> int:
    only = ",".join(args.only) if args.only else None
    return gpu_check.run(args.out, args.budget, only, args.dry_run)


def _add_dist(sub, argv) -> None:
    from bench.operators.ep import LOADS
    from bench.serving.models import MOE_MODELS
    from kernels.ep import MODES

    multi = sub.add_parser(
        "dist", help="multi-rank benchmarks under torchrun: EP dispatch/combine, all-reduce"
    )
    multi.add_argument("case", choices=("ep", "allreduce", "check"))
    multi.add_argument("--nproc", type=positive_int, help="start torchrun with this many ranks on this host")
    multi.add_argument("--backend", choices=("nccl", "gloo"), help="default: nccl with CUDA, else gloo")
    multi.add_argument(
        "--tokens",
        type=positive_ints,
        help="ep: tokens per rank, comma-separated (default: 1..4096; CPU 1,8)",
    )
    multi.add_argument(
        "--models",
        type=names_from(MOE_MODELS),
        default=",".join(dist_models()),
        help="ep: MoE presets, comma-separated",
    )
    multi.add_argument(
        "--loads", type=names_from(LOADS), default=",".join(LOADS), help="ep: routing loads (uniform, zipf)"
    )
    multi.add_argument("--modes", type=names_from(MODES), default=",".join(MODES), help="ep: exact, capacity")
    multi.add_argument(
        "--sizes", type=positive_ints, help="allreduce: bytes, comma-separated (default 8 KB .. 64 MB)"
    )
    multi.add_argument(
        "--reps", type=positive_int, default=None, help="timed calls per point (default 20; CPU 2)"
    )
    multi.add_argument(
        "--warmup", type=non_negative_int, default=None, help="untimed calls first (default 5; CPU 1)"
    )
    multi.add_argument(
        "--timeout", type=positive_number(MAX_SECONDS), default=120.0, help="process-group timeout, seconds"
    )
    multi.add_argument(
        "--out", type=output_file, help="rank 0 writes the results (the suite's JSON schema) here"
    )
    multi.set_defaults(func=lambda args: cmd_dist(args, sys.argv[2:] if argv is None else argv[1:]))


def build_parser(argv=None) -> Parser:
    """Every command's parser; each argument's type rejects nonsense while parsing (bench/commands/
    arguments.py). ``argv``: what ``dist`` hands on to the ranks it starts."""
    parser = Parser(prog="decodebench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_result_commands(sub)
    _add_profile_commands(sub)
    _add_gpu_commands(sub)

    from bench.commands import advise as advise_command
    from bench.commands import validate as validate_command

    advise_command.add_parsers(sub)
    validate_command.add_parsers(sub)
    _add_dist(sub, argv)
    return parser


def main(argv=None) -> int:
    """Runs one command. Bad input, whether argparse finds it or a command's own checks do (UsageError, an
    unreadable or malformed file), is one line on stderr and exit status 2, before any work starts."""
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ResultFileError) as error:
        print(f"decodebench {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
