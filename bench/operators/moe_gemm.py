"""Issue 21's operators: grouped_gemm (kernels/moe_gemm.py), the experts' GEMMs over dispatch's segments, and
moe_layer (kernels/moe_layer.py), the whole MoE layer composed from route, dispatch, grouped_gemm and combine
(kept here beside the GEMM it is built around: its other stages have their own cases in moe.py).

grouped_gemm's shapes are one GEMM of one GPU's MoE layer: the gate-up projection (w13 [E, 2I, hidden] with
silu_and_mul) or the down projection (w2 [E, hidden, I]), for DeepSeek-R1 under EP8 (32 whole experts a GPU,
fp8 as released, and bf16 beside it) and TP8 (all 256 experts, I / 8 each), Qwen3-235B-A22B, Mixtral-8x7B
and gpt-oss-120b (bf16), at 1 to 8192 tokens. Under EP the rows a GPU's experts receive are the plan's:
every rank's tokens x top_k choices spread over the ranks, so each rank gets its own tokens x top_k rows on
average, each one choice of one local expert (the plan's top_k is 1), already grouped (no gather).

Routing is a function of the shape (seeded by the model, tokens, experts and load, not by the build seed),
so the byte model counts exactly the experts the built inputs touch; ``expected_byte_model`` gives the
expectation under uniform routing for a shape alone (what the presets' inputs draw: their load is
"uniform"). Inputs put NaN where no correct kernel reads: in every untouched expert's weights (and scales),
and in dispatch's padding rows.

Byte model: the bytes that must cross DRAM, each distinct byte read or written once. With R the rows routed
(tokens x top_k) and T the experts touched:
    T x N x K x w_bytes (+ T x cdiv(N, 128) x cdiv(K, 128) x 4 fp8 scales); the rows read, R x K x a_bytes,
    or with the gather each token's row once (tokens x K x a_bytes); R x N_out x a_bytes written; and the
    plan's counts, offsets and the rows' token ids.
What the kernel reads beyond that is re-reads, the model's by design: the gather reads a token's row once
for each of its top_k experts, the programs of an expert's M tile read its rows once per N tile (BLOCK_N
output columns), and every program reads all the experts' counts to find its expert. At decode those are
kilobytes, L2 hits after the first read; at prefill x outgrows L2 (8192 tokens of hidden 7168 are 117 MB)
and some repeats may come from DRAM, so there the model is a floor. The interpreter's counter sees every
read: ``bench traffic``'s ratio (counted / model) shows the re-reads, and unique/model (distinct addresses)
the floor. The traffic shapes are decode steps of a few rows an expert, where the re-reads are within a
few percent of the weights (rows: bf16 weights, rows an expert / 64 of them; fp8, / 32).
FLOPs: 2 x R x N x K (N: w's rows, the gate and up halves both for silu_and_mul).

Peers, each verified at the shape it is timed:
- ``torch-loop``: a matmul per touched expert (segment bounds read on the host in prepare, outside the
  timing), silu_and_mul in torch; fp8 weights dequantised per expert inside the call, as plain torch must.
- ``torch-grouped-mm``: torch._grouped_mm over the plan's segments (16-bit weights only), where the installed
  torch takes the dtype and widths on this device (a probe decides up front); the gather is a copy.
- ``triton-kernels-matmul-ogs``: matmul_ogs of Triton's triton_kernels package (its gather fused), where it
  is installed and of the API generation this adapter drives; 16-bit weights, no fused activation, align 1,
  on CUDA.
"""

import functools
import importlib
from dataclasses import dataclass, replace

import torch
import triton

import kernels.moe
import kernels.moe_gemm
import reference.moe
from bench.operators import moe as moe_operator
from bench.operators.base import Case, Inputs, Peer, PeerUnavailable, Prepared, TuneSpec, pow2_between
from bench.serving.models import MOE_MODELS, MoEModel
from bench.serving.step import expected_experts_touched
from bench.testing import (
    DTYPE_LABELS,
    FP8,
    Guarded,
    assert_close,
    device_generator,
    generator,
    max_error,
    randn,
    seed_of,
)

SCALE_BLOCK = kernels.moe_gemm.SCALE_BLOCK
STAGES = ("gate_up", "down")
#: Tokens through one MoE layer (per rank under EP): decode batches and a prefill chunk.
GEMM_TOKENS = (1, 8, 64, 512, 8192)


