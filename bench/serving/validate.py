"""The decode-step model against measured data: its error per stage kind, per step and per published run.

Two sources no one here wrote (docs/facts.md#measured-ground-truth-for-the-decode-step-model):

- NVIDIA's measured H200 (or H100) kernel tables (AIConfigurator, bench/serving/measured.py): for every
  point of a grid of models, layouts (TP 1-8, experts split or spread), batches (1-256) and contexts
  (1K-8K), each stage kind the tables measure is projected by the step model and looked up in the tables at
  the same shapes; the ratio ours / measured is kept per kind and for the step total over the measured
  kinds.
- Published end-to-end runs (bench/serving/data/published_runs.csv, each row with its source; the command
  reads it): the model's
  steady-state output tokens/s for the run's model, layout, precision, fixed prompt/answer lengths and
  engine admission policy and KV memory rule, against the published figure.

A ratio above 1 means the model is slower (more time, fewer tokens/s ... the run ratio is ours / published
tokens/s, so below 1 there means slower).
"""

import math
import statistics
from dataclasses import dataclass, replace

from bench.serving import step as step_model
from bench.serving.advisor import (
    PREFILL_CHUNK,
    kv_budget_bytes,
    stage_pools,
    weights_per_rank,
)
from bench.serving.batching import kv_pool_bytes_of_free
from bench.serving.hardware import (
    GPUS,
    INTERCONNECTS,
    MOE_RATE_SOURCES,
    Hardware,
    Interconnect,
)
from bench.serving.measured import MissingShape, Tables
from bench.serving.models import MODEL_SPECS, ModelSpec
from bench.serving.step import Deployment, Layout

#: The stage kinds the measured tables cover, each with the step model's stage names it sums.
COMPARED = {
    "attention": ("write_kv", "paged_decode"),
    # vLLM's measured MLA module: every kernel from the projections to o_proj but the cache write (the
    # benchmark's forward context has no slot mapping, so vLLM skips the write)
    "mla": ("qkv_proj", "mla_norms", "rope", "mla_absorb", "mla_decode", "o_proj"),
    # FlashAttention-3's MLA decode kernel alone, inside that module
    "mla_attention": ("mla_decode",),
    "gemm": ("qkv_proj", "o_proj", "mlp"),
    "allreduce": ("attn_all_reduce", "mlp_all_reduce", "moe_all_reduce"),
    "moe_experts": ("dispatch", "experts", "combine"),
    "moe_shared": ("shared_expert",),
    "a2a": ("ep_dispatch_a2a", "ep_combine_a2a"),
    "lm_head": ("lm_head",),
}

#: vLLM 0.24's native RMSNorm (to fp32, pow, mean, add, rsqrt, mul, to, mul by the weight) and DeepSeek's
#: native rope (index, two repeat_interleaves, then for q and k: mul, neg, stack, mul, add, to; the write
#: back into q): eager kernels each, as the MLA module table ran them (docs/facts.md).
NATIVE_NORM_KERNELS = 8
NATIVE_ROPE_KERNELS = 16
#: What those chains add to a layer beyond serving's one kernel each: two norms and the rope.
NATIVE_EXTRA_KERNELS = 2 * (NATIVE_NORM_KERNELS - 1) + NATIVE_ROPE_KERNELS - 1

#: Kinds that look inside another kind's measurement (left out of the step total).
INSIDE = ("mla_attention",)

MODELS = ("Llama-3.1-8B", "Llama-3.1-70B", "Qwen3-32B", "Qwen3-30B-A3B", "Qwen3-235B-A22B", "DeepSeek-R1")
TPS = (1, 2, 4, 8)
BATCHES = (1, 16, 256)
CONTEXTS = (1024, 8192)
#: The share of a GPU's memory weights may take for a grid point to count (the rest: KV and activations).
WEIGHT_SHARE = 0.8


@dataclass(frozen=True)
class Point:
    model: str
    layout: Layout
    batch: int
    context: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.layout.label} B{self.batch} L{self.context}"


