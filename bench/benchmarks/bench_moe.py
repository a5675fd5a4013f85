"""MoE routing on a GPU: route, dispatch and combine for DeepSeek-R1 (256 experts, top-8, grouped sigmoid),
Qwen3-30B-A3B and Qwen3-235B-A22B (128, top-8), Mixtral-8x7B (8, top-2) and gpt-oss-120b (128, top-4 then
softmax), 1 to 16384 tokens, uniform and Zipf loads, each against its torch reference; and a whole MoE
layer (route, dispatch, the experts' matmuls on the dispatched rows, combine) to show routing's share
against experts run in torch: its extra_info names the experts' path (torch's grouped matmul, or a
per-expert loop that syncs, and why). Those experts are bf16 for every model (DeepSeek-R1 ships fp8, whose
weights are half the bytes: byte model, not measured), so the figure is named
``routing_share_bf16_torch_experts``; a model's ``routing_share`` on the project's kernels (fp8 for
DeepSeek-R1) is bench_moe_gemm.py's test_fused_gather_saves_dispatchs_copy.

The layer and each stage are timed as CUDA-graph replays, L2 flushed before each (the benchmark's rounds
replay the layer's graph on CUDA_CLOCK, the flush in their setup; the stages through
``time_cuda(..., cuda_graph=True)``): device time. An eager decode layer's launches take longer to issue
than to run, so events around it read the host; its eager median is kept as ``eager_layer_us``. Where the
experts fall back to the per-expert loop (it reads segment bounds on the host, so it cannot be captured),
everything is timed eagerly and ``cuda_graph`` says false.
Run: ``pytest bench/benchmarks/bench_moe.py --benchmark-json out.json`` on a GPU."""

import re
import warnings

import pytest
import torch

import kernels.moe as moe
from bench.benchmarks.cases import benchmark_every_impl
from bench.measure.device import machine_info
from bench.measure.timing import CUDA_CLOCK, capture_graph, flush_l2, time_cuda
from bench.operators.moe import COMBINE, DISPATCH, ROUTE, load_balancing_bias, load_statistics, route_kwargs
from bench.serving.models import MOE_MODELS
from bench.testing import generator

pytestmark = [pytest.mark.gpu, pytest.mark.benchmark(timer=CUDA_CLOCK)]
# conftest.py runs ``shape`` over this case's sweep (or its default shapes: --sweep default)
CASE = ROUTE


test_route = benchmark_every_impl(CASE)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("step", ["dispatch", "combine"])
@pytest.mark.parametrize("layer_shape", DISPATCH.default_shapes(), ids=lambda s: s.label)
def test_dispatch_and_combine(gpu_benchmark, layer_shape, step, impl):
    gpu_benchmark({"dispatch": DISPATCH, "combine": COMBINE}[step], layer_shape, impl)


GROUPED_MM = "grouped_mm"
PER_EXPERT = "per-expert loop (host sync)"
# torch._grouped_mm's own refusals (its checks in aten's Blas.cpp and their meta twins): the dtype, 16-byte
# strides, a GPU architecture it has no kernel for. Only these fall back; any other error is a failure.
_REFUSED = re.compile(r"16 bytes|bf16|bfloat16|dtype|\bsm_?\d{2,3}\b|compute capability|not supported", re.I)


def _swiglu(h, inter):
    return (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).contiguous()


def _grouped(x_sorted, plan, w13, w2):
    ends = plan.expert_offsets[1:].to(torch.int32)
    h = torch._grouped_mm(x_sorted, w13, offs=ends)
    return torch._grouped_mm(_swiglu(h, w2.shape[1]), w2, offs=ends)


def _per_expert(x_sorted, plan, w13, w2):
    """One matmul pair per expert; reading the segment bounds on the host syncs."""
    y = torch.zeros_like(x_sorted)
    bounds = zip(plan.expert_offsets[:-1].tolist(), plan.expert_offsets[1:].tolist())
    for e, (start, end) in enumerate(bounds):
        if end > start:
            y[start:end] = _swiglu(x_sorted[start:end] @ w13[e], w2.shape[1]) @ w2[e]
    return y


def expert_path(x_sorted, plan, w13, w2) -> tuple[str, str | None]:
    """The path the experts' SwiGLU MLP takes on this torch, tried once outside any timing, and why it is
    not grouped_mm (None when it is): torch._grouped_mm missing, or refusing this dtype or shape."""
    if getattr(torch, "_grouped_mm", None) is None:
        return PER_EXPERT, f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        _grouped(x_sorted, plan, w13, w2)
    except RuntimeError as error:
        message = str(error).strip().splitlines()[0][:200]
        if not _REFUSED.search(message):
            raise
        return PER_EXPERT, f"torch._grouped_mm refused: {message}"
    return GROUPED_MM, None


