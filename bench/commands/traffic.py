"""`decodebench traffic`: bytes each kernel loads and stores in Triton's interpreter, held against its byte
model."""

from bench.commands.arguments import kernels_named
from bench.measure import reports, runner


def register(sub) -> None:
    parser = sub.add_parser("traffic", help="bytes moved under the interpreter vs the byte model")
    parser.add_argument("--kernel", action="append")
    parser.set_defaults(func=main)


def main(args) -> int:
    text, ok = reports.traffic_table(runner.traffic_rows(kernels_named(args.kernel)))
    print(text)
    return 0 if ok else 1