def grid(models=MODELS, tps=TPS, batches=BATCHES, contexts=CONTEXTS, hw: Hardware | None = None) -> list:
    """Every (model, layout, batch, context) whose weights fit: TP layouts, and for MoE models the same
    GPUs as data-parallel attention with experts spread over them (DP = EP, as DeepEP deployments run)."""
    hw = hw or GPUS["h200"]
    points = []
    for name in models:
        spec = MODEL_SPECS[name]
        for tp in tps:
            layouts = [] if spec.tensor_parallel_problem(tp) else [Layout(tp=tp)]
            if spec.moe is not None and tp > 1 and spec.moe.num_experts % tp == 0:
                layouts.append(Layout(dp=tp, ep=tp))
            for lay in layouts:
                if weights_per_rank(spec, lay) <= WEIGHT_SHARE * hw.memory_bytes:
                    points += [Point(name, lay, b, c) for b in batches for c in contexts]
    return points


# -- the model's side ----------------------------------------------------------------------------------------


def ours_ms(stages) -> dict:
    """Milliseconds a step spends in each compared kind. An MLA model's attention-block kernels count once,
    as the "mla" module (not as gemm or attention); "mla_attention" is the module's attention kernel."""
    mla = any(s.name.endswith("mla_decode") for s in stages)
    out: dict = {}
    for stage in stages:
        base = stage.name.split(":")[-1]
        in_module = mla and base in COMPARED["mla"]
        for kind, names in COMPARED.items():
            if base not in names or (kind == "mla" and not in_module):
                continue
            if in_module and kind in ("gemm", "attention"):
                continue
            out[kind] = out.get(kind, 0.0) + stage.step_seconds * 1e3
    return out


def native_chains_ms(spec: ModelSpec, layout: Layout, batch: float, hw: Hardware) -> float:
    """Milliseconds a step's MLA layers spend in what vLLM 0.24's MLA module benchmark ran beyond serving's
    kernels: its two RMS norms and its rope as PyTorch's native eager chains (NATIVE_NORM_KERNELS a norm,
    NATIVE_ROPE_KERNELS for the rope, where serving runs one kernel each; docs/facts.md#measured-ground-
    truth-for-the-decode-step-model), each extra kernel a small one (its launch, its fp32 tensor read and
    written)."""
    g = spec.mla
    norm_elements = batch * ((spec.q_lora_rank or 0) + g.kv_lora_rank)  # both norms' rows
    rope_elements = batch * (spec.num_q_heads / layout.tp + 1) * g.qk_rope_head_dim  # q_pe and k_pe
    extra_norm, extra_rope = NATIVE_NORM_KERNELS - 1, NATIVE_ROPE_KERNELS - 1
    nbytes = 8 * (extra_norm * norm_elements + extra_rope * rope_elements)
    seconds = NATIVE_EXTRA_KERNELS * hw.launch_us * 1e-6
    seconds += nbytes / (hw.copy_gbps * 1e9 * hw.memory_efficiency)
    return seconds * 1e3 * spec.layers / layout.pp


# -- the measured side ---------------------------------------------------------------------------------------


def _gemm_dtype(spec: ModelSpec) -> str:
    """vLLM's per-tensor fp8 GEMM for fp8 weights: its block-scaled fp8 rows run 5x slower than per-tensor
    at decode sizes (a kernel choice, not what the weights' bytes cost)."""
    return "fp8" if spec.weight_bytes == 1 else "bfloat16"


#: The widest N the GEMM table measured: a wider product (an LM head) is looked up as equal column blocks.
WIDEST_N = 65536


def _gemm(tables: Tables, dtype: str, m: float, n: float, k: float) -> float:
    blocks = math.ceil(n / WIDEST_N)
    return blocks * tables["gemm"].ms((dtype,), (m, n / blocks, k))