@dataclass(frozen=True)
class GemmShape:
    """One grouped_gemm call of one GPU's MoE layer.

    ``launch_only``: the weights and rows are left unwritten (torch.empty touches no memory), for the static
    report and the tuner's compiles, which capture the launch and run nothing: a GPU's real expert weights
    are gigabytes, and the launch depends on their shapes, not their values. It is not in the label."""

    name: str  # the preset and its parallelism: "DeepSeek-R1 EP8"
    stage: str  # "gate_up": w13 [E, 2 x inner, hidden], silu_and_mul; "down": w2 [E, hidden, inner]
    tokens: int  # tokens through the layer; per rank under EP
    experts: int  # the experts on this GPU (E / ep)
    top_k: int  # each token's choices, of all the model's experts
    hidden: int
    inner: int  # each expert's width on this GPU (I / tp)
    ep: int = 1  # ranks the experts are spread over (each rank's tokens x top_k rows arrive, on average)
    gather: bool = False  # a is the tokens' x and row r reads x[row_token[r]] (moe_layer's fused gather)
    weight_dtype: torch.dtype = torch.bfloat16
    dtype: torch.dtype = torch.bfloat16
    load: str = "uniform"  # bench.operators.moe.LOADS
    align: int = 1
    launch_only: bool = False

    @property
    def n(self) -> int:
        return 2 * self.inner if self.stage == "gate_up" else self.hidden

    @property
    def k(self) -> int:
        return self.hidden if self.stage == "gate_up" else self.inner

    @property
    def columns(self) -> int:
        """The output's columns (N_out): silu_and_mul halves N."""
        return self.inner if self.stage == "gate_up" else self.hidden

    @property
    def activation(self) -> str | None:
        return "silu_and_mul" if self.stage == "gate_up" else None

    @property
    def plan_tokens(self) -> int:
        """The plan's tokens: the layer's tokens, or under EP the rows arriving (each one choice)."""
        return self.tokens if self.ep == 1 else self.tokens * self.top_k

    @property
    def plan_top_k(self) -> int:
        return self.top_k if self.ep == 1 else 1

    @property
    def rows(self) -> int:
        """R: the rows routed, every choice (route drops none)."""
        return self.tokens * self.top_k

    @property
    def max_rows(self) -> int:
        return kernels.moe.max_rows(self.plan_tokens, self.plan_top_k, self.experts, self.align)

    @property
    def label(self) -> str:
        tokens = f"tokens/rank={self.tokens}" if self.ep > 1 else f"tokens={self.tokens}"
        extra = "".join(
            [
                " gather" if self.gather else "",
                f" {self.load}" if self.load != "uniform" else "",
                f" align={self.align}" if self.align > 1 else "",
                f" a={DTYPE_LABELS[self.dtype]}" if self.dtype != torch.bfloat16 else "",
            ]
        )
        return (
            f"{self.name} {self.stage} {tokens} {self.experts}e top{self.top_k} N={self.n} K={self.k} "
            f"{DTYPE_LABELS[self.weight_dtype]}{extra}"
        )


# --- routing, plan and inputs -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _routing(name: str, plan_tokens: int, experts: int, plan_top_k: int, load: str) -> torch.Tensor:
    """int32 [plan_tokens, plan_top_k] on the CPU, seeded by what decides it (the two stages of a layer, and
    its bf16 and fp8 weights, see the same routing)."""
    gen = generator(seed_of(f"routing/{name}/{plan_tokens}x{plan_top_k}/{experts}/{load}"))
    return moe_operator.routing_ids(plan_tokens, experts, plan_top_k, load, gen)


def routing(shape: GemmShape) -> torch.Tensor:
    return _routing(shape.name, shape.plan_tokens, shape.experts, shape.plan_top_k, shape.load)


def make_plan(ids: torch.Tensor, experts: int, align: int) -> kernels.moe.DispatchPlan:
    """The plan dispatch makes for ``ids`` (the reference's, equal to the kernel's field by field: the
    dispatch case checks it), as the kernels' DispatchPlan."""
    plan = reference.moe.dispatch_plan(ids, experts, align=align)
    fields = kernels.moe.DispatchPlan.__dataclass_fields__
    return kernels.moe.DispatchPlan(**{f: getattr(plan, f) for f in fields})


def touched_experts(shape: GemmShape) -> int:
    return int(torch.bincount(routing(shape).reshape(-1).long(), minlength=shape.experts).gt(0).sum())


def expected_touched(shape: GemmShape) -> float:
    """The experts touched on average under uniform routing, what the presets' inputs draw (a shape alone,
    before any routing; the shape's load is not looked at): the step model's count at a flat popularity
    (alpha 0), each of the plan's tokens picking plan_top_k distinct experts."""
    return expected_experts_touched(shape.experts, shape.plan_top_k, shape.plan_tokens, alpha=0.0)


