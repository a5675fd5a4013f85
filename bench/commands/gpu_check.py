"""`decodebench gpu-check`: everything a lent GPU should measure, in the order that makes a short lease count.

A GPU is lent for minutes, machine start included, so the first thing measured must be the thing most worth
having, every result must be on disk as soon as it exists, and a step that crashes or overruns must leave
the others' results. The steps, in order:

1. ``machine``: GPU, versions, and the ceilings every figure is held against (copy bandwidth, bf16 matmul).
2. ``default-shapes``: every kernel at its default shapes, each verified once, then timed as a CUDA-graph
   replay and eagerly, beside its reference and its peers (run.json, written after every shape).
3. ``static``: the static report of the real compile (registers, spills, shared memory, access widths).
   ``dist``: EP dispatch/combine stage by stage (`dist --nproc`: NCCL ranks the suite spawns on loopback)
   on this machine's one GPU (world size 1: the GPU path and the CUDA graph measured, no wire; dist-ep.json).
   ``decode-step``: `decodebench step` for a dense and an MLA + MoE model: each stage one rank runs, timed
   and verified at its shape beside its projection (decode-step.txt; decode-step-<model>.json, which
   `decodebench validate --gpu FOLDER` compares stage by stage).
4. ``ncu``: Nsight Compute summaries (measured DRAM bytes beside each byte model), where ncu is on PATH.
5. ``tune``: candidate launch configurations timed and verified at the default shapes (a per-GPU table).
6. ``sanitizer``: compute-sanitizer memcheck over one small shape per kernel, racecheck where a kernel uses
   shared memory or atomics, where compute-sanitizer is on PATH (0 errors is the bar; logs kept).
7. ``tests-gpu-only``: the tests only a GPU can run (CUDA graphs, sync checks, timing).
8. ``sweep``: every case's benchmark sweep (sweep.json, written after every shape).
9. ``benchmarks``: the pytest-benchmark files at the default shapes (their JSON, with the GPU clock).
10. ``tests``: the rest of the suite, compiled, as far as the budget goes.

Every step runs under one deadline: a subprocess is ended at it with every process it started (dist's
ranks, a profiler's or compute-sanitizer's target), an in-process step checks it between shapes and stops
with what it has. A step still running HANG_GRACE_S past the deadline is taken for hung (a kernel that never
returns): summary.md says so and the process ends, so nothing writes after it. What a step left in the
caching allocator is given back to the GPU before the next. summary.md is rewritten after every step,
listing each step as ok, failed, partial (stopped by the deadline between shapes), timed out (a subprocess
killed at the deadline, or a hung step), skipped (with the reason), not reached or not selected
(``--only``). Only ``failed`` makes the exit non-zero. A profiler or compute-sanitizer the machine will
not let run (no counters for ncu, a device compute-sanitizer does not support: both seen under gVisor) makes
its step skipped, with the tool's own line as the reason: the machine, not the code, stopped it.

``--dry-run`` runs the same steps on a machine with no GPU (kernels in the interpreter, the smallest shapes,
the host's wall clock in place of CUDA events, the ceilings measured on the CPU) and writes the same files,
so the orchestration is proved where CI runs; nothing it writes is a GPU figure, and every file says so.
"""

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import child_env
from bench.commands.arguments import add_budget, add_out_folder, names_from
from bench.commands.model_inputs import preset_for
from bench.commands.run import failures, measure_or_log
from bench.measure import reports, results, runner
from bench.measure.device import copy_bandwidth_gbps, host_ceilings, machine_info, matmul_tflops
from bench.operators import CASES, static_cases