def expert_matmuls(x_sorted, plan, w13, w2, path: str = GROUPED_MM):
    """The experts' SwiGLU MLP on their rows, by ``path`` (expert_path's choice)."""
    return (_grouped if path == GROUPED_MM else _per_expert)(x_sorted, plan, w13, w2)


def layer_inputs(model_name: str, tokens: int, device="cuda") -> dict:
    """The layer's router logits, routing keywords, x and bf16 expert weights [E, hidden, 2I] and
    [E, I, hidden] (torch._grouped_mm's layout), on ``device``."""
    m = MOE_MODELS[model_name]
    gen = generator(7)
    logits = torch.randn(tokens, m.num_experts, generator=gen).to(torch.bfloat16).to(device)
    bias = load_balancing_bias(m, gen, device)
    x = torch.randn(tokens, m.hidden, generator=gen).to(torch.bfloat16).to(device)
    w13 = torch.empty(m.num_experts, m.hidden, 2 * m.intermediate, dtype=torch.bfloat16, device=device)
    w2 = torch.empty(m.num_experts, m.intermediate, m.hidden, dtype=torch.bfloat16, device=device)
    w13.normal_(0, 0.02)
    w2.normal_(0, 0.02)
    route_kw = route_kwargs(m) | {"bias": bias}
    return {"logits": logits, "route_kw": route_kw, "x": x, "w13": w13, "w2": w2}


def layer_share(benchmark, model_name: str, tokens: int, inputs: dict) -> dict:
    """Times the layer (the benchmark's rounds, L2 flushed in their setup) and each stage alone; returns
    extra_info's figures. CUDA-graph replays where the experts' path can be captured, eager otherwise."""
    m = MOE_MODELS[model_name]
    logits, kw, x, w13, w2 = (inputs[k] for k in ("logits", "route_kw", "x", "w13", "w2"))
    weights, ids = moe.route(logits, m.top_k, **kw)
    x_sorted, plan = moe.dispatch(x, ids, m.num_experts, align=16)
    path, why = expert_path(x_sorted, plan, w13, w2)
    if why:
        warnings.warn(f"moe layer {model_name}: experts run as a {path}: {why}", stacklevel=1)
    graphed = path == GROUPED_MM  # the per-expert loop syncs on the host: no graph
    y_sorted = expert_matmuls(x_sorted, plan, w13, w2, path)
    stages = {
        "route": lambda: moe.route(logits, m.top_k, **kw),
        "dispatch": lambda: moe.dispatch(x, ids, m.num_experts, align=16),
        "experts": lambda: expert_matmuls(x_sorted, plan, w13, w2, path),
        "combine": lambda: moe.combine(y_sorted, weights, plan),
    }
    label = f"moe layer {model_name} tokens={tokens}"
    median_us = {
        name: time_cuda(fn, label=f"{label} {name}", cuda_graph=graphed).median_ms * 1e3
        for name, fn in stages.items()
    }
    routing = median_us["route"] + median_us["dispatch"] + median_us["combine"]

    def layer():
        w, i = moe.route(logits, m.top_k, **kw)
        rows, p = moe.dispatch(x, i, m.num_experts, align=16)
        moe.combine(expert_matmuls(rows, p, w13, w2, path), w, p)

    timed = CUDA_CLOCK.timed(capture_graph(layer) if graphed else layer, label=label)
    benchmark.pedantic(timed, setup=flush_l2, rounds=10, warmup_rounds=2)
    return {
        "cuda_graph": graphed,
        "stage_median_us": {k: round(v, 2) for k, v in median_us.items()},
        "eager_layer_us": round(time_cuda(layer, label=f"{label} eager").median_ms * 1e3, 2),
        "expert_path": path,
        "expert_path_error": why,
        "experts": "bf16, torch (not the project's kernels)",
        "routing_share_bf16_torch_experts": round(routing / sum(median_us.values()), 3),
        "routing_launches": 1 + (1 if tokens * m.top_k <= moe._FUSED_PAIRS else 3) + 1,
        "load": load_statistics(ids, m.num_experts, 16),
    }


@pytest.mark.parametrize("tokens", [1, 64, 4096])
@pytest.mark.parametrize("model_name", ["DeepSeek-R1", "Qwen3-30B-A3B", "Mixtral-8x7B"])
def test_moe_layer_share(benchmark, model_name, tokens):
    """One MoE layer, stage by stage: the share of route + dispatch + combine in the whole layer, the
    experts bf16 in torch (layer_share)."""
    figures = layer_share(benchmark, model_name, tokens, layer_inputs(model_name, tokens))
    benchmark.extra_info.update(
        kernel="moe-layer", shape=f"{model_name} tokens={tokens}", gpu=machine_info().gpu, **figures
    )
