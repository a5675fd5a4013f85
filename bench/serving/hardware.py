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

import numpy as np

FACTS = "docs/facts.md#gpu-anchors-published-not-measured-here"

#: A device-to-device copy's bandwidth (bytes read + written per second, 1e9): typical published figures,
#: the ceiling projections hold bytes against where no GPU is present.
PROJECTION_GBPS = {"H100": 3000.0, "H200": 4300.0}
#: bf16 8192^3 matrix-product throughput, TFLOP/s: a typical published H100 figure (the H200 has the same
#: GH100 compute).
ANCHOR_TFLOPS = {"H100": 790.0}
#: HBM capacity, bytes: the total the driver reports (nvidia-smi's MiB; what an engine's memory fraction is
#: of), not the datasheets' rounded 80 and 141 GB (docs/facts.md#gpu-anchors-published-not-measured-here).
ANCHOR_MEMORY_BYTES = {"H100": 81559 * 2**20, "H200": 143771 * 2**20}
#: A fused MoE's achieved compute rate by rows an expert (M of each expert's GEMMs), per GPU one curve per
#: expert dtype and measured shape: (bytes a weight, hidden, inter) -> ((rows, TFLOP/s), ...), each anchor its
#: FLOPs over its latency less the one-token latency, from TensorRT-LLM 1.3.0rc20's measured MoE table of that
#: GPU (AIConfigurator, CUTLASS fused MoE, balanced routing, EP8); vLLM's own table, which validate compares
#: against, is not used. Few rows an expert leave its MMA tiles' rows mostly empty (each tile costs the same
#: however many rows fill it), so the rate grows with the rows and flattens far under the tensor cores'
#: ceiling. Up to about 32 rows the time is near the weights' read, so the compute term seldom binds there.
#: - block-fp8 at DeepSeek-R1's shape (7168, 2048; 32 experts a rank, tokens = 32 x rows): flat near 580
#:   past 256 rows (block-fp8 scales the partial sums every 128 of K outside the tensor cores: DeepSeek-V3's
#:   report, arXiv 2412.19437, 3.3.2); a CUTLASS grouped GEMM as vLLM runs under EP (FlashInfer's).
#: - bf16 at Qwen3-30B-A3B's (2048, 768) and Qwen3-235B-A22B's (4096, 1536) shapes (16 experts a rank,
#:   tokens = 16 x rows): the same rows reach more on the larger expert (382 against 302 TFLOP/s at 128
#:   rows, 575 against 361 at 256), so each shape keeps its own curve; both flatten past 512 rows (638-645,
#:   444-461 up to 1,024). vLLM 0.24 runs bf16 experts on its Triton fused MoE instead, which its table
#:   puts at 1.2-1.8x TensorRT-LLM's time (EP8, power-law routing, 512-4096 tokens): the step model's bf16
#:   experts are as fast as TensorRT-LLM's. docs/facts.md#measured-ground-truth-for-the-decode-step-model.
#: The H100's curves sit 10-31% under the H200's at the same rows (the same GH100 tensor cores; the
#: H100's table measures them slower, most at few rows).
MOE_RATES = {
    "H200": {
        (1, 7168, 2048): ((16, 126.5), (32, 222.6), (64, 371.3), (128, 526.2), (256, 579.9)),
        (2, 2048, 768): ((16, 66.8), (32, 100.1), (64, 175.3), (128, 301.9), (256, 361.4), (512, 452.6)),
        (2, 4096, 1536): ((16, 69.5), (32, 131.2), (64, 225.1), (128, 381.8), (256, 575.4), (512, 638.0)),
    },
    "H100": {
        (1, 7168, 2048): ((16, 92.2), (32, 166.0), (64, 282.6), (128, 435.3), (256, 519.1)),
        (2, 2048, 768): ((16, 46.4), (32, 80.2), (64, 137.8), (128, 223.3), (256, 307.8), (512, 386.7)),
        (2, 4096, 1536): ((16, 48.7), (32, 91.4), (64, 165.8), (128, 278.9), (256, 467.4), (512, 556.2)),
    },
}
#: The table key each curve comes from: TensorRT-LLM's (dtype, hidden, inter, top_k, experts, moe_tp, moe_ep,
#: routing); an anchor at R rows an expert is the row of R x experts / top_k tokens, net of the one-token row.
MOE_RATE_SOURCES = {
    (1, 7168, 2048): ("fp8_block", 7168, 2048, 8, 256, 1, 8, "balanced"),
    (2, 2048, 768): ("bfloat16", 2048, 768, 8, 128, 1, 8, "balanced"),
    (2, 4096, 1536): ("bfloat16", 4096, 1536, 8, 128, 1, 8, "balanced"),
}


