"""One decode step of a whole model, stage by stage: where its time goes on a given GPU and interconnect.

Each kernel of a decoder layer as vLLM runs it in decode (norms, projections, rope, write_kv, paged_decode
or MLA's absorbed kernels, the TP all-reduce, the MLP and its activation, or the MoE path with its
expert-parallel all-to-alls) gets its bytes and FLOPs on one rank from the model's shapes
(bench/serving/models.py: ModelSpec) and the layout, and a time from the ceilings it runs against:

    kernel:       its fixed cost (a GEMM's, decode attention's, a small kernel's, the fused MoE's)
                  + max(bytes / (copy bandwidth x eff.), FLOPs / (matmul ceiling x eff.)),
                  the matmul ceiling fp8's for fp8 weights (the LM head and embedding stay bf16); the
                  fused MoE's experts at the measured rate their rows an expert reach (Hardware.moe_tflops)
    all-reduce:   the fastest of a one-shot custom all-reduce (flat, then each peer's buffer read), a
                  two-shot one and NCCL's ring, at the bus bandwidth measured for the rank count
    all-to-all:   DeepEP's fixed cost + bytes sent to other ranks / its measured bandwidth
    pipeline:     steady state, micro-batches in flight (no fill-and-drain bubble a step), plus
                  pp_imbalance: what the slowest of vLLM's uneven stages adds
    host:         scheduling and sampling, once a step per engine process (Hardware.host_us)

The ceilings and fixed costs (bench/serving/hardware.py) are measured where a gpu-check result folder gives
them (``Hardware.from_results``), published figures otherwise: the GPU anchors
(docs/facts.md#gpu-anchors-published-not-measured-here) and NVIDIA's measured H200 kernel tables
(AIConfigurator; docs/facts.md#measured-ground-truth-for-the-decode-step-model), which ``decodebench
validate`` holds the model against stage kind by stage kind; every figure says which it is. This module
projects: ``decodebench step`` on a GPU times the same stages instead (bench/measure/step_timing.py).
"""

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from bench.serving.hardware import Hardware, Interconnect
from bench.serving.models import ModelSpec, pipeline_stages

# -- the layout ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How N GPUs run one model: dp replicas, each tp x pp GPUs; for MoE models ep > 1 spreads whole experts
    over the dp x tp GPUs of a pipeline stage (with dp > 1 that is data-parallel attention: each replica
    attends over its own sequences, the experts are shared), ep == 1 splits every expert tp ways."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    # EP's dispatch sends a token's row once per rank its experts reach, not once per expert (kernels/ep.py
    # ep_dispatch(dedup=True), as DeepEP's normal kernels do); its combine returns one partial row per rank.
    dedup: bool = False

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def label(self) -> str:
        text = f"DP{self.dp} TP{self.tp} PP{self.pp}"
        return text + (f" EP{self.ep}" if self.ep > 1 else "") + (" dedup" if self.dedup else "")


