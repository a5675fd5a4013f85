"""Tables for the terminal and summary files: verification, static, traffic, projections, timings.

Formatting only: each builder takes rows that bench/measure produced (or result entries read from a file)
and returns GitHub-flavoured markdown (tabulate), so the same text reads well in a terminal, in summary.md
and in a closing note.
"""

from bench.format import byte_count, table, us
from bench.serving.hardware import PROJECTION_GBPS


def verification_table(verifications) -> tuple[str, bool]:
    """Rows of runner.Verification: (table, all verified)."""
    rows = [
        [
            v.kernel,
            v.shape,
            "verified" if v.ok else "FAILED",
            f"{v.max_error:.3g}",
            f"{v.seconds:.2f}",
            v.message[:120],
        ]
        for v in verifications
    ]
    headers = ["kernel", "shape", "vs reference", "max abs error", "seconds", "detail"]
    return table(rows, headers), all(v.ok for v in verifications)


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
                f"{r.spill_bytes}/{r.stack_bytes}",
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
        "spill/stack B",
        "shared B",
        "widest load B",
        "widest store B",
        "global accesses by width",
    ]
    return table(body, headers)


def traffic_table(traffic_rows) -> tuple[str, bool]:
    """Rows of runner.TrafficRow: (table, all within their limits)."""
    rows = [
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
        for t in traffic_rows
    ]
    headers = ["kernel", "shape", "loaded B", "stored B", "model B", "ratio", "unique/model", "check"]
    return table(rows, headers), all(t.ok for t in traffic_rows)


def projection_table(projections) -> str:
    """Rows of runner.projection: modelled bytes over each GPU's published copy bandwidth (the anchors)."""
    rows = [
        [p["kernel"], p["shape"], byte_count(p["bytes"]), *(us(p[gpu]) for gpu in PROJECTION_GBPS)]
        for p in projections
    ]
    headers = [
        "kernel",
        "shape",
        "bytes (model)",
        *(f"{gpu} us at {gbps / 1000:.1f} TB/s" for gpu, gbps in PROJECTION_GBPS.items()),
    ]
    return table(rows, headers)


_CLOCK_WORDS = {"host": "host clock", "cuda-events": "device time"}


def _clocks(peer_timer: str, kernel_timer: str) -> str:
    """'' where a peer and the kernel were timed alike; else both clocks: ' (host clock vs device time)'."""
    if peer_timer == kernel_timer:
        return ""
    words = (_CLOCK_WORDS.get(timer, timer) for timer in (peer_timer, kernel_timer))
    return " ({} vs {})".format(*words)


def results_table(benchmarks: list[dict]) -> str:
    """One row per kernel and shape. The headline is the CUDA-graph replay where one was timed (what a
    serving engine running decode under graphs sees), the eager call beside it; then the speedup over the
    reference and the ratio to each peer at the same shape (a peer's time over the kernel's eager time:
    above 1, the kernel is faster). A peer read on another clock than the kernel (the host pool, host-only
    work on the host clock, against the kernel's CUDA events) has its ratio labelled with both clocks: it
    sets host time beside device time, not one call's cost beside the other's. Peers that did not run are
    listed under the table with their reasons, peers that failed or disagreed with the reference as FAILED."""
    times: dict[tuple, dict[str, float]] = {}
    timers: dict[tuple, str] = {}  # (key, impl) -> the entry's timer, for the peers
    kernel_rows: dict[tuple, dict[bool, dict]] = {}
    for b in benchmarks:
        info = b.get("extra_info", {})
        key = (info.get("kernel", b["name"]), info.get("shape", b.get("param") or ""))
        impl = info.get("impl", "triton")
        if impl == "triton":
            kernel_rows.setdefault(key, {})[bool(info.get("cuda_graph"))] = b
        else:
            times.setdefault(key, {})[impl] = b["stats"]["median"]
            timers[key, impl] = info.get("timer", "cuda-events")
    rows, skipped, failed = [], {}, {}
    for key, by_graph in kernel_rows.items():
        eager, graphed = by_graph.get(False), by_graph.get(True)
        head = graphed or eager
        info, median = head["extra_info"], head["stats"]["median"]
        eager_s = eager["stats"]["median"] if eager else None
        others = dict(times.get(key, {}))
        reference = others.pop("reference", None)
        p20, p80 = info.get("p20_s"), info.get("p80_s")
        for source in (eager, graphed):
            for peer, reason in ((source or {}).get("extra_info", {}).get("peers_skipped") or {}).items():
                skipped.setdefault(peer, reason)
            for peer, error in ((source or {}).get("extra_info", {}).get("peers_failed") or {}).items():
                failed.setdefault(f"{peer} at {key[1]}", error)
        base = eager_s or median
        base_timer = (eager or head)["extra_info"].get("timer", "cuda-events")
        rows.append(
            [
                key[0],
                key[1],
                ("graph " if graphed else "") + us(median),
                f"{us(p20)}-{us(p80)}" if p20 is not None and p80 is not None else "-",
                us(eager_s) if graphed and eager_s else "-",
                info.get("gbps", "-"),
                info.get("pct_of_peak", "-"),
                info.get("tflops", "-"),
                info.get("pct_of_matmul", "-"),
                info.get("bound", "-"),
                f"{reference / base:.2f}x" if reference and base else "-",  # a zero median has no ratio
                ", ".join(
                    f"{peer} {t / base:.2f}x{_clocks(timers[key, peer], base_timer)}"
                    for peer, t in sorted(others.items())
                    if base
                )
                or "-",
                {True: "verified", False: "FAILED"}.get(info.get("verified"), "-"),
            ]
        )
    headers = [
        "kernel",
        "shape",
        "median us",
        "p20-p80 us",
        "eager us",
        "GB/s",
        "% of copy peak",
        "TFLOP/s",
        "% of matmul",
        "bound",
        "vs reference",
        "peer time / kernel time",
        "checked",
    ]
    text = table(rows, headers)
    if failed:
        text += "\n\nPeers that FAILED (raised, or disagreed with the reference):\n" + "\n".join(
            f"- {p}: {e}" for p, e in sorted(failed.items())
        )
    if skipped:
        text += "\n\nPeers that did not run:\n" + "\n".join(f"- {p}: {r}" for p, r in sorted(skipped.items()))
    return text