@dataclass(frozen=True)
class Hardware:
    """One GPU's ceilings and how much of each a stage reaches. ``sources`` says, per figure, where it
    comes from: "anchor (published): ...", "anchor (assumed): ..." or "measured: <file>"."""

    name: str
    memory_bytes: float
    copy_gbps: float  # bytes read + written per second by a device copy: the bandwidth ceiling
    matmul_tflops: float  # a large bf16 matrix product: the compute ceiling
    memory_efficiency: float = 0.9  # share of copy bandwidth a bandwidth-bound stage reaches
    compute_efficiency: float = 0.9  # share of the matmul ceiling a large GEMM reaches
    launch_us: float = 2.0  # a small kernel (norm, activation, rope, cache write) under CUDA-graph replay
    gemm_us: float = 4.4  # a bf16 GEMM's fixed cost: its latency at zero bytes
    fp8_gemm_us: float = 7.1  # an fp8 GEMM's, the activation's quantization before it included
    attention_us: float = 9.4  # decode attention's floor (batch 1, one token), its cache write apart
    mla_attention_us: float = 16.2  # MLA decode attention's floor (FA3's MLA kernel, its split-KV combine in)
    mla_attention_tflops: float = 650.0  # its compute ceiling (it reaches compute_efficiency of it)
    moe_us: float = 20.0  # a fused MoE's fixed cost: align/sort, two grouped GEMMs, activation, sum
    host_us: float = 0.0  # per step, per engine process: scheduling, input preparation and sampling
    fp8_tflops: float = 0.0  # the fp8 tensor-core ceiling; 0: twice the bf16 ceiling
    moe_rates: dict = field(default_factory=lambda: dict(MOE_RATES["H200"]))  # fused MoE's rate by rows
    kernel_times: dict = field(default_factory=dict)  # kernel -> [(bytes, measured seconds)], by shape
    sources: dict = field(default_factory=dict)

    def tflops(self, weight_bytes: int) -> float:
        """The matmul ceiling for weights of ``weight_bytes`` bytes: fp8 tensor cores for 1 byte."""
        if weight_bytes == 1:
            return self.fp8_tflops or 2 * self.matmul_tflops
        return self.matmul_tflops

    def moe_rate_curve(self, weight_bytes: float, shape: tuple):
        """The measured (rows, TFLOP/s) curve for experts of ``weight_bytes`` bytes a weight and ``shape``
        (hidden, inter): of this dtype's curves (``moe_rates``), the one whose expert is nearest in size
        (hidden x inter, by ratio); None where no curve of this dtype was taken."""
        hidden, inter = shape
        curves = [key for key in self.moe_rates if key[0] == weight_bytes]
        if not curves:
            return None
        nearest = min(curves, key=lambda key: abs(math.log(key[1] * key[2] / (hidden * inter))))
        return self.moe_rates[nearest]

    def moe_tflops(self, weight_bytes: float, rows_per_expert, shape: tuple):
        """The fused MoE's compute ceiling for an expert's GEMMs at ``rows_per_expert`` rows (their M), the
        expert of ``shape`` (hidden, inter): the measured rate at that many rows (``moe_rate_curve``,
        interpolated; flat past its last anchor; below its first in proportion to the rows, the first
        anchor's tile time however few rows fill it) over ``compute_efficiency``, so that a stage reaches the
        measured rate; never above the dtype's ceiling; an array of rows gives an array. A dtype with no
        measured curve (MXFP4): its matmul ceiling."""
        curve = self.moe_rate_curve(weight_bytes, shape)
        if curve is None:
            return self.tflops(weight_bytes)
        rate = np.minimum(
            _interpolated(curve, rows_per_expert) / self.compute_efficiency, self.tflops(weight_bytes)
        )
        return float(rate) if rate.ndim == 0 else rate

    def gemm_floor_us(self, weight_bytes: int) -> float:
        return self.fp8_gemm_us if weight_bytes == 1 else self.gemm_us

    @classmethod
    def from_results(cls, base: "Hardware", machine: dict, benchmarks=(), origin: str = "") -> "Hardware":
        """``base`` with what a gpu-check run measured: the ceilings of its machine.json (``machine``, as
        bench.measure.results.read_machine_json checked it) and each suite kernel's measured time from its
        run.json entries (``benchmarks``, kept per shape: ``efficiency_for`` picks the nearest): the entry's
        median, or its bytes over pct_of_peak of the run's copy bandwidth. ``origin``: the run's folder
        name, for the sources."""
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
                peak = info.get("peak_gbps") or hardware.copy_gbps
                seconds = entry.get("stats", {}).get("median") or info["bytes"] / (
                    info["pct_of_peak"] / 100 * peak * 1e9
                )
                kernels.setdefault(info.get("kernel"), []).append((info["bytes"], seconds))
        return replace(
            hardware, name=machine.get("gpu", hardware.name), kernel_times=kernels, sources=sources
        )

    def efficiency_for(self, kernel: str | None, nbytes: float, floor_us: float = 0.0) -> tuple:
        """(share of copy bandwidth, fixed cost in us, "anchor" or "measured") for ``kernel`` at ``nbytes``:
        the anchor's efficiency and ``floor_us``, or, where a result file timed the kernel, its shape
        nearest ``nbytes``: the measured time less the fixed cost is its bytes' (a measured time holds its
        launch and floor too), so the projection at that shape gives the measured time back. The fixed
        cost shrinks where the measured time leaves the bytes less than the copy bandwidth allows."""
        found = self.kernel_times.get(kernel or "")
        if not found:
            return self.memory_efficiency, floor_us, "anchor"
        measured_bytes, seconds = min(found, key=lambda item: abs(math.log(max(item[0], 1) / max(nbytes, 1))))
        at_peak = measured_bytes / (self.copy_gbps * 1e9)
        busy = max(seconds - floor_us * 1e-6, at_peak)
        return at_peak / busy, max(0.0, seconds - busy) * 1e6, "measured"