def check_layout(spec: ModelSpec, layout: Layout) -> None:
    """ValueError naming the first of dp, tp, pp and ep that ``spec`` cannot run with: each a positive
    integer, tp splitting the heads (ModelSpec.tensor_parallel_problem), pp at most the layers, and ep > 1
    only on an MoE model, over a stage's dp x tp GPUs, dividing its experts."""
    for name in ("dp", "tp", "pp", "ep"):
        value = getattr(layout, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    problem = spec.tensor_parallel_problem(layout.tp)
    if problem:
        raise ValueError(problem)
    if layout.pp > spec.layers:
        raise ValueError(f"pp: expected at most {spec.name}'s {spec.layers} layers, got {layout.pp}")
    if layout.ep == 1:
        if layout.dedup:
            raise ValueError("dedup: deduplicated dispatch is expert parallelism's; expected ep > 1 with it")
        return
    if spec.moe is None:
        raise ValueError(f"ep: {spec.name} is dense (no experts to spread); expected 1, got {layout.ep}")
    if layout.ep != layout.dp * layout.tp:
        raise ValueError(
            f"ep: expected 1 or dp x tp = {layout.dp * layout.tp} (whole experts over a pipeline stage's "
            f"GPUs), got {layout.ep}"
        )
    if spec.moe.num_experts % layout.ep:
        raise ValueError(
            f"ep: expected a divisor of {spec.name}'s {spec.moe.num_experts} experts, got {layout.ep}"
        )


@dataclass(frozen=True)
class Deployment:
    """A model served on a layout of GPUs, as the step model costs it: the model and its layout (checked
    against each other on construction, check_layout), the GPU (published anchors or a gpu-check's
    measurements), the interconnect between the GPUs, and the bytes a KV-cache element takes (2 bf16, 1
    fp8). The advisor and validate compare deployments."""

    spec: ModelSpec
    layout: Layout
    hw: Hardware
    link: Interconnect
    kv_bytes: int = 2

    def __post_init__(self):
        check_layout(self.spec, self.layout)


# -- stages --------------------------------------------------------------------------------------------------

#: What binds a stage, and so what the advisor calls the constraint when its time dominates.
BOUNDS = (
    "HBM bandwidth",
    "compute",
    "interconnect",
    "routing/synchronization",
    "pipeline bubbles",
    "launch",
    "host",
)
SYNC = "routing/synchronization"
#: What a stage is, for ``step --json`` and ``validate``: write_kv counts as attention, the activation as
#: norm.
KINDS = (
    "attention",
    "gemm",
    "allreduce",
    "norm",
    "lm_head",
    "moe_route",
    "moe_dispatch",
    "moe_experts",
    "moe_shared",
    "a2a",
    "pp",
    "host",
    "other",
)


@dataclass(frozen=True)
class Stage:
    name: str
    bytes: float  # on one rank: memory traffic, or bytes sent on the links for a collective
    flops: float
    seconds: float  # per layer it runs in (per step for the step-level stages)
    per_step: int  # times it runs in one step on one rank (layers, or 1)
    bound: str  # one of BOUNDS
    source: str = "anchor"  # "measured" when its efficiency came from a result file
    split: dict = field(default_factory=dict)  # seconds by bound, where a stage has several (a collective)
    kind: str = "other"  # one of KINDS

    @property
    def step_seconds(self) -> float:
        return self.seconds * self.per_step


def _compute(name, kind, nbytes, flops, hw: Hardware, per_step, floor_us, *, kernel=None, tflops=None):
    """A kernel (or a few) bound by bandwidth or compute, plus its fixed cost: ``floor_us`` summed over its
    kernels (their latency at zero bytes, from measurement where Hardware.sources says so). Where a result
    file timed ``kernel``, its efficiency and fixed cost together give back the measured time at the
    measured shape (Hardware.efficiency_for)."""
    efficiency, floor_us, source = hw.efficiency_for(kernel, nbytes, floor_us)
    memory_s = nbytes / (hw.copy_gbps * 1e9 * efficiency)
    compute_s = flops / ((tflops or hw.matmul_tflops) * 1e12 * hw.compute_efficiency)
    launch_s = floor_us * 1e-6
    bound = "HBM bandwidth" if memory_s >= compute_s else "compute"
    busy = max(memory_s, compute_s)
    split = {bound: busy, "launch": launch_s}
    return Stage(
        name=name,
        bytes=nbytes,
        flops=flops,
        seconds=busy + launch_s,
        per_step=per_step,
        bound=bound,
        source=source,
        split=split,
        kind=kind,
    )


def _collective(name, kind, nbytes, latency_s, transfer_s, per_step, latency_bound="interconnect") -> Stage:
    split = {"interconnect": transfer_s}
    split[latency_bound] = split.get(latency_bound, 0.0) + latency_s
    bound = max(split, key=split.get)
    return Stage(
        name=name,
        bytes=nbytes,
        flops=0.0,
        seconds=latency_s + transfer_s,
        per_step=per_step,
        bound=bound,
        source="anchor",
        split=split,
        kind=kind,
    )


#: Routing's skew: the share of (token, expert) choices the i-th most popular expert gets goes as
#: (i + 1) ** -ALPHA (assumed: the exponent of the power law AIConfigurator's measured MoE tables route with,
#: power_law_1.01).
ALPHA = 1.01
#: Random placements ``busiest_rank`` averages over (a fixed seed: the same figures every run).
DRAWS, SEED = 1000, 0


def _capped(shares, top_k: int):
    """Shares of all choices (rows: one set each) with no expert above 1 / top_k (a token chooses an expert
    at most once), the excess spread over the others in proportion: water-filling, a few rounds at most."""
    shares = np.asarray(shares, dtype=float)
    cap = 1.0 / top_k
    while (shares > cap * (1 + 1e-12)).any():
        over = shares >= cap
        free = shares * ~over
        room = 1.0 - over.sum(axis=-1, keepdims=True) * cap
        total = free.sum(axis=-1, keepdims=True)
        shares = np.where(over, cap, free * room / np.where(total > 0, total, 1.0))
    return shares


@lru_cache(maxsize=64)
def expert_popularity(experts: int, top_k: int = 1, alpha: float = ALPHA) -> tuple[float, ...]:
    """Each expert's share of all choices, most popular first: (i + 1) ** -alpha, none above 1 / top_k."""
    weights = [(i + 1) ** -alpha for i in range(experts)]
    total = sum(weights)
    return tuple(float(p) for p in _capped([w / total for w in weights], top_k))


def touched_chance(shares, top_k: int, tokens: float) -> np.ndarray:
    """Each expert's chance that at least one of ``tokens`` tokens chooses it, with ``shares`` of all
    choices (a token's top_k choices distinct: an expert's chance a token is p x top_k)."""
    return 1.0 - np.maximum(0.0, 1.0 - np.asarray(shares, dtype=float) * top_k) ** tokens


@lru_cache(maxsize=4096)
def expected_experts_touched(experts: int, top_k: int, tokens: float, alpha: float = ALPHA) -> float:
    """Experts that at least one of ``tokens`` tokens chooses (top_k distinct experts each, expert popularity
    a power law): a token touches exactly top_k."""
    if tokens <= 0:
        return 0.0
    return float(touched_chance(expert_popularity(experts, top_k, alpha), top_k, tokens).sum())


@lru_cache(maxsize=8)
def _uniform_draws(experts: int) -> np.ndarray:
    return np.random.default_rng(SEED).random((DRAWS, experts))


@lru_cache(maxsize=4096)
def busiest_rank(
    experts: int, ranks: int, tokens: int = 256, top_k: int = 8, alpha: float = ALPHA
) -> tuple[float, tuple[float, ...]]:
    """(the busiest rank's share of all choices over the mean, its experts' shares of all choices, most
    popular first), as AIConfigurator's MoE collector routes its measured tables (collect_moe.py,
    power_law_logits_v3): each expert's load drawn from a power law on [1, 0.8 tokens] (on [0.01, 2] when
    the tokens' choices are fewer than the experts), the experts in no order, and the ``ranks`` contiguous
    blocks' busiest one (rank 0 in its measurement) timed; here the expectation over ``DRAWS`` draws, each
    expert's share capped at 1 / top_k."""
    low, high = (1.0, 0.8 * tokens) if tokens * top_k > experts else (0.01, 2.0)
    uniform = _uniform_draws(experts)
    power = 1.0 - alpha
    loads = ((high**power - low**power) * uniform + low**power) ** (1.0 / power)
    shares = _capped(loads / loads.sum(axis=1, keepdims=True), top_k)
    blocks = shares.reshape(DRAWS, ranks, experts // ranks)
    busiest = blocks[np.arange(DRAWS), blocks.sum(axis=2).argmax(axis=1)]
    mine = np.sort(busiest, axis=1)[:, ::-1].mean(axis=0)
    return float(busiest.sum(axis=1).mean() * ranks), tuple(float(p) for p in mine)


def slowest_share(mean_rows: float, ranks: int) -> float:
    """The slowest of ``ranks`` ranks' rows over the mean from chance alone (Poisson): about
    1 + sqrt(2 ln ranks / mean)."""
    if ranks <= 1 or mean_rows <= 0:
        return 1.0
    return 1.0 + math.sqrt(2.0 * math.log(ranks) / mean_rows)


def experts_ceiling(hw: Hardware, weight_bytes, shape, shares, tokens: float, top_k: int, scale=1.0) -> float:
    """The fused MoE's compute ceiling, TFLOP/s, over experts of ``shape`` (hidden, inter) with these
    ``shares`` of ``tokens`` x ``top_k`` choices (rows scaled by ``scale``): each expert's GEMMs run at the
    rate its own rows reach (Hardware.moe_tflops: a tile of M rows costs the same however few of them are
    filled), so the ceiling is the FLOP-weighted harmonic mean over the experts. An expert a few tokens touch
    by chance counts with the rows it gets when touched, weighted by that chance. Experts of a dtype with no
    measured curve: one rate whatever the rows (moe_tflops gives its ceiling)."""
    shares = np.asarray(shares, dtype=float)
    touched = touched_chance(shares, top_k, tokens)
    rows = tokens * top_k * shares * scale
    used = (touched > 0.0) & (rows > 0.0)
    rows, touched = rows[used], touched[used]
    time = float(np.sum(rows / hw.moe_tflops(weight_bytes, rows / touched, shape)))
    return float(rows.sum()) / time if time else hw.tflops(weight_bytes)


def _prefill_attention(dep: Deployment, tokens, context, comp):
    """Prefill's attention over a chunk of ``tokens`` new tokens whose queries see ``context`` tokens on
    average (causal): compute-bound, the cache read once per chunk (flash attention's tiling)."""
    spec, layout, hw, kv_bytes = dep.spec, dep.layout, dep.hw, dep.kv_bytes
    tp, context = layout.tp, spec.attended_context(context)  # a sliding-window layer sees its window
    heads = spec.num_q_heads / tp
    kv_token = spec.kv_bytes_per_token_layer(tp, kv_bytes)
    if spec.mla is None:
        width = 2 * spec.head_dim  # q.k and p.v
    else:  # prefill runs MLA un-absorbed: per-head keys of qk_nope + rope, values of v_head_dim
        width = spec.mla.qk_width + spec.v_head_dim
    nbytes = (context + tokens) * kv_token + 2 * tokens * spec.hidden * 2
    comp("write_kv", "attention", 2 * tokens * kv_token, 0, hw.launch_us, kernel="write_kv")
    comp("prefill_attention", "attention", nbytes, 2 * tokens * context * heads * width, hw.attention_us)


def _attention(dep: Deployment, batch, context, comp, prefill=False):
    """The attention block's kernels as vLLM runs them in decode (its MLA path: the absorbed form); with
    ``prefill``, ``batch`` is a chunk of one prompt's tokens and attention is prefill's."""
    if prefill:
        _prefill_projections(dep, batch, comp)
        _prefill_attention(dep, batch, context, comp)
        return
    spec, layout, hw, kv_bytes = dep.spec, dep.layout, dep.hw, dep.kv_bytes
    tp, h, wb = layout.tp, spec.hidden, spec.weight_bytes
    context = spec.attended_context(context)  # a sliding-window layer reads its window
    act = batch * h * 2
    heads = spec.num_q_heads / tp
    gemm, tflops = hw.gemm_floor_us(wb), hw.tflops(wb)
    kv_token = spec.kv_bytes_per_token_layer(tp, kv_bytes)
    if spec.mla is None:
        o_params = spec.num_q_heads * spec.head_dim * h / tp
        qkv_params = spec.attention_params() / tp - o_params
        comp("qkv_proj", "gemm", qkv_params * wb + 2 * act, 2 * batch * qkv_params, gemm, tflops=tflops)
        comp(
            "rope", "other", 4 * batch * (heads + spec.kv_heads_per_rank(tp)) * spec.head_dim, 0, hw.launch_us
        )
        comp("write_kv", "attention", 2 * batch * kv_token, 0, hw.launch_us, kernel="write_kv")
        flops = 4 * batch * context * heads * spec.head_dim
        nbytes = batch * context * kv_token + 2 * act
        comp("paged_decode", "attention", nbytes, flops, hw.attention_us, kernel="paged_decode")
        comp("o_proj", "gemm", o_params * wb + 2 * act, 2 * batch * o_params, gemm, tflops=tflops)
        return
    g, v = spec.mla, spec.v_head_dim
    qk = g.qk_width
    # Down projections (q_a with kv_a, fused) are whole on every rank; q_b is split by heads.
    down = h * (spec.q_lora_rank or 0) + h * g.cached_width
    up = (spec.q_lora_rank or h) * heads * qk
    comp("qkv_proj", "gemm", (down + up) * wb + 2 * act, 2 * batch * (down + up), 2 * gemm, tflops=tflops)
    comp("mla_norms", "norm", 4 * batch * ((spec.q_lora_rank or 0) + g.kv_lora_rank), 0, 2 * hw.launch_us)
    comp("rope", "other", 4 * batch * (heads + 1) * g.qk_rope_head_dim, 0, hw.launch_us)
    # W_UK before attention and W_UV after it: bf16 batched products over the heads (two kernels). vLLM 0.24
    # runs them on strided views and hands FA3 the rope and latent parts of the query apart: no copies.
    absorb = heads * g.kv_lora_rank * (g.qk_nope_head_dim + v)
    comp(
        "mla_absorb",
        "gemm",
        absorb * 2 + 4 * batch * heads * g.kv_lora_rank * 2,
        2 * batch * absorb,
        2 * hw.gemm_us,
    )
    comp("write_kv", "attention", 2 * batch * kv_token, 0, hw.launch_us, kernel="write_kv")
    flops = 2 * batch * context * heads * (g.cached_width + g.kv_lora_rank)
    nbytes = batch * context * kv_token + 2 * batch * heads * g.cached_width * 2
    comp(
        "mla_decode",
        "attention",
        nbytes,
        flops,
        hw.mla_attention_us,
        kernel="mla_decode",
        tflops=hw.mla_attention_tflops,
    )
    o_params = spec.num_q_heads * v * h / tp
    comp("o_proj", "gemm", o_params * wb + 2 * act, 2 * batch * o_params, gemm, tflops=tflops)


def _prefill_projections(dep: Deployment, tokens, comp):
    """A prompt chunk's attention projections: every projection's parameters, split tp ways."""
    spec, hw = dep.spec, dep.hw
    wb, h = spec.weight_bytes, spec.hidden
    params = spec.attention_params() / dep.layout.tp
    flops = 2 * tokens * params
    comp(
        "qkv_proj",
        "gemm",
        params * wb + 4 * tokens * h * 2,
        flops,
        3 * hw.gemm_floor_us(wb),
        tflops=hw.tflops(wb),
    )


def _moe(dep: Deployment, batch, comp, out, collective):
    """An MoE layer's MLP: router, shared experts, and the routed experts split tp ways (ep 1) or spread
    whole over ep ranks with the all-to-alls around them."""
    spec, layout, hw, link = dep.spec, dep.layout, dep.hw, dep.link
    m, tp, h, wb = spec.moe, layout.tp, spec.hidden, spec.weight_bytes
    act = batch * h * 2
    gemm, tflops = hw.gemm_floor_us(wb), hw.tflops(wb)
    comp(
        "route",
        "moe_route",
        h * m.num_experts * 2 + act,
        2 * batch * h * m.num_experts,
        hw.gemm_us + hw.launch_us,
    )
    if m.shared_experts:
        params = m.shared_experts * spec.expert_params() / tp
        comp(
            "shared_expert",
            "moe_shared",
            params * wb + 4 * act,
            2 * batch * params,
            2 * gemm + hw.launch_us,
            tflops=tflops,
        )
    pairs = batch * m.top_k
    expert, ewb = spec.expert_params(), spec.routed_expert_bytes  # routed experts' own width (MXFP4)
    # The rate curves' shape: a whole expert's, under TP too (split experts run slower still at the same rows,
    # docs/facts.md#measured-ground-truth-for-the-decode-step-model; not modelled).
    shape = (h, m.expert_intermediate)
    experts_floor = hw.moe_us - 2 * hw.launch_us  # the fused MoE's fixed cost, its dispatch and combine apart
    if layout.ep == 1:
        comp(
            "dispatch",
            "moe_dispatch",
            2 * pairs * h * 2,
            0,
            hw.launch_us,
            kernel="dispatch",
        )
        params = expected_experts_touched(m.num_experts, m.top_k, batch) * expert / tp
        popularity = expert_popularity(m.num_experts, m.top_k)
        comp(
            "experts",
            "moe_experts",
            params * ewb + 4 * pairs * h * 2,
            2 * pairs * expert / tp,
            experts_floor,
            tflops=experts_ceiling(hw, ewb, shape, popularity, batch, m.top_k),
        )
        comp("combine", "moe_dispatch", pairs * h * 2 + act, 2 * pairs * h, hw.launch_us, kernel="combine")
        return
    # Whole experts spread over the stage's dp x tp ranks; each rank dispatches its share of its replica's
    # tokens, and every replica's tokens reach every rank's experts. The busiest rank (routing's power law,
    # and chance on top at small batches) sets the pace at the combine.
    ranks = layout.ep
    mine = pairs / tp
    comp("dispatch", "moe_dispatch", 2 * mine * h * 2, 0, hw.launch_us, kernel="dispatch")
    # Rows that leave the rank: every choice on another rank's expert, or (dedup) one row per other rank a
    # token reaches, with its (expert, weight) pairs beside it (8 bytes a choice).
    if layout.dedup:
        rows_out = mine / m.top_k * m.ranks_reached(ranks) * (ranks - 1) / ranks
        sent, returned = rows_out * (h * 2 + 8 * m.top_k), rows_out * h * 2
    else:
        sent = returned = mine * h * 2 * (ranks - 1) / ranks
    latency, transfer = link.all_to_all_s(sent, ranks)
    out.append(collective("ep_dispatch_a2a", "a2a", sent, latency, transfer, SYNC))
    tokens = layout.dp * batch
    skew, popular = busiest_rank(m.num_experts, ranks, max(1, round(tokens)), m.top_k)
    even = tokens * m.top_k / ranks
    arriving = even * skew
    weights = float(touched_chance(popular, m.top_k, tokens).sum()) * expert * ewb

    def experts_cost(rows, computed):  # the experts stage's bytes and FLOPs with ``rows`` rows arriving
        return weights + 4 * rows * h * 2, 2 * computed * expert

    chance = slowest_share(arriving, ranks)
    ceiling = experts_ceiling(hw, ewb, shape, popular, tokens, m.top_k, chance)
    comp("experts", "moe_experts", *experts_cost(arriving, arriving * chance), experts_floor, tflops=ceiling)
    # The others wait for the busiest rank: the time its rows over the mean take (its weights and fixed cost
    # it pays either way) moves from its bound to SYNC, so the split still sums to the stage's time.
    stage = out[-1]
    level_ceiling = experts_ceiling(hw, ewb, shape, popular, tokens, m.top_k, 1.0 / skew)
    level = _compute("", "", *experts_cost(even, even), hw, 1, experts_floor, tflops=level_ceiling)
    wait = max(0.0, stage.seconds - level.seconds)
    split = {**stage.split, stage.bound: stage.split[stage.bound] - wait}
    out[-1] = replace(stage, split={**split, SYNC: split.get(SYNC, 0.0) + wait})
    latency, transfer = link.all_to_all_s(returned, ranks)
    out.append(collective("ep_combine_a2a", "a2a", returned, latency, transfer, SYNC))
    comp(
        "combine",
        "moe_dispatch",
        mine * h * 2 + batch / tp * h * 2,
        2 * mine * h,
        hw.launch_us,
        kernel="combine",
    )


def layer_stages(
    dep: Deployment,
    batch: float,
    context: float,
    *,
    moe: bool = False,
    per_step: int = 1,
    prefill: bool = False,
) -> list[Stage]:
    """One decoder layer's stages on one rank, kernel by kernel as vLLM runs them in decode: ``batch``
    sequences of this replica at mean ``context`` tokens; ``moe``: the layer's MLP is the MoE path (its
    stages named moe:<stage>); ``prefill``: ``batch`` new tokens of a prompt chunk instead."""
    prefix = "moe:" if moe else ""
    spec, hw, link = dep.spec, dep.hw, dep.link
    tp, h, wb = dep.layout.tp, spec.hidden, spec.weight_bytes
    act = batch * h * 2  # one bf16 activation row per sequence
    out: list[Stage] = []

    def comp(name, kind, nbytes, flops, floor_us, kernel=None, tflops=None):
        stage = _compute(
            prefix + name, kind, nbytes, flops, hw, per_step, floor_us, kernel=kernel, tflops=tflops
        )
        out.append(stage)

    def collective(name, kind, nbytes, latency, transfer, latency_bound="interconnect"):
        return _collective(prefix + name, kind, nbytes, latency, transfer, per_step, latency_bound)

    def all_reduce(name):
        if tp > 1:
            latency, transfer = link.all_reduce_s(act, tp)
            out.append(collective(name, "allreduce", act, latency, transfer))

    comp("attn_norm", "norm", 3 * act, 4 * batch * h, hw.launch_us)  # fused with the residual add
    _attention(dep, batch, context, comp, prefill)
    all_reduce("attn_all_reduce")
    comp("mlp_norm", "norm", 3 * act, 4 * batch * h, hw.launch_us)
    if moe:
        _moe(dep, batch, comp, out, collective)
        all_reduce("moe_all_reduce")
        return out
    params = spec.mlp_params(spec.intermediate) / tp
    width = spec.intermediate / tp
    comp(
        "mlp",
        "gemm",
        params * wb + 2 * act + 3 * batch * width * 2,
        2 * batch * params,
        2 * hw.gemm_floor_us(wb),
        tflops=hw.tflops(wb),
    )
    comp("act", "norm", 3 * batch * width * 2, 4 * batch * width, hw.launch_us)
    all_reduce("mlp_all_reduce")
    return out


def _every_layer(dep: Deployment, batch, context, prefill=False) -> list[Stage]:
    """The stages of every decoder layer: a dense layer's counted once per dense layer, then an MoE
    layer's once per MoE layer."""
    stages = []
    for moe, count in ((False, dep.spec.dense_layers), (True, dep.spec.moe_layers)):
        if count:
            stages += layer_stages(dep, batch, context, moe=moe, per_step=count, prefill=prefill)
    return stages


def _pipeline_imbalance(spec, pp, flights, layers, head_s) -> Stage | None:
    """A step's time beyond the layers once and the LM head once a micro-batch (what step_stages charges),
    when ``flights`` micro-batches each cross the slowest of pp uneven stages (pipeline_stages): every stage
    runs them all in a step, so the step takes at least flights x the slowest stage (its dense and MoE
    layers at ``layers``' times a layer, the head on the last). None when nothing is left over."""
    if pp <= 1:
        return None
    moe_s = sum(s.seconds for s in layers if s.name.startswith("moe:"))
    dense_s = sum(s.seconds for s in layers if not s.name.startswith("moe:"))
    first_moe = spec.layers if spec.moe is None else spec.moe.first_dense_layers

    def stage_s(stage: range) -> float:
        dense = sum(i < first_moe for i in stage)
        return dense * dense_s + (len(stage) - dense) * moe_s + head_s * (stage.stop == spec.layers)

    slowest = max(stage_s(stage) for stage in pipeline_stages(spec.layers, pp))
    extra = flights * slowest - sum(s.step_seconds for s in layers) - flights * head_s
    if extra <= 0:
        return None
    bound = "pipeline bubbles"
    return Stage("pp_imbalance", 0.0, 0.0, extra, 1, bound, split={bound: extra}, kind="pp")


def step_stages(dep: Deployment, batch: float, context: float) -> list[Stage]:
    """Every stage of one decode step of a replica (every sequence one token further), on its slowest
    pipeline rank.

    Pipeline parallelism at steady state, as engines run it (vLLM, TensorRT-LLM; docs/facts.md): the batch
    is split into m = min(pp, batch) micro-batches kept in flight, so no stage waits for a fill or a drain.
    In one step every micro-batch crosses all pp stages: the step takes the model's layers once at the
    micro-batch's size (each stage reads its own weights once a micro-batch), the last stage's head once a
    micro-batch, and the pp - 1 hand-offs. With one sequence (m = 1) that is the stages in sequence, each
    weight read once. Stages split as vLLM splits them are uneven, and every stage runs all m micro-batches
    a step: the slowest stage's excess over that is pp_imbalance (_pipeline_imbalance)."""
    spec, hw, pp = dep.spec, dep.hw, dep.layout.pp
    flights = max(1, min(pp, int(batch))) if pp > 1 else 1
    micro = batch / flights
    stages = _every_layer(dep, micro, context)
    h, tp = spec.hidden, dep.layout.tp
    head = spec.vocab * h / tp  # the LM head and the embedding stay bf16 in fp8 checkpoints
    head_bytes, head_flops = head * 2 + micro * h * 2, 2 * micro * head
    lm_head = _compute("lm_head", "lm_head", head_bytes, head_flops, hw, flights, hw.gemm_us)
    imbalance = _pipeline_imbalance(spec, pp, flights, stages, lm_head.seconds)
    stages.append(lm_head)
    stages.append(_compute("embedding", "norm", 2 * micro * h * 2, 0, hw, flights, hw.launch_us))
    if imbalance is not None:
        stages.append(imbalance)
    if pp > 1:
        latency, transfer = dep.link.send_s(micro * h * 2)
        stages.append(
            _collective("pp_send", "pp", micro * h * 2, latency, transfer, pp - 1, "pipeline bubbles")
        )
    if hw.host_us:
        host = hw.host_us * 1e-6
        stages.append(
            Stage(
                name="host",
                bytes=0.0,
                flops=0.0,
                seconds=host,
                per_step=1,
                bound="host",
                split={"host": host},
                kind="host",
            )
        )
    return stages


def prefill_stages(dep: Deployment, tokens: float, context: float) -> list[Stage]:
    """One prefill step of a replica: a chunk of ``tokens`` prompt tokens (engines chunk prompts, vLLM at
    max_num_batched_tokens), its queries seeing ``context`` tokens on average, through every layer; the
    LM head for the chunk's last token only. Pipeline stages each take the chunk in turn."""
    stages = _every_layer(dep, tokens, context, prefill=True)
    head = dep.spec.vocab * dep.spec.hidden / dep.layout.tp
    stages.append(_compute("lm_head", "lm_head", head * 2, 2 * head, dep.hw, 1, dep.hw.gemm_us))
    return stages


def step_seconds(stages: list[Stage]) -> float:
    return sum(s.step_seconds for s in stages)


def seconds_by_bound(stages: list[Stage]) -> dict[str, float]:
    totals = dict.fromkeys(BOUNDS, 0.0)
    for s in stages:
        for bound, seconds in s.split.items():
            totals[bound] += seconds * s.per_step
    return totals
