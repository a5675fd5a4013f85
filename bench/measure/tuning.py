"""The tuner behind `decodebench tune` (bench/commands/tune.py): each kernel's launch configuration chosen
by measurement, one table per GPU.

A launcher's heuristic (tile sizes, warps, pipeline depth) is a guess made from shapes; which candidate is
fastest is a fact about one GPU and one compiler. For every tunable case (one whose operator gives a
``tune`` spec: bench/operators/base.py TuneSpec) the tuner groups the case's default shapes by the shape key
the launcher derives (kernels/_configs.py), proposes the spec's candidates around the launcher's heuristic
for each key, and:

1. drops the candidates the launcher refuses (its ValueError, e.g. a head tile whose accumulator is too wide),
   with its reason; compiles each other candidate's launches for the GPU's architecture (sm_90 without a
   GPU, in a child process with TRITON_INTERPRET=0 as the static report does) and drops those that spill
   registers, use stack or ask for more shared memory than the architecture has, before any GPU time is
   spent;
2. on a GPU, verifies each remaining candidate against the reference (the case's compare, at the group's
   shapes whose reference is affordable), then times it at every shape of the group (CUDA events, L2
   flushed, as every timing here);
3. keeps, per key, the candidate with the lowest geometric mean of its time over the fastest candidate's
   at each shape, and writes ``tuned-configs.json`` (the kernels/configs/<gpu-slug>.json content) with
   ``tune-timings.json`` / ``tune.md`` beside it, after every key, so a deadline loses nothing finished.

Committing a table is a human's step: ``decodebench tune --install --out DIR`` merges DIR's
tuned-configs.json into kernels/configs/<slug>.json. Without a GPU, ``--dry-run`` lists the candidates
with their sm_90 static figures and what is dropped.
"""

import datetime
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import child_env
from bench.format import table, us
from bench.measure import runner, timing
from bench.measure.device import machine_info
from bench.measure.static import StaticRow, access_widths, capture_launches, compile_aot, compiled_usage
from bench.operators import CASES
from bench.operators.base import Case
from bench.testing import seed_of
from kernels import INTERPRETED, _configs

RESULT_FILE = "tuned-configs.json"
NOT_REACHED = "Not reached before the deadline"  # the summary's line naming the keys a deadline cut off
TIMINGS_FILE = "tune-timings.json"
SUMMARY_FILE = "tune.md"
#: Shared memory one program may use, by compute capability (bytes; opt-in maximum per block).
SHARED_LIMIT = {90: 232448, 100: 232448, 80: 166912, 87: 166912, 86: 101376, 89: 101376, 120: 101376}
# Verification per candidate at this many of a key's shapes (the cheapest affordable ones): a tile's
# correctness does not depend on the batch, and the reference is slow.
VERIFY_SHAPES = 2
# Timing per shape and candidate (milliseconds): enough for a stable median of microsecond kernels.
WARMUP_MS, REP_MS = 10.0, 40.0


# --- candidates --------------------------------------------------------------------------------------------


def knobs_label(knobs: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in knobs.items())


@dataclass
class Candidate:
    knobs: dict
    static: StaticRow | None = None  # the primary kernel's figures at the target architecture
    worst_spill: int = 0  # local-memory bytes of the worst launch the candidate makes
    dropped: str | None = None  # why it gets no GPU time (or why it lost its place: failed verification)
    verified: bool | None = None
    medians_ms: dict[str, float] = field(default_factory=dict)  # shape label -> median
    score: float | None = None  # geometric mean of median / the fastest candidate's median, over shapes


@dataclass
class Group:
    """One shape key of one kernel: the default shapes the launcher configures alike, and its candidates."""

    case: Case
    key: str
    heuristic: dict  # the tunable knobs the heuristic picks
    shapes: list
    cheap: object  # a small shape with the same key and launch configuration (built for compiles)
    candidates: list[Candidate] = field(default_factory=list)
    winner: dict | None = None
    note: str = ""


