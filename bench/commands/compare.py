"""Regression tracking for timings: two result files (pytest-benchmark's schema, whichever wrote them)
compared entry by entry, with a threshold past which the comparison fails.

Entries pair up by (kernel, impl, shape) from extra_info, or by name where extra_info lacks them.
``--fail median:10%`` fails when any paired entry's median grew by more than 10%; the statistic may be any
of pytest-benchmark's (min, max, mean, median) and the limit a percentage or an absolute time (``5us``).

Two files from different GPUs are refused unless ``--allow-other-gpu`` says that is the point (a change
across cards is no regression); a pair of entries read on different clocks (CUDA events against the host's,
a dry run's wall clock against a GPU's) is always refused: their difference measures the clocks.
"""

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.commands.arguments import UsageError, checked
from bench.measure import results

STATS = ("min", "max", "mean", "median")


@dataclass(frozen=True)
class Threshold:
    stat: str
    percent: float | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Threshold":
        match = re.fullmatch(r"(\w+):(\d+(?:\.\d*)?|\.\d+)(%|s|ms|us|ns)", text.strip())
        if not match or match.group(1) not in STATS:
            raise ValueError(
                f"--fail: expected STAT:LIMIT with STAT in {STATS} and LIMIT like 10% or 5us, got {text!r}"
            )
        stat, value, unit = match.group(1), float(match.group(2)), match.group(3)
        if unit == "%":
            return cls(stat, percent=value)
        return cls(stat, seconds=value * {"s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[unit])

    def exceeded(self, base: float, new: float) -> bool:
        if self.percent is not None:
            return new > base * (1 + self.percent / 100)
        return new - base > self.seconds


def _key(entry: dict) -> tuple:
    info = entry.get("extra_info", {})
    if "kernel" in info and "shape" in info:
        return (info["kernel"], info.get("impl", "triton"), info["shape"], bool(info.get("cuda_graph")))
    return (entry["name"],)


@dataclass
class Delta:
    key: tuple
    base: float
    new: float
    failed: bool

    @property
    def change(self) -> float:
        return (self.new - self.base) / self.base if self.base else float("inf")


def _gpu(document: dict) -> str | None:
    """The GPU a file was measured on: decodebench's machine_info names it, pytest-benchmark's entries do."""
    named = document["machine_info"].get("gpu") if isinstance(document.get("machine_info"), dict) else None
    entries = {e.get("extra_info", {}).get("gpu") for e in document["benchmarks"]} - {None}
    return named or (", ".join(sorted(entries)) if entries else None)


def _clock(entry: dict) -> tuple:
    """What an entry's time was read on: its timer (results.entry's default: CUDA events) and clock."""
    info = entry.get("extra_info", {})
    return info.get("timer", "cuda-events"), info.get("clock")


def _same_clocks(base: dict, new: dict, keys) -> None:
    for key in sorted(keys):
        (base_timer, base_clock), (new_timer, new_clock) = _clock(base[key]), _clock(new[key])
        if base_timer != new_timer or (base_clock and new_clock and base_clock != new_clock):
            raise UsageError(
                f"{label(key)}: timed on {base_clock or base_timer} in BASE, {new_clock or new_timer} in NEW:"
                " times read on different clocks are not comparable"
            )


def compare(
    base_path: Path, new_path: Path, threshold: Threshold, allow_other_gpu: bool = False
) -> tuple[list[Delta], list[tuple], list[tuple]]:
    """(paired deltas, keys only in base, keys only in new). UsageError for files of two GPUs (unless
    ``allow_other_gpu``) and for a pair of entries timed on different clocks."""
    # Both files are read and checked before anything is compared (a stat a file lacks included).
    base_file = results.load(base_path, stats=(threshold.stat,))
    new_file = results.load(new_path, stats=(threshold.stat,))
    base_gpu, new_gpu = _gpu(base_file), _gpu(new_file)
    if base_gpu and new_gpu and base_gpu != new_gpu and not allow_other_gpu:
        raise UsageError(
            f"{base_path} was measured on {base_gpu}, {new_path} on {new_gpu}: not a regression check; "
            "pass --allow-other-gpu to compare them anyway"
        )
    base = {_key(e): e for e in base_file["benchmarks"]}
    new = {_key(e): e for e in new_file["benchmarks"]}
    _same_clocks(base, new, base.keys() & new.keys())
    deltas = []
    for key in base.keys() & new.keys():
        b, n = base[key]["stats"][threshold.stat], new[key]["stats"][threshold.stat]
        deltas.append(Delta(key=key, base=b, new=n, failed=threshold.exceeded(b, n)))
    deltas.sort(key=lambda d: d.key)
    return deltas, sorted(base.keys() - new.keys()), sorted(new.keys() - base.keys())


def label(key: tuple) -> str:
    """kernel impl shape, and (graph) for a CUDA-graph replay."""
    return " ".join(str(part) for part in key if not isinstance(part, bool)) + (
        " (graph)" if True in key else ""
    )


def table(deltas: list[Delta], stat: str) -> str:
    from bench.format import table as render
    from bench.format import us

    rows = [
        [
            label(d.key),
            us(d.base),
            us(d.new),
            f"{100 * d.change:+.1f}%",
            "FAILED" if d.failed else "",
        ]
        for d in deltas
    ]
    return render(rows, ["entry", f"base {stat} us", f"new {stat} us", "change", "check"])


def register(sub) -> None:
    parser = sub.add_parser("compare", help="timings of two result files, failing past a threshold")
    parser.add_argument("base")
    parser.add_argument("new")
    parser.add_argument("--fail", default="median:10%", help="STAT:LIMIT, e.g. median:10%% or min:5us")
    parser.add_argument(
        "--allow-other-gpu", action="store_true", help="compare files measured on different GPUs"
    )
    parser.set_defaults(func=main)


def main(args) -> int:
    threshold = checked(Threshold.parse, args.fail)
    deltas, only_base, only_new = compare(Path(args.base), Path(args.new), threshold, args.allow_other_gpu)
    print(table(deltas, threshold.stat))
    for name, keys in (("only in BASE", only_base), ("only in NEW", only_new)):
        if keys:
            print(f"\n{name}: " + "; ".join(label(k) for k in keys))
    failed = [d for d in deltas if d.failed]
    if failed:
        print(f"\nFAILED: {len(failed)} of {len(deltas)} entries past {args.fail}", file=sys.stderr)
    return 1 if failed else 0
