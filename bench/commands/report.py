"""Tables for the terminal and summary files: verification, static, traffic, projections, timings.

Each builder takes cases or result entries and returns GitHub-flavoured markdown (tabulate), so the same text
reads well in a terminal, in summary.md and in a closing note.
"""

from bench.measure.device import PROJECTION_GBPS, machine_info


def table(rows, headers) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github", floatfmt="g", disable_numparse=True)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.4g}"


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def verification_table(cases) -> tuple[str, bool]:
    from bench.measure.runner import verify

    device = "cuda" if machine_info().gpu != "cpu" else "cpu"
    rows, all_ok = [], True
    for case in cases:
        for shape in case.small_shapes():
            v = verify(case, shape, device)
            all_ok &= v.ok
            rows.append(
                [
                    v.kernel,
                    v.shape,
                    "verified" if v.ok else "FAILED",
                    f"{v.max_error:.3g}",
                    f"{v.seconds:.2f}",
                    v.message[:120],
                ]
            )
    headers = ["kernel", "shape", "vs reference", "max abs error", "seconds", "detail"]
    return table(rows, headers), all_ok


def static_rows(cases, real: bool = False):
    from bench.measure.static import static_report

    return [row for case in cases for row in static_report(case, real=real)]


def static_table(rows) -> str:
    def widths(w):
        return " ".join(f"{k}B x{v}" for k, v in w.items()) or "-"

    body = []
    for r in rows:
        if r.error:
            body.append([r.kernel, r.shape, r.arch, r.num_warps, "-", "-", "-", "-", "-", f"n/a: {r.error}"])
            continue
        body.append(
            [
                r.kernel,
                r.shape,
                r.arch,
                r.num_warps,
                r.registers,
                r.spill_bytes,
                r.shared_bytes,
                r.widest_load,
                r.widest_store,
                f"loads {widths(r.load_widths)}; stores {widths(r.store_widths)}",
            ]
        )
    headers = [
        "kernel",
        "shape",
        "arch",
        "warps",
        "registers",
        "spill B",
        "shared B",
        "widest load B",
        "widest store B",
        "global accesses by width",
    ]
    return table(body, headers)


def traffic_table(cases) -> tuple[str, bool]:
    from bench.measure.runner import traffic

    rows, all_ok = [], True
    for case in cases:
        for shape in case.traffic_shapes():
            t = traffic(case, shape)
            all_ok &= t.ok
            rows.append(
                [
                    t.kernel,
                    t.shape,
                    t.loaded,
                    t.stored,
                    t.model,
                    f"{t.ratio:.3f}",
                    f"{t.unique / t.model:.3f}",
                    "reported" if t.limit is None else ("ok" if t.ok else f"over {t.limit}"),
                ]
            )
    headers = ["kernel", "shape", "loaded B", "stored B", "model B", "ratio", "unique/model", "check"]
    return table(rows, headers), all_ok


def projection_table(cases) -> str:
    from bench.measure.runner import projection

    rows = []
    for case in cases:
        for shape in case.default_shapes():
            p = projection(case, shape)
            rows.append(
                [p["kernel"], p["shape"], _bytes(p["bytes"]), *(_us(p[gpu]) for gpu in PROJECTION_GBPS)]
            )
    headers = [
        "kernel",
        "shape",
        "bytes (model)",
        *(f"{gpu} us at {gbps / 1000:.1f} TB/s" for gpu, gbps in PROJECTION_GBPS.items()),
    ]
    return table(rows, headers)


def results_table(benchmarks: list[dict]) -> str:
    """One row per kernel entry, with the speedup over the reference and the ratio to each peer measured at
    the same shape (a peer's time over the kernel's: above 1, the kernel is faster); peers that could not
    run are listed under the table with their reasons."""
    others: dict[tuple, dict[str, float]] = {}
    for b in benchmarks:
        info = b.get("extra_info", {})
        if info.get("impl") not in (None, "triton"):
            others.setdefault((info.get("kernel"), info.get("shape")), {})[info["impl"]] = b["stats"][
                "median"
            ]
    rows, skipped = [], {}
    for b in benchmarks:
        info, stats = b.get("extra_info", {}), b["stats"]
        if info.get("impl") not in (None, "triton"):
            continue
        median = stats["median"]
        times = dict(others.get((info.get("kernel"), info.get("shape")), {}))
        reference = times.pop("reference", None)
        p20, p80 = info.get("p20_s"), info.get("p80_s")
        for peer, reason in info.get("peers_skipped", {}).items():
            skipped.setdefault(peer, reason)
        rows.append(
            [
                info.get("kernel", b["name"]),
                info.get("shape", b.get("param") or ""),
                ("graph " if info.get("cuda_graph") else "") + _us(median),
                f"{_us(p20)}-{_us(p80)}" if p20 is not None and p80 is not None else "-",
                info.get("gbps", "-"),
                info.get("pct_of_peak", "-"),
                f"{reference / median:.2f}x" if reference else "-",
                ", ".join(f"{peer} {t / median:.2f}x" for peer, t in sorted(times.items())) or "-",
                {True: "verified", False: "FAILED"}.get(info.get("verified"), "-"),
            ]
        )
    headers = [
        "kernel",
        "shape",
        "median us",
        "p20-p80 us",
        "GB/s",
        "% of copy peak",
        "vs reference",
        "peer time / kernel time",
        "checked",
    ]
    text = table(rows, headers)
    if skipped:
        text += "\n\nPeers that did not run:\n" + "\n".join(f"- {p}: {r}" for p, r in sorted(skipped.items()))
    return text
