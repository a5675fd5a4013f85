"""`decodebench advise`: which data / tensor / pipeline (and expert) parallel layout of N GPUs serves a
reasoning workload fastest, from the decode-step model (bench/serving/step.py) and a simulation of the
requests through continuous batching.

For each layout that fits (weights, an activation reserve and at least one longest sequence in memory):

- memory plan per rank: weights (non-expert parameters split tp ways; experts tp ways, or whole experts
  spread ep ways; layers split into pp stages as vLLM splits them, the embedding on the first and the LM
  head on the last), and the KV pool left on the stage where it is smallest, in tokens of the layers that
  keep the whole context (a sequence's sliding-window layers hold a fixed window beside them);
- simulation of one replica's share of the R requests through continuous batching (bench/serving/
  batching.py; replicas are statistically alike; all requests arrive at once, an offline batch as the
  scaling study, arXiv 2605.19775, ran): first-come-first-served admission while the pool has room for the
  prompt above a watermark (KV-aware) and fewer than max_num_seqs run; each simulated step decodes
  ``stride`` tokens of every running sequence at the step model's time for that batch and mean context;
  prompts prefill in chunks of packed prompt tokens at the step model's prefill time; when the pool runs
  out the newest sequence is preempted and recomputed later. Each layout gets the best of a sweep of
  max_num_seqs, as the scaling study tuned it (or the best under a time-per-output-token limit);
- the binding constraint: KV capacity when admission waited on the pool for most of the run or preempted
  sequences' recomputation cost over a tenth of the output tokens, otherwise the bound (HBM bandwidth,
  compute, interconnect, routing/synchronization, pipeline bubbles, launch, host) that took the most time;
- beside the makespan, a steady-state tokens/s: every replica at its peak batch, decoding at the
  workload's mean context.

No rule names a model or a size: the ranking is the simulated makespan.
"""

import math
from dataclasses import dataclass, replace

import numpy as np

from bench.serving import batching
from bench.serving.batching import Batching, Requests, kv_pool_bytes
from bench.serving.hardware import Hardware, Interconnect
from bench.serving.models import DEFAULT_BLOCK_SIZE, ModelSpec, pipeline_stages
from bench.serving.step import (
    Deployment,
    Layout,
    prefill_stages,
    seconds_by_bound,
    step_seconds,
    step_stages,
)
from bench.serving.workloads import ReasoningWorkload

BLOCK = DEFAULT_BLOCK_SIZE
MAX_NUM_SEQS = (64, 128, 256, 512, 1024)


# -- layouts and memory --------------------------------------------------------------------------------------