def _weights(weight_dtype, experts: int, n: int, k: int, untouched, device, gen, launch_only=False) -> tuple:
    """(w [experts, n, k], w_scale or None): random, NaN in every untouched expert (scales too). fp8 codes
    spread over e4m3's range with 128 x 128 block scales that bring the products back to O(1). With
    ``launch_only``, unwritten."""
    fp8 = weight_dtype == FP8
    blocks = (experts, triton.cdiv(n, SCALE_BLOCK), triton.cdiv(k, SCALE_BLOCK))
    if launch_only:
        w = torch.empty(experts, n, k, dtype=weight_dtype, device=device)
        return w, torch.empty(blocks, device=device) if fp8 else None
    w = randn((experts, n, k), torch.float32, device, gen, scale=4.0 if fp8 else k**-0.5)
    w[untouched] = float("nan")
    w_scale = None
    if fp8:
        w_scale = (torch.rand(blocks, generator=gen, device=gen.device) + 0.5).to(device) * (k**-0.5 / 4)
        w_scale[untouched] = float("nan")
    return w.to(weight_dtype), w_scale


def build(shape: GemmShape, device, seed: int, guarded: bool = False) -> Inputs:
    """The shape's routing and plan; random rows and weights; NaN in untouched experts' weights and in
    dispatch's padding rows (gather=False). With ``guarded``, out starts poisoned inside sentinel fences."""
    plan = make_plan(routing(shape).to(device), shape.experts, shape.align)
    untouched = plan.tokens_per_expert == 0
    gen = device_generator(seed, device)
    w, w_scale = _weights(
        shape.weight_dtype, shape.experts, shape.n, shape.k, untouched, device, gen, shape.launch_only
    )
    if shape.launch_only:
        rows = shape.plan_tokens if shape.gather else shape.max_rows
        a = torch.empty(rows, shape.k, dtype=shape.dtype, device=device)
    else:
        x = randn((shape.plan_tokens, shape.k), shape.dtype, device, gen)
        a = x if shape.gather else sorted_rows(x, plan)
    args = {
        "a": a,
        "w": w,
        "plan": plan,
        "gather": shape.gather,
        "activation": shape.activation,
        "w_scale": w_scale,
    }
    guards = {}
    if guarded:
        guards["out"] = Guarded.empty((shape.max_rows, shape.columns), shape.dtype, device)
        args["out"] = guards["out"].tensor
    return Inputs(args, ("out",), guards)


def sorted_rows(x: torch.Tensor, plan) -> torch.Tensor:
    """Dispatch's x_sorted for ``plan``: each row the token's, padding rows NaN (a kernel that reads one
    shows it)."""
    tokens = plan.row_token.long()
    real = tokens >= 0
    out = torch.full((tokens.numel(), x.shape[1]), float("nan"), dtype=x.dtype, device=x.device)
    out[real] = x[tokens[real]]
    return out


# --- cost models and the comparison -------------------------------------------------------------------------


def _gemm_bytes(shape: GemmShape, touched: float) -> float:
    """The byte model with ``touched`` experts (counted, or expected)."""
    w_bytes = shape.n * shape.k * shape.weight_dtype.itemsize
    if shape.weight_dtype == FP8:
        w_bytes += triton.cdiv(shape.n, SCALE_BLOCK) * triton.cdiv(shape.k, SCALE_BLOCK) * 4
    read = shape.plan_tokens if shape.gather else shape.rows  # the gather's repeats of a token are L2's
    rows = (read * shape.k + shape.rows * shape.columns) * shape.dtype.itemsize
    plan = (2 * shape.experts + 1) * 4 + shape.rows * 4  # counts, offsets, each row's token id
    return touched * w_bytes + rows + plan


def byte_model(shape: GemmShape) -> int:
    """Bytes that must cross DRAM: the touched experts' weights once each, the rows read (with the gather,
    each token's once) and written, the plan."""
    return round(_gemm_bytes(shape, touched_experts(shape)))


def expected_byte_model(shape: GemmShape) -> float:
    """byte_model with the experts touched on average under uniform routing (no routing drawn)."""
    return _gemm_bytes(shape, expected_touched(shape))


def flop_model(shape: GemmShape) -> int:
    return 2 * shape.rows * shape.n * shape.k


def check_rows(out: torch.Tensor, expected: Inputs, shape: GemmShape, poisoned: bool) -> float:
    """``out``'s rows holding a token within the dtype's tolerance of the reference (NaN there means a
    kernel read an untouched expert or a padding row); with ``poisoned``, every padding row still NaN."""
    real = expected.args["plan"].row_token >= 0
    want = expected.result
    assert_close(out[real], want[real], "out (rows holding a token)", dtype=shape.dtype)
    if poisoned and not out[~real].isnan().all():
        raise AssertionError("out: a padding row (row_token -1) was written")
    return max_error(out[real], want[real])