STEPS = (
    "machine",
    "default-shapes",
    "static",
    "dist",
    "decode-step",
    "ncu",
    "tune",
    "sanitizer",
    "tests-gpu-only",
    "sweep",
    "benchmarks",
    "tests",
)
# Peers cheap enough to set up at every sweep shape (FlexAttention compiles per shape: default shapes only).
SWEEP_PEERS = ("sdpa-contiguous", "flashinfer")
# A step is not started with less than this left: it could not finish anything worth keeping.
MIN_START_S = 3.0
# compute-sanitizer sees an overrun only past the end of an allocation: with torch's caching allocator a
# tensor sits inside a larger cached block, so each tensor gets an allocation of its own.
SANITIZED_ENV = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
# What an in-process step keeps in hand before it starts another shape.
SHAPE_RESERVE_S = 2.0
# A step still running this long past the deadline is taken for hung (_run_step's watchdog).
HANG_GRACE_S = 20.0
# A subprocess step at the deadline gets SIGTERM (dist's spawned ranks, in its process group, get it too; ncu
# stops its target), and this long to end before everything it started is killed.
TERM_GRACE_S = 5.0

# partial: an in-process step the deadline stopped between shapes (what it measured is kept); timed out: a
# subprocess killed at the deadline. Neither is a failure: the budget, not the code, ended them.
ENDED = ("ok", "failed", "partial", "timed out", "skipped")
# What ncu and compute-sanitizer print where the machine will not let them run at all, whatever the target:
# no hardware counters (ncu under gVisor, and where counters are restricted to admins: ERR_NVGPUCTRPERM) and
# a GPU compute-sanitizer refuses (under gVisor). A step that meets one is skipped, not failed.
TOOL_CANNOT_RUN = ("Failed to initialize the profiler", "ERR_NVGPUCTRPERM", "Device not supported")


@dataclass
class StepResult:
    state: str  # ok, failed, partial, timed out, skipped, not reached, not selected
    detail: str = ""
    seconds: float = 0.0


@dataclass
class CheckRun:
    """One gpu-check: its folder, its deadline, and what each step has left behind so far."""

    folder: Path
    deadline: float  # time.monotonic()
    dry_run: bool
    selected: tuple[str, ...]
    machine: dict = field(default_factory=dict)
    steps: dict[str, StepResult] = field(default_factory=dict)
    sections: dict[str, str] = field(default_factory=dict)  # step -> markdown shown in summary.md

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def out_of_time(self, reserve: float = SHAPE_RESERVE_S) -> bool:
        return self.left() < reserve

    def subprocess(self, name: str, command: list[str], **kw) -> StepResult:
        """Runs ``command`` to the deadline at most, its output to <folder>/<name>.txt (run_subprocess)."""
        return run_subprocess(name, self.folder, command, timeout=self.left(), **kw)

    def write_summary(self) -> None:
        m = self.machine
        title = "gpu-check dry run (CPU, wall clock: no GPU figure here)" if self.dry_run else "gpu-check"
        lines = [f"# {title} on {m.get('gpu', '?')}", ""]
        if m.get("gpu") == "cpu":
            lines.append(
                f"- no CUDA device: kernels in Triton's interpreter; torch {m.get('torch')}, triton "
                f"{m.get('triton')}, {m.get('started')} UTC"
            )
        elif m:
            lines.append(
                f"- {m.get('capability')}, {m.get('sm_count')} SMs, {m.get('memory_gib')} GiB, driver "
                f"{m.get('driver')}, CUDA {m.get('cuda')}, torch {m.get('torch')}, triton {m.get('triton')}, "
                f"{m.get('started')} UTC"
            )
        if "copy_gbps" in m:
            lines.append(
                f"- copy bandwidth measured: {m['copy_gbps']:.0f} GB/s (read + write); "
                f"{m['matmul_label']}: {m['matmul_tflops']:.3g} TFLOP/s ({m['clock']})"
            )
        lines += ["", "## Steps", ""]
        steps = dict(self.steps)  # the watchdog may write the summary while a step is running
        for name in STEPS:
            step = steps.get(name, StepResult("not reached"))
            seconds = f" ({step.seconds:.0f} s)" if step.state in ENDED else ""
            lines.append(f"- {name}: {step.state}{seconds}{': ' + step.detail if step.detail else ''}")
        for name, text in list(self.sections.items()):
            lines += ["", f"## {name}", "", text]
        results.write_text_atomic(self.folder / "summary.md", "\n".join(lines) + "\n")