def _attention_layer(tables, spec, layout, batch, context, kv) -> dict:
    tp = layout.tp
    if spec.mla is not None:
        heads = spec.num_q_heads // tp
        key = (kv, "fp8_block" if spec.weight_bytes == 1 else "bfloat16", heads)
        out = {"mla": tables["mla"].ms(key, (batch, context))}
        try:
            out["mla_attention"] = tables["mla_attention"].ms((kv, heads), (batch, context - 1))
        except MissingShape:  # an extract from before SGLang's table was read
            pass
        return out
    kv_heads = spec.kv_heads_per_rank(tp)
    key = (kv, spec.num_q_heads // tp, kv_heads, spec.head_dim)
    attention = tables["attention"].ms(key, (batch, context))
    dtype, h, d = _gemm_dtype(spec), spec.hidden, spec.head_dim
    qkv = _gemm(tables, dtype, batch, (spec.num_q_heads // tp + 2 * kv_heads) * d, h)
    o = _gemm(tables, dtype, batch, h, spec.num_q_heads // tp * d)
    return {"attention": attention, "gemm": qkv + o}


def _mlp_layer(tables, spec, layout, batch) -> dict:
    dtype, h, width = _gemm_dtype(spec), spec.hidden, spec.intermediate / layout.tp
    return {"gemm": _gemm(tables, dtype, batch, 2 * width, h) + _gemm(tables, dtype, batch, h, width)}


def _moe_layer(tables, spec, layout, batch) -> dict:
    m, h, tp, ep = spec.moe, spec.hidden, layout.tp, layout.ep
    dtype = "fp8_block" if spec.weight_bytes == 1 else "bfloat16"
    moe_tp, moe_ep = (1, ep) if ep > 1 else (tp, 1)
    key = (dtype, h, m.expert_intermediate, m.top_k, m.num_experts, moe_tp, moe_ep, "power_law_1.01")
    out = {"moe_experts": tables["moe"].ms(key, (batch * layout.dp,))}
    if m.shared_experts:
        width = m.shared_experts * m.expert_intermediate / tp
        dense = _gemm_dtype(spec)
        out["moe_shared"] = _gemm(tables, dense, batch, 2 * width, h) + _gemm(tables, dense, batch, h, width)
    if ep > 1:
        try:  # apart: the all-to-all table has DeepSeek's hidden 7168 only, and its miss keeps the rest
            out["a2a"] = sum(
                tables["a2a"].ms(("deepep_ll", phase, ep, h, m.top_k, m.num_experts), (batch,))
                for phase in ("dispatch", "combine")
            )
        except MissingShape:
            pass
    return out


def measured_ms(tables: Tables, spec: ModelSpec, point: Point, kv: str = "bfloat16") -> dict:
    """Milliseconds a step spends in each kind the tables measure, from the tables at the point's shapes;
    a kind whose shape the tables lack is left out."""
    layout, batch, context = point.layout, point.batch, point.context
    out: dict = {}

    def add(per_layer: dict, layers: int):
        for kind, ms in per_layer.items():
            out[kind] = out.get(kind, 0.0) + ms * layers

    def attempt(fn, layers, *args):
        try:
            add(fn(tables, spec, layout, *args), layers)
        except MissingShape:
            pass

    attempt(_attention_layer, spec.layers, batch, context, kv)
    if spec.dense_layers:
        attempt(_mlp_layer, spec.dense_layers, batch)
    if spec.moe_layers:
        attempt(_moe_layer, spec.moe_layers, batch)
    if layout.tp > 1:
        try:
            per = tables["allreduce"].ms((layout.tp,), (batch * spec.hidden * 2,))
            add({"allreduce": per}, 2 * spec.layers)
        except MissingShape:
            pass
    try:
        add({"lm_head": _gemm(tables, "bfloat16", batch, spec.vocab / layout.tp, spec.hidden)}, 1)
    except MissingShape:
        pass
    return out


# -- comparison ----------------------------------------------------------------------------------------------


def compare_kernels(tables: Tables, points, hw: Hardware, link: Interconnect) -> list:
    """One row per grid point: each kind's ours and measured ms, and the total over kinds both have."""
    rows = []
    for point in points:
        spec = MODEL_SPECS[point.model]
        stages = step_model.step_stages(Deployment(spec, point.layout, hw, link), point.batch, point.context)
        ours, measured = ours_ms(stages), measured_ms(tables, spec, point)
        if "mla" in ours:  # projected as the table's benchmark ran the module (its norms and rope native)
            ours["mla"] += native_chains_ms(spec, point.layout, point.batch, hw)
        kinds = sorted(set(ours) & set(measured))
        whole = [k for k in kinds if k not in INSIDE]  # the step total counts each kernel once
        rows.append(
            {
                "point": point.label,
                "model": point.model,
                "tp": point.layout.tp,
                "ep": point.layout.ep,
                "batch": point.batch,
                "context": point.context,
                "kinds": {k: {"ours_ms": ours[k], "measured_ms": measured[k]} for k in kinds},
                "total": {
                    "ours_ms": sum(ours[k] for k in whole),
                    "measured_ms": sum(measured[k] for k in whole),
                },
            }
        )
    return rows


def ratio_summary(kind: str, found: list) -> dict:
    """One kind's (ratio, where) pairs: points, median, worst (farthest from 1 in log) and where, range."""
    values = [r for r, _ in found]
    worst = max(found, key=lambda item: abs(math.log(item[0])))
    return {
        "kind": kind,
        "points": len(values),
        "median": statistics.median(values),
        "worst": worst[0],
        "worst_at": worst[1],
        "low": min(values),
        "high": max(values),
    }


def summarise(rows: list) -> list:
    """Per kind (and "step total"): points, median ratio, worst ratio (farthest from 1 in log), range."""
    ratios: dict = {}
    for row in rows:
        for kind, pair in list(row["kinds"].items()) + [("step total", row["total"])]:
            if pair["measured_ms"] > 0:
                ratios.setdefault(kind, []).append((pair["ours_ms"] / pair["measured_ms"], row["point"]))
    out = [ratio_summary(kind, found) for kind, found in ratios.items()]
    order = list(COMPARED) + ["step total"]
    return sorted(out, key=lambda row: order.index(row["kind"]))


# -- the suite's own stage timings (a gpu-check folder) ------------------------------------------------------


def _projected_again(point: dict, hw: Hardware, link: Interconnect) -> dict | None:
    """Each stage's ms a step, the model projected afresh at a step document's point on ``hw``; None for a
    model the presets do not hold (a --config step: its recorded projection stands)."""
    if not point.get("preset") or point["model"] not in MODEL_SPECS:
        return None
    spec = MODEL_SPECS[point["model"]]
    if point["weights"] != spec.precision:  # step --weights: every weight at that precision
        spec = spec.with_weights(point["weights"])
    layout = Layout(dp=point["dp"], tp=point["tp"], pp=point["pp"], ep=point["ep"], dedup=point["dedup"])
    hw = replace(hw, host_us=point.get("host_us", 0.0))
    kv = 1 if point["kv"] == "fp8" else 2
    stages = step_model.step_stages(Deployment(spec, layout, hw, link, kv), point["batch"], point["context"])
    return {s.name: s.step_seconds * 1e3 for s in stages}


def compare_own_timings(documents: list, hw: Hardware, link: Interconnect) -> dict:
    """``step --json`` documents written on a GPU (gpu-check's decode-step-*.json) against the model: every
    stage the GPU timed, its projection on ``hw`` (the folder's measured ceilings) over its measured time,
    per stage and summarised per kind and per step (over the timed stages)."""
    stages, by_kind, totals = [], {}, []
    for document in documents:
        point = document["point"]
        layout = Layout(dp=point["dp"], tp=point["tp"], pp=point["pp"], ep=point["ep"])
        label = f"{point['model']} {layout.label} B{point['batch']} L{point['context']}"
        again = _projected_again(point, hw, link)
        ours_sum = measured_sum = 0.0
        for stage in document["stages"]:
            measured_ms = stage.get("measured_ms")
            if not measured_ms:
                continue
            # a stage today's model no longer has (a document from an older model) keeps its recorded one
            ours = (again or {}).get(stage["name"], stage["ms"])
            stages.append(
                {
                    "point": label,
                    "stage": stage["name"],
                    "kind": stage["kind"],
                    "ours_ms": ours,
                    "measured_ms": measured_ms,
                    "verified": stage.get("verified"),
                }
            )
            by_kind.setdefault(stage["kind"], []).append((ours / measured_ms, f"{label} {stage['name']}"))
            ours_sum, measured_sum = ours_sum + ours, measured_sum + measured_ms
        if measured_sum:
            totals.append((ours_sum / measured_sum, label))
    kinds = [ratio_summary(kind, found) for kind, found in sorted(by_kind.items())]
    if totals:
        kinds.append(ratio_summary("step (timed stages)", totals))
    return {"hardware": hw.name, "stages": stages, "kinds": kinds}


# -- published end-to-end runs -------------------------------------------------------------------------------


def published_runs(rows) -> list:
    """The published runs' CSV rows (bench/serving/data/published_runs.csv, read by the command) with
    their numbers as numbers; rows whose model starts with "#" are comments."""
    runs = []
    for row in rows:
        if row["model"].startswith("#"):
            continue
        run = dict(row)
        for key in ("gpus", "tp", "pp", "ep", "isl", "osl", "max_batch"):
            run[key] = int(row[key])
        for column, known in (("admission", ADMISSION), ("kv_memory", KV_MEMORY)):
            if run[column] not in known:
                raise ValueError(
                    f"published run {row['model']}: {column} {run[column]!r} is not one of {sorted(known)}"
                )
        run["output_tokens_per_s"] = float(row["output_tokens_per_s"])
        runs.append(run)
    return runs


#: KV slots a running sequence holds, by the engine's admission policy (a run's ``admission`` column):
#: - "reserve": admitted only when its prompt and whole answer fit, so it holds isl + osl from the start
#:   (TensorRT-LLM's default capacity scheduler, GUARANTEED_NO_EVICT;
#:   docs/facts.md#measured-ground-truth-for-the-decode-step-model);
#: - "grow": blocks as tokens arrive, preempting when the pool runs out (vLLM, SGLang): on average its
#:   prompt and half its answer.
ADMISSION = {
    "reserve": lambda isl, osl: isl + osl,
    "grow": lambda isl, osl: isl + osl / 2,
}


#: A rank's KV pool, by the engine's memory rule (a run's ``kv_memory`` column):
#: - "of_total": a share (0.9) of the GPU's whole memory, less weights and activations (vLLM's
#:   gpu_memory_utilization; the advisor's memory plan, kv_budget_bytes);
#: - "of_free": a share (0.9) of the memory left free once the weights and activations are in (TensorRT-LLM's
#:   free_gpu_memory_fraction, default 0.9; TensorRT-LLM docs, How to Change KV Cache Behavior).
KV_MEMORY = {
    "of_total": kv_budget_bytes,
    "of_free": lambda hw, weights: kv_pool_bytes_of_free(hw.memory_bytes, weights),
}


def steady_tokens_per_s(
    dep: Deployment, isl: int, osl: int, max_batch: int, admission="grow", kv_memory="of_total"
) -> tuple:
    """(output tokens/s of all GPUs, sequences per replica): every replica holds as many sequences as its
    KV pool (its engine's ``kv_memory`` rule, ``KV_MEMORY``; or the engine's batch cap) allows, each holding
    the slots its engine's ``admission`` policy (``ADMISSION``) keeps for it. Each decodes at the step time at
    the mean context (its prompt and half its answer) and pays its prompt's prefill once."""
    # The advisor's memory plan, each pipeline stage's budget by the engine's rule.
    pool, _, window = min(stage_pools(dep, KV_MEMORY[kv_memory]))
    batch = int(min(max_batch, pool // (ADMISSION[admission](isl, osl) + window)))
    if batch < 1:
        return 0.0, 0
    decode = step_model.step_stages(dep, batch, isl + osl / 2)
    decode_s = step_model.step_seconds(decode)
    prefill_s = 0.0
    for start in range(0, isl, PREFILL_CHUNK):  # the prompt in chunks, each attending to what came before
        tokens = min(PREFILL_CHUNK, isl - start)
        context = start + tokens / 2
        chunk = step_model.prefill_stages(dep, tokens, context)
        prefill_s += step_model.step_seconds(chunk)
    per_sequence_s = osl * decode_s + batch * prefill_s  # every sequence's prefill stalls the batch once
    return dep.layout.dp * batch * osl / per_sequence_s, batch


def compare_published(runs: list, hw: Hardware, link: Interconnect) -> list:
    """Each published run (``published_runs``) against the model's steady-state tokens/s for it."""
    out = []
    for run in runs:
        spec = MODEL_SPECS[run["model"]].with_weights(run["weights"])
        layout = Layout(dp=run["gpus"] // (run["tp"] * run["pp"]), tp=run["tp"], pp=run["pp"], ep=run["ep"])
        kv = 1 if run["kv"] == "fp8" else 2
        dep = Deployment(spec, layout, hw, link, kv)
        ours, batch = steady_tokens_per_s(
            dep, run["isl"], run["osl"], run["max_batch"], run["admission"], run["kv_memory"]
        )
        out.append(
            {
                "run": f"{run['model']} {layout.label} {run['weights']} {run['isl']}/{run['osl']}",
                "engine": run["engine"],
                "published_tokens_per_s": run["output_tokens_per_s"],
                "ours_tokens_per_s": ours,
                "batch": batch,
                "admission": run["admission"],
                "ratio": ours / run["output_tokens_per_s"],
                "source": run["source"],
            }
        )
    return out


def moe_rate_anchors(tables: Tables, hw: Hardware) -> list:
    """The fused MoE's rate anchors (Hardware.moe_rates, a curve per dtype and shape) beside what their
    source rows give (TensorRT-LLM's MoE table, hardware.MOE_RATE_SOURCES): each anchor's FLOPs over its
    latency less the one-token latency. Reading them here records the rows in the extract."""
    out = []
    for curve, key in MOE_RATE_SOURCES.items():
        hidden, inter, top_k, experts, ep = key[1], key[2], key[3], key[4], key[6]
        try:
            floor = tables["moe_trtllm"].ms(key, (1,))
        except MissingShape:  # a system whose TensorRT-LLM table lacks this shape
            continue
        for rows, anchor in hw.moe_rates.get(curve, ()):
            count = rows * experts // top_k
            flops = 2 * 3 * hidden * inter * count * top_k / ep
            measured = flops / ((tables["moe_trtllm"].ms(key, (count,)) - floor) * 1e-3) / 1e12
            out.append(
                {"curve": key[:3], "rows": rows, "tokens": count, "anchor": anchor, "measured": measured}
            )
    return out


def validate(tables: Tables, runs: list, points=None, hw: Hardware | None = None, link=None) -> dict:
    """Every comparison: per kind and step total over the grid (default: ``grid()``), and per published run
    (``published_runs``), on the H200 and NVLink presets unless told otherwise."""
    hw = hw or GPUS["h200"]
    link = link or INTERCONNECTS["nvlink"]
    rows = compare_kernels(tables, grid(hw=hw) if points is None else points, hw, link)
    return {
        "tables": tables.source,
        "hardware": hw.name,
        "kinds": summarise(rows),
        "points": rows,
        "published": compare_published(runs, hw, link),
        "moe_rate": moe_rate_anchors(tables, hw),
    }