def groups_of(case: Case) -> list[Group]:
    """The case's default shapes grouped by the launcher's shape key, with their candidates, those the
    launcher refuses already dropped. Keys come from the launcher itself (case.launch_config) on the cheap
    shapes' inputs, built on the CPU."""
    spec = case.tune
    found: dict[str, Group] = {}
    for shape in case.default_shapes():
        cheap = spec.cheap(shape)
        inputs = case.build(cheap, "cpu", seed=0)
        info = case.launch_config(inputs)
        group = found.get(info["key"])
        if group is None:
            heuristic = {k: info["config"][k] for k in spec.tunable}
            group = found[info["key"]] = Group(case, info["key"], heuristic, [], cheap)
            group.candidates = [
                Candidate(knobs, dropped=launcher_refusal(case, inputs, knobs))
                for knobs in spec.candidates(heuristic)
            ]
        group.shapes.append(shape)
    return list(found.values())


def launcher_refusal(case: Case, inputs, knobs: dict) -> str | None:
    """Why the launcher refuses ``knobs`` for these inputs (its ValueError), None when it takes them. The
    launches are captured, not run: nothing compiles."""
    try:
        _launches(case, inputs, knobs)
    except ValueError as error:
        return f"the launcher refuses it: {error}"
    return None


# --- static figures and the filter -------------------------------------------------------------------------


def drop_reason(row: StaticRow | None, worst_spill: int, arch: int) -> str | None:
    """Why a candidate gets no GPU time, from its compile: it failed, it spills (or uses stack), or it
    wants more shared memory than one program may have on the architecture. None: keep it."""
    if row is None:
        return "not compiled"
    if row.error:
        return f"does not compile: {row.error}"
    if worst_spill or row.spill_bytes:
        return f"spills {max(worst_spill, row.spill_bytes or 0)} B a thread"
    if row.stack_bytes:
        return f"uses {row.stack_bytes} B of stack a thread"
    limit = SHARED_LIMIT.get(arch, min(SHARED_LIMIT.values()))
    if row.shared_bytes and row.shared_bytes > limit:
        return f"needs {row.shared_bytes} B of shared memory, sm_{arch} has {limit}"
    return None


def apply_filter(candidates: list[Candidate], arch: int) -> list[Candidate]:
    """Marks candidates that must not be timed (their ``dropped``); returns the ones kept."""
    for candidate in candidates:
        if candidate.dropped is None:
            candidate.dropped = drop_reason(candidate.static, candidate.worst_spill, arch)
    return [c for c in candidates if c.dropped is None]


def _figures(compiled, kernel: str, key: str, arch: int, num_warps: int) -> StaticRow:
    # The load widths from PTX, not SASS: disassembling each candidate's cubin costs about a second a kernel
    # on these machines (dozens of candidates in a dry run), and ptxas keeps the widths PTX asks for.
    loads, _ = access_widths(compiled.asm["ptx"], listing="ptx")
    widest = max(loads, default=None)
    usage = compiled_usage(compiled)
    return StaticRow(kernel, key, f"sm_{arch}", "aot", num_warps, **usage, widest_load=widest)


def compile_candidates(groups: list[Group], arch: int, deadline: float | None = None) -> None:
    """Fills each candidate's static figures: its launches at the group's cheap shape, captured under the
    candidate and compiled for sm_<arch> (the primary kernel always, other launches where the candidate
    changes them; the static report covers the heuristic's). The compiles run in a child process with
    TRITON_INTERPRET=0 that needs no GPU, spread over the machine's cores."""
    if not groups:
        return
    names = sorted({g.case.name for g in groups})
    env = child_env(TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "bench.measure.tuning", "--static-child", str(arch), *names]
    timeout = None if deadline is None else max(0.1, deadline - time.monotonic())
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        for group in groups:
            group.note = "compiling the candidates ran past the deadline"
        return
    if done.returncode != 0:
        raise RuntimeError(f"tune: compiling the candidates failed:\n{done.stderr[-3000:]}")
    take_figures(groups, json.loads(done.stdout))