def run_subprocess(
    name: str, folder: Path, command: list[str], timeout: float, env: dict | None = None, append: bool = False
) -> StepResult:
    """Runs one command (``env``: variables on top of child_env's), its output to folder/<name>.txt (added
    to it with ``append``). At ``timeout`` seconds the command and every process it started are ended (what
    they printed so far is kept); once it exits, whatever it left running in its process group is too."""
    log = folder / f"{name}.txt"
    timed_out = False
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # Files, not pipes: a descendant that outlived the kill cannot hold the step open on a pipe.
        child = subprocess.Popen(
            command, stdout=out, stderr=err, text=True, env=child_env(**(env or {})), start_new_session=True
        )
        try:
            child.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            end_process_tree(child)
        _signal_group(child.pid, signal.SIGKILL)  # what it left behind (a daemon, an orphaned worker)
        stdout, stderr = _read(out), _read(err)
    with open(log, "a" if append else "w") as file:
        file.write(stdout + stderr)
        if timed_out:
            file.write(f"\nKILLED at the deadline, after {timeout:.0f} s\n")
    if timed_out:
        return StepResult("timed out", f"killed at the deadline after {timeout:.0f} s; see {log.name}")
    last = (stdout.strip().splitlines() or [""])[-1]
    return StepResult("ok" if child.returncode == 0 else "failed", f"exit {child.returncode}: {last[:160]}")


def _read(file) -> str:
    file.seek(0)
    return file.read()


