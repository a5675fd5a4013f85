"""One decode step of a whole model, stage by stage: where its time goes on a given GPU and interconnect.

Each stage of a decoder layer (norms, projections, write_kv, paged_decode or mla_decode, the TP all-reduce,
the MLP or the MoE path with its expert-parallel all-to-alls) gets its bytes and FLOPs on one rank from the
model's shapes (bench/serving/models.py: ModelSpec) and the layout, and a time from the ceilings it runs
against:

    compute or memory stage:  max(bytes / (copy bandwidth x eff.), FLOPs / (matmul ceiling x eff.))
                              + its kernel launches x the launch gap
    all-reduce (ring):        2 (n - 1) x hop latency + 2 (n - 1) / n x bytes / link bandwidth
    all-to-all:               (n - 1) x hop latency + bytes sent to other ranks / link bandwidth
    pipeline hand-off:        hop latency + bytes / link bandwidth, per stage boundary

The ceilings (bench/serving/hardware.py) are measured where a gpu-check result folder gives them
(``Hardware.from_results``: the copy bandwidth and matmul ceiling measured there, and each suite kernel's
measured share of the copy bandwidth at its nearest shape), published anchors otherwise
(docs/facts.md#gpu-anchors-published-not-measured-here); every figure says which it is. This module
projects: ``decodebench step`` on a GPU times the same stages instead (bench/measure/step_timing.py).
"""

import math
from dataclasses import dataclass, field, replace

from bench.serving.hardware import Hardware, Interconnect
from bench.serving.models import ModelSpec

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

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def label(self) -> str:
        text = f"DP{self.dp} TP{self.tp} PP{self.pp}"
        return text + (f" EP{self.ep}" if self.ep > 1 else "")


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


# -- stages --------------------------------------------------------------------------------------------------

#: What binds a stage, and so what the advisor calls the constraint when its time dominates.
BOUNDS = ("HBM bandwidth", "compute", "interconnect", "routing/synchronization", "pipeline bubbles", "launch")
SYNC = "routing/synchronization"


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

    @property
    def step_seconds(self) -> float:
        return self.seconds * self.per_step


def _compute(name, nbytes, flops, hw: Hardware, per_step: int, launches: int = 1, kernel=None) -> Stage:
    efficiency, source = hw.efficiency_for(kernel, nbytes)
    memory_s = nbytes / (hw.copy_gbps * 1e9 * efficiency)
    compute_s = flops / (hw.matmul_tflops * 1e12 * hw.compute_efficiency)
    launch_s = launches * hw.launch_us * 1e-6
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
    )


def _collective(name, nbytes, latency_s, transfer_s, per_step: int, latency_bound="interconnect") -> Stage:
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
    )


def expected_experts_touched(experts: int, top_k: int, tokens: float) -> float:
    """Experts that at least one of ``tokens`` tokens chooses (each chooses top_k of them, uniformly)."""
    if tokens <= 0:
        return 0.0
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def slowest_share(mean_rows: float, ranks: int) -> float:
    """The slowest of ``ranks`` ranks' rows over the mean, when rows land by chance (Poisson): about
    1 + sqrt(2 ln ranks / mean). What every rank waits for at the combine."""
    if ranks <= 1 or mean_rows <= 0:
        return 1.0
    return 1.0 + math.sqrt(2.0 * math.log(ranks) / mean_rows)