def layouts(spec: ModelSpec, gpus: int, gpus_per_node: int = 8) -> list[Layout]:
    """Every dp x tp x pp of ``gpus`` (tp within a node and splitting the heads; pp at most the layers),
    and for MoE models each with experts split tp ways (ep 1) and spread over dp x tp (ep), the latter with
    and without a deduplicated dispatch (one row per (token, rank), Layout.dedup)."""
    found = []
    for tp in _divisors(gpus):
        if tp > gpus_per_node or spec.tensor_parallel_problem(tp):
            continue
        for pp in _divisors(gpus // tp):
            if pp > spec.layers:
                continue
            dp = gpus // (tp * pp)
            found.append(Layout(dp=dp, tp=tp, pp=pp))
            if spec.moe is not None and dp * tp > 1 and spec.moe.num_experts % (dp * tp) == 0:
                found.append(Layout(dp=dp, tp=tp, pp=pp, ep=dp * tp))
                found.append(Layout(dp=dp, tp=tp, pp=pp, ep=dp * tp, dedup=True))
    return found


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class MemoryPlan:
    weights_bytes: float  # per rank of the heaviest pipeline stage
    kv_bytes_per_token: float  # per rank of the stage whose pool binds, its layers keeping the whole context
    pool_tokens: int  # tokens the replica's KV pool holds (each rank holds its share of each)
    fits: bool
    why: str = ""
    sequences: int = 0  # of the workload's mean length (prompt + output), the pool holds at once
    window_slots: int = 0  # a sequence's sliding-window pages on the binding stage (ModelSpec.window_slots)


def stage_weights(spec: ModelSpec, layout: Layout, stage: range) -> float:
    """Weight bytes on one rank of the pipeline stage holding ``stage``'s layers: experts spread over EP
    (or split TP ways), the rest split TP ways; routed experts at their own width (MXFP4 in gpt-oss); the
    embedding on the first stage and the LM head on the last (one matrix when tied and both are one stage),
    bf16 in fp8 and MXFP4 checkpoints too."""
    tp = layout.tp
    split, routed = (sum(parts) for parts in zip(*(spec.layer_params(i) for i in stage)))
    first, last = stage.start == 0, stage.stop == spec.layers
    tables = first + last - (first and last and spec.tied_embeddings)  # embedding, LM head
    return (
        split / tp * spec.weight_bytes
        + routed / (layout.ep if layout.ep > 1 else tp) * spec.routed_expert_bytes
        + tables * spec.vocab * spec.hidden * 2 / tp
    )


def weights_per_rank(spec: ModelSpec, layout: Layout) -> float:
    """Weight bytes on a rank of the heaviest pipeline stage (stage_weights)."""
    return max(stage_weights(spec, layout, stage) for stage in pipeline_stages(spec.layers, layout.pp))


def kv_budget_bytes(hw: Hardware, weights: float) -> float:
    """A rank's KV pool on ``hw`` (batching.kv_pool_bytes)."""
    return kv_pool_bytes(hw.memory_bytes, weights)


def stage_pools(dep: Deployment, budget_of=None) -> list[tuple[int, float, int]]:
    """(token slots, KV bytes a token, window_slots) of each pipeline stage's pool: its budget (``budget_of``
    (hw, weights), default kv_budget_bytes: vLLM's rule) over the bytes a token holds in its layers. A
    replica's sequences hold the same tokens on every stage, so the smallest pool binds (vLLM sizes every
    stage's blocks to the smallest)."""
    spec, layout, hw, kv_bytes = dep.spec, dep.layout, dep.hw, dep.kv_bytes
    out = []
    for stage in pipeline_stages(spec.layers, layout.pp):
        per_token = spec.kv_bytes_per_token(
            tp=layout.tp, kv_bytes=kv_bytes, start=stage.start, stop=stage.stop
        )
        budget = (budget_of or kv_budget_bytes)(hw, stage_weights(spec, layout, stage))
        window = spec.window_slots(BLOCK, stage.start, stage.stop)
        out.append((max(0, int(budget // per_token)), per_token, window))
    return out


def memory_plan(dep: Deployment, workload: ReasoningWorkload) -> MemoryPlan:
    weights = weights_per_rank(dep.spec, dep.layout)
    pool, per_token, window = min(stage_pools(dep))
    budget = kv_budget_bytes(dep.hw, weights)
    # ``window``: what a sequence's sliding-window layers hold beside its tokens (ModelSpec.window_slots)
    longest = workload.max_output + workload.max_prompt + window
    if budget <= 0:
        why = f"weights {weights / 1e9:.0f} GB a rank do not fit"
        return MemoryPlan(
            weights_bytes=weights, kv_bytes_per_token=per_token, pool_tokens=0, fits=False, why=why
        )
    if pool < longest:
        why = f"pool of {pool} tokens < one longest sequence"
        return MemoryPlan(
            weights_bytes=weights, kv_bytes_per_token=per_token, pool_tokens=pool, fits=False, why=why
        )
    mean = workload.prompt_median + workload.mean_output + window
    return MemoryPlan(
        weights_bytes=weights,
        kv_bytes_per_token=per_token,
        pool_tokens=pool,
        fits=True,
        sequences=int(pool // mean),
        window_slots=window,
    )


# -- simulation ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    layout: Layout
    fits: bool
    max_num_seqs: int = 0
    seconds: float = math.inf  # makespan of the R requests
    tokens_per_s: float = 0.0
    tpot_ms: float = 0.0  # mean time per output token a sequence sees
    peak_sequences: int = 0
    preemptions: int = 0
    bound: str = ""
    by_bound: dict | None = None  # simulated seconds by bound
    plan: MemoryPlan | None = None
    why: str = ""
    steady_tokens_per_s: float = (
        0.0  # all replicas at the peak batch, decoding at the workload's mean context
    )

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.layout.gpus

    def row(self) -> dict:
        out = {
            "layout": self.layout.label,
            "dp": self.layout.dp,
            "tp": self.layout.tp,
            "pp": self.layout.pp,
            "ep": self.layout.ep,
            "dedup": self.layout.dedup,
            "fits": self.fits,
            "max_num_seqs": self.max_num_seqs,
            "seconds": round(self.seconds, 2) if self.fits else None,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "tokens_per_s_per_gpu": round(self.tokens_per_s_per_gpu, 1),
            "steady_tokens_per_s_per_gpu": round(self.steady_tokens_per_s / self.layout.gpus, 1),
            "tpot_ms": round(self.tpot_ms, 3),
            "peak_sequences": self.peak_sequences,
            "preemptions": self.preemptions,
            "bound": self.bound,
            "why": self.why,
        }
        if self.plan is not None:
            out.update(
                weights_gb_per_rank=round(self.plan.weights_bytes / 1e9, 1),
                kv_pool_tokens=self.plan.pool_tokens,
                sequences_held=self.plan.sequences * self.layout.dp,
            )
        return out


class _StepTimes:
    """The step model, memoised on a grid of (batch, context): a simulation asks it thousands of times with
    batches and contexts that change slowly. Batches past 32 and contexts round to 1/24 and 1/16 of an
    octave (under 1.5% and 2.2%: the step's terms are near linear in both)."""

    def __init__(self, dep: Deployment):
        self.dep = dep
        self.cache: dict = {}

    def __call__(self, batch: int, context: float) -> tuple[float, dict]:
        batch_key = batch if batch <= 32 else round(math.log2(batch) * 24)
        key = (batch_key, round(math.log2(max(context, 1)) * 16))
        if key not in self.cache:
            at = batch if batch <= 32 else 2 ** (batch_key / 24)
            stages = step_stages(self.dep, at, 2 ** (key[1] / 16))
            self.cache[key] = (step_seconds(stages), seconds_by_bound(stages))
        return self.cache[key]


def simulate(
    dep: Deployment,
    workload: ReasoningWorkload,
    requests: int,
    max_num_seqs: int,
    *,
    stride: int = 32,
    seed: int = 0,
) -> Outcome:
    """One replica of the deployment's layout serving its share of ``requests`` through continuous batching
    (bench/serving/batching.py) at the step model's times; the outcome scaled to the dp replicas."""
    layout = dep.layout
    plan = memory_plan(dep, workload)
    if not plan.fits:
        return Outcome(layout=layout, fits=False, why=plan.why, plan=plan)
    # The same R requests for every layout; this replica serves every dp-th of them (one answer each).
    all_prompts, all_outputs = workload.draw(requests, np.random.default_rng(seed))
    mine = Requests.from_draw(all_prompts[:: layout.dp], all_outputs[:: layout.dp, :1])
    step_time = _StepTimes(dep)
    config = Batching(
        pool_tokens=plan.pool_tokens,
        policy=f"paged-{BLOCK}",
        stride=stride,
        max_num_seqs=max_num_seqs,
        step_time=step_time,
        prefill_s_per_token=prefill_seconds_per_token(dep, workload),
        window_slots=plan.window_slots,
    )
    run = batching.simulate(config, mine)
    mean_context = workload.prompt_median + workload.mean_output / 2
    peak = max(1, run.peak_sequences)
    busy = min(layout.dp, requests)  # with fewer requests than replicas, the rest stand idle
    steady = busy * peak / step_time(peak, mean_context)[0]
    # KV capacity binds when admission waited on the pool most of the time, or when preempted sequences'
    # recomputation cost over a tenth of the answers' tokens (the sweep then settles on a small batch).
    kv_bound = run.kv_wait_seconds > 0.5 * run.seconds or run.recomputed_tokens > 0.1 * mine.output.sum()
    return Outcome(
        layout=layout,
        fits=True,
        max_num_seqs=max_num_seqs,
        seconds=run.seconds,
        tokens_per_s=int(all_outputs[:, 0].sum()) / run.seconds if run.seconds else 0.0,
        tpot_ms=run.tpot_s * 1e3,
        peak_sequences=run.peak_sequences * busy,
        preemptions=run.preemptions * busy,
        bound="KV capacity" if kv_bound else max(run.by_bound, key=run.by_bound.get),
        by_bound=run.by_bound,
        plan=plan,
        steady_tokens_per_s=steady,
    )


#: Prompt tokens one prefill step takes: prompts are chunked and packed to vLLM's max_num_batched_tokens for
#: throughput serving (8192, assumed).
PREFILL_CHUNK = 8192


def prefill_seconds_per_token(dep: Deployment, workload: ReasoningWorkload) -> float:
    """A prompt token's prefill seconds on one replica: a full chunk of packed prompts through the step
    model's prefill (every layer's GEMMs at the chunk's size, attention over half the mean prompt)."""
    chunk = prefill_stages(dep, PREFILL_CHUNK, workload.prompt_median / 2)
    return step_seconds(chunk) / PREFILL_CHUNK


def advise(
    spec: ModelSpec,
    gpus: int,
    hw: Hardware,
    link: Interconnect,
    workload: ReasoningWorkload,
    requests: int = 2048,
    *,
    sweep=MAX_NUM_SEQS,
    stride: int = 32,
    seed: int = 0,
    kv_bytes: int = 2,
    max_tpot_ms: float | None = None,
) -> list[Outcome]:
    """Every layout of ``gpus`` GPUs, best first (fitting ones by makespan, then those that do not fit),
    each at the best max_num_seqs of the sweep; with ``max_tpot_ms``, the best whose mean time per output
    token is at most that (as deployments are sized), a layout none of whose runs meets it not fitting."""
    best = []
    for layout in layouts(spec, gpus):
        dep = Deployment(spec, layout, hw, link, kv_bytes)
        tried = [simulate(dep, workload, requests, s, stride=stride, seed=seed) for s in sweep]
        if max_tpot_ms is not None:
            meeting = [o for o in tried if o.fits and o.tpot_ms <= max_tpot_ms]
            if not meeting and tried[0].fits:
                why = f"TPOT over {max_tpot_ms:g} ms at every max_num_seqs tried"
                tried = [replace(min(tried, key=lambda o: o.tpot_ms), fits=False, why=why, seconds=math.inf)]
            else:
                tried = meeting or tried
        best.append(min(tried, key=lambda o: o.seconds))
    return sorted(best, key=lambda o: (not o.fits, o.seconds))


def as_json(outcomes: list[Outcome], **context) -> dict:
    rows = [o.row() for o in outcomes]
    fitting = [o for o in outcomes if o.fits]
    if len(fitting) > 1:
        context["runner_up_slower"] = round(fitting[1].seconds / fitting[0].seconds, 3)
    return {**context, "layouts": rows, "by_bound": [o.by_bound for o in outcomes if o.fits][:1]}