def end_process_tree(child: subprocess.Popen, grace_s: float = TERM_GRACE_S) -> None:
    """Ends ``child`` and every process below it, its process group and those that left it (a tool may start
    its workers in sessions of their own): SIGTERM first (dist's spawned ranks share its process group and
    get it too; a profiler stops its target), then SIGKILL to whatever is left after ``grace_s``. The
    processes below are held by pidfd from the moment they are listed: by the time of the SIGKILL, a number
    that had exited may name another process, a pidfd never does."""
    below = _hold(descendants(child.pid))
    try:
        _signal_group(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(child.pid, signal.SIGKILL)
        for pid, handle in below:  # found before the signals: once orphaned, they no longer name their parent
            _kill(pid, handle)
    finally:
        for _, handle in below:
            if handle is not None:
                os.close(handle)
    child.wait()


def _hold(pids: list[int]) -> list[tuple[int, int | None]]:
    """Each process with a pidfd on it, or None where pidfds are not to be had (not Linux 5.3+; a sandbox
    without the call): such a one is signalled by number, as before. One already gone is left out."""
    held = []
    for pid in pids:
        try:
            held.append((pid, os.pidfd_open(pid)))
        except ProcessLookupError:
            continue
        except (AttributeError, OSError):
            held.append((pid, None))
    return held


def _kill(pid: int, handle: int | None) -> None:
    try:
        if handle is None:
            os.kill(pid, signal.SIGKILL)
        else:
            signal.pidfd_send_signal(handle, signal.SIGKILL)
    except ProcessLookupError:
        pass


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc (none where /proc is not there)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # the child leads its own group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


# --- the steps, in order ------------------------------------------------------------------------------------


def step_machine(run: CheckRun) -> StepResult:
    if run.dry_run:
        ceilings = host_ceilings()
    else:
        ceilings = {
            "copy_gbps": copy_bandwidth_gbps(),
            "matmul_tflops": matmul_tflops(),
            "matmul_label": "bf16 8192^3 matmul",
            "clock": "CUDA events",
        }
    run.machine.update(ceilings)
    (run.folder / "machine.json").write_text(json.dumps(run.machine, indent=1))
    return StepResult(
        "ok", f"copy {ceilings['copy_gbps']:.0f} GB/s, matmul {ceilings['matmul_tflops']:.3g} TFLOP/s"
    )


def _measure_into(run: CheckRun, name: str, file: str, shapes_of: Callable, **measure_kw) -> StepResult:
    """Measures shape after shape into <folder>/<file>, written after each; stops at the deadline and says
    how many shapes were left. A shape that raises is logged to <file>-errors.txt and counted as a failure;
    the shapes after it still run (one bad shape must not cost the rest of a lease)."""
    entries, done, left, longest, crashed = [], 0, 0, 0.0, []
    for case in CASES.values():
        for shape in shapes_of(case):
            if run.out_of_time(max(SHAPE_RESERVE_S, longest)):  # the longest shape so far must still fit
                left += 1
                continue
            begin = time.monotonic()
            errors = run.folder / f"{Path(file).stem}-errors.txt"
            measured = measure_or_log(case, shape, errors, device=run.device, **measure_kw)
            if measured is None:
                crashed.append(f"{case.name} {shape.label}")
            else:
                entries += measured
            longest = max(longest, time.monotonic() - begin)
            done += 1
            results.write(run.folder / file, entries, run.machine)
    if entries:
        run.sections[f"{name} ({file})"] = reports.results_table(entries)
    failed = [f"{label} (raised)" for label in crashed] + failures(entries)
    detail = f"{done} shapes measured, {left} left for lack of time, {len(failed)} failures"
    if failed:
        detail += ": " + ", ".join(failed[:5])
    return StepResult("failed" if failed else ("partial" if left else "ok"), detail)


def step_default_shapes(run: CheckRun) -> StepResult:
    shapes = (lambda case: case.small_shapes()[:1]) if run.dry_run else (lambda case: case.default_shapes())
    return _measure_into(run, "Default shapes", "run.json", shapes, graph=True)


def step_static(run: CheckRun) -> StepResult:
    from bench.measure import static

    rows, left = [], []
    if run.dry_run:  # every case's AOT compile at once, a child per core; what the deadline cuts is left
        try:
            static.compile_in_children([case.name for case in static_cases()], timeout=run.left())
        except subprocess.TimeoutExpired:
            pass
    for case in static_cases():
        if run.out_of_time() or (run.dry_run and not static.compiled(case.name)):
            left.append(case.name)
            continue
        try:
            rows += runner.static_rows([case], real=not run.dry_run, timeout=run.left())
        except subprocess.TimeoutExpired:  # the compiling child killed at the deadline
            left.append(case.name)
            continue
        results.write_text_atomic(
            run.folder / "static.json", json.dumps([r.as_dict() for r in rows], indent=1)
        )
    source = "AOT compile here for sm_90/sm_80" if run.dry_run else "the compile of a real launch"
    run.sections[f"Static, from {source} (static.json)"] = reports.static_table(rows)
    spills = sorted({f"{r.kernel} {r.shape}" for r in rows if r.spill_bytes})
    detail = f"{len(rows)} launches, {len(spills)} with spills" + (
        f"; not reached: {', '.join(left)}" if left else ""
    )
    return StepResult("failed" if spills else ("partial" if left else "ok"), detail)


def step_dist(run: CheckRun) -> StepResult:
    """`dist --nproc` with one NCCL rank per GPU here (the lent machines have one), or 2 gloo ranks in a dry
    run."""
    import torch

    out = str(run.folder / "dist-ep.json")
    if run.dry_run:
        args = ["--nproc", "2", "ep", "--backend", "gloo", "--tokens", "1", "--models", "Qwen3-235B-A22B"]
        args += ["--loads", "uniform", "--reps", "1", "--warmup", "0"]
    else:
        args = ["--nproc", str(torch.cuda.device_count()), "ep", "--tokens", "1,64,4096", "--reps", "10"]
    return run.subprocess("dist", [sys.executable, "-m", "bench", "dist", *args, "--out", out])


def step_decode_step(run: CheckRun) -> StepResult:
    """Each model in a process of its own (one that fails leaves the other's figures), both logged to
    decode-step.txt, each stage's projection and measured time in decode-step-<model>.json."""
    models = [
        ["DeepSeek-R1-Distill-Llama-8B", "--batch", "64", "--context", "8192"],
        ["DeepSeek-R1", "--tp", "8", "--batch", "32", "--context", "4096"],
    ]
    # The folder's measured ceilings where the machine step wrote them; with --only decode-step, the anchors
    # of the card this is (step refuses a folder without machine.json).
    measured = (run.folder / "machine.json").is_file()
    gpu = str(run.folder) if measured else preset_for(machine_info().gpu)
    ended = []
    for index, args in enumerate(models):
        document = run.folder / f"decode-step-{args[0]}.json"  # what `validate --gpu FOLDER` compares
        command = [sys.executable, "-m", "bench", "step", *args, "--gpu", gpu, "--json", str(document)]
        if run.out_of_time(MIN_START_S):
            ended.append((args[0], StepResult("not reached", "the budget ran out first")))
            continue
        ended.append((args[0], run.subprocess("decode-step", command, append=index > 0)))
    states = [result.state for _, result in ended]
    state = next((s for s in ("failed", "timed out", "not reached") if s in states), "ok")
    told = [f"{model}: {r.state}" + ("" if r.state == "ok" else f" ({r.detail})") for model, r in ended]
    return StepResult(
        "partial" if state == "not reached" else state, "; ".join(told) + "; see decode-step.txt"
    )


def step_ncu(run: CheckRun) -> StepResult:
    if not shutil.which("ncu"):
        return StepResult("skipped", "ncu not on PATH: no Nsight Compute summaries")
    command = [
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
    ]
    result = run.subprocess("ncu", [*command, "--out", str(run.folder / "profiles")])
    refused = _tool_refused(run.folder / "ncu.txt") if result.state == "failed" else None
    return StepResult("skipped", f"ncu cannot run here: {refused}") if refused else result


def _tool_refused(log: Path) -> str | None:
    """The line of a tool's log saying the machine will not let it run (TOOL_CANNOT_RUN), if there is one."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = (line.strip()[:200] for line in text.splitlines() if any(s in line for s in TOOL_CANNOT_RUN))
    return next(lines, None)


def step_tune(run: CheckRun) -> StepResult:
    from bench.measure import tuning

    text, ok = tuning.run(
        list(CASES.values()), out=run.folder / "tune", deadline=run.deadline, dry_run=run.dry_run
    )
    run.sections["Tuned launch configurations (tune/)"] = text
    if not ok:
        return StepResult("failed", "a candidate failed verification, or a key got no winner: see tune/")
    cut = tuning.NOT_REACHED in text
    return StepResult(
        "partial" if cut else "ok", "keys left at the deadline: see tune/" if cut else "see tune/"
    )


def step_sanitizer(run: CheckRun) -> StepResult:
    tool = shutil.which("compute-sanitizer")
    if not tool:
        return StepResult("skipped", "compute-sanitizer not on PATH")
    static = {}
    if (run.folder / "static.json").exists():
        for row in json.loads((run.folder / "static.json").read_text()):
            static.setdefault(row["kernel"], []).append(row)
    lines, errors, cut = [], 0, 0
    for case in CASES.values():
        checks = ["memcheck"] + (["racecheck"] if _shares_or_atomics(case, static, run.device) else [])
        for check in checks:
            if run.out_of_time(10.0):
                lines.append(f"- {case.name} {check}: not reached")
                cut += 1
                continue
            name = f"sanitizer-{check}-{case.name}"
            target = [sys.executable, "-m", "bench", "sanitize-target", case.name]
            command = [tool, "--tool", check, "--error-exitcode", "9", *target]
            result = run.subprocess(name, command, env=SANITIZED_ENV)
            refused = _tool_refused(run.folder / f"{name}.txt") if result.state == "failed" else None
            if refused and not lines:  # the first run is the probe: the machine refuses the tool outright
                return StepResult("skipped", f"compute-sanitizer cannot run here: {refused}; see {name}.txt")
            log = (run.folder / f"{name}.txt").read_text(errors="replace")
            summary = next((line for line in log.splitlines() if "ERROR SUMMARY" in line), result.detail)
            errors += result.state == "failed"
            cut += result.state == "timed out"  # the budget ended it: no verdict on the kernel
            lines.append(f"- {case.name} {check}: {result.state}, {summary.strip()}")
    run.sections["compute-sanitizer (sanitizer-*.txt)"] = "\n".join(lines)
    state = "failed" if errors else ("partial" if cut else "ok")
    return StepResult(state, f"{errors} runs with errors, {cut} cut off or not reached by the deadline")


def _shares_or_atomics(case, static: dict, device: str) -> bool:
    """racecheck where a kernel of the case keeps tiles in shared memory or uses atomics (by its compile).
    The launches are captured on ``device``: a GPU box's compiled launchers refuse CPU tensors."""
    from bench.measure.static import capture

    shape = case.small_shapes()[0]
    names = {launch.kernel for launch in capture(case, shape, device)}
    rows = [row for kernel in names for row in static.get(kernel, [])]
    return any((row.get("shared_bytes") or 0) > 0 or row.get("atomics") for row in rows)


def _pytest(run: CheckRun, name: str, *args: str) -> StepResult:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    return run.subprocess(name, [*command, f"--junitxml={run.folder / (name + '.xml')}"])


def step_tests_gpu_only(run: CheckRun) -> StepResult:
    return _pytest(run, "tests-gpu-only", "tests", "-m", "gpu")


def step_sweep(run: CheckRun) -> StepResult:
    shapes = (lambda case: case.small_shapes()) if run.dry_run else (lambda case: case.sweep())
    return _measure_into(run, "Sweep", "sweep.json", shapes, graph=False, peers=SWEEP_PEERS)


def step_benchmarks(run: CheckRun) -> StepResult:
    return _pytest(
        run, "benchmarks", "bench", "--sweep", "default", f"--benchmark-json={run.folder / 'benchmarks.json'}"
    )


def step_tests(run: CheckRun) -> StepResult:
    return _pytest(run, "tests", "tests", "-m", "not gpu")


STEP_FUNCTIONS: dict[str, Callable[[CheckRun], StepResult]] = {
    "machine": step_machine,
    "default-shapes": step_default_shapes,
    "static": step_static,
    "dist": step_dist,
    "decode-step": step_decode_step,
    "ncu": step_ncu,
    "tune": step_tune,
    "sanitizer": step_sanitizer,
    "tests-gpu-only": step_tests_gpu_only,
    "sweep": step_sweep,
    "benchmarks": step_benchmarks,
    "tests": step_tests,
}


def parse_only(text: str | None) -> tuple[str, ...]:
    if not text:
        return STEPS
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in STEPS]
    if unknown:
        raise SystemExit(f"--only: unknown step {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    return names


def register(sub) -> None:
    parser = sub.add_parser(
        "gpu-check", help="everything a lent GPU should measure, in order, within a budget, to one folder"
    )
    add_out_folder(parser, "folder for everything it writes (default bench/results/<gpu>/<UTC time>)")
    add_budget(parser, "wall-clock budget in seconds (default 420)", "--budget-s", default=420.0)
    parser.add_argument("--only", type=names_from(STEPS), help="comma-separated steps: " + ",".join(STEPS))
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="every step on this CPU (interpreter, smallest shapes, wall clock)",
    )
    parser.set_defaults(func=main)


