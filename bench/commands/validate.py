"""`decodebench validate`: the decode-step model against NVIDIA's measured H200 kernel tables and published
end-to-end runs (bench/serving/validate.py), its error per stage kind, per step and per run.

    decodebench validate [--extract] [--json FILE] [--plot PNG] [--gpu RESULTS] [--write-extract FILE]

The tables are read through AIConfigurator's package when it is installed (pip install
'decodebench[validate]'), from the committed extract of the same rows otherwise (--extract forces it).
"""

import json

from tabulate import tabulate

from bench.commands.arguments import UsageError, checked, output_file, ready_to_write
from bench.serving import measured
from bench.serving import validate as validation

#: The targets issue 18 set: (median low, median high, worst low, worst high).
KIND_TARGET = (0.8, 1.25, 0.5, 2.0)
TOTAL_TARGET = (0.85, 1.15, 0.67, 1.5)
RUN_TARGET = (0.8, 1.25)


def _verdict(row: dict) -> str:
    low, high, worst_low, worst_high = TOTAL_TARGET if row["kind"] == "step total" else KIND_TARGET
    median_ok = low <= row["median"] <= high
    worst_ok = worst_low <= row["worst"] <= worst_high
    return "yes" if median_ok and worst_ok else ("median only" if median_ok else "no")


def print_result(result: dict) -> None:
    print(f"The step model ({result['hardware']}) against {result['tables']}: ratio ours / measured.\n")
    rows = [
        [
            r["kind"],
            r["points"],
            f"{r['median']:.2f}",
            f"{r['worst']:.2f}",
            f"{r['low']:.2f}-{r['high']:.2f}",
            r["worst_at"],
            _verdict(r),
        ]
        for r in result["kinds"]
    ]
    headers = ["stage kind", "points", "median", "worst", "range", "worst at", "in target"]
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    print(
        f"\ntargets: each kind median {KIND_TARGET[0]}-{KIND_TARGET[1]}, "
        f"worst {KIND_TARGET[2]}-{KIND_TARGET[3]};"
        f" step total (the measured kinds) median {TOTAL_TARGET[0]}-{TOTAL_TARGET[1]}, worst "
        f"{TOTAL_TARGET[2]}-{TOTAL_TARGET[3]}\n"
    )
    runs = [
        [
            r["run"],
            r["engine"],
            f"{r['published_tokens_per_s']:,.0f}",
            f"{r['ours_tokens_per_s']:,.0f}",
            f"{r['ratio']:.2f}",
            "yes" if RUN_TARGET[0] <= r["ratio"] <= RUN_TARGET[1] else "no",
        ]
        for r in result["published"]
    ]
    headers = ["published run (output tokens/s)", "engine", "published", "projected", "ratio", "in target"]
    print(tabulate(runs, headers=headers, tablefmt="github", disable_numparse=True))
    print(
        f"\nruns' sources: {validation.PUBLISHED.name} (a source per row); "
        f"target {RUN_TARGET[0]}-{RUN_TARGET[1]}"
    )


def cmd_validate(args) -> int:
    from bench.commands.advise import hardware_of, interconnect_of

    hw, link = hardware_of(args.gpu), interconnect_of(args.interconnect)
    if args.write_extract and measured.load_tables().source.startswith("extract"):
        raise UsageError(
            "--write-extract: needs AIConfigurator installed (pip install 'decodebench[validate]')"
        )
    tables = checked(measured.load_tables, prefer_package=not args.extract)
    try:
        result = validation.validate(tables, hw=hw, link=link)
    except measured.MissingShape as error:
        raise UsageError(f"{error} (the extract holds the default grid's rows only)") from None
    print_result(result)
    if args.json:
        ready_to_write(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"written: {args.json}")
    if args.plot:
        print(validation.plot(result, ready_to_write(args.plot)))
    if args.write_extract:
        ready_to_write(args.write_extract).write_text(tables.extract_text())
        print(f"written: {args.write_extract}")
    return 0


def add_parsers(sub) -> None:
    parser = sub.add_parser(
        "validate", help="the step model against NVIDIA's measured H200 kernel tables and published runs"
    )
    parser.add_argument(
        "--extract", action="store_true", help="the committed extract even when AIConfigurator is installed"
    )
    parser.add_argument("--json", type=output_file, help="write every ratio here")
    parser.add_argument(
        "--plot", type=output_file, help="a scatter of projected against measured (plot extra)"
    )
    parser.add_argument(
        "--gpu", default="h200", help="h200, or a gpu-check result folder whose ceilings to use"
    )
    parser.add_argument("--interconnect", default="nvlink", help="nvlink, or a `dist allreduce --out` file")
    parser.add_argument(
        "--write-extract", type=output_file, help="write the table rows the grid read (with AIConfigurator)"
    )
    parser.set_defaults(func=cmd_validate)