def compare(actual: Inputs, expected: Inputs, shape: GemmShape) -> float:
    out = actual.written_out("grouped_gemm")
    return check_rows(out, expected, shape, poisoned="out" in actual.guards)


def launch_config(inputs: Inputs) -> dict:
    a = inputs.args
    return kernels.moe_gemm.grouped_gemm_choice(a["a"], a["w"], a["plan"], a["activation"]).as_info()


# --- shapes -------------------------------------------------------------------------------------------------


def _preset(name: str, stage: str, tokens: int, weight_dtype=None) -> GemmShape:
    """A GEMM of the presets the issue names. DeepSeek-R1 is fp8 as released unless ``weight_dtype``."""
    model_name, _, parallel = name.partition(" ")
    m = MOE_MODELS[model_name]
    ep = int(parallel[2:]) if parallel.startswith("EP") else 1
    tp = int(parallel[2:]) if parallel.startswith("TP") else 1
    dtype = weight_dtype or (FP8 if model_name == "DeepSeek-R1" else torch.bfloat16)
    return GemmShape(
        name,
        stage,
        tokens,
        m.num_experts // ep,
        m.top_k,
        m.hidden,
        m.intermediate // tp,
        ep=ep,
        gather=stage == "gate_up" and ep == 1,
        weight_dtype=dtype,
    )


PRESETS = ("DeepSeek-R1 EP8", "DeepSeek-R1 TP8", "Qwen3-235B-A22B", "Mixtral-8x7B", "gpt-oss-120b")


def sweep() -> list[GemmShape]:
    """Every preset, both GEMMs, 1 to 8192 tokens; DeepSeek-R1 EP8 in bf16 too (what fp8 saves)."""
    shapes = [_preset(name, stage, n) for name in PRESETS for stage in STAGES for n in GEMM_TOKENS]
    return shapes + [_preset(PRESETS[0], s, n, torch.bfloat16) for s in STAGES for n in GEMM_TOKENS]


def default_shapes() -> list[GemmShape]:
    """The issue's targets: DeepSeek-R1 EP8 at decode (streaming the touched experts' weights) and at 8192
    tokens (compute-bound, fp8 against bf16); one decode step of each other preset."""
    ep8 = PRESETS[0]
    return [
        *(_preset(ep8, stage, n) for n in (1, 64, 8192) for stage in STAGES),
        _preset(ep8, "gate_up", 8192, torch.bfloat16),
        _preset("DeepSeek-R1 TP8", "gate_up", 64),
        _preset("Qwen3-235B-A22B", "gate_up", 64),
        _preset("Mixtral-8x7B", "gate_up", 8),
        _preset("gpt-oss-120b", "down", 64),
    ]


def small_shapes() -> list[GemmShape]:
    """Interpreter sizes: odd K and N, align 1 to 8, uniform, Zipf and hot loads, gather and dispatch's
    rows, an EP rank's plan (one choice a row), fp8 with odd block edges, fp16."""
    S = GemmShape
    return [
        S("odd", "gate_up", 5, 6, 2, hidden=40, inner=23, gather=True, load="zipf", align=4),
        S("ep hot", "gate_up", 4, 5, 2, hidden=24, inner=20, ep=2, load="hot", align=8),
        # K: two 128-column scale blocks, the second 8 wide; N = 131 rows over two 128-row blocks.
        S("fp8 odd blocks", "down", 3, 3, 2, hidden=131, inner=136, weight_dtype=FP8),
        S("fp16", "down", 7, 4, 2, hidden=33, inner=16, dtype=torch.float16, weight_dtype=torch.float16),
    ]


def _launch(shape: GemmShape) -> GemmShape:
    return replace(shape, launch_only=True)


def static_shapes() -> list[GemmShape]:
    """The benchmarks' launch configurations: expert counts 32, 256 and 128, 16-row (decode) and 64-row
    (prefill) M tiles, fp8 and bf16 weights, gate-up with the gather and without, down. Captured only."""
    ep8 = PRESETS[0]
    return [
        _launch(_preset(ep8, "gate_up", 64)),
        _launch(_preset(ep8, "down", 8192)),
        _launch(_preset(ep8, "gate_up", 8192, torch.bfloat16)),
        _launch(_preset("DeepSeek-R1 TP8", "gate_up", 64)),
        _launch(_preset("Qwen3-235B-A22B", "gate_up", 64)),
        _launch(_preset("gpt-oss-120b", "down", 64)),
    ]


