"""`decodebench validate`: the decode-step model against NVIDIA's measured H200 (or H100) kernel tables and
published end-to-end runs (bench/serving/validate.py), its error per stage kind, per step and per run.

    decodebench validate [--extract] [--system h200_sxm|h100_sxm] [--json FILE] [--plot PNG]
                         [--gpu h100|h200|RESULTS] [--interconnect ...] [--write-extract FILE]

The tables are read here: through AIConfigurator's package when it is installed (pip install
'decodebench[validate]'; pandas reads its parquet files), from the committed extract of the same rows for
each system otherwise (--extract forces it). The published runs are bench/serving/data/published_runs.csv.
"""

import csv
import json
from pathlib import Path

from bench.commands.arguments import UsageError, output_file, ready_to_write
from bench.format import table
from bench.measure import plots
from bench.serving import measured
from bench.serving import validate as validation

DATA = Path(validation.__file__).parent / "data"
#: The committed extracts (`--write-extract`): the rows the default grid reads, one file a system.
EXTRACTS = {system: DATA / f"aiconfigurator_{system.split('_')[0]}.json" for system in measured.SYSTEMS}
PUBLISHED = DATA / "published_runs.csv"

#: The targets issue 18 set: (median low, median high, worst low, worst high).
KIND_TARGET = (0.8, 1.25, 0.5, 2.0)
TOTAL_TARGET = (0.85, 1.15, 0.67, 1.5)
RUN_TARGET = (0.8, 1.25)
#: How a kind is projected where its measured rows timed more than serving runs (README, "Validation").
KIND_NOTES = {
    "mla": "projected as the table's benchmark ran vLLM 0.24's module: its RMS norms and rope as PyTorch's "
    f"native eager chains ({validation.NATIVE_EXTRA_KERNELS} kernels more a layer than serving; collected "
    "before AIConfigurator's c56db49f), "
    "no cache write; step and advise project serving's kernels",
}


# -- reading the sources -------------------------------------------------------------------------------------


def _package_folder(system: str = measured.SYSTEM) -> Path | None:
    """AIConfigurator's data folder for ``system``, when its package is installed."""
    try:
        import aiconfigurator_core  # the optional extra: decodebench[validate]
    except ImportError:
        return None
    return Path(aiconfigurator_core.__file__).parent / "systems" / "data" / system


def _read_parquet(path: Path, spec: measured.TableSpec) -> dict:
    """One table as {key tuple: ms}: its rows kept by ``spec.where``, the fastest kernel per key."""
    import pandas as pd  # a dependency of aiconfigurator, there whenever it is

    frame = pd.read_parquet(path)
    for column, value in spec.where.items():
        frame = frame[frame[column] == value]
    keys = list(spec.exact + spec.axes)
    frame = frame.groupby(keys, as_index=False)[spec.latency].min()
    return {
        tuple(_plain(v) for v in row[:-1]): float(row[-1]) * spec.to_ms
        for row in frame[keys + [spec.latency]].itertuples(index=False)
    }


def _plain(value):
    if isinstance(value, str):
        return value
    return int(value) if float(value).is_integer() else float(value)


def load_tables(use_package: bool = True, system: str = measured.SYSTEM) -> measured.Tables:
    """The installed package's tables for ``system``, or its committed extract's."""
    folder = _package_folder(system) if use_package else None
    if folder is None:
        extract = EXTRACTS[system]
        return measured.tables_from_extract(json.loads(extract.read_text()), extract.name)
    from importlib.metadata import version

    rows = {name: _read_parquet(folder / spec.path, spec) for name, spec in measured.TABLES.items()}
    source = f"aiconfigurator-core {version('aiconfigurator-core')}, {system} (installed)"
    return measured.tables_from_rows(rows, source, system)


def load_published() -> list:
    with open(PUBLISHED, newline="") as handle:
        return validation.published_runs(csv.DictReader(handle))


def load_step_documents(folder: Path) -> list:
    """The ``step --json`` documents gpu-check's decode-step step wrote in a result folder."""
    documents = []
    for path in sorted(folder.glob("decode-step*.json")):
        try:
            document = json.loads(path.read_text())
            parts = document if isinstance(document, dict) else {}
            if not isinstance(parts.get("point"), dict) or not isinstance(parts.get("stages"), list):
                raise ValueError("expected a `step --json` document with a point and stages")
        except ValueError as error:  # JSONDecodeError included
            raise UsageError(f"--gpu: {path}: {error}") from None
        documents.append(document)
    return documents


def print_own_timings(folder: Path, result: dict) -> None:
    if not result["stages"]:
        print(f"\n{folder}: its decode-step documents hold no timed stage (written without a GPU)")
        return
    print(f"\nThe step model ({result['hardware']}) against this GPU's own stage timings ({folder}): ratio")
    print("ours / measured, each stage gpu-check's decode-step timed (CUDA-graph replay, L2 cleared).\n")
    print(table(_kind_rows(result["kinds"]), KIND_HEADERS))


# -- printing ------------------------------------------------------------------------------------------------


def _verdict(row: dict) -> str:
    total = row["kind"].startswith("step ")
    low, high, worst_low, worst_high = TOTAL_TARGET if total else KIND_TARGET
    median_ok = low <= row["median"] <= high
    worst_ok = worst_low <= row["worst"] <= worst_high
    return "yes" if median_ok and worst_ok else ("median only" if median_ok else "no")


