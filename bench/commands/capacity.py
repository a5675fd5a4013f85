"""`decodebench capacity`: how much of a GPU's KV memory holds token states under each allocation policy,
on reasoning loads, and what replicating DeepSeek-R1's MLA latent on every TP rank costs (no GPU)."""

from bench.commands.arguments import (
    MAX_ARRIVAL_RATE,
    MAX_GPU_GIB,
    UsageError,
    output_file,
    positive_int,
    positive_number,
    ready_to_write,
)
from bench.serving import capacity
from bench.serving.models import MODEL_SPECS, MODELS
from bench.serving.workloads import WORKLOADS


def register(sub) -> None:
    parser = sub.add_parser("capacity", help="KV memory holding tokens under each allocation policy (no GPU)")
    parser.add_argument("--workload", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--model", choices=list(MODELS), default="Llama-3.1-8B")
    parser.add_argument(
        "--gpu-gib",
        type=positive_number(MAX_GPU_GIB),
        default=capacity.DEFAULT_GPU_GIB,
        help=f"GPU memory for both tables (default: an H200's {capacity.DEFAULT_GPU_GIB:.1f}, as its driver "
        "reports it)",
    )
    parser.add_argument("--tp", type=positive_int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--arrival-rate",
        type=positive_number(MAX_ARRIVAL_RATE),
        help="questions arriving per 16 decoded tokens (Poisson); default: always a queue (saturated)",
    )
    parser.add_argument("--plot", type=output_file, help="also write the shares as a PNG (plot extra)")
    parser.set_defaults(func=main)


def main(args) -> int:
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
    print(capacity.replication_report(capacity.latent_replication(gpu_gib=args.gpu_gib)))
    if args.plot:
        print(capacity.plot(rows, ready_to_write(args.plot)))
    return 0
