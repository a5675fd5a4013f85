"""decodebench's command line (the `decodebench` console script and ``python -m bench``, both through
bench/__main__.py, which prepares the process for the kernels first).

Each command is a module of this package that registers its own parser (``register(sub)``, setting
``func``) and does its work by calling bench.measure, bench.operators and bench.serving; this module only
assembles them and turns bad input into one line on stderr and exit status 2. ``decodebench --help`` lists
the commands; README's "More commands" table says what each does.
"""

import sys

from bench.commands import (
    advise,
    capacity,
    compare,
    dist,
    gpu_check,
    profile,
    proxies,
    report,
    run,
    static,
    step,
    traffic,
    tune,
    validate,
)
from bench.commands.arguments import Parser, UsageError
from bench.measure.results import ResultFileError

#: In the order `decodebench --help` lists them.
COMMANDS = (
    run,
    report,
    static,
    traffic,
    capacity,
    profile,
    compare,
    proxies,
    gpu_check,
    tune,
    step,
    advise,
    validate,
    dist,
)


def build_parser() -> Parser:
    """Every command's parser; each argument's type rejects nonsense while parsing (bench/commands/
    arguments.py)."""
    parser = Parser(prog="decodebench", description="Decode-side Triton kernels, measured and explained.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv=None) -> int:
    """Runs one command. Bad input, whether argparse finds it or a command's own checks do (UsageError, an
    unreadable or malformed file), is one line on stderr and exit status 2, before any work starts."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ResultFileError) as error:
        print(f"decodebench {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
