"""The command line's argument checks, so that bad input is one line on stderr and exit status 2, found
before any command starts work.

Two kinds: argparse types (``type=``) that reject a value while the arguments are parsed (a count that is
not a positive integer, a size that is NaN, a file that is not JSON, an output path no file can be created
at), and UsageError, raised by a command for what needs more than one argument to judge (a layout against
a model, a shape index against a case) before it does anything else; cli.main prints it as argparse prints
its own errors.
"""

import argparse
import math
import os
from pathlib import Path

from bench.measure.results import read_json_object
from bench.operators import CASES, STATIC_ONLY, static_cases

# Upper bounds past which a number is nonsense and would break the work, not just slow it: no GPU holds
# 10 TiB; numpy's Poisson draw fails far below inf; timeouts and budgets become timedelta and select()
# arguments, which overflow (1e6 s is eleven days).
MAX_GPU_GIB = 1e4
MAX_ARRIVAL_RATE = 1e6
MAX_SECONDS = 1e6


class UsageError(ValueError):
    """Bad input on the command line found after parsing: cli.main prints it on one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse's parser with its errors on one line (the usage block is what --help is for), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def checked(check, *args, **kwargs):
    """``check(*args, **kwargs)``, its ValueError (bad input, judged by the model or system layer) raised
    again as a UsageError. Only for checks: a ValueError from the work itself is a bug to see in full."""
    try:
        return check(*args, **kwargs)
    except ValueError as error:
        raise UsageError(str(error)) from None


def integer(minimum: int = 1, maximum: int | None = None):
    """A type for an int of at least ``minimum`` (and at most ``maximum``)."""
    if maximum is not None:
        expected = f"an integer from {minimum} to {maximum}"
    else:
        expected = {0: "a non-negative integer", 1: "a positive integer"}[minimum]

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def positive_number(maximum: float = math.inf):
    """A type for a finite float above 0 (and at most ``maximum``): no NaN, no inf."""
    expected = "a finite number above 0" + (f" and at most {maximum:g}" if maximum < math.inf else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and 0 < value <= maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = integer(1)
non_negative_int = integer(0)


def positive_ints(text: str) -> tuple[int, ...]:
    """A type for comma-separated positive integers (at least one)."""
    parts = [part.strip() for part in text.split(",")]
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def names_from(choices):
    """A type for comma-separated names, each one of ``choices`` (at least one)."""
    known = tuple(choices)

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(","))
        unknown = [name for name in names if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown))}; expected comma-separated names "
                f"from {', '.join(known)}"
            )
        return names

    return parse


def json_file(text: str) -> str:
    """A type for a readable file holding a JSON object (a model's config.json): its path."""
    try:
        read_json_object(Path(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def output_file(text: str) -> str:
    """A type for a file to write: not a folder, and in a folder that exists or can be made (the command
    makes it when it writes, ``ready_to_write``)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; expected a file to write")
    _check_creatable(path.parent, text)
    return text


def output_folder(text: str) -> str:
    """A type for a folder to write into: one that exists, or that can be made."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    _check_creatable(path, text)
    return text


def add_out_folder(parser, help: str, **kwargs) -> None:
    """``--out``: the folder a command writes into (checked as output_folder)."""
    parser.add_argument("--out", type=output_folder, help=help, **kwargs)


def add_budget(parser, help: str, *aliases: str, **kwargs) -> None:
    """``--budget`` (and ``aliases``): the wall-clock seconds a command may spend."""
    parser.add_argument("--budget", *aliases, type=positive_number(MAX_SECONDS), help=help, **kwargs)


def _check_creatable(folder: Path, text: str) -> None:
    """The folder exists and is writable, or its nearest existing ancestor is a writable folder."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {text}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create {text}: {existing} is not writable")


def ready_to_write(text: str) -> Path:
    """An output_file's path, its folder made."""
    path = Path(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def kernels_named(names) -> list:
    """The cases (bench/operators) of these kernels, every case without names."""
    if not names:
        return list(CASES.values())
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise UsageError(f"unknown kernel {', '.join(unknown)}; known: {', '.join(CASES)}")
    return [CASES[n] for n in names]


def static_kernels_named(names) -> list:
    """Cases and static-only kernels (EP's regroup) by name, all of them without names."""
    if not names:
        return static_cases()
    unknown = [n for n in names if n not in STATIC_ONLY and n not in CASES]
    if unknown:
        known = [*CASES, *STATIC_ONLY]
        raise UsageError(f"unknown kernel {', '.join(unknown)}; known: {', '.join(known)}")
    return [STATIC_ONLY[n] if n in STATIC_ONLY else CASES[n] for n in names]


def default_shape(case, index: int):
    """The case's default shape ``index`` (--shape)."""
    shapes = list(case.default_shapes())
    if not 0 <= index < len(shapes):
        raise UsageError(f"--shape: expected 0 to {len(shapes) - 1} (the case's default shapes), got {index}")
    return shapes[index]
