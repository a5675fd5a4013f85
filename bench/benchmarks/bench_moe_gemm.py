"""The experts on a GPU (issue 21): grouped_gemm's gate-up (silu_and_mul) and down GEMMs for DeepSeek-R1 under
EP8 (fp8 as released, bf16 beside it) and TP8, Qwen3-235B-A22B, Mixtral-8x7B and gpt-oss-120b at 1 to 8192
tokens, against the torch reference and the peers (a torch loop over experts, torch._grouped_mm,
triton_kernels' matmul_ogs), each skipped with its reason where it cannot run; GB/s and TFLOP/s with their
share of the copy bandwidth and the bf16 matmul ceiling measured in the session (conftest.py).

Then the whole layer, moe_layer, with the gather fused into the gate-up GEMM and with dispatch's copy, and
the issue's target beside it: fused, the layer's time is at least dispatch's copy below the unfused layer's.
That comparison is recorded (extra_info: each stage's median, the saving, the copy, whether the target is
met), not asserted: timing belongs to gpu-check, not to a test.

What each layer figure is: the kernel's layer and every stage are captured once into a CUDA graph and the
graph is replayed, L2 flushed before each replay (``time_cuda(..., cuda_graph=True)``; the benchmark's own
rounds replay the same way on CUDA_CLOCK): device time, as a serving engine running decode under CUDA
graphs sees it. Timed eagerly, a decode layer's five launches and their host-side checks take longer to
issue than the GPU takes to run them, so CUDA events around an eager call read the host; those eager
figures are kept beside the graph ones, named ``eager_*``, as a secondary figure (what a caller without
graphs pays). The torch reference reads the routing on the host (it cannot be captured): it is timed
eagerly and its entry says so (``cuda_graph`` false).
Run: ``pytest bench/benchmarks/bench_moe_gemm.py --benchmark-json out.json`` on a GPU."""

import inspect
from dataclasses import replace

import pytest

import kernels.moe as moe
from bench.benchmarks.cases import benchmark_every_impl
from bench.benchmarks.conftest import ROUNDS, WARMUP_ROUNDS
from bench.measure.device import machine_info
from bench.measure.timing import CUDA_CLOCK, capture_graph, flush_l2, time_cuda
from bench.operators.moe_gemm import GROUPED_GEMM, MOE_LAYER, STAGES
from bench.testing import seed_of
from kernels.moe_gemm import grouped_gemm

pytestmark = [pytest.mark.gpu, pytest.mark.benchmark(timer=CUDA_CLOCK)]
CASE = GROUPED_GEMM
test_grouped_gemm = benchmark_every_impl(CASE)


def graph_us(fn, label: str) -> float:
    """``fn``'s median in us as a CUDA-graph replay, L2 flushed before each: device time (the headline)."""
    return time_cuda(fn, label=label, cuda_graph=True).median_ms * 1e3


def eager_us(fn, label: str) -> float:
    """``fn``'s median in us called eagerly between CUDA events, L2 flushed before each: at decode, the
    host issuing the launches (a secondary figure, named eager_* wherever it lands)."""
    return time_cuda(fn, label=f"{label} eager").median_ms * 1e3


def benchmark_graph(benchmark, fn, label: str) -> float:
    """pytest-benchmark's rounds over ``fn`` captured once into a CUDA graph (outside the rounds), each
    replay on CUDA_CLOCK with L2 flushed in the round's setup; the median in us."""
    replay = capture_graph(fn)
    benchmark.pedantic(
        CUDA_CLOCK.timed(replay, label=label), setup=flush_l2, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS
    )
    return benchmark.stats.stats.median * 1e6


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("layer_shape", MOE_LAYER.default_shapes(), ids=lambda s: s.label)
def test_moe_layer(gpu_benchmark, layer_shape, impl):
    """The kernel's layer as a CUDA-graph replay, its eager median beside it (eager_us); the torch
    reference eagerly (it reads the routing on the host: no graph)."""
    gpu_benchmark(MOE_LAYER, layer_shape, impl, graph=impl == "triton")


# route's keywords (all after logits and top_k), as moe_layer passes them through.
_ROUTE_KEYWORDS = tuple(inspect.signature(moe.route).parameters)[2:]


