"""CPU-side performance proxies kept as a committed baseline, so a change that adds spills or traffic fails
CI on a machine with no GPU.

The proxies, per kernel launch configuration and architecture: registers, spill (local) and stack bytes
(ptxas spills through the stack frame as well), shared memory, and global accesses by width (from
bench/measure/static.py); per traffic shape: the traffic ratio (from bench/measure/traffic.py).
``bench/baselines/cpu-proxies.json`` holds them with the Triton version that compiled them. A check fails
on: more spill or stack bytes; a global access narrower than before (fewer 16-byte accesses, or a new
narrower width); shared memory up by more than 10%; registers up by more than 16 (a change in occupancy
class); a traffic ratio up by more than 0.01; a launch or shape that disappeared. Registers, shared memory
and access widths are compared only when the Triton version matches the baseline's (CI pins it; other
compilers move them); spills, stack and traffic always.
An intended change updates the baseline in the same commit: ``decodebench proxies --update``.
"""

import json
from pathlib import Path

import triton

BASELINE = Path(__file__).resolve().parents[1] / "baselines" / "cpu-proxies.json"

REGISTER_SLACK = 16
SHARED_SLACK = 0.10
TRAFFIC_SLACK = 0.01


def collect(cases) -> dict:
    """The proxies of every case, as a JSON-ready dict."""
    from bench.measure.runner import static_rows, traffic

    static, traffic_ratios = {}, {}
    cases = list(cases)
    static_rows(cases)  # every case's compile at once (a child per core); the loop below reads the cache
    for case in cases:
        for row in static_rows([case]):
            key = f"{case.name} | {row.kernel} | {row.shape} | {row.arch}"
            static[key] = (
                {"error": row.error}
                if row.error
                else {
                    "registers": row.registers,
                    "spill_bytes": row.spill_bytes,
                    "stack_bytes": row.stack_bytes,
                    "shared_bytes": row.shared_bytes,
                    "load_widths": {str(k): v for k, v in row.load_widths.items()},
                    "store_widths": {str(k): v for k, v in row.store_widths.items()},
                }
            )
        for shape in case.traffic_shapes():
            traffic_ratios[f"{case.name} | {shape.label}"] = round(traffic(case, shape).ratio, 4)
    from bench.measure.static import ARCHS

    archs = [f"sm_{a}" for a in ARCHS]
    return {"triton": triton.__version__, "archs": archs, "static": static, "traffic": traffic_ratios}


def _narrower(before: dict, after: dict) -> str | None:
    """A regression in access widths: fewer 16-byte accesses, or a width that was not there and is narrower
    than the narrowest before."""
    if after.get("16", 0) < before.get("16", 0):
        return f"16-byte accesses {before.get('16', 0)} -> {after.get('16', 0)}"
    narrowest = min((int(w) for w in before), default=16)
    new = [int(w) for w in after if w not in before and int(w) < narrowest]
    return f"new {min(new)}-byte accesses" if new else None


def check(current: dict, baseline: dict) -> list[str]:
    """Regressions of ``current`` against ``baseline``, one line each (empty: none)."""
    problems = []
    same_compiler = current.get("triton") == baseline.get("triton")
    compiled = set(current.get("archs") or [])
    for key, before in baseline["static"].items():
        if compiled and key.rsplit(" | ", 1)[-1] not in compiled:
            continue  # an arch this run did not compile (DECODEBENCH_ARCHS): not compared
        after = current["static"].get(key)
        if after is None:
            problems.append(f"{key}: launch configuration gone (update the baseline if intended)")
            continue
        if "error" in before or "error" in after:
            if ("error" in before) != ("error" in after):
                problems.append(
                    f"{key}: compile outcome changed: {before.get('error')} -> {after.get('error')}"
                )
            continue
        if after["spill_bytes"] > before["spill_bytes"]:
            problems.append(f"{key}: spills {before['spill_bytes']} -> {after['spill_bytes']} bytes")
        # ptxas spills through the stack frame too (LOCAL stays 0): seen at mla_decode's 64-head tile.
        if after.get("stack_bytes", 0) > before.get("stack_bytes", 0):
            problems.append(f"{key}: stack {before.get('stack_bytes', 0)} -> {after['stack_bytes']} bytes")
        if same_compiler:
            for kind in ("load_widths", "store_widths"):
                narrower = _narrower(before[kind], after[kind])
                if narrower:
                    problems.append(f"{key}: {kind.split('_')[0]}s: {narrower}")
            if after["registers"] > before["registers"] + REGISTER_SLACK:
                problems.append(f"{key}: registers {before['registers']} -> {after['registers']}")
            if after["shared_bytes"] > before["shared_bytes"] * (1 + SHARED_SLACK) + 1024:
                problems.append(
                    f"{key}: shared memory {before['shared_bytes']} -> {after['shared_bytes']} bytes"
                )
    for key, before in baseline["traffic"].items():
        after = current["traffic"].get(key)
        if after is None:
            problems.append(f"{key}: traffic shape gone (update the baseline if intended)")
        elif after > before + TRAFFIC_SLACK:
            problems.append(f"{key}: traffic ratio {before} -> {after}")
    return problems


def load(path: Path = BASELINE) -> dict:
    return json.loads(Path(path).read_text())


def save(proxies: dict, path: Path = BASELINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(proxies, indent=1, sort_keys=True) + "\n")
    return path
