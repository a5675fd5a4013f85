"""The machine a whole model is served on: one GPU's ceilings (``Hardware``) and the links between GPUs
(``Interconnect``), as published anchors or as a gpu-check run or an all-reduce run measured them.

The anchors are other people's published figures (docs/facts.md#gpu-anchors-published-not-measured-here),
never this project's measurements: every figure carries its provenance in ``sources``, "anchor (published)",
"anchor (assumed)" or "measured: <file>". Result files are read by the caller (bench/commands, with
bench.measure.results) and passed in as their loaded contents: nothing here opens a file.
"""

import math
from dataclasses import dataclass, field, replace
from pathlib import PurePath

FACTS = "docs/facts.md#gpu-anchors-published-not-measured-here"

#: A device-to-device copy's bandwidth (bytes read + written per second, 1e9): typical published figures,
#: the ceiling projections hold bytes against where no GPU is present.
PROJECTION_GBPS = {"H100": 3000.0, "H200": 4300.0}
#: bf16 8192^3 matrix-product throughput, TFLOP/s: a typical published H100 figure (the H200 has the same
#: GH100 compute).
ANCHOR_TFLOPS = {"H100": 790.0}
#: HBM capacity, bytes, from NVIDIA's datasheets.
ANCHOR_MEMORY_BYTES = {"H100": 80e9, "H200": 141e9}


@dataclass(frozen=True)
class Hardware:
    """One GPU's ceilings and how much of each a stage reaches. ``sources`` says, per figure, where it
    comes from: "anchor (published): ...", "anchor (assumed): ..." or "measured: <file>"."""

    name: str
    memory_bytes: float
    copy_gbps: float  # bytes read + written per second by a device copy: the bandwidth ceiling
    matmul_tflops: float  # a large bf16 matrix product: the compute ceiling
    memory_efficiency: float = 0.9  # share of copy bandwidth a bandwidth-bound stage reaches
    compute_efficiency: float = 0.7  # share of the matmul ceiling a compute-bound stage reaches
    launch_us: float = 2.0  # the gap a kernel launch adds under CUDA-graph replay
    kernel_efficiency: dict = field(default_factory=dict)  # stage -> measured share of copy bandwidth
    sources: dict = field(default_factory=dict)

    @classmethod
    def from_results(cls, base: "Hardware", machine: dict, benchmarks=(), origin: str = "") -> "Hardware":
        """``base`` with what a gpu-check run measured: the ceilings of its machine.json (``machine``, as
        bench.measure.results.read_machine_json checked it) and each suite kernel's measured share of copy
        bandwidth from its run.json entries (``benchmarks``, kept per shape: ``efficiency_for`` picks the
        nearest). ``origin``: the run's folder name, for the sources."""
        where = f"measured: {origin}/machine.json" if origin else "measured: machine.json"
        sources = dict(base.sources)
        hardware = base
        if machine.get("copy_gbps"):
            hardware = replace(hardware, copy_gbps=float(machine["copy_gbps"]))
            sources["copy_gbps"] = where
        if machine.get("matmul_tflops"):
            hardware = replace(hardware, matmul_tflops=float(machine["matmul_tflops"]))
            sources["matmul_tflops"] = where
        if machine.get("memory_gib"):
            hardware = replace(hardware, memory_bytes=float(machine["memory_gib"]) * 2**30)
            sources["memory"] = where
        kernels: dict[str, list] = {}
        for entry in benchmarks:
            info = entry.get("extra_info", {})
            if info.get("impl", "triton") == "triton" and info.get("pct_of_peak") and info.get("bytes"):
                kernels.setdefault(info.get("kernel"), []).append((info["bytes"], info["pct_of_peak"] / 100))
        return replace(
            hardware, name=machine.get("gpu", hardware.name), kernel_efficiency=kernels, sources=sources
        )

    def efficiency_for(self, kernel: str | None, nbytes: float) -> tuple[float, str]:
        """The share of copy bandwidth ``kernel`` reached at the measured shape nearest ``nbytes``, or the
        anchor's."""
        found = self.kernel_efficiency.get(kernel or "")
        if not found:
            return self.memory_efficiency, "anchor"
        near = min(found, key=lambda item: abs(math.log(max(item[0], 1) / max(nbytes, 1))))
        return min(1.0, near[1]), "measured"


_ASSUMED = {
    "efficiency": "anchor (assumed): 90% of copy bandwidth, 70% of the matmul ceiling",
    "launch": "anchor (assumed): 2 us a kernel under CUDA graphs",
}

