"""`decodebench gpu-check`: everything a lent GPU should measure in one go, written to one folder.

Steps, each kept apart so that one failing leaves the others' results: the test suite on the GPU
(subprocess), the static report of the real compile, the default shapes timed with and without CUDA graphs
(kernel, reference and peers; verified first), pytest-benchmark over the default shapes (subprocess: its
JSON and GPU clock), Nsight Compute summaries of every kernel where ncu exists, and the full sweep in
process, written after every shape so that whatever the budget allows is kept. Budget: 7 minutes by
default, inside the 8 a lent GPU gives one command.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from bench.cases import CASES
from bench.commands import report
from bench.measure import results
from bench.measure.device import copy_bandwidth_gbps, machine_info, matmul_tflops

# Peers cheap enough to set up at every sweep shape.
SWEEP_PEERS = ("sdpa-contiguous", "flashinfer")


def _subprocess_step(name: str, out: Path, command: list[str], timeout: float) -> tuple[str, bool]:
    """Runs one step as a subprocess, its output to out/<name>.txt."""
    log = out / f"{name}.txt"
    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": path}
        )
    except subprocess.TimeoutExpired as expired:
        log.write_text(f"{expired.stdout or ''}{expired.stderr or ''}\nTIMED OUT after {timeout:.0f} s\n")
        return f"timed out after {timeout:.0f} s", False
    log.write_text(done.stdout + done.stderr)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    return f"exit {done.returncode}: {last[:160]}", done.returncode == 0


def _in_process_step(name: str, out: Path, work) -> tuple[str, bool]:
    """Runs ``work()`` (which returns (status, ok)); a crash is logged to out/<name>-error.txt, not raised."""
    try:
        return work()
    except Exception:
        (out / f"{name}-error.txt").write_text(traceback.format_exc())
        return f"crashed: see {name}-error.txt", False


def run(out: str | None, budget_s: float = 420.0) -> int:
    info = machine_info()
    if info.gpu == "cpu":
        print("gpu-check needs a CUDA device; on this machine use `decodebench run`", file=sys.stderr)
        return 2
    from bench.measure.runner import measure

    stamp = time.strftime("%Y-%m-%d-%H%M", time.gmtime())
    folder = Path(out) if out else results.results_dir_for(info.slug) / stamp
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    peak = copy_bandwidth_gbps()
    ceilings = {"copy_gbps": peak, "matmul_tflops": matmul_tflops()}
    (folder / "machine.json").write_text(json.dumps({**info.as_dict(), **ceilings}, indent=1))
    py = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    steps, sections = {}, []

    def timed(name, step):
        start = time.monotonic()
        status, ok = step()
        steps[name] = (f"{status} ({time.monotonic() - start:.0f} s)", ok)
        print(f"{name}: {steps[name][0]}", flush=True)

    # The GPU-only tests first (CUDA graphs, sync checks, timing: what no CPU run covers), then the whole
    # suite compiled, time-boxed: every new launch configuration compiles, so it may not finish.
    timed(
        "tests-gpu-only",
        lambda: _subprocess_step(
            "tests-gpu-only",
            folder,
            [*py, "tests", "-m", "gpu", f"--junitxml={folder / 'tests-gpu.xml'}"],
            timeout=min(120.0, 0.2 * budget_s),
        ),
    )
    timed(
        "tests",
        lambda: _subprocess_step(
            "tests",
            folder,
            [*py, "tests", f"--junitxml={folder / 'tests.xml'}"],
            timeout=min(240.0, 0.35 * budget_s),
        ),
    )

    def static():
        rows = report.static_rows(list(CASES.values()), real=True)
        (folder / "static.json").write_text(json.dumps([r.as_dict() for r in rows], indent=1))
        sections.append(("Static, from the compile of a real launch", report.static_table(rows)))
        spills = sum(1 for r in rows if r.spill_bytes)
        return f"{len(rows)} launches, {spills} with spills", spills == 0

    timed("static", lambda: _in_process_step("static", folder, static))

    def default_shapes():
        entries = []
        for case in CASES.values():
            for shape in case.default_shapes():
                entries += measure(case, shape)
                entries += measure(case, shape, cuda_graph=True, with_reference=False)
        results.write(folder / "run.json", entries, ceilings)
        sections.append(("Default shapes (run.json)", report.results_table(entries)))
        failed = [e["name"] for e in entries if e["extra_info"].get("verified") is False]
        return f"{len(entries)} timings, {len(failed)} failed verification", not failed

    timed("default-shapes", lambda: _in_process_step("default-shapes", folder, default_shapes))

    timed(
        "pytest-benchmark",
        lambda: _subprocess_step(
            "pytest-benchmark",
            folder,
            [*py, "bench", "--sweep", "default", f"--benchmark-json={folder / 'benchmarks.json'}"],
            timeout=max(30.0, min(150.0, deadline - time.monotonic() - 60)),
        ),
    )

    def nsight():
        """ncu summaries of every kernel (measured DRAM bytes beside each byte model), where ncu exists."""
        if not shutil.which("ncu"):
            return "ncu not on PATH: no Nsight Compute summaries", True
        return _subprocess_step(
            "ncu",
            folder,
            [
                sys.executable,
                "-m",
                "bench",
                "profile",
                "all",
                "--tool",
                "ncu",
                "--shape",
                "1",
                "--calls",
                "3",
                "--out",
                str(folder / "profiles"),
            ],
            timeout=max(30.0, min(150.0, deadline - time.monotonic() - 90)),
        )

    timed("ncu", nsight)

    def sweep():
        """Every case's full sweep, in process, written after each shape; shapes left when the budget runs
        out are counted, not silently dropped. Peers that compile per shape (FlexAttention) are timed at the
        default shapes only."""
        entries, done, left = [], 0, 0
        for case in CASES.values():
            for shape in case.sweep():
                if deadline - time.monotonic() < 20:
                    left += 1
                    continue
                entries += measure(case, shape, peers=SWEEP_PEERS)
                done += 1
                results.write(folder / "sweep.json", entries, ceilings)
        if entries:
            sections.append(("Sweep (sweep.json)", report.results_table(entries)))
        failed = [e["name"] for e in entries if e["extra_info"].get("verified") is False]
        return f"{done} shapes measured, {left} left for lack of time, {len(failed)} failed verification", (
            not failed
        )

    timed("sweep", lambda: _in_process_step("sweep", folder, sweep))

    summary = [
        f"# gpu-check on {info.gpu}",
        "",
        f"- {info.capability}, {info.sm_count} SMs, {info.memory_gib} GiB, driver {info.driver}, "
        f"CUDA {info.cuda}, torch {info.torch}, triton {info.triton}, {stamp} UTC",
        f"- copy bandwidth measured: {peak:.0f} GB/s (read + write); bf16 matmul: "
        f"{ceilings['matmul_tflops']:.0f} TFLOP/s",
        "",
        "## Steps",
        "",
        *(f"- {name}: {'ok' if ok else 'FAILED'}, {status}" for name, (status, ok) in steps.items()),
    ]
    for title, text in sections:
        summary += ["", f"## {title}", "", text]
    (folder / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    print(f"\nwritten: {folder}")
    return 0 if all(ok for _, ok in steps.values()) else 1
