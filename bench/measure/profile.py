"""`decodebench profile CASE --tool torch|nsys|ncu`: one benchmark shape under a profiler, its report parsed
into a table that sets each kernel's measured time (and, with ncu, DRAM bytes) beside the case's byte model.

- ``ncu`` (Nsight Compute): per kernel launch, duration, DRAM bytes read and written, DRAM throughput as % of
  peak and SM throughput, with the clocks left alone (``--clock-control none``) so times compare with CUDA
  events. Measured DRAM bytes against the byte model show unexpected traffic directly.
- ``nsys`` (Nsight Systems): per kernel, instances and device time (``cuda_gpu_kern_sum``).
- ``torch`` (torch.profiler): per kernel, instances and device time, where neither Nsight tool is
  installed. Without a GPU it profiles the interpreter's run: CPU time, labelled as such.

The profiled process runs ``decodebench profile-target``: inputs built, one warm-up call, then ``calls``
calls, each in an NVTX range PROFILE_RANGE, which ncu's --nvtx-include selects. A stateful case's reset
(allocate's pool put back) runs before each call, outside the range, so ncu and torch.profiler do not count
its copies as the kernel's; nsys captures from the first timed call to the last (cudaProfilerStart and
Stop around them), so its per-call figures leave out the inputs' build and the warm-up call but keep a
stateful case's resets. ncu reports every
metric in its base unit (``--print-units base``); a unit the parser does not know is an error, never a silent
factor of 1.
"""

import csv
import io
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.measure.device import kernel_device
from bench.measure.nvtx import nvtx_range
from bench.testing import seed_of

PROFILE_RANGE = "decodebench-profile"
NCU_METRICS = (
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
)
# ncu is asked for base units (--print-units base): bytes, nanoseconds and percentages are all it prints for
# the metrics above, so a unit other than these means the command line changed, and is an error.
_UNITS = {"byte": 1, "nsecond": 1e-9, "%": 1}


@dataclass
class KernelProfile:
    name: str
    launches: int
    seconds: float  # total over the launches
    dram_bytes: float | None = None  # total over the launches (ncu only)
    dram_pct: float | None = None  # mean % of peak DRAM throughput (ncu only)
    sm_pct: float | None = None


def target(case, shape, calls: int) -> None:
    """What the profiled process runs: a warm-up call, then ``calls`` calls in the NVTX range."""
    device = kernel_device()
    inputs = case.build(shape, device, seed_of(f"{case.name}/{shape.label}"))
    reset = inputs.reset or (lambda: None)
    reset()
    case.run_kernel(inputs)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()  # nsys's capture range: the timed calls only
    for _ in range(calls):
        reset()  # outside the range: its copies are not the kernel's work
        with nvtx_range(PROFILE_RANGE):
            case.run_kernel(inputs)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


def profile_torch(case, shape, calls: int) -> tuple[list[KernelProfile], str]:
    from torch.profiler import ProfilerActivity, profile, record_function

    device = kernel_device()
    on_gpu = device == "cuda"
    inputs = case.build(shape, device, seed_of(f"{case.name}/{shape.label}"))
    reset = inputs.reset or (lambda: None)
    reset()
    case.run_kernel(inputs)  # compile outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            if on_gpu and inputs.reset:  # the reset's copies are not the kernel's launches: not collected
                prof.toggle_collection_dynamic(False, activities)
                reset()
                torch.cuda.synchronize()
                prof.toggle_collection_dynamic(True, activities)
            else:
                reset()
            with record_function(f"{case.name} call"):
                case.run_kernel(inputs)
        if on_gpu:
            torch.cuda.synchronize()
    rows = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if on_gpu and device_us > 0 and event.device_type == torch.autograd.DeviceType.CUDA:
            rows[event.key] = KernelProfile(event.key, event.count, device_us * 1e-6)
        elif not on_gpu and event.key == f"{case.name} call":
            rows[event.key] = KernelProfile(event.key, event.count, event.cpu_time_total * 1e-6)
    note = "device time (torch.profiler)" if on_gpu else "CPU time of the interpreter's run: no GPU here"
    return sorted(rows.values(), key=lambda r: -r.seconds), note


