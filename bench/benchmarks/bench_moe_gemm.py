"""The experts on a GPU (issue 21): grouped_gemm's gate-up (silu_and_mul) and down GEMMs for DeepSeek-R1 under
EP8 (fp8 as released, bf16 beside it) and TP8, Qwen3-235B-A22B, Mixtral-8x7B and gpt-oss-120b at 1 to 8192
tokens, against the torch reference and the peers (a torch loop over experts, torch._grouped_mm,
triton_kernels' matmul_ogs), each skipped with its reason where it cannot run; GB/s and TFLOP/s with their
share of the copy bandwidth and the bf16 matmul ceiling measured in the session (conftest.py).

Then the whole layer, moe_layer, with the gather fused into the gate-up GEMM and with dispatch's copy, and
the issue's target beside it: fused, the layer's time is at least dispatch's copy below the unfused layer's.
That comparison is recorded (extra_info: each stage's median, the saving, the copy, whether the target is
met), not asserted: timing belongs to gpu-check, not to a test.
Run: ``pytest bench/benchmarks/bench_moe_gemm.py --benchmark-json out.json`` on a GPU."""

from dataclasses import replace

import pytest

import kernels.moe as moe
from bench.benchmarks.cases import benchmark_every_impl
from bench.measure.device import machine_info
from bench.measure.timing import CUDA_CLOCK, flush_l2, time_cuda
from bench.operators.moe_gemm import GROUPED_GEMM, MOE_LAYER, STAGES
from bench.testing import seed_of
from kernels.moe_gemm import grouped_gemm

pytestmark = [pytest.mark.gpu, pytest.mark.benchmark(timer=CUDA_CLOCK)]
CASE = GROUPED_GEMM
test_grouped_gemm = benchmark_every_impl(CASE)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("layer_shape", MOE_LAYER.default_shapes(), ids=lambda s: s.label)
def test_moe_layer(gpu_benchmark, layer_shape, impl):
    gpu_benchmark(MOE_LAYER, layer_shape, impl)


def layer_stages(args: dict, fused: bool) -> dict:
    """The layer's calls one stage at a time on ``args`` (moe_layer's), each stage's inputs made once here
    by the stage before it, outside any timing."""
    route_kw = {k: args[k] for k in ("scoring", "num_groups", "topk_groups", "bias", "scale")}
    route_kw["softmax_after_topk"], route_kw["renormalize"] = args["softmax_after_topk"], args["renormalize"]
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


def _median_us(fn, label: str) -> float:
    return time_cuda(fn, label=label).median_ms * 1e3


@pytest.mark.parametrize(
    "layer_shape", [s for s in MOE_LAYER.default_shapes() if s.fused_gather], ids=lambda s: s.label
)
def test_fused_gather_saves_dispatchs_copy(benchmark, layer_shape):
    """The fused layer timed as the benchmark; beside it the unfused layer, and each stage alone on the fused
    path's inputs: dispatch's copy is dispatch's time less dispatch_plan's (what the fused path runs
    instead). Target: unfused - fused >= that copy. Also routing's share of the layer: route + plan +
    combine against the two GEMMs."""
    inputs = MOE_LAYER.build(layer_shape, "cuda", seed_of(f"moe_layer/{layer_shape.label}"))
    fused_args = inputs.args
    unfused_args = {**fused_args, "fused_gather": False}
    label = f"moe_layer {replace(layer_shape, fused_gather=False).label}"
    unfused_us = _median_us(lambda: MOE_LAYER.kernel(**unfused_args), label)
    stages = {
        name: _median_us(fn, f"moe_layer {layer_shape.label} {name}")
        for name, fn in layer_stages(fused_args, fused=True).items()
    }
    benchmark.pedantic(
        CUDA_CLOCK.timed(lambda: MOE_LAYER.kernel(**fused_args), label=f"moe_layer {layer_shape.label}"),
        setup=flush_l2,  # cold L2 before each round, as time_cuda gives the unfused layer and each stage
        rounds=10,
        warmup_rounds=2,
    )
    fused_us = benchmark.stats.stats.median * 1e6
    copy_us = stages["dispatch"] - stages["plan"]
    routing_us = stages["route"] + stages["plan"] + stages["combine"]
    benchmark.extra_info.update(
        kernel="moe_layer",
        shape=layer_shape.label,
        gpu=machine_info().gpu,
        fused_us=round(fused_us, 2),
        unfused_us=round(unfused_us, 2),
        saved_us=round(unfused_us - fused_us, 2),
        dispatch_copy_us=round(copy_us, 2),
        target_met=unfused_us - fused_us >= copy_us,
        stage_median_us={k: round(v, 2) for k, v in stages.items()},
        routing_share=round(routing_us / (routing_us + sum(stages[s] for s in STAGES)), 3),
    )
