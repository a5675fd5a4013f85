"""Tables and units for everything decodebench prints: a leaf (the standard library and tabulate only), so
any floor of bench may format with it.

One formatter a unit, each taking the unit its name says it prints from the base unit (seconds, bytes), so
no caller converts by hand and no two tables print the same quantity differently.
"""


def table(rows, headers) -> str:
    """GitHub-flavoured markdown: reads well in a terminal, in summary.md and in a closing note. Cells are
    printed as given (no number parsing: "1,234" and "-" stay as they are)."""
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github", floatfmt="g", disable_numparse=True)


def us(seconds: float | None) -> str:
    """Seconds as microseconds: four significant figures below 1,000 us (2.345, 158.5), whole microseconds
    with thousands separators from there (1,235, 12,346); "-" where there is no figure."""
    if seconds is None:
        return "-"
    micro = seconds * 1e6
    return f"{micro:,.0f}" if abs(micro) >= 999.5 else f"{micro:.4g}"


def byte_count(n: float) -> str:
    """Bytes in decimal units (1.23 GB, 4.50 MB, 12.00 KB, 512 B)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
