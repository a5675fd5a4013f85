"""`decodebench advise`: which data / tensor / pipeline (and expert) parallel layout of N GPUs serves a
reasoning workload fastest, from the decode-step model (bench/serving/step.py) and a simulation of the
requests through continuous batching.

For each layout that fits (weights, an activation reserve and at least one longest sequence in memory):

- memory plan per rank: weights (non-expert parameters split tp ways; experts tp ways, or whole experts
  spread ep ways; everything split pp ways by layers), and the KV pool left;
- simulation of one replica's share of the R requests (replicas are statistically alike; all requests
  arrive at once, an offline batch as the paper ran): first-come-first-served admission while the pool has
  room for the prompt above a watermark (KV-aware) and fewer than max_num_seqs run; each simulated step
  decodes ``stride`` tokens of every running sequence at the step model's time for that batch and mean
  context; prompts prefill at the matmul ceiling; when the pool runs out the newest sequence is preempted
  and recomputed later. Each layout gets the best of a sweep of max_num_seqs, as the paper tuned it;
- the binding constraint: KV capacity when admission waited on the pool for most of the run or preempted
  sequences' recomputation cost over a tenth of the output tokens, otherwise the bound (HBM bandwidth,
  compute, interconnect, routing/synchronization, pipeline bubbles, launch) that took the most time.

No rule names a model or a size: the ranking is the simulated makespan.
"""

import math
from dataclasses import dataclass

import numpy as np

from bench.serving.capacity import ACTIVATION_RESERVE_GIB, MEMORY_UTILISATION, WATERMARK
from bench.serving.hardware import Hardware, Interconnect
from bench.serving.models import ModelSpec
from bench.serving.step import BOUNDS, Layout, seconds_by_bound, step_stages
from bench.serving.workloads import ReasoningWorkload

ACTIVATION_RESERVE_BYTES = ACTIVATION_RESERVE_GIB * 2**30
BLOCK = 16
MAX_NUM_SEQS = (64, 128, 256, 512, 1024)


# -- layouts and memory --------------------------------------------------------------------------------------


def layouts(spec: ModelSpec, gpus: int, gpus_per_node: int = 8) -> list[Layout]:
    """Every dp x tp x pp of ``gpus`` (tp within a node and splitting the heads; pp at most the layers),
    and for MoE models each with experts split tp ways (ep 1) and spread over dp x tp (ep)."""
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
    return found


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class MemoryPlan:
    weights_bytes: float  # per rank
    kv_bytes_per_token: float  # per rank, all its layers
    pool_tokens: int  # tokens the replica's KV pool holds (each rank holds its share of each)
    fits: bool
    why: str = ""
    sequences: int = 0  # of the workload's mean length (prompt + output), the pool holds at once