GPUS = {
    "h100": Hardware(
        name="H100 SXM (anchors)",
        memory_bytes=ANCHOR_MEMORY_BYTES["H100"],
        copy_gbps=PROJECTION_GBPS["H100"],
        matmul_tflops=ANCHOR_TFLOPS["H100"],
        sources={
            "memory": f"anchor (published): 80 GB ({FACTS})",
            "copy_gbps": f"anchor (published): a device copy at about 3.0 TB/s ({FACTS})",
            "matmul_tflops": f"anchor (published): bf16 8192^3 at about 790 TFLOP/s ({FACTS})",
            **_ASSUMED,
        },
    ),
    "h200": Hardware(
        name="H200 SXM (anchors)",
        memory_bytes=ANCHOR_MEMORY_BYTES["H200"],
        copy_gbps=PROJECTION_GBPS["H200"],
        matmul_tflops=ANCHOR_TFLOPS["H100"],
        sources={
            "memory": f"anchor (published): 141 GB ({FACTS})",
            "copy_gbps": f"anchor (published): a device copy at about 4.3 TB/s ({FACTS})",
            "matmul_tflops": f"anchor (published): the H100's bf16 matmul, the same GH100 compute ({FACTS})",
            **_ASSUMED,
        },
    ),
}


@dataclass(frozen=True)
class Interconnect:
    """The links between GPUs, as a hop latency (alpha) and a per-GPU one-way bandwidth (beta)."""

    name: str
    gbps: float
    hop_us: float
    source: str

    def all_reduce_s(self, nbytes: float, ranks: int) -> tuple[float, float]:
        """(latency, transfer) seconds of a ring all-reduce of ``nbytes`` on each rank."""
        if ranks <= 1:
            return 0.0, 0.0
        return 2 * (ranks - 1) * self.hop_us * 1e-6, 2 * (ranks - 1) / ranks * nbytes / (self.gbps * 1e9)

    def all_to_all_s(self, sent_bytes: float, ranks: int) -> tuple[float, float]:
        """(latency, transfer) seconds of an all-to-all in which each rank sends ``sent_bytes`` to others."""
        if ranks <= 1:
            return 0.0, 0.0
        return (ranks - 1) * self.hop_us * 1e-6, sent_bytes / (self.gbps * 1e9)

    def send_s(self, nbytes: float) -> tuple[float, float]:
        return self.hop_us * 1e-6, nbytes / (self.gbps * 1e9)

    @classmethod
    def from_all_reduce(cls, document: dict, path: str) -> "Interconnect":
        """Alpha and beta fitted to a ``decodebench dist allreduce --out`` result (``document``, loaded and
        checked by bench.measure.results.load from ``path``, named in the source): the hop latency from the
        smallest size's time (2 (n - 1) hops), the bandwidth from the largest size's bus bandwidth (what a
        ring all-reduce's links carry per GPU)."""
        found = [
            (info["bytes"], b["stats"]["median"], info)
            for b in document["benchmarks"]
            for info in [b.get("extra_info", {})]
            if info.get("kernel") == "all_reduce"
            and info.get("impl") in ("nccl", "gloo")
            and info.get("bytes")
            and b["stats"]["median"] > 0
        ]
        world = found[0][2].get("world_size", 1) if found else 1
        if not found or not isinstance(world, int) or world < 2:
            raise ValueError(f"interconnect: {path} holds no all-reduce measured on 2 or more ranks")
        small, large = min(found), max(found)
        hop_us = small[1] * 1e6 / (2 * (world - 1))
        busbw = large[0] / large[1] * 2 * (world - 1) / world / 1e9
        machine = document.get("machine_info", {})
        file = PurePath(path).name
        source = (
            f"measured: {file}, {world} ranks ({machine.get('gpu', '?')}): {small[1] * 1e6:.1f} us at "
            f"{small[0]} B, bus bandwidth {busbw:.0f} GB/s at {large[0]} B"
        )
        return cls(name=f"measured ({file})", gbps=busbw, hop_us=hop_us, source=source)


INTERCONNECTS = {
    "nvlink": Interconnect(
        name="NVLink (H100/H200 SXM)",
        gbps=450.0,
        hop_us=1.5,
        source="anchor (published): 900 GB/s per GPU both ways (docs/facts.md#the-study-behind-the-suite); "
        "hop latency chosen so a ring all-reduce of 8 KB on 8 GPUs takes 21 us, inside the 20-25 us "
        "published for NCCL in one engine (docs/facts.md#published-kernel-figures-to-hold-results-against)",
    ),
    "pcie": Interconnect(
        name="PCIe Gen5 x16",
        gbps=50.0,
        hop_us=5.0,
        source="anchor (assumed): about 64 GB/s raw per direction",
    ),
    "ib": Interconnect(
        name="InfiniBand NDR 400 Gb/s", gbps=45.0, hop_us=5.0, source="anchor (assumed): 400 Gb/s per GPU"
    ),
}