def take_figures(groups: list[Group], rows: list[dict]) -> None:
    """Puts the compiling child's rows (one per candidate compiled) on the groups' candidates."""
    figures = {(r["case"], r["key"], knobs_label(r["knobs"])): r for r in rows}
    for group in groups:
        for candidate in group.candidates:
            found = figures.get((group.case.name, group.key, knobs_label(candidate.knobs)))
            if found:
                candidate.static = StaticRow(**found["static"]) if found["static"] else None
                candidate.worst_spill = found["worst_spill"]


def _launches(case: Case, inputs, knobs: dict) -> list:
    with _configs.forced(case.name, knobs), capture_launches(case.kernel_module) as launches:
        case.run_kernel(inputs)
    return launches


def _compile_job(job: tuple[str, object, str, dict, dict, int]) -> dict:
    """One candidate's figures (run in a worker of the compiling child)."""
    name, cheap, key, knobs, heuristic, arch = job
    case = CASES[name]
    spec = case.tune
    inputs = case.build(cheap, "cpu", seed=0)
    baseline = {launch.kernel: launch.kwargs for launch in _launches(case, inputs, heuristic)}
    primary, worst = None, 0
    for launch in _launches(case, inputs, knobs):
        if launch.kernel != spec.primary and launch.kwargs == baseline.get(launch.kernel):
            continue
        num_warps = launch.kwargs.get("num_warps", 4)
        try:
            row = _figures(compile_aot(launch, arch), launch.kernel, key, arch, num_warps)
        except Exception as error:  # a target that cannot take it (fp8 on sm_80): say why
            reason = (str(error).strip().splitlines() or [repr(error)])[-1][:200]
            row = StaticRow(launch.kernel, key, f"sm_{arch}", "aot", num_warps, error=reason)
        worst = max(worst, row.spill_bytes or 0)
        if launch.kernel == spec.primary:
            primary = row
    return {
        "case": name,
        "key": key,
        "knobs": knobs,
        "static": primary.as_dict() if primary else None,
        "worst_spill": worst,
    }


def compile_jobs(groups: list[Group], arch: int) -> list[tuple]:
    """The compiling child's work: one job per candidate not dropped already (the launcher takes it)."""
    return [
        (g.case.name, g.cheap, g.key, c.knobs, g.heuristic, arch)
        for g in groups
        for c in g.candidates
        if c.dropped is None
    ]


