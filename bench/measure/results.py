"""One JSON schema for every result: pytest-benchmark's (``machine_info``, ``benchmarks`` with ``stats`` in
seconds and ``extra_info``), whether written by ``pytest bench/ --benchmark-json`` or by ``decodebench run``.
So ``decodebench report`` and pytest-benchmark's own compare read both.

extra_info of an entry: kernel, impl ("triton" or "reference"), shape (label), bytes, flops, gbps, tflops,
peak_gbps (copy bandwidth measured in the same run), pct_of_peak, p20_s, p80_s, gpu.
"""

import datetime
import json
import statistics
from pathlib import Path

from bench.measure.device import machine_info
from bench.measure.timing import Timing

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def results_dir_for(gpu_slug: str) -> Path:
    """Results are stored per GPU: pytest-benchmark's machine id does not name the GPU."""
    return RESULTS_DIR / gpu_slug


def cost_info(case, shape, seconds: float, peak_gbps: float | None, peak_tflops: float | None = None) -> dict:
    """Bytes and FLOPs from the case's models, turned into GB/s, TFLOP/s and % of the measured ceilings.
    With both ceilings, also the roofline's verdict: the shape's arithmetic intensity (FLOP/byte) against
    the ridge (matmul ceiling / copy bandwidth) names the ceiling that binds, and ``pct_of_bound`` is the
    share of that ceiling reached (what a bandwidth-bound and a compute-bound shape are each held to)."""
    nbytes, flops = case.byte_model(shape), case.flop_model(shape)
    gbps = nbytes / seconds / 1e9
    tflops = flops / seconds / 1e12
    info = {
        "kernel": case.name,
        "shape": shape.label,
        "bytes": nbytes,
        "flops": flops,
        "gbps": round(gbps, 2),
        "tflops": round(tflops, 4),
        "intensity": round(flops / nbytes, 2) if nbytes else None,
    }
    if peak_gbps:
        info["peak_gbps"] = round(peak_gbps, 1)
        info["pct_of_peak"] = round(100 * gbps / peak_gbps, 1)
    if peak_tflops:
        info["peak_tflops"] = round(peak_tflops, 1)
        info["pct_of_matmul"] = round(100 * tflops / peak_tflops, 1)
    if peak_gbps and peak_tflops and nbytes:
        ridge = peak_tflops * 1e12 / (peak_gbps * 1e9)
        info["ridge"] = round(ridge, 1)
        info["bound"] = "compute" if flops / nbytes > ridge else "bandwidth"
        info["pct_of_bound"] = info["pct_of_matmul"] if info["bound"] == "compute" else info["pct_of_peak"]
    return info


def entry(name: str, group: str, timing: Timing, extra_info: dict) -> dict:
    """A pytest-benchmark ``benchmarks`` item from a Timing (pytest-benchmark keeps seconds)."""
    data = [t * 1e-3 for t in timing.samples_ms]
    ordered = sorted(data)
    q1, _, q3 = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else ordered * 3
    return {
        "group": group,
        "name": name,
        "fullname": name,
        "params": None,
        "param": None,
        "extra_info": {**extra_info, "p20_s": timing.p20_ms * 1e-3, "p80_s": timing.p80_ms * 1e-3},
        "options": {"timer": "cuda-events", "min_rounds": len(data)},
        "stats": {
            "min": ordered[0],
            "max": ordered[-1],
            "mean": statistics.fmean(data),
            "stddev": statistics.stdev(data) if len(data) > 1 else 0.0,
            "rounds": len(data),
            "median": timing.median_ms * 1e-3,
            "iqr": q3 - q1,
            "q1": q1,
            "q3": q3,
            "iterations": 1,
            "ops": 1.0 / statistics.fmean(data),
            "total": sum(data),
        },
    }


def write(path: Path, benchmarks: list[dict], extra_machine: dict | None = None) -> Path:
    machine = machine_info().as_dict()
    if extra_machine:
        machine.update(extra_machine)
    document = {
        "machine_info": machine,
        "commit_info": {},
        "benchmarks": benchmarks,
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": "decodebench",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1))
    return path


class ResultFileError(ValueError):
    """A result file that cannot be read as one: the message is one line naming the file and why."""


def load(path: Path) -> dict:
    """A result file (either writer), checked enough that reports and compare can trust its shape."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise ResultFileError(f"{path}: cannot read it ({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultFileError(f"{path}: not JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(document, dict) or not isinstance(document.get("benchmarks"), list):
        raise ResultFileError(
            f"{path}: not a pytest-benchmark or decodebench result file (no 'benchmarks' list)"
        )
    for index, item in enumerate(document["benchmarks"]):
        stats = item.get("stats") if isinstance(item, dict) else None
        if (
            not isinstance(stats, dict)
            or not isinstance(stats.get("median"), (int, float))
            or "name" not in item
        ):
            raise ResultFileError(f"{path}: benchmarks[{index}] has no name or no stats.median")
    return document
