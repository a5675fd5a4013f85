"""`decodebench tune`: launch configurations chosen by timing candidates, one table per GPU. The tuner is
bench/measure/tuning.py, each kernel's candidates its operator's ``tune`` spec (bench/operators/). This
module parses the arguments, picks the output folder and the deadline, calls the tuner, and checks a table
before ``--install`` merges it."""

import re
import tempfile
import time
from pathlib import Path

from bench.commands.arguments import UsageError, add_budget, add_out_folder, checked, kernels_named
from bench.measure import results, tuning
from bench.measure.device import machine_info
from bench.measure.results import read_json_object


def register(sub) -> None:
    parser = sub.add_parser("tune", help="launch configurations chosen by timing candidates (per-GPU table)")
    parser.add_argument("cases", nargs="*", help="kernels to tune (default: every tunable one)")
    parser.add_argument(
        "--dry-run", action="store_true", help="no timing: candidates, sm_90 static figures, spills dropped"
    )
    add_out_folder(
        parser,
        "folder for tune.md, tune-timings.json, tuned-configs.json "
        "(default bench/results/<gpu>/tune-<UTC time>; a temporary folder for --dry-run)",
    )
    add_budget(parser, "wall-clock seconds; stops cleanly between candidates")
    parser.add_argument(
        "--install",
        action="store_true",
        help="merge --out DIR's tuned-configs.json into kernels/configs/<gpu>.json (no tuning)",
    )
    parser.set_defaults(func=main)


def main(args) -> int:
    if args.install:
        return install(args.out)
    return run(kernels_named(args.cases), args.out, args.dry_run, args.budget)


def run(cases, out: str | None, dry_run: bool, budget: float | None) -> int:
    """Tunes ``cases`` (or, ``dry_run``, lists their candidates) within ``budget`` seconds; writes to
    ``out``, by default this GPU's results folder (a temporary one for a dry run)."""
    if out:
        folder = Path(out)
    elif dry_run:
        folder = Path(tempfile.mkdtemp(prefix="decodebench-tune-"))
    else:
        stamp = time.strftime("tune-%Y-%m-%d-%H%M%S", time.gmtime())
        folder = results.results_dir_for(machine_info().slug) / stamp
    deadline = time.monotonic() + budget if budget else None
    start = time.perf_counter()
    text, ok = tuning.run(cases, out=folder, deadline=deadline, dry_run=dry_run)
    print(text)
    print(f"{time.perf_counter() - start:.1f} s; written: {folder}")
    if not dry_run and ok:
        print(f"to commit the table: decodebench tune --install --out {folder}")
    return 0 if ok else 1


def install(out: str | None) -> int:
    """Merges the table a tune run wrote to ``out`` into kernels/configs/<gpu>.json."""
    if not out:
        raise UsageError("--install: name the folder a tune run wrote with --out DIR")
    _check_tuned_configs(Path(out) / tuning.RESULT_FILE)
    print(f"installed: {tuning.install(Path(out))}")
    return 0


def _check_tuned_configs(path: Path) -> None:
    """What ``tune --install`` merges: a tune run's table, its slug a file name (the target's)."""
    document = checked(read_json_object, path)
    kernels = document.get("kernels")
    slug = document.get("slug")
    if not isinstance(slug, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", slug):
        raise UsageError(f"{path}: slug: expected a GPU's slug (a file name), got {slug!r:.60}")
    if not isinstance(kernels, dict) or not all(isinstance(entries, dict) for entries in kernels.values()):
        raise UsageError(f"{path}: kernels: expected an object of objects (kernel -> key -> configuration)")
