"""`decodebench static`: the AOT compile for sm_90/sm_80 of every kernel's launches (registers, spills,
shared memory, access widths), no GPU needed."""

import json

from bench.commands.arguments import output_file, ready_to_write, static_kernels_named
from bench.measure import reports, runner


def register(sub) -> None:
    parser = sub.add_parser("static", help="AOT-compile for sm_90/sm_80: registers, spills, access widths")
    parser.add_argument("--kernel", action="append")
    parser.add_argument("--json", type=output_file, help="also write the rows as JSON")
    parser.set_defaults(func=main)


def main(args) -> int:
    rows = runner.static_rows(static_kernels_named(args.kernel))
    print(reports.static_table(rows))
    if args.json:
        ready_to_write(args.json).write_text(json.dumps([r.as_dict() for r in rows], indent=1))
    return 0