def _static_child(argv: list[str]) -> None:
    """``python -m bench.measure.tuning --static-child ARCH CASE...``: every candidate's figures as JSON."""
    arch, names = int(argv[0]), argv[1:]
    jobs = compile_jobs([g for name in names for g in groups_of(CASES[name])], arch)
    workers = max(1, min(len(jobs), os.cpu_count() or 1, 8))
    if workers == 1:
        rows = [_compile_job(job) for job in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            rows = pool.map(_compile_job, jobs, chunksize=1)
    print(json.dumps(rows))


# --- timing on a GPU ---------------------------------------------------------------------------------------


def _time_group(group: Group, deadline: float | None, device: str = "cuda") -> bool:
    """Verifies and times the group's kept candidates at its shapes; picks the winner. False when the
    deadline cut it short (no winner then: an unfinished comparison is not evidence)."""
    case = group.case
    kept = [c for c in group.candidates if c.dropped is None]
    checked = sorted((s for s in group.shapes if case.reference_affordable(s)), key=case.byte_model)
    checked = checked[:VERIFY_SHAPES]
    built = {s.label: case.build(s, device, seed_of(f"{case.name}/{s.label}")) for s in group.shapes}
    try:
        for candidate in kept:
            if deadline is not None and time.monotonic() > deadline:
                group.note = "stopped at the deadline"
                return False
            with _configs.forced(case.name, candidate.knobs):
                failures = [v for v in (runner.verify(case, s, device) for s in checked) if not v.ok]
                candidate.verified = not failures if checked else None
                if failures:
                    candidate.dropped = (
                        f"FAILED verification at {failures[0].shape}: {failures[0].message[:160]}"
                    )
                    continue
                for shape in group.shapes:
                    inputs = built[shape.label]
                    measured = timing.time_cuda(
                        lambda inputs=inputs: case.kernel(**inputs.args),
                        label=f"tune {case.name}[{knobs_label(candidate.knobs)}] {shape.label}",
                        warmup_ms=WARMUP_MS,
                        rep_ms=REP_MS,
                        setup=inputs.reset,
                    )
                    candidate.medians_ms[shape.label] = measured.median_ms
    finally:
        built.clear()
        torch.cuda.empty_cache()
    timed = [c for c in kept if c.dropped is None and len(c.medians_ms) == len(group.shapes)]
    if not timed:
        group.note = "no candidate passed"
        return True
    for candidate in timed:
        ratios = [
            candidate.medians_ms[s.label] / min(c.medians_ms[s.label] for c in timed) for s in group.shapes
        ]
        candidate.score = math.exp(sum(map(math.log, ratios)) / len(ratios))
    group.winner = min(timed, key=lambda c: c.score).knobs
    return True


# --- writing -----------------------------------------------------------------------------------------------


def group_table(group: Group, timed: bool = True) -> str:
    """A key's candidates: static figures, which is the heuristic (and the winner), why any was dropped,
    and (timed) the score and median per shape."""

    rows = []
    for c in group.candidates:
        s = c.static
        figures = ["-"] * 4 if s is None or s.error else [s.registers, s.spill_bytes, s.shared_bytes]
        if len(figures) == 3:
            figures.append(s.widest_load)
        mark = "heuristic" if c.knobs == group.heuristic else ""
        if group.winner is not None and c.knobs == group.winner:
            mark = (mark + ", chosen").lstrip(", ")
        status = f"dropped: {c.dropped}" if c.dropped else ("kept" if c.score is None else f"x{c.score:.3f}")
        row = [knobs_label(c.knobs), *figures, mark, status]
        if timed:
            medians_ms = (c.medians_ms.get(shape.label) for shape in group.shapes)
            row.append(" / ".join(us(None if ms is None else ms * 1e-3) for ms in medians_ms))
        rows.append(row)
    headers = ["candidate", "regs", "spill B", "shared B", "widest load B", "", "status"]
    return table(rows, headers + (["median us per shape"] if timed else []))


def summary(groups: list[Group], arch: int, dry_run: bool, left: list[str]) -> str:
    lines = [f"# decodebench tune ({'dry run: ' if dry_run else ''}static figures for sm_{arch})", ""]
    for group in groups:
        lines += [f"## {group.case.name} [{group.key}]", ""]
        lines.append("shapes: " + "; ".join(s.label for s in group.shapes))
        if group.note:
            lines.append(f"note: {group.note}")
        lines += ["", group_table(group, timed=not dry_run), ""]
    if left:
        lines += [f"{NOT_REACHED}: " + "; ".join(left), ""]
    return "\n".join(lines)


def table_document(groups: list[Group]) -> dict:
    """The kernels/configs/<slug>.json content: every key that got a winner."""
    info = machine_info()
    kernels: dict[str, dict] = {}
    for group in groups:
        if group.winner is not None:
            kernels.setdefault(group.case.name, {})[group.key] = group.winner
    return {
        "gpu": info.gpu,
        "slug": info.slug,
        "capability": info.capability,
        "triton": info.triton,
        "torch": info.torch,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kernels": kernels,
    }


def _timings_document(groups: list[Group]) -> list[dict]:
    return [
        {
            "kernel": g.case.name,
            "key": g.key,
            "knobs": c.knobs,
            "heuristic": c.knobs == g.heuristic,
            "chosen": c.knobs == g.winner,
            "dropped": c.dropped,
            "verified": c.verified,
            "static": c.static.as_dict() if c.static else None,
            "medians_ms": c.medians_ms,
            "score": c.score,
        }
        for g in groups
        for c in g.candidates
    ]


def _write(out: Path, groups: list[Group], text: str, dry_run: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).write_text(text + "\n")
    (out / TIMINGS_FILE).write_text(json.dumps(_timings_document(groups), indent=1))
    if not dry_run:
        (out / RESULT_FILE).write_text(json.dumps(table_document(groups), indent=1) + "\n")


# --- entry points ------------------------------------------------------------------------------------------


def _arch() -> int:
    if INTERPRETED or not torch.cuda.is_available():
        return 90
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def run(cases, *, out: Path, deadline: float | None, dry_run: bool) -> tuple[str, bool]:
    """Tunes the tunable ``cases`` (others are skipped); returns (markdown summary, ok).

    Checks ``deadline`` (a time.monotonic() value) between candidates and stops cleanly; writes
    out/tune.md, out/tune-timings.json and (on a GPU) out/tuned-configs.json after every key. ``dry_run``:
    no timing, only the candidates and their static figures (the only mode without a GPU). ok: every key
    reached got a winner (dry run: every key kept a candidate) and no candidate failed verification.
    """
    out = Path(out)
    on_gpu = torch.cuda.is_available() and not INTERPRETED
    if not dry_run and not on_gpu:
        return "tune: timing needs a CUDA device; without one use --dry-run", False
    tunable = [case for case in cases if case.tune is not None and case.launch_config is not None]
    no_knobs = [case.name for case in cases if case.launch_config is None]
    left_out = [case.name for case in cases if case not in tunable and case.name not in no_knobs]
    arch = _arch()
    groups: list[Group] = []
    for case in tunable:
        groups += groups_of(case)
    compile_candidates(groups, arch, deadline)
    ok, done, left = True, [], []
    for group in groups:
        if deadline is not None and time.monotonic() > deadline:
            left.append(f"{group.case.name} [{group.key}]")
            continue
        if not apply_filter(group.candidates, arch):
            group.note = "every candidate dropped: the heuristic stays"
            ok = False
        elif not dry_run:
            finished = _time_group(group, deadline)
            if not finished:
                left.append(f"{group.case.name} [{group.key}] (partly timed)")
            failed = any(c.dropped and c.dropped.startswith("FAILED") for c in group.candidates)
            ok &= not failed and (group.winner is not None or not finished)
        done.append(group)
        text = summary(done, arch, dry_run, left)
        _write(out, done, text, dry_run)
    text = summary(done, arch, dry_run, left)
    if no_knobs:
        text += f"\nNot tunable (no launch knobs): {', '.join(no_knobs)}\n"
    if left_out:
        text += f"\nLeft out of tuning (no tune spec: see bench/operators/): {', '.join(left_out)}\n"
    _write(out, done, text, dry_run)
    return text, ok


def install(out: Path, config_dir: Path = _configs.CONFIG_DIR) -> Path:
    """Merges out/tuned-configs.json into config_dir/<its slug>.json (entries it names replace the old
    ones; others stay); returns the path written. A human's step, after reading out/tune.md."""
    document = json.loads((Path(out) / RESULT_FILE).read_text())
    target = config_dir / f"{document['slug']}.json"
    merged = json.loads(target.read_text()) if target.exists() else {"kernels": {}}
    kernels = merged.get("kernels", {})
    for kernel, entries in document["kernels"].items():
        kernels.setdefault(kernel, {}).update(entries)
    merged.update({k: v for k, v in document.items() if k != "kernels"}, kernels=kernels)
    config_dir.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(merged, indent=1, sort_keys=False) + "\n")
    _configs.clear_cache()
    return target


if __name__ == "__main__":
    if sys.argv[1:2] == ["--static-child"]:  # compile_candidates' child
        _static_child(sys.argv[2:])