def memory_plan(spec: ModelSpec, layout: Layout, hw: Hardware, workload: ReasoningWorkload, kv_bytes=2):
    m = spec.moe
    experts = 0 if m is None else spec.moe_layers * m.num_experts * spec.expert_params()
    rest = spec.params() - experts
    expert_split = layout.ep if layout.ep > 1 else layout.tp
    weights = (rest / layout.tp + experts / expert_split) / layout.pp * spec.weight_bytes
    per_token = spec.layers / layout.pp * spec.kv_bytes_per_token_layer(layout.tp, kv_bytes)
    budget = hw.memory_bytes * MEMORY_UTILISATION - weights - ACTIVATION_RESERVE_BYTES
    pool = max(0, int(budget // per_token))
    longest = workload.max_output + 2048
    if budget <= 0:
        return MemoryPlan(weights, per_token, 0, False, f"weights {weights / 1e9:.0f} GB a rank do not fit")
    if pool < longest:
        return MemoryPlan(weights, per_token, pool, False, f"pool of {pool} tokens < one longest sequence")
    mean = workload.prompt_median + workload.output_median * math.exp(workload.output_sigma**2 / 2)
    return MemoryPlan(weights, per_token, pool, True, sequences=int(pool // mean))


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

    def row(self) -> dict:
        out = {
            "layout": self.layout.label,
            "dp": self.layout.dp,
            "tp": self.layout.tp,
            "pp": self.layout.pp,
            "ep": self.layout.ep,
            "fits": self.fits,
            "max_num_seqs": self.max_num_seqs,
            "seconds": round(self.seconds, 2) if self.fits else None,
            "tokens_per_s": round(self.tokens_per_s, 1),
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

    def __init__(self, spec, layout, hw, link, kv_bytes):
        self.args = (spec, layout, hw, link)
        self.kv_bytes = kv_bytes
        self.cache: dict = {}

    def __call__(self, batch: int, context: float) -> tuple[float, dict]:
        batch_key = batch if batch <= 32 else round(math.log2(batch) * 24)
        key = (batch_key, round(math.log2(max(context, 1)) * 16))
        if key not in self.cache:
            spec, layout, hw, link = self.args
            at = batch if batch <= 32 else 2 ** (batch_key / 24)
            stages = step_stages(spec, layout, at, 2 ** (key[1] / 16), hw, link, kv_bytes=self.kv_bytes)
            by_bound = seconds_by_bound(stages)
            self.cache[key] = (sum(by_bound.values()), by_bound)
        return self.cache[key]


def simulate(
    spec: ModelSpec,
    layout: Layout,
    hw: Hardware,
    link: Interconnect,
    workload: ReasoningWorkload,
    requests: int,
    max_num_seqs: int,
    *,
    stride: int = 32,
    seed: int = 0,
    kv_bytes: int = 2,
) -> Outcome:
    plan = memory_plan(spec, layout, hw, workload, kv_bytes)
    if not plan.fits:
        return Outcome(layout, False, why=plan.why, plan=plan)
    # The same R requests for every layout; this replica serves every dp-th of them.
    all_prompts, all_outputs = workload.draw(requests, np.random.default_rng(seed))
    prompts, outputs = all_prompts[:: layout.dp], all_outputs[:: layout.dp]
    mine = len(prompts)
    targets = prompts + outputs[:, 0]
    step = _StepTimes(spec, layout, hw, link, kv_bytes)
    pool_blocks = plan.pool_tokens // BLOCK
    watermark = int(WATERMARK * pool_blocks)
    active_params = _active_params(spec) / (layout.tp * layout.pp)
    queue = list(range(mine))[::-1]  # pop() takes the next in arrival order
    index = np.zeros(0, dtype=np.int64)
    length = np.zeros(0, dtype=np.int64)
    clock, kv_wait, tokens_done, token_time, lost = 0.0, 0.0, 0, 0.0, 0
    peak = preemptions = 0
    by_bound = dict.fromkeys(BOUNDS, 0.0)
    while queue or len(index):
        # Admission: first come, first served, while the prompt's blocks fit above the watermark.
        used = int((-(-length // BLOCK)).sum())
        admitted = []
        while queue and len(index) + len(admitted) < max_num_seqs:
            need = -(-(prompts[queue[-1]] + 1) // BLOCK)
            if used + need > pool_blocks - watermark:
                break
            used += need
            admitted.append(queue.pop())
        if admitted:
            new = np.array(admitted, dtype=np.int64)
            prefill_tokens = int(prompts[new].sum())
            clock += 2 * active_params * prefill_tokens / (hw.matmul_tflops * 1e12 * hw.compute_efficiency)
            index = np.concatenate([index, new])
            length = np.concatenate([length, prompts[new].astype(np.int64)])
        blocked = bool(queue) and len(index) < max_num_seqs
        if not len(index):
            break  # nothing fits at all (plan.fits rules this out)
        peak = max(peak, len(index))
        # Decode ``stride`` tokens of every running sequence (fewer where it finishes sooner).
        seconds, bounds = step(len(index), float(length.mean()) + stride / 2)
        grow = np.minimum(stride, targets[index] - length)
        steps = int(grow.max())
        clock += seconds * steps
        for bound, share in bounds.items():
            by_bound[bound] += share * steps
        if blocked:
            kv_wait += seconds * steps
        tokens_done += int(grow.sum())
        token_time += seconds * int(grow.sum())
        length = length + grow
        # Out of blocks: the newest sequences are preempted (their blocks freed; recomputed from the prompt).
        held = np.cumsum(-(-length // BLOCK))
        keep = int(np.searchsorted(held, pool_blocks, side="right"))
        if keep < len(index):
            preemptions += len(index) - keep
            lost += int((length[keep:] - prompts[index[keep:]]).sum())  # decoded again after restart
            queue += [int(i) for i in index[keep:][::-1]]  # back to the head of the queue, oldest first
            index, length = index[:keep], length[:keep]
        done = length >= targets[index]
        index, length = index[~done], length[~done]
    total = int(all_outputs[:, 0].sum())
    # KV capacity binds when admission waited on the pool most of the time, or when preempted sequences'
    # recomputation cost over a tenth of the answers' tokens (the sweep then settles on a small batch).
    kv_bound = kv_wait > 0.5 * clock or lost > 0.1 * outputs[:, 0].sum()
    bound = "KV capacity" if kv_bound else max(by_bound, key=by_bound.get)
    return Outcome(
        layout,
        True,
        max_num_seqs,
        clock,
        total / clock if clock else 0.0,
        token_time / tokens_done * 1e3 if tokens_done else 0.0,
        peak * layout.dp,
        preemptions * layout.dp,
        bound,
        by_bound,
        plan,
    )


def _active_params(spec: ModelSpec) -> float:
    """Parameters one token runs through (its top-k experts, not all of them)."""
    if spec.moe is None:
        return spec.params()
    m = spec.moe
    idle = spec.moe_layers * (m.num_experts - m.top_k) * spec.expert_params()
    return spec.params() - idle


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
) -> list[Outcome]:
    """Every layout of ``gpus`` GPUs, best first (fitting ones by makespan, then those that do not fit),
    each at the best max_num_seqs of the sweep."""
    best = []
    for layout in layouts(spec, gpus):
        tried = [
            simulate(
                spec, layout, hw, link, workload, requests, s, stride=stride, seed=seed, kv_bytes=kv_bytes
            )
            for s in sweep
        ]
        best.append(min(tried, key=lambda o: o.seconds))
    return sorted(best, key=lambda o: (not o.fits, o.seconds))


def as_json(outcomes: list[Outcome], **context) -> dict:
    rows = [o.row() for o in outcomes]
    fitting = [o for o in outcomes if o.fits]
    if len(fitting) > 1:
        context["runner_up_slower"] = round(fitting[1].seconds / fitting[0].seconds, 3)
    return {**context, "layouts": rows, "by_bound": [o.by_bound for o in outcomes if o.fits][:1]}