def _run_profiled(command: list[str], tool_command: list[str], timeout: float) -> None:
    done = subprocess.run(tool_command + command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{tool_command[0]} failed ({done.returncode}):\n{done.stderr[-2000:]}")


def _target_command(case_name: str, shape_index: int, calls: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench",
        "profile-target",
        case_name,
        "--shape",
        str(shape_index),
        "--calls",
        str(calls),
    ]


def profile_nsys(case_name, shape_index, calls, out: Path, timeout=600.0) -> list[KernelProfile]:
    nsys = shutil.which("nsys")
    if not nsys:
        raise RuntimeError("nsys is not on PATH (Nsight Systems); try --tool ncu or --tool torch")
    report = out / f"{case_name}-{shape_index}"
    _run_profiled(
        _target_command(case_name, shape_index, calls),
        [
            nsys,
            "profile",
            "-t",
            "cuda,nvtx",
            "--capture-range=cudaProfilerApi",
            "--capture-range-end=stop",
            "-f",
            "true",
            "-o",
            str(report),
        ],
        timeout,
    )
    stats = subprocess.run(
        [nsys, "stats", "--report", "cuda_gpu_kern_sum", "--format", "csv", f"{report}.nsys-rep"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    (out / f"{case_name}-{shape_index}-kern_sum.csv").write_text(stats.stdout)
    return parse_nsys_kernel_summary(stats.stdout)


def profile_ncu(case_name, shape_index, calls, out: Path, timeout=600.0) -> list[KernelProfile]:
    ncu = shutil.which("ncu")
    if not ncu:
        raise RuntimeError("ncu is not on PATH (Nsight Compute); try --tool torch")
    done = subprocess.run(
        [
            ncu,
            "--nvtx",
            "--nvtx-include",
            f"{PROFILE_RANGE}/",
            "--clock-control",
            "none",
            "--print-units",
            "base",
            "--csv",
            "--metrics",
            ",".join(NCU_METRICS),
        ]
        + _target_command(case_name, shape_index, calls),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:  # ncu prints its own errors (==ERROR==) on stdout: both are kept
        raise RuntimeError(f"ncu failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    (out / f"{case_name}-{shape_index}-ncu.csv").write_text(done.stdout)
    return parse_ncu_metrics(done.stdout)


def _csv_rows(text: str, first_field: str, empty: str) -> list[dict]:
    """The CSV table of a tool's output: its header is the line whose first field is ``first_field``
    (tools print banner lines before it; nsys leaves the header unquoted and quotes only fields holding a
    comma, ncu quotes every field: both read). Lines starting with '#' are comments wherever they stand
    (tests/data's hand-written examples say so in one). No header, or no row under it: ValueError, with
    ``empty`` and the tool's last lines, never an empty table."""
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    start = next(
        (i for i, line in enumerate(lines) if next(csv.reader([line]), [""])[:1] == [first_field]), None
    )
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:])))) if start is not None else []
    if not rows:
        tail = "\n".join(line for line in lines[-5:] if line.strip())
        raise ValueError(f"{empty}; the tool printed:\n{tail or '(nothing)'}")
    return rows


def parse_nsys_kernel_summary(text: str) -> list[KernelProfile]:
    """`nsys stats --report cuda_gpu_kern_sum --format csv`: one row per kernel name."""
    rows = []
    for row in _csv_rows(text, "Time (%)", "nsys stats: no kernel in its cuda_gpu_kern_sum table"):
        total = float(row["Total Time (ns)"].replace(",", "")) * 1e-9
        rows.append(KernelProfile(row["Name"], int(row["Instances"].replace(",", "")), total))
    return sorted(rows, key=lambda r: -r.seconds)


def _value(row: dict) -> float:
    unit = row.get("Metric Unit", "").strip().lower()
    if unit not in _UNITS:
        raise ValueError(
            f"ncu: metric {row.get('Metric Name')} in unit {row.get('Metric Unit')!r}, which the parser does "
            f"not know (known: {', '.join(_UNITS)}); profile_ncu asks for base units"
        )
    return float(row["Metric Value"].replace(",", "")) * _UNITS[unit]


def parse_ncu_metrics(text: str) -> list[KernelProfile]:
    """`ncu --csv --metrics ...`: one row per (launch, metric); folded to one profile per kernel name."""
    launches: dict[tuple, dict] = {}
    for row in _csv_rows(text, "ID", f"ncu profiled no kernel: check --nvtx-include {PROFILE_RANGE}/"):
        launch = launches.setdefault((row["ID"], row["Kernel Name"]), {})
        launch[row["Metric Name"]] = _value(row)
    kernels: dict[str, KernelProfile] = {}
    for (_, name), metrics in launches.items():
        k = kernels.setdefault(name, KernelProfile(name, 0, 0.0, 0.0, 0.0, 0.0))
        k.launches += 1
        k.seconds += metrics.get("gpu__time_duration.sum", 0.0)
        k.dram_bytes += metrics.get("dram__bytes_read.sum", 0.0) + metrics.get("dram__bytes_write.sum", 0.0)
        k.dram_pct += metrics.get("dram__throughput.avg.pct_of_peak_sustained_elapsed", 0.0)
        k.sm_pct += metrics.get("sm__throughput.avg.pct_of_peak_sustained_elapsed", 0.0)
    for k in kernels.values():
        k.dram_pct /= k.launches
        k.sm_pct /= k.launches
    return sorted(kernels.values(), key=lambda r: -r.seconds)


def summary(case, shape, profiles: list[KernelProfile], calls: int, note: str = "") -> str:
    """Per kernel: launches per call, time per call, and (ncu) DRAM bytes per call; then the call's total
    against the byte model."""
    from bench.format import table

    model = case.byte_model(shape)
    rows = []
    for p in profiles:
        per_call_s = p.seconds / calls
        row = [p.name[:60], f"{p.launches / calls:g}", f"{per_call_s * 1e6:.4g}"]
        if p.dram_bytes is not None:
            row += [
                f"{p.dram_bytes / calls:.4g}",
                f"{p.dram_bytes / calls / max(per_call_s, 1e-12) / 1e9:.1f}",
                f"{p.dram_pct:.1f}",
                f"{p.sm_pct:.1f}",
            ]
        rows.append(row)
    headers = ["kernel", "launches/call", "us/call"]
    if any(p.dram_bytes is not None for p in profiles):
        headers += ["DRAM B/call", "DRAM GB/s", "% DRAM peak", "% SM peak"]
    text = [
        f"## {case.name}: {shape.label} ({calls} calls){' - ' + note if note else ''}",
        "",
        table(rows, headers),
    ]
    total_s = sum(p.seconds for p in profiles) / calls
    line = f"byte model: {model:.4g} B/call"
    if profiles and all(p.dram_bytes is not None for p in profiles):
        measured = sum(p.dram_bytes for p in profiles) / calls
        line += f"; measured DRAM {measured:.4g} B/call = {measured / model:.3f}x the model"
    if total_s > 0:
        line += f"; {model / total_s / 1e9:.1f} GB/s of modelled bytes over the kernels' time"
    text += ["", line]
    return "\n".join(text)
