"""Pictures from saved results (the plot extra): a roofline of every kernel's achieved point against the
bandwidth and compute ceilings, and decode attention's GB/s against context length, one line per peer.

Ceilings come from the results' machine_info where the run measured them (copy_gbps, matmul_tflops), else
from the published anchors for the named GPU (bench/serving/hardware.py,
docs/facts.md#gpu-anchors-published-not-measured-here), and the legend says which.
"""

import re
from pathlib import Path

from bench.serving.hardware import ANCHOR_TFLOPS, PROJECTION_GBPS


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _ceilings(machine: dict) -> tuple[float, float, str]:
    gpu = str(machine.get("gpu", ""))
    anchor = next((name for name in PROJECTION_GBPS if name in gpu), "H100")
    gbps = machine.get("copy_gbps") or PROJECTION_GBPS[anchor]
    tflops = machine.get("matmul_tflops") or ANCHOR_TFLOPS.get(anchor, ANCHOR_TFLOPS["H100"])
    source = "measured in this run" if machine.get("copy_gbps") else f"{anchor} anchors (published)"
    return float(gbps), float(tflops), source


def roofline(document: dict, path: Path) -> str:
    plt = _pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed (pip install 'decodebench[plot]')"
    gbps, tflops, source = _ceilings(document.get("machine_info", {}))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    intensities = [10.0**e for e in range(-3, 4)]
    ax.plot(
        intensities,
        [min(gbps * i / 1e3, tflops) for i in intensities],
        color="black",
        lw=1.5,
        label=f"ceilings: {gbps:.0f} GB/s, {tflops:.0f} TFLOP/s ({source})",
    )
    colors: dict[str, str] = {}
    for b in document["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("impl", "triton") != "triton" or not info.get("bytes"):
            continue
        color = colors.setdefault(info.get("kernel", "?"), f"C{len(colors) % 10}")
        seconds, flops = b["stats"]["median"], info.get("flops", 0)
        if flops:
            intensity, achieved = flops / info["bytes"], flops / seconds / 1e12
        else:  # a copy: drawn at 1e-3 FLOP/byte, at the share of the memory roof it reaches
            intensity = 1e-3
            achieved = info["bytes"] / seconds / 1e9 / gbps * (gbps * intensity / 1e3)
        ax.scatter(intensity, achieved, s=14, color=color, label=info.get("kernel"))
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte of the byte model); copies drawn at 1e-3")
    ax.set_ylabel("TFLOP/s (copies: their share of the memory roof)")
    ax.set_title(f"Roofline: {document.get('machine_info', {}).get('gpu', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot written: {path}"


def decode_bandwidth(document: dict, path: Path) -> str:
    plt = _pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed (pip install 'decodebench[plot]')"
    lines: dict[tuple, list] = {}
    for b in document["benchmarks"]:
        info = b.get("extra_info", {})
        match = re.search(r"b=(\d+) ctx=(\d+) ", info.get("shape", ""))
        if info.get("kernel") != "paged_decode" or not match or "page=16" not in info["shape"]:
            continue
        batch, context = int(match.group(1)), int(match.group(2))
        model = info["shape"].split(" b=")[0]
        lines.setdefault((model, batch, info.get("impl", "triton")), []).append(
            (context, info.get("gbps", 0))
        )
    if not lines:
        return "no plot: no paged_decode results with uniform contexts in this file"
    gbps, _, source = _ceilings(document.get("machine_info", {}))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for (model, batch, impl), points in sorted(lines.items()):
        points.sort()
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            ms=3,
            label=f"{model} b={batch} {impl}",
        )
    ax.axhline(gbps, color="black", lw=1, ls="--", label=f"copy bandwidth ({source})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("GB/s (byte model / median time)")
    ax.set_title("Decode attention bandwidth by context")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot written: {path}"


def step_bars(stages, title: str, path) -> str:
    """A decode step's time as one bar stacked by stage (bench/serving/step.py), ms."""
    plt = _pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed (pip install 'decodebench[plot]')"
    fig, ax = plt.subplots(figsize=(9, 3.2))
    left = 0.0
    for stage in sorted(stages, key=lambda s: -s.step_seconds):
        width = stage.step_seconds * 1e3
        ax.barh([0], [width], left=left, label=f"{stage.name} ({stage.bound})")
        left += width
    ax.set_yticks([])
    ax.set_xlabel("ms per decode step (projected)")
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return f"plot written: {path}"


def advise_bars(outcomes, title: str, path) -> str:
    """Each fitting layout's simulated makespan, stacked by the bound its time went to."""
    plt = _pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed (pip install 'decodebench[plot]')"
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(outcomes) + 1.5))
    labels = [o.layout.label for o in outcomes]
    bounds = [b for b in (outcomes[0].by_bound or {}) if any((o.by_bound or {}).get(b) for o in outcomes)]
    left = [0.0] * len(outcomes)
    for bound in bounds:
        widths = [(o.by_bound or {}).get(bound, 0.0) for o in outcomes]
        ax.barh(labels, widths, left=left, label=bound)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("simulated seconds (projected), by what bound them")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot written: {path}"


def validate_scatter(result: dict, kinds, path) -> str:
    """A scatter of projected against measured ms (every kind at every point) and of the published runs."""
    plt = _pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed (pip install 'decodebench[plot]')"
    fig, (kernels, runs) = plt.subplots(1, 2, figsize=(12, 5.5))
    for kind in kinds:
        pairs = [r["kinds"][kind] for r in result["points"] if kind in r["kinds"]]
        if pairs:
            kernels.scatter(
                [p["measured_ms"] for p in pairs], [p["ours_ms"] for p in pairs], s=10, label=kind
            )
    kernels.set(xlabel=f"measured ms per step ({result['tables']})", ylabel="projected ms per step")
    kernels.legend(fontsize=7)
    published = result["published"]
    runs.scatter(
        [r["published_tokens_per_s"] for r in published], [r["ours_tokens_per_s"] for r in published]
    )
    for r in published:
        runs.annotate(r["run"], (r["published_tokens_per_s"], r["ours_tokens_per_s"]), fontsize=6)
    runs.set(xlabel="published output tokens/s", ylabel="projected output tokens/s")
    for ax in (kernels, runs):
        ax.set_xscale("log")
        ax.set_yscale("log")
        low, high = ax.get_xlim()
        ax.plot([low, high], [low, high], color="grey", lw=0.8)  # ours == measured
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"
