"""decodebench's command line (also ``python -m bench`` from the repo root).

decodebench run [--kernel NAME] [--graph] [--out FILE]
    GPU: time each kernel and its reference at default shapes; table of time, GB/s, % of the copy
    bandwidth measured in the same run, speedup. No GPU: verify every kernel against its reference in
    the interpreter, then the static, traffic and projection reports.
decodebench report FILE...          tables from saved results (decodebench or pytest-benchmark JSON)
decodebench static [--json FILE]    registers, spills, shared memory, access widths at sm_90 and sm_80
decodebench traffic                 bytes moved under the interpreter against each byte model
decodebench gpu-check --out DIR     on a lent GPU: tests, benchmark sweep, static report, all under DIR
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.cases import CASES
from bench.device import PROJECTION_GBPS, copy_bandwidth_gbps, machine_info


def _table(rows, headers) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github", floatfmt="g", disable_numparse=True)


def _cases(names):
    if not names:
        return list(CASES.values())
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"--kernel: unknown {', '.join(unknown)}; known: {', '.join(CASES)}")
    return [CASES[n] for n in names]


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.3g}"


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


# --- reports ------------------------------------------------------------------------------------------------


def verification_table(cases) -> tuple[str, bool]:
    from bench.runner import verify

    device = "cuda" if machine_info().gpu != "cpu" else "cpu"
    rows, all_ok = [], True
    for case in cases:
        for shape in case.small_shapes():
            v = verify(case, shape, device)
            all_ok &= v.ok
            rows.append(
                [
                    v.kernel,
                    v.shape,
                    "verified" if v.ok else "FAILED",
                    f"{v.max_error:.3g}",
                    f"{v.seconds:.2f}",
                    v.message[:120],
                ]
            )
    headers = ["kernel", "shape", "vs reference", "max abs error", "seconds", "detail"]
    return _table(rows, headers), all_ok


def static_rows(cases, real: bool = False):
    from bench.static import static_report

    return [row for case in cases for row in static_report(case, real=real)]


def static_table(rows) -> str:
    def widths(w):
        return " ".join(f"{k}B x{v}" for k, v in w.items()) or "-"

    table = []
    for r in rows:
        if r.error:
            table.append([r.kernel, r.shape, r.arch, r.num_warps, "-", "-", "-", "-", "-", f"n/a: {r.error}"])
            continue
        table.append(
            [
                r.kernel,
                r.shape,
                r.arch,
                r.num_warps,
                r.registers,
                r.spill_bytes,
                r.shared_bytes,
                r.widest_load,
                r.widest_store,
                f"loads {widths(r.load_widths)}; stores {widths(r.store_widths)}",
            ]
        )
    headers = [
        "kernel",
        "shape",
        "arch",
        "warps",
        "registers",
        "spill B",
        "shared B",
        "widest load B",
        "widest store B",
        "global accesses by width",
    ]
    return _table(table, headers)


def traffic_table(cases) -> tuple[str, bool]:
    from bench.runner import TRAFFIC_LIMIT, traffic

    rows, all_ok = [], True
    for case in cases:
        for shape in case.small_shapes() + list(case.static_shapes()):
            t = traffic(case, shape)
            all_ok &= t.ok
            rows.append(
                [
                    t.kernel,
                    t.shape,
                    t.loaded,
                    t.stored,
                    t.model,
                    f"{t.ratio:.3f}",
                    f"{t.unique / t.model:.3f}",
                    "ok" if t.ok else f"over {TRAFFIC_LIMIT}",
                ]
            )
    headers = ["kernel", "shape", "loaded B", "stored B", "model B", "ratio", "unique/model", "check"]
    return _table(rows, headers), all_ok


def projection_table(cases) -> str:
    from bench.runner import projection

    rows = []
    for case in cases:
        for shape in case.default_shapes():
            p = projection(case, shape)
            rows.append(
                [p["kernel"], p["shape"], _bytes(p["bytes"]), *(_us(p[gpu]) for gpu in PROJECTION_GBPS)]
            )
    headers = [
        "kernel",
        "shape",
        "bytes (model)",
        *(f"{gpu} us at {gbps / 1000:.1f} TB/s" for gpu, gbps in PROJECTION_GBPS.items()),
    ]
    return _table(rows, headers)


def results_table(benchmarks: list[dict]) -> str:
    """One row per kernel entry; a reference entry of the same shape gives the speedup column."""
    reference = {
        (b["extra_info"].get("kernel"), b["extra_info"].get("shape")): b["stats"]["median"]
        for b in benchmarks
        if b.get("extra_info", {}).get("impl") == "reference"
    }
    rows = []
    for b in benchmarks:
        info, stats = b.get("extra_info", {}), b["stats"]
        if info.get("impl") == "reference":
            continue
        ref = reference.get((info.get("kernel"), info.get("shape")))
        p20, p80 = info.get("p20_s"), info.get("p80_s")
        spread = f"{_us(p20)}-{_us(p80)}" if p20 is not None and p80 is not None else "-"
        rows.append(
            [
                info.get("kernel", b["name"]),
                info.get("shape", b.get("param") or ""),
                ("graph " if info.get("cuda_graph") else "") + _us(stats["median"]),
                spread,
                info.get("gbps", "-"),
                info.get("pct_of_peak", "-"),
                f"{ref / stats['median']:.2f}x" if ref else "-",
                {True: "verified", False: "FAILED"}.get(info.get("verified"), "-"),
            ]
        )
    headers = ["kernel", "shape", "median us", "p20-p80 us", "GB/s", "% of copy peak", "speedup", "checked"]
    return _table(rows, headers)


# --- commands -----------------------------------------------------------------------------------------------


def cmd_run(args) -> int:
    cases = _cases(args.kernel)
    info = machine_info()
    if info.gpu == "cpu":
        return _run_without_gpu(cases)
    from bench import results
    from bench.runner import measure

    print(f"{info.gpu} ({info.capability}, {info.sm_count} SMs), torch {info.torch}, triton {info.triton}")
    print(f"copy bandwidth measured now: {copy_bandwidth_gbps():.0f} GB/s (read + write)\n")
    entries = []
    for case in cases:
        for shape in case.default_shapes():
            entries += measure(case, shape, cuda_graph=args.graph)
    print(results_table(entries))
    if args.out:
        path = results.write(Path(args.out), entries, {"copy_gbps": copy_bandwidth_gbps()})
        print(f"\nwritten: {path}")
    failed = [e["name"] for e in entries if e["extra_info"].get("verified") is False]
    if failed:
        print(f"\nFAILED against the reference: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _run_without_gpu(cases) -> int:
    start = time.perf_counter()
    print("No CUDA device: kernels run in Triton's interpreter; no timings. Verification, static and traffic")
    print("reports, and projections from each byte model.\n")
    verified, verified_ok = verification_table(cases)
    print("## Verified against the reference (interpreter, small odd shapes)\n")
    print(verified)
    print(
        "\n## Static: compiled here for sm_90 and sm_80 (no GPU), the launch configurations benchmarks use\n"
    )
    print(static_table(static_rows(cases)))
    traffic, traffic_ok = traffic_table(cases)
    print("\n## Traffic: bytes loaded + stored under the interpreter against the byte model\n")
    print(traffic)
    print("\n## Projections, not measurements: modelled bytes / copy bandwidth measured on the lent GPUs\n")
    print(projection_table(cases))
    print("\n(A launch costs a few microseconds more; small decode steps are bound by that, not by bytes.)")
    print(f"\n{time.perf_counter() - start:.1f} s")
    if not verified_ok:
        print("\nFAILED: a kernel disagrees with its reference", file=sys.stderr)
    if not traffic_ok:
        print("\nFAILED: a kernel moves more than its byte model allows", file=sys.stderr)
    return 0 if verified_ok and traffic_ok else 1


def cmd_report(args) -> int:
    from bench import results

    for path in args.files:
        document = results.load(Path(path))
        machine = document.get("machine_info", {})
        gpu = machine.get("gpu") or machine.get("node", "?")
        print(
            f"## {path}: {gpu}, torch {machine.get('torch', '?')}, triton {machine.get('triton', '?')}, "
            f"{document.get('datetime', '')}\n"
        )
        print(results_table(document["benchmarks"]))
        print()
    return 0


def cmd_static(args) -> int:
    rows = static_rows(_cases(args.kernel))
    print(static_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in rows], indent=1))
    return 0


def cmd_traffic(args) -> int:
    table, ok = traffic_table(_cases(args.kernel))
    print(table)
    return 0 if ok else 1


def _step(name: str, out: Path, command: list[str], timeout: float) -> str:
    """Runs one gpu-check step as a subprocess, its output to out/<name>.txt; returns a one-line status."""
    start = time.perf_counter()
    log = out / f"{name}.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
    }
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        log.write_text(done.stdout + done.stderr)
        status = f"exit {done.returncode}"
    except subprocess.TimeoutExpired as expired:
        log.write_text(f"{expired.stdout or ''}{expired.stderr or ''}\nTIMED OUT after {timeout:.0f} s\n")
        status = f"timed out after {timeout:.0f} s"
    tail = log.read_text().strip().splitlines()[-1:] or [""]
    return f"{name}: {status} in {time.perf_counter() - start:.0f} s ({tail[0][:150]})"


def cmd_gpu_check(args) -> int:
    info = machine_info()
    if info.gpu == "cpu":
        print("gpu-check needs a CUDA device; on this machine use `decodebench run`", file=sys.stderr)
        return 2
    from bench import results
    from bench.runner import measure

    stamp = time.strftime("%Y-%m-%d-%H%M", time.gmtime())
    out = Path(args.out) if args.out else results.results_dir_for(info.slug) / stamp
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    left = lambda: max(10.0, deadline - time.monotonic())  # noqa: E731
    summary = [f"# gpu-check: {info.gpu}", "", f"- machine: {json.dumps(info.as_dict())}"]
    peak = copy_bandwidth_gbps()
    summary.append(f"- copy bandwidth measured: {peak:.0f} GB/s (read + write)")
    (out / "machine.json").write_text(json.dumps({**info.as_dict(), "copy_gbps": peak}, indent=1))

    py = sys.executable
    steps = [
        _step(
            "tests",
            out,
            [py, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", f"--junitxml={out / 'tests.xml'}"],
            timeout=min(240, left() * 0.4),
        )
    ]

    rows = static_rows(list(CASES.values()), real=True)
    (out / "static.json").write_text(json.dumps([r.as_dict() for r in rows], indent=1))
    static = static_table(rows)

    entries = []
    for case in CASES.values():
        for shape in case.default_shapes():
            entries += measure(case, shape)
            entries += measure(case, shape, cuda_graph=True, with_reference=False)
    results.write(out / "run.json", entries, {"copy_gbps": peak})
    run = results_table(entries)

    steps.append(
        _step(
            "bench-sweep",
            out,
            [
                py,
                "-m",
                "pytest",
                "bench",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--benchmark-json={out / 'benchmarks.json'}",
            ],
            timeout=max(30, left() - 20),
        )
    )
    summary += [
        "",
        "## Steps",
        "",
        *(f"- {s}" for s in steps),
        "",
        "## Default shapes (run.json)",
        "",
        run,
        "",
        "## Static, from the compile of a real launch",
        "",
        static,
        "",
    ]
    (out / "summary.md").write_text("\n".join(summary))
    print("\n".join(summary))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="decodebench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="benchmark (GPU) or verify and report (no GPU)")
    run.add_argument("--kernel", action="append", help="limit to this kernel (repeatable)")
    run.add_argument("--graph", action="store_true", help="time CUDA-graph replays of the kernels")
    run.add_argument("--out", help="write the results (pytest-benchmark JSON) to this file")
    run.set_defaults(func=cmd_run)

    report = sub.add_parser("report", help="tables from saved result files")
    report.add_argument("files", nargs="+")
    report.set_defaults(func=cmd_report)

    static = sub.add_parser("static", help="AOT-compile for sm_90/sm_80: registers, spills, access widths")
    static.add_argument("--kernel", action="append")
    static.add_argument("--json", help="also write the rows as JSON")
    static.set_defaults(func=cmd_static)

    traffic = sub.add_parser("traffic", help="bytes moved under the interpreter vs the byte model")
    traffic.add_argument("--kernel", action="append")
    traffic.set_defaults(func=cmd_traffic)

    check = sub.add_parser(
        "gpu-check", help="tests, sweep and static report on a GPU, all written to one folder"
    )
    check.add_argument(
        "--out", help="folder for everything it writes (default bench/results/<gpu>/<UTC time>)"
    )
    check.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget (default 7 minutes)")
    check.set_defaults(func=cmd_gpu_check)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