def main(args) -> int:
    return run(args.out, args.budget, ",".join(args.only) if args.only else None, args.dry_run)


def run(out: str | None, budget_s: float = 420.0, only: str | None = None, dry_run: bool = False) -> int:
    """Runs the selected steps within ``budget_s`` seconds of wall clock; returns 0 when no step failed, 1
    otherwise, 2 when there is no GPU and this is not a dry run, or when the default folder (named to the
    second) exists already."""
    started = time.monotonic()
    info = machine_info()
    if info.gpu == "cpu" and not dry_run:
        print(
            "gpu-check needs a CUDA device; on this machine use `decodebench run` (or gpu-check --dry-run)",
            file=sys.stderr,
        )
        return 2
    selected = parse_only(only)
    stamp = time.strftime("%Y-%m-%d-%H%M%S", time.gmtime())
    if out:
        folder = Path(out)
    elif dry_run:  # not a GPU result: kept out of bench/results/
        folder = Path(tempfile.mkdtemp(prefix=f"gpu-check-dry-run-{stamp}-"))
    else:
        folder = results.results_dir_for(info.slug) / stamp
    try:  # a default folder is this run's alone: another run's files must not mix with its own
        folder.mkdir(parents=True, exist_ok=bool(out) or dry_run)
    except FileExistsError:
        print(f"gpu-check: {folder} exists (another run started this second); pass --out", file=sys.stderr)
        return 2
    check = CheckRun(folder, started + budget_s, dry_run, selected)
    check.machine.update(info.as_dict(), started=stamp, budget_s=budget_s, dry_run=dry_run)
    for name in STEPS:
        if name not in selected:
            check.steps[name] = StepResult("not selected")
    check.write_summary()  # from the first second on, the folder says what ran and what did not
    for name in (step for step in STEPS if step in selected):
        if check.out_of_time(MIN_START_S):
            check.steps[name] = StepResult("not reached", "the budget ran out first")
            continue
        begin = time.monotonic()
        print(f"{name}: running ({check.left():.0f} s left)", flush=True)
        result = _run_step(check, name)
        result.seconds = time.monotonic() - begin
        check.steps[name] = result
        print(f"{name}: {result.state} ({result.seconds:.0f} s) {result.detail}", flush=True)
        check.write_summary()
    check.write_summary()
    print((folder / "summary.md").read_text())
    print(f"written: {folder} ({time.monotonic() - started:.0f} s)")
    return _status(check)