def _kind_rows(kinds: list) -> list:
    return [
        [
            r["kind"],
            r["points"],
            f"{r['median']:.2f}",
            f"{r['worst']:.2f}",
            f"{r['low']:.2f}-{r['high']:.2f}",
            r["worst_at"],
            _verdict(r),
        ]
        for r in kinds
    ]


KIND_HEADERS = ["stage kind", "points", "median", "worst", "range", "worst at", "in target"]


def print_result(result: dict) -> None:
    print(f"The step model ({result['hardware']}) against {result['tables']}: ratio ours / measured.\n")
    print(table(_kind_rows(result["kinds"]), KIND_HEADERS))
    for row in result["kinds"]:
        if row["kind"] in KIND_NOTES:
            print(f"{row['kind']}: {KIND_NOTES[row['kind']]}")
    curves: dict = {}
    for r in result.get("moe_rate", []):
        pair = f"{r['rows']}: {r['anchor']:.0f} / {r['measured']:.0f}"
        curves.setdefault(tuple(r["curve"]), []).append(pair)
    for (dtype, hidden, inter), pairs in curves.items():
        print(
            f"moe_experts: {dtype} experts ({hidden}, {inter}) run at a rate by rows an expert taken from "
            "the GPU preset's TensorRT-LLM MoE table (EP8, balanced; not compared), rows: TFLOP/s anchor / "
            f"this system's rows: {', '.join(pairs)}"
        )
    print(
        f"\ntargets: each kind median {KIND_TARGET[0]}-{KIND_TARGET[1]}, worst {KIND_TARGET[2]}-"
        f"{KIND_TARGET[3]}; step total (over the measured kinds) median {TOTAL_TARGET[0]}-{TOTAL_TARGET[1]}, "
        f"worst {TOTAL_TARGET[2]}-{TOTAL_TARGET[3]}\n"
    )
    runs = [
        [
            r["run"],
            r["engine"],
            f"{r['admission']}: {r['batch']:,}",
            f"{r['published_tokens_per_s']:,.0f}",
            f"{r['ours_tokens_per_s']:,.0f}",
            f"{r['ratio']:.2f}",
            "yes" if RUN_TARGET[0] <= r["ratio"] <= RUN_TARGET[1] else "no",
        ]
        for r in result["published"]
    ]
    if not runs:
        print("published runs: H200's only (--system h200_sxm)")
        return
    headers = [
        "published run (output tokens/s)",
        "engine",
        "admission: sequences",
        "published",
        "projected",
        "ratio",
        "in target",
    ]
    print(table(runs, headers))
    print(f"\nruns' sources: {PUBLISHED.name}, a source a row; target {RUN_TARGET[0]}-{RUN_TARGET[1]}")


def cmd_validate(args) -> int:
    from bench.commands.model_inputs import hardware_of, interconnect_of

    hw = hardware_of(args.gpu or args.system.split("_")[0])
    link = interconnect_of(args.interconnect)
    if args.write_extract and (args.extract or _package_folder() is None):
        raise UsageError(
            "--write-extract: needs AIConfigurator installed (pip install 'decodebench[validate]')"
        )
    tables = load_tables(use_package=not args.extract, system=args.system)
    runs = load_published() if args.system == measured.SYSTEM else []  # the published runs are H200's
    try:
        result = validation.validate(tables, runs, hw=hw, link=link)
    except measured.MissingShape as error:
        raise UsageError(f"{error} (the extract holds the default grid's rows only)") from None
    print_result(result)
    folder = Path(args.gpu) if args.gpu and Path(args.gpu).is_dir() else None
    if folder is not None:
        documents = load_step_documents(folder)
        if documents:
            result["own_timings"] = validation.compare_own_timings(documents, hw, link)
            print_own_timings(folder, result["own_timings"])
        else:
            print(f"\n{folder}: no decode-step*.json (gpu-check's decode-step step writes them on a GPU)")
    if args.json:
        ready_to_write(args.json).write_text(json.dumps(result, indent=1))
        print(f"written: {args.json}")
    if args.plot:
        print(plots.validate_scatter(result, validation.COMPARED, ready_to_write(args.plot)))
    if args.write_extract:
        ready_to_write(args.write_extract).write_text(tables.extract_text())
        print(f"written: {args.write_extract}")
    return 0


def register(sub) -> None:
    parser = sub.add_parser(
        "validate", help="the step model against NVIDIA's measured H200/H100 kernel tables and published runs"
    )
    parser.add_argument(
        "--extract", action="store_true", help="the committed extract even when AIConfigurator is installed"
    )
    parser.add_argument("--json", type=output_file, help="write every ratio here")
    parser.add_argument(
        "--plot", type=output_file, help="a scatter of projected against measured (plot extra)"
    )
    parser.add_argument("--system", choices=measured.SYSTEMS, default=measured.SYSTEM, help="the tables' GPU")
    parser.add_argument("--gpu", help="h100, h200 (default: the system's), or a gpu-check result folder")
    parser.add_argument("--interconnect", default="nvlink", help="nvlink, or a `dist allreduce --out` file")
    parser.add_argument(
        "--write-extract", type=output_file, help="write the table rows the grid read (with AIConfigurator)"
    )
    parser.set_defaults(func=cmd_validate)
