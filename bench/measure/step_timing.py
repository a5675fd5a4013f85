"""The decode step's stages run for real, one at a time, at the shapes the step model projects them at: the
suite's kernels through their cases (write_kv, paged_decode, mla_decode, route, dispatch, the experts'
grouped_gemm, combine; verified against their references at that shape where the reference is affordable),
the norms and the dense projections as the torch calls a serving engine makes (rms_norm, matmuls; fp8
weights stand in as bf16 there, noted). What needs
more GPUs than one (the all-reduces, the all-to-alls, the pipeline's hand-offs) keeps its projection, said so.

On a GPU each stage is timed as ``decodebench run`` times a kernel: CUDA-graph replay, L2 cleared by reading
before every call, inside an NVTX range ``step.<stage>`` so an nsys timeline reads stage by stage. On a CPU
(tests) the same plumbing runs with the host clock and the interpreter at small shapes.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.measure.runner import verify
from bench.measure.timing import time_cuda
from bench.operators import CASES
from bench.operators.kv_cache import WriteKVShape
from bench.operators.mla_attention import MLADecodeShape
from bench.operators.moe import DispatchShape, RouteShape
from bench.operators.moe_gemm import GemmShape
from bench.operators.paged_attention import PagedDecodeShape
from bench.serving.models import ModelSpec
from bench.serving.step import Layout, Stage
from bench.testing import generator, randn


@dataclass(frozen=True)
class Timed:
    """A stage's measured time (seconds per run), or why it kept its projection; verified: True/False
    against the reference at this shape, None where none was run."""

    seconds: float | None
    verified: bool | None = None
    note: str = ""


def _gemm(rows: int, inner: int, outer: int, device, gen) -> Callable:
    x = randn((rows, inner), torch.bfloat16, device, gen)
    w = randn((inner, outer), torch.bfloat16, device, gen, scale=inner**-0.5)
    return lambda: x @ w


def _batched_gemm(batches: int, rows: int, inner: int, outer: int, device, gen) -> Callable:
    """One bf16 matmul per batch (MLA's absorbed per-head products), as torch.bmm."""
    x = randn((batches, rows, inner), torch.bfloat16, device, gen)
    w = randn((batches, inner, outer), torch.bfloat16, device, gen, scale=inner**-0.5)
    return lambda: torch.bmm(x, w)


def tokens_per_rank(micro: int, layout: Layout) -> int:
    """The tokens one rank routes: under EP a replica's tp ranks split its micro-batch (each dispatches its
    share, as the step model's MoE stages count them); without EP every rank takes them all."""
    return max(1, round(micro / layout.tp)) if layout.ep > 1 else micro


def _experts_call(spec: ModelSpec, layout: Layout, micro: int, device, check: bool):
    """The experts as a serving engine's fused MoE runs them, on the suite's own kernel (grouped_gemm,
    bench/operators/moe_gemm.py): gate-up with silu_and_mul (the rows gathered from the tokens where no EP
    exchange laid them out), then down, the weights in the checkpoint's dtype (fp8 with 128 x 128 block
    scales as released). Under EP each rank holds E/ep whole experts and receives its share of every rank's
    rows; under TP each GPU holds every expert, I/tp wide."""
    m = spec.moe
    ep = max(layout.ep, 1)
    calls, verified = [], []
    for stage in ("gate_up", "down"):
        shape = GemmShape(
            name=f"{spec.name} {layout.label}",
            stage=stage,
            tokens=tokens_per_rank(micro, layout),
            experts=m.num_experts // ep,
            top_k=m.top_k,
            hidden=spec.hidden,
            inner=m.expert_intermediate if ep > 1 else max(1, m.expert_intermediate // layout.tp),
            ep=ep,
            gather=stage == "gate_up" and ep == 1,
            weight_dtype=torch.float8_e4m3fn if spec.weight_bytes == 1 else torch.bfloat16,
        )
        call, ok = _case_call("grouped_gemm", shape, device, check)
        calls.append(call)
        verified.append(ok)
    checked = [ok for ok in verified if ok is not None]
    note = "grouped_gemm, gate-up then down"
    if spec.routed_expert_bytes < 1:  # MXFP4 (gpt-oss): the suite has no fp4 kernel, and Hopper no fp4 MMA
        note += f"; {spec.precision.split('experts ')[-1]} experts timed as bf16"
    return _chain(*calls), (all(checked) if checked else None), note


def _chain(*calls: Callable) -> Callable:
    def run():
        for call in calls:
            call()

    return run


def _small_kernel(spec: ModelSpec, layout: Layout, micro: int, name: str, device, gen) -> Callable | None:
    """The step's small kernels the suite has no operator for, as PyTorch runs them at their shapes: rope,
    the MLP's activation, MLA's two norms and its two absorbed batched products."""
    heads = spec.num_q_heads // layout.tp
    if name == "rope":
        width = spec.mla.qk_rope_head_dim if spec.mla else spec.head_dim
        x = randn((micro, heads + spec.kv_heads_per_rank(layout.tp), width), torch.bfloat16, device, gen)
        return lambda: x * 0.5 + x.flip(-1)
    if name == "act":
        x = randn((micro, 2 * max(1, spec.intermediate // layout.tp)), torch.bfloat16, device, gen)
        return lambda: torch.nn.functional.silu(x[:, ::2]) * x[:, 1::2]
    if spec.mla is None:
        return None
    g = spec.mla
    if name == "mla_norms":
        q = randn((micro, spec.q_lora_rank or spec.hidden), torch.bfloat16, device, gen)
        kv = randn((micro, g.kv_lora_rank), torch.bfloat16, device, gen)
        return _chain(
            lambda: torch.nn.functional.rms_norm(q, q.shape[-1:]),
            lambda: torch.nn.functional.rms_norm(kv, kv.shape[-1:]),
        )
    if name == "mla_absorb":
        uk = _batched_gemm(heads, micro, g.qk_nope_head_dim, g.kv_lora_rank, device, gen)
        uv = _batched_gemm(heads, micro, g.kv_lora_rank, spec.v_head_dim, device, gen)
        return _chain(uk, uv)
    return None


def _case_call(name: str, shape, device, check: bool) -> tuple[Callable, bool | None]:
    case = CASES[name]
    inputs = case.build(shape, device, seed=0)
    verified = None
    if check and case.reference_affordable(shape):
        verified = verify(case, shape, device).ok
    return (lambda: case.run_kernel(inputs)), verified


def stage_calls(
    spec: ModelSpec, layout: Layout, batch: int, context: int, stage: Stage, device, *, check: bool = True
):
    """(call, verified, note) running ``stage`` at its shape on one rank, or (None, None, why not)."""
    gen = generator(0, "cpu")
    tp, h = layout.tp, spec.hidden
    name = stage.name.removeprefix("moe:")
    kind = "fp8 weights timed as bf16" if spec.weight_bytes == 1 else ""
    micro = max(1, round(batch / max(1, min(layout.pp, batch))))  # micro-batches in flight (step.py)
    m = spec.moe
    # The model's own routing rule (DeepSeek's grouped sigmoid; a config.json's scoring_func and groups).
    moe_model = None if m is None else spec.moe_model()
    small = _small_kernel(spec, layout, micro, name, device, gen)
    if small is not None:
        return small, None, ""
    if name in ("attn_norm", "mlp_norm"):
        x = randn((micro, h), torch.bfloat16, device, gen)
        weight = torch.ones(h, dtype=torch.bfloat16, device=device)
        return (lambda: torch.nn.functional.rms_norm(x, (h,), weight)), None, ""
    if name == "qkv_proj":
        return _gemm(micro, h, max(1, round(stage.flops / (2 * micro * h))), device, gen), None, kind
    if name == "o_proj":
        return _gemm(micro, max(1, round(stage.flops / (2 * micro * h))), h, device, gen), None, kind
    if name in ("mlp", "shared_expert"):
        width = spec.intermediate if name == "mlp" else m.shared_experts * m.expert_intermediate
        width = max(1, width // tp)
        up, down = _gemm(micro, h, 2 * width, device, gen), _gemm(micro, width, h, device, gen)
        return _chain(up, down), None, kind
    if name == "embedding":
        table = randn((spec.vocab, h), torch.bfloat16, device, gen)
        ids = torch.randint(spec.vocab, (batch,), generator=gen).to(device)
        return (lambda: torch.nn.functional.embedding(ids, table)), None, ""
    if name == "lm_head":
        return _gemm(batch, h, max(1, spec.vocab // tp), device, gen), None, kind
    if name == "experts":
        return _experts_call(spec, layout, micro, device, check)
    if name == "write_kv":
        mla = spec.mla is not None
        shape = WriteKVShape(
            name=spec.name,
            pattern="decode",
            num_tokens=micro,
            num_kv_heads=1 if mla else spec.kv_heads_per_rank(tp),
            head_dim=spec.mla.cached_width if mla else spec.head_dim,
            head_dim_v=None if mla else spec.head_dim,
        )
        return (*_case_call("write_kv", shape, device, check), "")
    if name == "paged_decode":
        shape = PagedDecodeShape(
            name=spec.name,
            lengths=(context,) * micro,
            num_q_heads=spec.num_q_heads // tp,
            num_kv_heads=spec.kv_heads_per_rank(tp),
            head_dim=spec.head_dim,
        )
        return (*_case_call("paged_decode", shape, device, check), "")
    if name == "mla_decode":
        g = spec.mla
        shape = MLADecodeShape(
            name=spec.name,
            lengths=(context,) * micro,
            num_heads=spec.num_q_heads // tp,
            qk_dim=g.cached_width,
            v_head_dim=g.kv_lora_rank,
            scale=g.softmax_scale,
        )
        return (*_case_call("mla_decode", shape, device, check), "")
    if name == "route":
        shape = RouteShape(tokens=micro, model=moe_model)
        return (*_case_call("route", shape, device, check), "")
    if name in ("dispatch", "combine"):
        shape = DispatchShape(tokens=tokens_per_rank(micro, layout), model=moe_model)
        return (*_case_call(name, shape, device, check), "")
    return None, None, "projected: a collective or the pipeline's, not run on one GPU"


def time_stages(
    spec: ModelSpec,
    layout: Layout,
    batch: int,
    context: int,
    stages: list[Stage],
    *,
    device: str = "cuda",
    timer: Callable | None = None,
    check: bool = True,
) -> dict[str, Timed]:
    """Every stage that one device can run, timed (``timer``: bench.measure.timing.time_cuda with a CUDA
    graph on a GPU; pass time_wall on a CPU); the others keep their projections."""
    timer = timer or (lambda fn, label: time_cuda(fn, label=label, cuda_graph=True))
    found = {}
    for stage in stages:
        try:
            call, verified, note = stage_calls(spec, layout, batch, context, stage, device, check=check)
            if call is None:
                found[stage.name] = Timed(None, None, note)
                continue
            timing = timer(call, f"step.{stage.name}")
        except Exception as error:  # a shape a kernel refuses, out of memory, a failed capture: say so,
            # keep the projection, go on to the next stage
            found[stage.name] = Timed(None, None, f"not run: {type(error).__name__}: {str(error)[:100]}")
            continue
        found[stage.name] = Timed(timing.median_ms * 1e-3, verified, note)
    return found
