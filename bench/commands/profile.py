"""`decodebench profile`: one default shape of a kernel under Nsight Compute, Nsight Systems or
torch.profiler, measured time (and DRAM bytes) beside the byte model; and the two targets other commands run
under a tool (`profile-target` under nsys or ncu, `sanitize-target` under compute-sanitizer)."""

from pathlib import Path

from bench.commands.arguments import (
    add_out_folder,
    default_shape,
    kernels_named,
    non_negative_int,
    positive_int,
)
from bench.measure import profile, runner
from bench.measure.device import machine_info
from bench.operators import CASES


def register(sub) -> None:
    parser = sub.add_parser("profile", help="one benchmark shape under ncu, nsys or torch.profiler")
    parser.add_argument("case", help="a kernel (" + ", ".join(CASES) + "), or all")
    parser.add_argument(
        "--shape",
        type=non_negative_int,
        default=0,
        help="index into the case's default shapes (all: capped)",
    )
    parser.add_argument("--tool", choices=("torch", "nsys", "ncu"), default="torch")
    parser.add_argument("--calls", type=positive_int, default=10)
    add_out_folder(parser, "folder for the reports and the summary", default="profiles/out")
    parser.set_defaults(func=main)

    target = sub.add_parser("profile-target", help="(run by profile under nsys or ncu)")
    target.add_argument("case")
    target.add_argument("--shape", type=non_negative_int, default=0)
    target.add_argument("--calls", type=positive_int, default=10)
    target.set_defaults(func=profile_target)

    sanitize = sub.add_parser("sanitize-target", help="(run by gpu-check under compute-sanitizer)")
    sanitize.add_argument("case")
    sanitize.set_defaults(func=sanitize_target)


def main(args) -> int:
    cases = list(CASES.values()) if args.case == "all" else kernels_named([args.case])
    indices = [
        min(args.shape, len(case.default_shapes()) - 1) if args.case == "all" else args.shape
        for case in cases
    ]
    shapes = [default_shape(case, index) for case, index in zip(cases, indices)]  # checked before any run
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


def profile_target(args) -> int:
    (case,) = kernels_named([args.case])
    profile.target(case, default_shape(case, args.shape), args.calls)
    return 0


def sanitize_target(args) -> int:
    """One small shape of a case, verified: what compute-sanitizer watches (gpu-check's sanitizer step)."""
    (case,) = kernels_named([args.case])
    device = "cpu" if machine_info().gpu == "cpu" else "cuda"
    checked = runner.verify(case, case.small_shapes()[0], device)
    print(f"{case.name} {checked.shape}: {'verified' if checked.ok else 'FAILED ' + checked.message}")
    return 0 if checked.ok else 1