def _interpolated(anchors: tuple, x):
    """y at ``x`` (a number or an array) on the (x, y) ``anchors`` (ascending x): linear between them, y / x
    constant below the first, flat past the last."""
    xs, ys = zip(*anchors)
    x = np.maximum(np.asarray(x, dtype=float), 0.0)
    return np.where(x <= xs[0], ys[0] * x / xs[0], np.interp(x, xs, ys))


#: NVIDIA's measured H200 kernel tables (AIConfigurator's vLLM 0.24 rows; bench/serving/measured.py reads
#: them and ``decodebench validate`` compares the model with them).
TABLES = "AIConfigurator's vLLM tables, H200 (docs/facts.md#measured-ground-truth-for-the-decode-step-model)"

_ASSUMED = {
    "efficiency": "anchor (published, measured by NVIDIA): GEMMs at M >= 1024 reach 0.95-1.0 of the bf16 "
    "anchor and 0.76-0.85 of twice it in fp8, 0.9 of each taken; bandwidth-bound GEMMs reach 0.96 of copy "
    f"bandwidth, 0.9 taken for every bandwidth-bound stage ({TABLES})",
    "fp8": f"anchor (published): fp8 tensor cores at twice the bf16 rate ({FACTS})",
    "gemm": "anchor (published, measured by NVIDIA): a GEMM's latency at zero bytes, fitted over the GEMM "
    f"rows at M 1-64, N and K 1K-16K: 4.4 us bf16, 7.1 us fp8 with its activation quantization ({TABLES})",
    "attention": "anchor (published, measured by NVIDIA): FlashAttention-3 decode at batch 1, one token, "
    f"11.4 us with its cache write: 9.4 us + the write's launch ({TABLES})",
    "mla_attention": "anchor (published, measured by NVIDIA): FlashAttention-3's MLA decode kernel (the one "
    "vLLM 0.24 and SGLang run on Hopper) at batch 1, 16 heads, 1K context: 16.5 us in SGLang 0.5.14's "
    "measured MLA table, 16.2 us at zero bytes; its split-KV combine included. Compute-bound (128 heads, "
    "batch 256, 8K context) it runs at 587 TFLOP/s: a 650 TFLOP/s ceiling at the 0.9 efficiency every "
    "compute-bound stage reaches (AIConfigurator's SGLang tables, H200; vLLM's has the whole module only "
    "(docs/facts.md#measured-ground-truth-for-the-decode-step-model))",
    "moe": "anchor (published, measured by NVIDIA): the fused MoE at one token costs 20 us with its weights "
    f"negligible (Qwen3-30B-A3B's experts split 8 ways; {TABLES})",
    "moe_rate": None,  # each GPU's own curves: _moe_rate_source
    "launch": "anchor (assumed): 2 us a small kernel (norm, activation, rope, cache write) under CUDA "
    "graphs; the smallest kernels NVIDIA measured for vLLM (static fp8 quantization, up to 16 x 512) take "
    f"1.9 us (median; H100 2.0) ({TABLES})",
    "host": "anchor (assumed): no host time a step unless --host-us gives it (engines overlap scheduling)",
}


