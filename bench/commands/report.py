"""`decodebench report`: tables (and, with --plot, pictures) from saved result files of either writer
(`decodebench run --out`, pytest-benchmark's JSON)."""

from pathlib import Path

from bench.commands.arguments import output_folder
from bench.measure import plots, reports, results


def register(sub) -> None:
    parser = sub.add_parser("report", help="tables from saved result files")
    parser.add_argument("files", nargs="+")
    parser.add_argument(
        "--plot",
        type=output_folder,
        help="also write a roofline and decode GB/s-by-context PNGs to this folder",
    )
    parser.set_defaults(func=main)


def main(args) -> int:
    documents = [results.load(Path(path)) for path in args.files]  # every file checked before any output
    for path, document in zip(args.files, documents):
        machine = document.get("machine_info", {})
        gpu = machine.get("gpu") or machine.get("node", "?")
        print(
            f"## {path}: {gpu}, torch {machine.get('torch', '?')}, triton {machine.get('triton', '?')}, "
            f"{document.get('datetime', '')}\n"
        )
        print(reports.results_table(document["benchmarks"]))
        print()
        if args.plot:
            folder = Path(args.plot)
            folder.mkdir(parents=True, exist_ok=True)
            stem = Path(path).stem
            print(plots.roofline(document, folder / f"{stem}-roofline.png"))
            print(plots.decode_bandwidth(document, folder / f"{stem}-decode-gbps.png"))
    return 0