def _status(check: CheckRun) -> int:
    return 1 if any(s.state == "failed" for s in list(check.steps.values())) else 0


def _run_step(check: CheckRun, name: str) -> StepResult:
    """One step, under a watchdog (an in-process step checks the deadline only between shapes, and a hung
    kernel never returns to check it); what it cached on the GPU is released after it."""
    watchdog = threading.Timer(max(check.left(), 0.0) + HANG_GRACE_S, _hung, args=(check, name))
    watchdog.daemon = True
    watchdog.start()
    try:
        return STEP_FUNCTIONS[name](check)
    except Exception:
        (check.folder / f"{name}-error.txt").write_text(traceback.format_exc())
        return StepResult("failed", f"crashed: see {name}-error.txt")
    finally:
        watchdog.cancel()
        release_memory()


def _hung(check: CheckRun, name: str) -> None:
    """The watchdog: the step is still running HANG_GRACE_S past the deadline. summary.md says so; then, on
    a GPU, the process ends (with it the hung kernel, which nothing else can stop) so that nothing writes
    after the summary; a dry run only records it and goes on."""
    ending = "a dry run goes on" if check.dry_run else "the process was ended here"
    detail = f"still running {HANG_GRACE_S:.0f} s past the deadline: {ending}"
    check.steps[name] = StepResult("timed out", detail)
    check.write_summary()
    print(f"{name}: timed out, {ending}", flush=True)
    if not check.dry_run:
        os._exit(_status(check))


def release_memory() -> None:
    """Gives what this process's caching allocator holds back to the GPU: the next step may be another
    process (dist's spawned ranks, the sanitizer's target, pytest) that needs it. The collection first frees
    tensors only cycles still hold. Nothing to do where CUDA was never initialized (a dry run)."""
    import torch

    if torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()