def _moe_rate_source(gpu: str) -> str:
    """Where ``gpu``'s fused-MoE rate curves (MOE_RATES) come from, with their anchors."""
    curves = "; ".join(
        f"{'block-fp8' if nbytes == 1 else 'bf16'} at ({hidden}, {inter}) "
        + ", ".join(f"{rows}: {rate:.0f}" for rows, rate in curve)
        + " TFLOP/s by rows"
        for (nbytes, hidden, inter), curve in MOE_RATES[gpu].items()
    )
    return (
        "anchor (published, measured by NVIDIA): a fused MoE's compute rate by rows an expert, net of its "
        "one-token latency (TensorRT-LLM 1.3.0rc20's CUTLASS fused MoE, as vLLM runs block-fp8 under EP "
        "(bf16: vLLM's Triton fused MoE, 1.2-1.8x slower); balanced routing, EP8; AIConfigurator's "
        f"TensorRT-LLM tables, {gpu} (docs/facts.md#measured-ground-truth-for-the-decode-step-model)): "
        f"{curves} (DeepSeek-R1's, Qwen3-30B-A3B's and Qwen3-235B-A22B's expert shapes); an expert takes "
        "the curve of its dtype nearest its size"
    )


def _anchored(gpu: str, memory: str, copy: str, matmul: str, matmul_of: str | None = None) -> Hardware:
    """``gpu``'s SXM part from its published anchors, each source saying what was published;
    ``matmul_of``: the GPU whose matmul ceiling it shares."""
    published = {"memory": memory, "copy_gbps": copy, "matmul_tflops": matmul}
    return Hardware(
        name=f"{gpu} SXM (anchors)",
        memory_bytes=ANCHOR_MEMORY_BYTES[gpu],
        copy_gbps=PROJECTION_GBPS[gpu],
        matmul_tflops=ANCHOR_TFLOPS[matmul_of or gpu],
        moe_rates=dict(MOE_RATES[gpu]),
        sources={
            **{key: f"anchor (published): {what} ({FACTS})" for key, what in published.items()},
            **{key: text or _moe_rate_source(gpu) for key, text in _ASSUMED.items()},
        },
    )


GPUS = {
    "h100": _anchored(
        "H100",
        "81,559 MiB as the driver reports (80 GB spec)",
        "a device copy at about 3.0 TB/s",
        "bf16 8192^3 at about 790 TFLOP/s",
    ),
    "h200": _anchored(
        "H200",
        "143,771 MiB as the driver reports (141 GB spec)",
        "a device copy at about 4.3 TB/s",
        "the H100's bf16 matmul, the same GH100 compute",
        matmul_of="H100",
    ),
}


