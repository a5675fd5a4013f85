"""One JSON schema for every result: pytest-benchmark's (``machine_info``, ``benchmarks`` with ``stats`` in
seconds and ``extra_info``), whether written by ``pytest bench/ --benchmark-json`` or by ``decodebench run``.
So ``decodebench report`` and pytest-benchmark's own compare read both.

extra_info of an entry: kernel, impl ("triton" or "reference"), shape (label), bytes, flops, gbps, tflops,
peak_gbps (copy bandwidth measured in the same run), pct_of_peak, p20_s, p80_s, gpu.
"""

import datetime
import json
import math
import os
import tempfile
from pathlib import Path

from pytest_benchmark.stats import Stats

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
    """A pytest-benchmark ``benchmarks`` item from a Timing (pytest-benchmark keeps seconds). Its ``stats``
    are pytest-benchmark's own (``Stats``: quartiles, outliers, ops), so `pytest-benchmark compare` reads
    them as it reads its own runs. What the library cannot build is assembled here: its ``Metadata`` wants a
    live fixture and timer, where these samples come from CUDA events or the host clock taken elsewhere."""
    stats = Stats()
    for milliseconds in timing.samples_ms:
        stats.update(milliseconds * 1e-3)
    return {
        "group": group,
        "name": name,
        "fullname": name,
        "params": None,
        "param": None,
        "extra_info": {**extra_info, "p20_s": timing.p20_ms * 1e-3, "p80_s": timing.p80_ms * 1e-3},
        "options": {"timer": extra_info.get("timer", "cuda-events"), "min_rounds": len(timing.samples_ms)},
        "stats": {**stats.as_dict(), "iterations": 1},
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
    write_text_atomic(path, json.dumps(document, indent=1))
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to a file of its own beside ``path``, then renames it over ``path``: a file rewritten
    after every shape or step (run.json, static.json, summary.md) is never seen half-written, neither by a
    reader nor after a process ended mid-write (gpu-check's watchdog ends a hung GPU run)."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(handle, 0o666 & ~_UMASK)  # mkstemp's 0600 would survive the rename
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: The process's umask, read once at import: reading it means setting it, and a thread writing a file in
#: between (gpu-check's watchdog writes summary.md) would create it with none.
_UMASK = _read_umask()


class ResultFileError(ValueError):
    """A JSON file (a result file, a model's config, a gpu-check machine.json) that cannot be read as one:
    the message is one line naming the file and why."""


def read_json_object(path) -> dict:
    """The JSON object a file holds; ResultFileError when it is missing, a folder, not UTF-8 JSON, or
    holds something other than an object."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ResultFileError(f"{path}: cannot read it ({error.strerror or error})") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError both are
        raise ResultFileError(f"{path}: not JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(document, dict):
        raise ResultFileError(f"{path}: expected a JSON object, found {type(document).__name__}")
    return document


def read_machine_json(path) -> dict:
    """A gpu-check machine.json, its ceilings checked: ValueError naming the file and the field."""
    machine = read_json_object(path)
    if not isinstance(machine.get("gpu", ""), str):
        raise ResultFileError(f"{path}: gpu: expected a string, got {machine['gpu']!r:.60}")
    for key in ("copy_gbps", "matmul_tflops"):
        value = machine.get(key)
        if value is not None and not (_is_number(value) and value > 0):
            raise ResultFileError(f"{path}: {key}: expected a positive number, got {value!r:.60}")
    # A machine without a GPU writes 0 GiB (device.machine_info): nothing measured, the anchor stays.
    memory = machine.get("memory_gib")
    if memory is not None and not (_is_number(memory) and memory >= 0):
        raise ResultFileError(f"{path}: memory_gib: expected a non-negative number, got {memory!r:.60}")
    return machine


def load(path: Path, stats: tuple[str, ...] = ("median",)) -> dict:
    """A result file (either writer), checked enough that report, compare and the plots can trust every
    field they read: each entry's name, its ``stats`` named here (non-negative seconds), its extra_info."""
    path = Path(path)
    document = read_json_object(path)
    if not isinstance(document.get("benchmarks"), list):
        raise ResultFileError(
            f"{path}: not a pytest-benchmark or decodebench result file (no 'benchmarks' list)"
        )
    if not isinstance(document.get("machine_info", {}), dict):
        raise ResultFileError(f"{path}: machine_info: expected an object")
    problem = _numbers_problem(document.get("machine_info", {}), ("copy_gbps", "matmul_tflops"))
    if problem:
        raise ResultFileError(f"{path}: machine_info.{problem}")
    for index, item in enumerate(document["benchmarks"]):
        problem = _entry_problem(item, ("median", *stats))
        if problem:
            raise ResultFileError(f"{path}: benchmarks[{index}]: {problem}")
    return document


#: extra_info fields report, compare and the plots read, by the types they must have where present.
_INFO_TYPES = {
    "kernel": str,
    "impl": str,
    "shape": str,
    "cuda_graph": (bool, type(None)),
    "verified": (bool, type(None)),
    "peers_skipped": (dict, type(None)),
    "peers_failed": (dict, type(None)),
}
_INFO_NUMBERS = ("bytes", "flops", "p20_s", "p80_s", "pct_of_peak")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers_problem(fields: dict, names) -> str | None:
    """The first of ``names`` in ``fields`` that is neither null nor a finite non-negative number."""
    for name in names:
        value = fields.get(name)
        if value is not None and not (_is_number(value) and value >= 0):
            return f"{name}: expected a non-negative number, got {value!r:.60}"
    return None


def _entry_problem(item, stats: tuple[str, ...]) -> str | None:
    if not isinstance(item, dict):
        return f"expected an object, got {type(item).__name__}"
    if not isinstance(item.get("name"), str):
        return f"name: expected a string, got {item.get('name')!r:.60}"
    if not isinstance(item.get("param"), (str, int, float, type(None))):
        return f"param: expected a string or a number, got {type(item['param']).__name__}"
    if not isinstance(item.get("stats"), dict):
        return "stats: expected an object"
    for stat in dict.fromkeys(stats):
        value = item["stats"].get(stat)
        if not (_is_number(value) and value >= 0):
            return f"stats.{stat}: expected a non-negative number of seconds, got {value!r:.60}"
    info = item.get("extra_info", {})
    if not isinstance(info, dict):
        return f"extra_info: expected an object, got {type(info).__name__}"
    for field, types in _INFO_TYPES.items():
        if field in info and not isinstance(info[field], types):
            return f"extra_info.{field}: expected {_type_names(types)}, got {info[field]!r:.60}"
    problem = _numbers_problem(info, _INFO_NUMBERS)
    return f"extra_info.{problem}" if problem else None


def _type_names(types) -> str:
    names = {str: "a string", bool: "true or false", dict: "an object", type(None): "null"}
    return " or ".join(names[t] for t in (types if isinstance(types, tuple) else (types,)))