def layer_stages(
    spec: ModelSpec,
    layout: Layout,
    batch: float,
    context: float,
    hw: Hardware,
    link: Interconnect,
    *,
    kv_bytes: int = 2,
    moe: bool = False,
    per_step: int = 1,
) -> list[Stage]:
    """One decoder layer's stages on one rank: ``batch`` sequences of this replica at mean ``context``
    tokens; ``moe``: the layer's MLP is the MoE path (its stages named moe:<stage>)."""
    prefix = "moe:" if moe else ""
    tp, h, wb = layout.tp, spec.hidden, spec.weight_bytes
    act = batch * h * 2  # one bf16 activation row per sequence
    heads = spec.num_q_heads / tp
    out = []

    def comp(name, nbytes, flops, launches=1, kernel=None):
        out.append(_compute(prefix + name, nbytes, flops, hw, per_step, launches, kernel))

    def all_reduce(name):
        if tp > 1:
            latency, transfer = link.all_reduce_s(act, tp)
            out.append(_collective(prefix + name, act, latency, transfer, per_step))

    comp("attn_norm", 2 * act, 4 * batch * h)
    if spec.mla is not None:
        g, v = spec.mla, spec.v_head_dim
        o_params = spec.num_q_heads * v * h
        width = g.cached_width
    else:
        o_params = spec.num_q_heads * spec.head_dim * h
        width = None
    qkv_params = (spec.attention_params() - o_params) / tp
    comp("qkv_proj", qkv_params * wb + 2 * act, 2 * batch * qkv_params, launches=2)
    kv_token = spec.kv_bytes_per_token_layer(tp, kv_bytes)
    comp("write_kv", 2 * batch * kv_token, 0, kernel="write_kv")
    if width is not None:
        attention_flops = 2 * batch * context * heads * (width + spec.mla.kv_lora_rank)
        comp("mla_decode", batch * context * kv_token + 2 * act, attention_flops, kernel="mla_decode")
    else:
        attention_flops = 4 * batch * context * heads * spec.head_dim
        comp("paged_decode", batch * context * kv_token + 2 * act, attention_flops, kernel="paged_decode")
    comp("o_proj", o_params / tp * wb + 2 * act, 2 * batch * o_params / tp)
    all_reduce("attn_all_reduce")
    comp("mlp_norm", 2 * act, 4 * batch * h)
    if not moe:
        params = spec.mlp_params(spec.intermediate) / tp
        comp("mlp", params * wb + 4 * act, 2 * batch * params, launches=3)
        all_reduce("mlp_all_reduce")
        return out

    m = spec.moe
    comp("route", batch * m.num_experts * 6, 2 * batch * h * m.num_experts, kernel="route")
    if m.shared_experts:
        params = m.shared_experts * spec.expert_params() / tp
        comp("shared_expert", params * wb + 4 * act, 2 * batch * params, launches=3)
    pairs = batch * m.top_k
    expert = spec.expert_params()
    if layout.ep > 1:
        # Whole experts spread over the stage's dp x tp ranks; each rank dispatches its share of its
        # replica's tokens, and every replica's tokens reach every rank's experts.
        ranks = layout.ep
        mine = pairs / tp  # (token, choice) pairs this rank sends
        comp("dispatch", 2 * mine * h * 2, 0, kernel="dispatch")
        sent = mine * h * 2 * (ranks - 1) / ranks
        latency, transfer = link.all_to_all_s(sent, ranks)
        out.append(_collective(prefix + "ep_dispatch_a2a", sent, latency, transfer, per_step, SYNC))
        arriving = layout.dp * pairs / ranks  # rows a rank's experts receive, on average
        touched = expected_experts_touched(m.num_experts, m.top_k, layout.dp * batch) / ranks
        nbytes = touched * expert * wb + 4 * arriving * h * 2
        stage = _compute(prefix + "experts", nbytes, 2 * arriving * expert, hw, per_step, launches=3)
        skew = slowest_share(arriving, ranks)  # the busiest rank sets the pace
        split = dict(stage.split)
        split["routing/synchronization"] = stage.seconds * (skew - 1)
        out.append(replace(stage, seconds=stage.seconds * skew, split=split))
        out.append(_collective(prefix + "ep_combine_a2a", sent, latency, transfer, per_step, SYNC))
        comp("combine", mine * h * 2 + batch / tp * h * 2, 2 * mine * h, kernel="combine")
        all_reduce("moe_all_reduce")
    else:
        comp("dispatch", 2 * pairs * h * 2, 0, kernel="dispatch")
        touched = expected_experts_touched(m.num_experts, m.top_k, batch)
        params = touched * expert / tp
        comp("experts", params * wb + 4 * pairs * h * 2, 2 * pairs * expert / tp, launches=3)
        comp("combine", pairs * h * 2 + act, 2 * pairs * h, kernel="combine")
        all_reduce("moe_all_reduce")
    return out


def step_stages(
    spec: ModelSpec,
    layout: Layout,
    batch: float,
    context: float,
    hw: Hardware,
    link: Interconnect,
    *,
    kv_bytes: int = 2,
) -> list[Stage]:
    """Every stage of one decode step of a replica: each layer kind's stages (per_step = its layers on one
    pipeline stage, run pp times: once per micro-batch of batch / pp sequences), the embedding and the LM
    head, and the pipeline's hand-offs and bubble."""
    pp = layout.pp
    micro = batch / pp
    layers = spec.layers / pp
    moe_layers = spec.moe_layers / pp
    dense_layers = layers - moe_layers
    stages = []
    if dense_layers:
        stages += layer_stages(
            spec, layout, micro, context, hw, link, kv_bytes=kv_bytes, per_step=round(dense_layers * pp)
        )
    if moe_layers:
        runs = round(moe_layers * pp)
        stages += layer_stages(
            spec, layout, micro, context, hw, link, kv_bytes=kv_bytes, moe=True, per_step=runs
        )
    h, wb, tp = spec.hidden, spec.weight_bytes, layout.tp
    head = spec.vocab * h / tp
    stages.append(_compute("lm_head", head * wb + batch * h * 2, 2 * batch * head, hw, 1))
    stages.append(_compute("embedding", 2 * batch * h * 2, 0, hw, 1))
    if pp > 1:
        latency, transfer = link.send_s(micro * h * 2)
        stages.append(
            _collective("pp_send", micro * h * 2, latency, transfer, pp * (pp - 1), "pipeline bubbles")
        )
        # Synchronous steps (assumed): a step's pp micro-batches fill and drain the pipeline, so each
        # rank idles (pp - 1) / (2 pp - 1) of the step: (pp - 1) / pp of its busy time.
        busy = sum(s.step_seconds for s in stages)
        bubble = busy * (pp - 1) / pp
        stages.append(
            Stage(
                name="pp_bubble",
                bytes=0.0,
                flops=0.0,
                seconds=bubble,
                per_step=1,
                bound="pipeline bubbles",
                source="anchor",
                split={"pipeline bubbles": bubble},
            )
        )
    return stages


def step_seconds(stages: list[Stage]) -> float:
    return sum(s.step_seconds for s in stages)


def seconds_by_bound(stages: list[Stage]) -> dict[str, float]:
    totals = dict.fromkeys(BOUNDS, 0.0)
    for s in stages:
        for bound, seconds in s.split.items():
            totals[bound] += seconds * s.per_step
    return totals