@dataclass(frozen=True)
class Interconnect:
    """The links between GPUs, as a hop latency (alpha) and a per-GPU one-way bandwidth (beta), and the
    collectives engines run over them: a one-shot all-reduce (every rank reads every peer's buffer: flat
    latency up to a size), a two-shot one (reduce-scatter then all-gather), NCCL's ring for what neither
    handles, and the expert-parallel all-to-all at its own measured latency and bandwidth."""

    name: str
    gbps: float
    hop_us: float
    source: str
    oneshot_us: float = 0.0  # a one-shot all-reduce's fixed cost; 0: no custom all-reduce (NCCL only)
    read_gbps: float = 0.0  # what one rank reads from its peers at once in a one-shot all-reduce
    bus_gbps: tuple = ()  # ((ranks, GB/s), ...): an all-reduce's bus bandwidth by rank count; (): gbps
    a2a_us: float = 0.0  # an expert-parallel dispatch's (or combine's) fixed cost; 0: the hop latencies
    a2a_gbps: float = 0.0  # bytes a rank sends to others per second in it; 0: gbps

    def all_reduce_s(self, nbytes: float, ranks: int) -> tuple[float, float]:
        """(latency, transfer) seconds of the fastest all-reduce of ``nbytes`` on each rank the engine has:
        one-shot, two-shot (with a custom all-reduce) or NCCL's ring."""
        if ranks <= 1:
            return 0.0, 0.0
        bus = self.bus_bandwidth(ranks) * 1e9
        forms = [(2 * (ranks - 1) * self.hop_us * 1e-6, 2 * (ranks - 1) / ranks * nbytes / bus)]
        if self.oneshot_us:
            alpha = self.oneshot_us * 1e-6
            forms.append((alpha, (ranks - 1) * nbytes / ((self.read_gbps or self.gbps) * 1e9)))
            forms.append((2 * alpha, 2 * (ranks - 1) / ranks * nbytes / bus))
        return min(forms, key=sum)

    def bus_bandwidth(self, ranks: int) -> float:
        """GB/s of bus bandwidth at ``ranks`` ranks: the measured rank count nearest it, or ``gbps``."""
        if not self.bus_gbps:
            return self.gbps
        return min(self.bus_gbps, key=lambda pair: abs(math.log(pair[0] / ranks)))[1]

    def all_to_all_s(self, sent_bytes: float, ranks: int) -> tuple[float, float]:
        """(latency, transfer) seconds of an all-to-all in which each rank sends ``sent_bytes`` to others."""
        if ranks <= 1:
            return 0.0, 0.0
        latency = self.a2a_us * 1e-6 if self.a2a_us else (ranks - 1) * self.hop_us * 1e-6
        return latency, sent_bytes / ((self.a2a_gbps or self.gbps) * 1e9)

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
        oneshot = [
            b["stats"]["median"]
            for b in document["benchmarks"]
            for info in [b.get("extra_info", {})]
            if info.get("kernel") == "all_reduce"
            and "one-shot" in str(info.get("impl"))
            and b["stats"]["median"] > 0
        ]
        oneshot_us = min(oneshot) * 1e6 if oneshot else 0.0
        if oneshot:
            source += f"; one-shot {oneshot_us:.1f} us at its smallest size"
        return cls(name=f"measured ({file})", gbps=busbw, hop_us=hop_us, source=source, oneshot_us=oneshot_us)


INTERCONNECTS = {
    "nvlink": Interconnect(
        name="NVLink (H100/H200 SXM)",
        gbps=450.0,
        hop_us=1.5,
        source="anchor (published): 900 GB/s per GPU both ways (docs/facts.md#the-study-behind-the-suite); "
        "hop latency chosen so a ring all-reduce of 8 KB on 8 GPUs takes 21 us, inside the 20-25 us "
        "published for NCCL in one engine (docs/facts.md#published-kernel-figures-to-hold-results-against); "
        "anchor (published, measured by NVIDIA): vLLM's custom all-reduce under CUDA graphs on 2-8 H200s, "
        "one-shot 4.5 us flat, peers' buffers read at 200 GB/s, bus bandwidth at 8-16 MB 123, 146 and 186 "
        "GB/s on 2, 4 and 8 GPUs; DeepEP's low-latency all-to-all (EP8, hidden 7168) 45 us a dispatch or "
        f"combine at 1-32 tokens, 160 GB/s sent at 256 ({TABLES})",
        oneshot_us=4.5,
        read_gbps=200.0,
        bus_gbps=((2, 123.0), (4, 146.0), (8, 186.0)),
        a2a_us=45.0,
        a2a_gbps=160.0,
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