def scaled(shape: GemmShape, hidden: int, inner: int) -> GemmShape:
    """A preset's routing (experts, top_k, tokens) at widths the interpreter can run."""
    return replace(shape, name=f"{shape.name}-like", hidden=hidden, inner=inner)


def traffic_shapes() -> list[GemmShape]:
    """Decode steps of the presets' routing at interpreter widths, one to two rows an expert: fp8 without
    and with the gather (32 and 256 experts), bf16 down (moe_layer's traffic shape has bf16 gate-up).
    DeepSeek-R1 TP8's down GEMM (K = 256: each program's weight tile is 16 KB) is not here: every program
    also reads the 256 experts' counts (1 KB, from L2 after the first), which the counter sees as 6% more;
    tests/test_traffic.py holds it to the model with those re-reads counted apart."""
    return [
        scaled(_preset("DeepSeek-R1 EP8", "gate_up", 1), 256, 128),
        scaled(_preset("DeepSeek-R1 TP8", "gate_up", 1), 256, 128),
        scaled(_preset("Mixtral-8x7B", "down", 1), 256, 256),
    ]


# --- peers --------------------------------------------------------------------------------------------------


def _silu_and_mul(product: torch.Tensor) -> torch.Tensor:
    gate, up = product.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _dequantized(w: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One expert's fp8 [N, K] times its 128 x 128 block scales, in ``dtype``."""
    n, k = w.shape
    scales = w_scale.repeat_interleave(SCALE_BLOCK, 0).repeat_interleave(SCALE_BLOCK, 1)[:n, :k]
    return (w.float() * scales).to(dtype)


def loop_prepare(inputs: Inputs, shape: GemmShape) -> Prepared:
    """The touched experts' segments read on the host here (a torch MoE syncs for them); the call is the
    matmuls alone, into an output allocated here."""
    a = inputs.args
    plan, rows, w, w_scale = a["plan"], a["a"], a["w"], a["w_scale"]
    bounds = zip(plan.expert_offsets.tolist(), plan.tokens_per_expert.tolist())
    segments = [(e, start, start + count) for e, (start, count) in enumerate(bounds) if count]
    tokens = plan.row_token.long()
    out = torch.full((shape.max_rows, shape.columns), float("nan"), dtype=shape.dtype, device=rows.device)

    def call():
        for e, start, end in segments:
            x = rows[tokens[start:end]] if shape.gather else rows[start:end]
            weight = w[e] if w_scale is None else _dequantized(w[e], w_scale[e], shape.dtype)
            product = x @ weight.T
            out[start:end] = _silu_and_mul(product) if shape.activation else product
        return out

    return Prepared(call)


def grouped_mm_refusal(dtype: torch.dtype, device: torch.device, n: int, k: int) -> str | None:
    """Why torch._grouped_mm cannot take ``dtype`` rows of ``k`` columns times [k, n] weights on
    ``device`` (None when it can): torch decides, on a probe of one 16-row group."""
    if getattr(torch, "_grouped_mm", None) is None:
        return f"torch {torch.__version__} has no torch._grouped_mm"
    a = torch.zeros(16, k, dtype=dtype, device=device)
    b = torch.zeros(1, n, k, dtype=dtype, device=device).transpose(1, 2)
    try:
        torch._grouped_mm(a, b, offs=torch.tensor([16], dtype=torch.int32, device=device))
    except (RuntimeError, NotImplementedError) as error:
        why = str(error).strip().splitlines()[0][:200]
        return (
            f"torch._grouped_mm refuses {DTYPE_LABELS[dtype]} [M, {k}] x [{k}, {n}] on {device.type}: {why}"
        )
    return None


def grouped_mm_prepare(inputs: Inputs, shape: GemmShape) -> Prepared:
    """The weights as [E, K, N] (a transposed view, no copy); the gather, when the shape has one, is the
    call's copy of the rows (torch has no fused one)."""
    if shape.weight_dtype == FP8:
        raise PeerUnavailable("torch._grouped_mm takes 16-bit weights, not fp8 with 128 x 128 block scales")
    a = inputs.args
    rows = a["a"]
    refusal = grouped_mm_refusal(shape.dtype, rows.device, shape.n, shape.k)
    if refusal:
        raise PeerUnavailable(refusal)
    plan = a["plan"]
    ends = plan.expert_offsets[1:].contiguous()
    weights = a["w"].transpose(1, 2)
    tokens = plan.row_token.long().clamp_min(0)  # padding rows read token 0; they are not compared

    def call():
        product = torch._grouped_mm(rows[tokens] if shape.gather else rows, weights, offs=ends)
        return _silu_and_mul(product) if shape.activation else product

    return Prepared(call)


def ogs_gather_index(plan, top_k: int) -> torch.Tensor:
    """matmul_ogs's gather source for each row a plan holds, in the plan's row order: the index of the
    row's (token, choice) pair, token x top_k + choice (matmul_ogs reads x[index // top_k])."""
    pairs = plan.slot_row.reshape(-1).long()
    valid = pairs >= 0
    source = torch.full((plan.row_token.numel(),), -1, dtype=torch.int32, device=pairs.device)
    source[pairs[valid]] = torch.arange(pairs.numel(), device=pairs.device, dtype=torch.int32)[valid]
    return source[plan.row_token >= 0]


def _ogs_refusal(shape: GemmShape, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "triton_kernels' matmul_ogs runs on CUDA devices only"
    if shape.weight_dtype == FP8:
        return (
            "this adapter drives matmul_ogs with 16-bit weights (DeepSeek's 128 x 128 block scales are not "
            "one of its scale formats)"
        )
    if shape.activation:
        return (
            "matmul_ogs fuses gpt-oss's SwiGLU (interleaved gate and up, clamped, up + 1), not silu_and_mul"
        )
    if shape.align != 1:
        return "matmul_ogs takes unpadded segments (align 1)"
    return None


def _ogs_api():
    """(matmul_ogs, RoutingData, GatherIndx, make_ragged_tensor_metadata) of the installed triton_kernels, or
    PeerUnavailable: not installed, or another API generation than the one driven here."""
    try:
        ogs = importlib.import_module("triton_kernels.matmul_ogs")
        ragged = importlib.import_module("triton_kernels.tensor")
    except ImportError as error:
        raise PeerUnavailable(
            f"triton_kernels with matmul_ogs is not installed ({error}); it ships in the Triton repository "
            "(python/triton_kernels), not as the PyPI package named triton-kernels (another project)"
        ) from None
    names = [
        (ogs, "matmul_ogs"),
        (ogs, "RoutingData"),
        (ogs, "GatherIndx"),
        (ragged, "make_ragged_tensor_metadata"),
    ]
    missing = [f"{m.__name__}.{n}" for m, n in names if not hasattr(m, n)]
    if missing:
        raise PeerUnavailable(
            f"the installed triton_kernels lacks {', '.join(missing)}: this adapter drives the generation "
            "whose matmul_ogs holds RoutingData and GatherIndx"
        )
    return tuple(getattr(m, n) for m, n in names)


def ogs_prepare(inputs: Inputs, shape: GemmShape) -> Prepared:
    """Routing data from the plan (counts, their ragged metadata, the gather's pair indices), built here;
    the call is matmul_ogs alone over w as [E, K, N] (a transposed view)."""
    a = inputs.args
    refusal = _ogs_refusal(shape, a["a"].device)
    if refusal:
        raise PeerUnavailable(refusal)
    matmul_ogs, routing_data, gather_indx, ragged_metadata = _ogs_api()
    plan, rows = a["plan"], shape.rows
    counts = plan.tokens_per_expert
    metadata = ragged_metadata(counts, rows)
    ones = torch.ones(rows, dtype=torch.float32, device=counts.device)
    data = routing_data(ones, counts, shape.experts, shape.plan_top_k, metadata)
    gather = None
    if shape.gather:
        source = ogs_gather_index(plan, shape.plan_top_k)
        destination = torch.empty_like(source)
        destination[source.long()] = torch.arange(rows, dtype=torch.int32, device=source.device)
        gather = gather_indx(source, destination)
    x, weights = a["a"], a["w"].transpose(1, 2)
    return Prepared(lambda: matmul_ogs(x, weights, None, data, gather_indx=gather))


def gemm_peer_check(result: torch.Tensor, expected: Inputs, shape: GemmShape) -> float:
    """A peer's [max_rows, N_out] in the plan's row order (matmul_ogs's [1, R, N] at align 1, where R is
    max_rows), held to the reference on every row holding a token."""
    return check_rows(result.reshape(-1, shape.columns), expected, shape, poisoned=False)


PEERS = {
    "torch-loop": Peer("torch-loop", loop_prepare, gemm_peer_check),
    "torch-grouped-mm": Peer("torch-grouped-mm", grouped_mm_prepare, gemm_peer_check),
    "triton-kernels-matmul-ogs": Peer("triton-kernels-matmul-ogs", ogs_prepare, gemm_peer_check),
}


# --- tuning -------------------------------------------------------------------------------------------------

TUNE = TuneSpec(
    "_grouped_gemm_kernel",
    kernels.moe_gemm.TUNABLE,
    (
        lambda h: {"BLOCK_N": h["BLOCK_N"] * 2},
        lambda h: {"BLOCK_N": h["BLOCK_N"] // 2},
        lambda h: {"BLOCK_K": h["BLOCK_K"] * 2},
        lambda h: {"BLOCK_M": h["BLOCK_M"] * 2},
        lambda h: {"num_warps": h["num_warps"] * 2},
        lambda h: {"num_stages": h["num_stages"] - 1},
        lambda h: {"num_stages": h["num_stages"] + 1},
    ),
    {
        "BLOCK_M": pow2_between(16, 128),  # tl.dot's M is 16 at least
        "BLOCK_N": pow2_between(32, 256),
        "BLOCK_K": pow2_between(32, 128),  # fp8: a K step stays inside one 128-column scale block
        "num_warps": pow2_between(4, 8),
        "num_stages": range(2, 6).__contains__,
    },
    # The key is the launcher's (dtypes, experts, N, K, activation, rows an expert): the default shape
    # itself, its weights left unwritten.
    _launch,
)


GROUPED_GEMM = Case.by_convention(globals(), "grouped_gemm")


# --- moe_layer ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer on one GPU: route, dispatch (or the fused gather), gate-up, down, combine. Under TP each
    expert is ``tp`` ways narrower (the all-reduce after it is not the layer's)."""

    name: str
    tokens: int
    model: MoEModel
    tp: int = 1
    weight_dtype: torch.dtype = torch.bfloat16
    dtype: torch.dtype = torch.bfloat16
    fused_gather: bool = True
    align: int = 1

    @property
    def inner(self) -> int:
        return self.model.intermediate // self.tp

    @property
    def label(self) -> str:
        m = self.model
        path = "fused gather" if self.fused_gather else "dispatch copy"
        align = f" align={self.align}" if self.align > 1 else ""
        return (
            f"{self.name} tokens={self.tokens} {m.num_experts}e top{m.top_k} hidden={m.hidden} "
            f"I={self.inner} {DTYPE_LABELS[self.weight_dtype]} {path}{align}"
        )

    def route_shape(self) -> moe_operator.RouteShape:
        return moe_operator.RouteShape(self.tokens, self.model, torch.float32)

    def dispatch_shape(self) -> moe_operator.DispatchShape:
        return moe_operator.DispatchShape(self.tokens, self.model, align=self.align, dtype=self.dtype)

    def gemm(self, stage: str) -> GemmShape:
        m = self.model
        gather = stage == "gate_up" and self.fused_gather
        return GemmShape(
            self.name,
            stage,
            self.tokens,
            m.num_experts,
            m.top_k,
            m.hidden,
            self.inner,
            gather=gather,
            weight_dtype=self.weight_dtype,
            dtype=self.dtype,
            align=self.align,
        )


@functools.lru_cache(maxsize=16)
def _layer_routing(name: str, tokens: int, model: MoEModel):
    """(router logits fp32, bias or None, ids) on the CPU, seeded by the shape's routing alone; ids by the
    reference route (the kernel's are equal: the route case checks them bitwise). DeepSeek's score bias is
    trained to balance the experts' load, so a small one keeps the routing near the uniform routing the byte
    model's projections assume (about 215 of 256 experts touched at 64 tokens, 222 expected;
    moe_operator.BIAS_SCALE)."""
    gen = generator(seed_of(f"layer routing/{name}/{tokens}/{model}"))
    logits = randn((tokens, model.num_experts), torch.float32, "cpu", gen, scale=2.0)
    bias = moe_operator.load_balancing_bias(model, gen, "cpu")
    _, ids = reference.moe.route(logits, model.top_k, bias=bias, **moe_operator.route_kwargs(model))
    return logits, bias, ids


def layer_touched(shape: LayerShape) -> int:
    _, _, ids = _layer_routing(shape.name, shape.tokens, shape.model)
    return int(torch.bincount(ids.reshape(-1).long(), minlength=shape.model.num_experts).gt(0).sum())


def layer_build(shape: LayerShape, device, seed: int, guarded: bool = False) -> Inputs:
    """Router logits seeded by the shape; random x and weights, NaN in every expert the routing leaves
    untouched (w13, w2 and their scales)."""
    m = shape.model
    logits, bias, ids = _layer_routing(shape.name, shape.tokens, m)
    untouched = torch.bincount(ids.reshape(-1).long(), minlength=m.num_experts).eq(0).to(device)
    gen = device_generator(seed, device)
    weights = {}
    for name, (n, k) in (("w13", (2 * shape.inner, m.hidden)), ("w2", (m.hidden, shape.inner))):
        w, scale = _weights(shape.weight_dtype, m.num_experts, n, k, untouched, device, gen)
        weights[name], weights[f"{name}_scale"] = w, scale
    x = randn((shape.tokens, m.hidden), shape.dtype, device, gen)
    args = {
        "x": x,
        "router_logits": logits.to(device),
        **weights,
        "top_k": m.top_k,
        **moe_operator.route_kwargs(shape.model),
        "bias": None if bias is None else bias.to(device),
        "align": shape.align,
        "fused_gather": shape.fused_gather,
    }
    guards = {}
    if guarded:
        guards["out"] = Guarded.empty((shape.tokens, m.hidden), shape.dtype, device)
        args["out"] = guards["out"].tensor
    return Inputs(args, ("out",), guards)


def layer_byte_model(shape: LayerShape) -> int:
    """route + the plan (+ dispatch's copy of the rows without the fused gather) + both GEMMs with the
    experts this routing touches + combine, each stage's own model."""
    touched = layer_touched(shape)
    dispatch = shape.dispatch_shape()
    copy = (shape.tokens + shape.tokens * shape.model.top_k) * shape.model.hidden * shape.dtype.itemsize
    plan = moe_operator.dispatch_byte_model(dispatch) - (copy if shape.fused_gather else 0)
    gemms = sum(_gemm_bytes(shape.gemm(stage), touched) for stage in STAGES)
    route = moe_operator.byte_model(shape.route_shape())
    return round(route + plan + gemms + moe_operator.combine_byte_model(dispatch))


def layer_flop_model(shape: LayerShape) -> int:
    m = shape.model
    combine = 2 * shape.tokens * m.top_k * m.hidden
    return (
        moe_operator.flop_model(shape.route_shape())
        + sum(flop_model(shape.gemm(s)) for s in STAGES)
        + combine
    )


def layer_compare(actual: Inputs, expected: Inputs, shape: LayerShape) -> float:
    out = actual.written_out("moe_layer")
    if not torch.isfinite(out.float()).all():
        raise AssertionError("out: holds NaN or inf (an untouched expert's weights were read)")
    assert_close(out, expected.result, "out", dtype=shape.dtype)
    return max_error(out, expected.result)


def _layer(name: str, tokens: int, fused: bool = True, weight_dtype=None) -> LayerShape:
    model_name, _, parallel = name.partition(" ")
    tp = int(parallel[2:]) if parallel.startswith("TP") else 1
    dtype = weight_dtype or (FP8 if model_name == "DeepSeek-R1" else torch.bfloat16)
    return LayerShape(name, tokens, MOE_MODELS[model_name], tp, dtype, fused_gather=fused)


#: Single-GPU layers (EP's layer spans ranks: bench/operators/ep.py times its collectives).
LAYER_PRESETS = ("DeepSeek-R1 TP8", "Qwen3-235B-A22B", "Mixtral-8x7B", "gpt-oss-120b")


def layer_sweep() -> list[LayerShape]:
    return [_layer(name, n, fused) for name in LAYER_PRESETS for n in GEMM_TOKENS for fused in (True, False)]


def layer_default_shapes() -> list[LayerShape]:
    """Fused and unfused side by side: the gather's saving is dispatch's copy."""
    tp8 = LAYER_PRESETS[0]
    shapes = [(tp8, n) for n in (1, 64, 512)] + [("Qwen3-235B-A22B", 64), ("Mixtral-8x7B", 8)]
    return [_layer(name, n, fused) for name, n in shapes for fused in (True, False)]


def layer_small_shapes() -> list[LayerShape]:
    """DeepSeek's grouped sigmoid routing with a bias in small, align 4; softmax routing, fp8 weights with
    odd block edges, dispatch's copy."""
    deepseek_like = MoEModel("DeepSeek-like", 40, 16, 4, 24, "sigmoid", 4, 2, 2.5, bias=True)
    softmax = MoEModel("softmax", 136, 8, 2, 70)
    return [
        LayerShape("DeepSeek-like", 5, deepseek_like, align=4),
        LayerShape("softmax fp8", 3, softmax, weight_dtype=FP8, fused_gather=False),
    ]


def layer_traffic_shapes() -> list[LayerShape]:
    """A decode step of Qwen3-235B-A22B's routing (128 experts, top 8) at interpreter widths."""
    qwen = MOE_MODELS["Qwen3-235B-A22B"]
    return [LayerShape("Qwen3-235B-A22B-like", 1, replace(qwen, hidden=256, intermediate=128))]


MOE_LAYER = Case.by_convention(
    globals(),
    "moe_layer",
    prefix="layer_",
    module="moe_layer",
    # Its launches are route's, dispatch's, grouped_gemm's and combine's: their cases report them.
    static_shapes=list,
    # Left out of tuning: the layer has no knobs of its own; each stage is tuned as its own case.
    tune=None,
)
