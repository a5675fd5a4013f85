"""`decodebench proxies`: registers, spills, access widths and traffic ratios against the committed CPU-side
baseline (bench/baselines/cpu-proxies.json), or ``--update`` to write it."""

from bench.commands.arguments import static_kernels_named
from bench.measure import proxies


def register(sub) -> None:
    parser = sub.add_parser("proxies", help="check (or --update) the committed CPU-side proxy baseline")
    parser.add_argument("--kernel", action="append")
    parser.add_argument("--update", action="store_true", help="write the current proxies as the baseline")
    parser.set_defaults(func=main)


def main(args) -> int:
    current = proxies.collect(static_kernels_named(args.kernel))
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