def layer_stages(args: dict, fused: bool) -> dict:
    """The layer's calls one stage at a time on ``args`` (moe_layer's), each stage's inputs made once here
    by the stage before it, outside any timing."""
    route_kw = {k: args[k] for k in _ROUTE_KEYWORDS if k in args}
    x, logits, w13, w2, top_k, align = (
        args[k] for k in ("x", "router_logits", "w13", "w2", "top_k", "align")
    )
    experts = w13.shape[0]
    weights, ids = moe.route(logits, top_k, **route_kw)
    rows, plan = (
        (x, moe.dispatch_plan(ids, experts, align=align))
        if fused
        else moe.dispatch(x, ids, experts, align=align)
    )
    hidden = grouped_gemm(rows, w13, plan, gather=fused, activation="silu_and_mul", w_scale=args["w13_scale"])
    y = grouped_gemm(hidden, w2, plan, w_scale=args["w2_scale"])
    return {
        "route": lambda: moe.route(logits, top_k, **route_kw),
        "plan": lambda: moe.dispatch_plan(ids, experts, align=align),
        "dispatch": lambda: moe.dispatch(x, ids, experts, align=align),
        "gate_up": lambda: grouped_gemm(
            rows, w13, plan, gather=fused, activation="silu_and_mul", w_scale=args["w13_scale"]
        ),
        "down": lambda: grouped_gemm(hidden, w2, plan, w_scale=args["w2_scale"]),
        "combine": lambda: moe.combine(y, weights, plan),
    }


def saving(fused_us: float, unfused_us: float, stages: dict) -> dict:
    """The target's figures from the layers' and stages' medians (us): dispatch's copy is dispatch's time
    less dispatch_plan's (what the fused path runs instead); routing's share is route + plan + combine
    against them and the two GEMMs."""
    copy_us = stages["dispatch"] - stages["plan"]
    routing_us = stages["route"] + stages["plan"] + stages["combine"]
    return {
        "fused_us": round(fused_us, 2),
        "unfused_us": round(unfused_us, 2),
        "saved_us": round(unfused_us - fused_us, 2),
        "dispatch_copy_us": round(copy_us, 2),
        "target_met": unfused_us - fused_us >= copy_us,
        "stage_median_us": {k: round(v, 2) for k, v in stages.items()},
        "routing_share": round(routing_us / (routing_us + sum(stages[s] for s in STAGES)), 3),
    }


@pytest.mark.parametrize(
    "layer_shape", [s for s in MOE_LAYER.default_shapes() if s.fused_gather], ids=lambda s: s.label
)
def test_fused_gather_saves_dispatchs_copy(benchmark, layer_shape):
    """The fused layer as the benchmark; beside it the unfused layer, and each stage alone on the fused
    path's inputs, every one a CUDA-graph replay (``saving``'s figures, and the model's one routing_share
    on the project's kernels); the two layers' eager medians as eager_fused_us and eager_unfused_us.
    Target: unfused - fused >= dispatch's copy."""
    fused_args = MOE_LAYER.build(layer_shape, "cuda", seed_of(f"moe_layer/{layer_shape.label}")).args
    unfused_args = {**fused_args, "fused_gather": False}
    fused_label = f"moe_layer {layer_shape.label}"
    unfused_label = f"moe_layer {replace(layer_shape, fused_gather=False).label}"

    def fused():
        return MOE_LAYER.kernel(**fused_args)

    def unfused():
        return MOE_LAYER.kernel(**unfused_args)

    unfused_us = graph_us(unfused, unfused_label)
    stages = {
        name: graph_us(fn, f"{fused_label} {name}")
        for name, fn in layer_stages(fused_args, fused=True).items()
    }
    fused_us = benchmark_graph(benchmark, fused, fused_label)
    benchmark.extra_info.update(
        # Its own kernel name: test_moe_layer's graph entry is (moe_layer, triton, shape, graph), and two
        # entries under one key overwrite each other in reports and compare.
        kernel="moe_layer-saving",
        shape=layer_shape.label,
        gpu=machine_info().gpu,
        cuda_graph=True,
        **saving(fused_us, unfused_us, stages),
        eager_fused_us=round(eager_us(fused, fused_label), 2),
        eager_unfused_us=round(eager_us(unfused, unfused_label), 2),
    )
