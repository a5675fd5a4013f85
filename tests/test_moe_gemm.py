"""grouped_gemm and moe_layer against their references: odd K and N, empty experts, one token, every token on
one expert, alignments 1 to 128, gather and dispatch's rows, silu_and_mul, fp8 weights with odd block edges;
padding rows never written, untouched experts' weights never read; bad input names the argument and writes
nothing. The sm_90 compile (no spills, 16-byte weight loads) is tests/test_static.py's, at the operator's
static shapes."""

import dataclasses
import functools
import inspect
from types import SimpleNamespace

import pytest
import torch
import triton

import kernels.moe_gemm as moe_gemm
from bench.measure.traffic import measure
from bench.operators.moe import routing_ids
from bench.testing import Guarded, assert_close, forbid_allocation, generator, randn, seed_of
from kernels import moe
from kernels.moe_layer import moe_layer
from reference import moe_gemm as reference
from reference import moe_layer as reference_layer
from tests import helpers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
NAN = float("nan")


@dataclasses.dataclass(frozen=True)
class GemmCase:
    tokens: int
    experts: int
    top_k: int
    k: int
    n: int  # w's rows (gate and up together for silu_and_mul)
    align: int = 1
    activation: str | None = None
    gather: bool = False
    fp8: bool = False
    dtype: torch.dtype = torch.bfloat16
    load: str = "uniform"  # routing_ids' loads, or "one": every token on the same top_k experts


@dataclasses.dataclass
class GemmInputs:
    x: torch.Tensor
    x_sorted: torch.Tensor  # its padding rows NaN: a kernel that reads one shows it
    w: torch.Tensor  # untouched experts NaN
    w_scale: torch.Tensor | None
    plan: moe.DispatchPlan

    def call_args(self, case: GemmCase) -> dict:
        a = self.x if case.gather else self.x_sorted
        return {
            "a": a,
            "w": self.w,
            "plan": self.plan,
            "gather": case.gather,
            "activation": case.activation,
            "w_scale": self.w_scale,
        }


def build(case: GemmCase, seed: int) -> GemmInputs:
    gen = generator(seed)
    if case.load == "one":
        ids = torch.arange(case.top_k, dtype=torch.int32).flip(0).repeat(case.tokens, 1)
    else:
        ids = routing_ids(case.tokens, case.experts, case.top_k, case.load, gen)
    x = randn((case.tokens, case.k), case.dtype, DEVICE, gen)
    x_sorted, plan = moe.dispatch(x, ids.to(DEVICE), case.experts, align=case.align)
    x_sorted[plan.row_token < 0] = NAN
    untouched = plan.tokens_per_expert == 0
    w = randn(
        (case.experts, case.n, case.k), torch.float32, DEVICE, gen, scale=4.0 if case.fp8 else case.k**-0.5
    )
    w[untouched] = NAN
    w_scale = None
    if case.fp8:
        blocks = (case.experts, triton.cdiv(case.n, 128), triton.cdiv(case.k, 128))
        w_scale = (torch.rand(blocks, generator=gen) + 0.5).to(DEVICE) * (case.k**-0.5 / 4)
        w_scale[untouched] = NAN
    w = w.to(FP8 if case.fp8 else case.dtype)
    return GemmInputs(x, x_sorted, w, w_scale, plan)


def check(case: GemmCase, seed: int) -> GemmInputs:
    """The kernel's rows within the dtype's tolerance of the reference; padding rows left poisoned (NaN),
    the sentinels around out intact, out returned."""
    inputs = build(case, seed)
    args = inputs.call_args(case)
    columns = case.n // 2 if case.activation else case.n
    guard = Guarded.empty((inputs.plan.row_token.shape[0], columns), case.dtype, DEVICE)
    got = moe_gemm.grouped_gemm(**args, out=guard.tensor)
    assert got is guard.tensor
    guard.check("out")
    want = reference.grouped_gemm(**args)
    real = inputs.plan.row_token >= 0
    assert_close(got[real], want[real], "out", dtype=case.dtype)
    assert got[~real].isnan().all(), "a padding row (row_token -1) was written"
    return inputs


S = GemmCase
FUZZ_GRID = {
    "odd K and N": S(5, 4, 2, k=37, n=29),
    "odd N silu_and_mul, gather": S(5, 4, 2, k=45, n=46, activation="silu_and_mul", gather=True),
    "empty experts, align 16": S(2, 9, 2, k=32, n=24, align=16),
    "one token, align 8, silu gather": S(
        1, 8, 3, k=40, n=40, align=8, activation="silu_and_mul", gather=True
    ),
    "every token on one expert (two M tiles)": S(21, 5, 1, k=24, n=20, load="one"),
    "every token on the same two, gather": S(9, 3, 2, k=17, n=18, load="one", gather=True),
    "align 128, silu_and_mul": S(6, 3, 2, k=16, n=32, align=128, activation="silu_and_mul"),
    "align 3, gather, hot expert": S(7, 4, 2, k=20, n=18, align=3, gather=True, load="hot"),
    "fp16 silu_and_mul": S(4, 4, 2, k=24, n=40, activation="silu_and_mul", dtype=torch.float16),
    # Two 128-column scale blocks in K (the second 8 wide); the up half starts at row 70, so its tile
    # straddles the first 128-row scale block's edge.
    "fp8 odd block edges, silu gather": S(
        3, 3, 2, k=136, n=140, activation="silu_and_mul", gather=True, fp8=True
    ),
    "fp8 odd block edges, align 4": S(3, 3, 2, k=130, n=131, align=4, fp8=True),
    "fp8 fp16, one expert": S(3, 2, 1, k=24, n=20, fp8=True, dtype=torch.float16, load="one"),
    # The grid's launch groups of 8 M tiles, each over 3 N tiles: 28 tiles (two groups of real ones), and
    # one expert's 3 real tiles in a short group.
    "more M tiles than a launch group": S(200, 16, 4, k=20, n=150),
    "one expert's M tiles in a short launch group": S(150, 1, 1, k=20, n=150),
}


@pytest.mark.parametrize("case", FUZZ_GRID, ids=list(FUZZ_GRID))
def test_grouped_gemm_matches_the_reference(case, request):
    check(FUZZ_GRID[case], seed_of(request.node.name))


@helpers.property_test(
    lambda st: dict(
        tokens=st.integers(1, 12),
        experts=st.integers(1, 8),
        top_k=st.integers(1, 3),
        k=st.integers(1, 70),
        n=st.integers(1, 40),
        align=st.sampled_from([1, 2, 5, 16, 128]),
        activation=st.sampled_from([None, "silu_and_mul"]),
        gather=st.booleans(),
        fp8=st.booleans(),
        load=st.sampled_from(["uniform", "zipf", "one"]),
        seed=st.integers(0, 2**31 - 1),
    )
)
def test_random_shapes_property(tokens, experts, top_k, k, n, align, activation, gather, fp8, load, seed):
    n = 2 * n if activation else n
    case = S(tokens, experts, min(top_k, experts), k, n, align, activation, gather, fp8, load=load)
    check(case, seed)


def _loaded_per_expert(traffic, w: torch.Tensor) -> list[int]:
    """Bytes loaded from each expert's [N, K] slab of w (every access counted)."""
    slab = w[0].numel() * w.element_size()
    start = w.data_ptr()
    per_expert = [0] * w.shape[0]
    for addresses, sizes in traffic._loaded:
        inside = (addresses >= start) & (addresses < start + slab * w.shape[0])
        for expert in range(w.shape[0]):
            mine = inside & ((addresses - start) // slab == expert)
            per_expert[expert] += int(sizes[mine].sum())
    return per_expert


@pytest.mark.skipif(torch.cuda.is_available(), reason="traffic is counted in Triton's interpreter")
@pytest.mark.parametrize("activation", [None, "silu_and_mul"])
def test_each_touched_experts_weights_are_read_once_per_m_tile_and_untouched_ones_never(activation):
    """A decode step (2 tokens, top 2 of 8): each touched expert is one M tile that reads its [N, K]
    weights once; no program reads an untouched expert's. An expert of 21 rows takes two tiles (16 rows
    each): two reads (the second from L2 on a GPU)."""
    for case, tiles in (
        (S(2, 8, 2, k=40, n=48, activation=activation, gather=True), 1),
        (S(21, 5, 1, 24, 20, load="one"), 2),
    ):
        inputs = build(case, 7)
        traffic = measure(lambda inputs=inputs, case=case: moe_gemm.grouped_gemm(**inputs.call_args(case)))
        touched = (inputs.plan.tokens_per_expert > 0).tolist()
        slab = case.n * case.k * inputs.w.element_size()
        want = [slab * tiles if t else 0 for t in touched]
        assert _loaded_per_expert(traffic, inputs.w) == want


def test_runs_are_bit_identical_and_the_gather_equals_dispatchs_rows():
    case = S(9, 4, 2, k=33, n=34, align=4, activation="silu_and_mul")
    inputs = build(case, 3)
    first = moe_gemm.grouped_gemm(**inputs.call_args(case))
    again = moe_gemm.grouped_gemm(**inputs.call_args(case))
    gathered = moe_gemm.grouped_gemm(**inputs.call_args(dataclasses.replace(case, gather=True)))
    real = inputs.plan.row_token >= 0
    assert torch.equal(first[real], again[real]) and torch.equal(first[real], gathered[real])


def test_out_given_allocates_nothing(monkeypatch):
    case = S(4, 4, 2, k=16, n=32, activation="silu_and_mul", gather=True)
    inputs = build(case, 5)
    out = torch.empty(inputs.plan.row_token.shape[0], 16, dtype=case.dtype, device=DEVICE)
    forbid_allocation(monkeypatch, moe_gemm)
    got = moe_gemm.grouped_gemm(**inputs.call_args(case), out=out)
    monkeypatch.undo()
    assert got is out


def test_an_empty_batch_launches_nothing_and_returns_out(monkeypatch):
    x = torch.zeros(0, 16, dtype=torch.bfloat16, device=DEVICE)
    plan = moe.dispatch_plan(torch.zeros(0, 2, dtype=torch.int32, device=DEVICE), 4, align=4)
    w = torch.zeros(4, 8, 16, dtype=torch.bfloat16, device=DEVICE)
    out = torch.full((12, 8), NAN, dtype=torch.bfloat16, device=DEVICE)  # max_rows: padding only
    monkeypatch.setattr(moe_gemm, "_grouped_gemm_kernel", None)  # a launch would fail on None[grid]
    assert moe_gemm.grouped_gemm(x, w, plan, gather=True, out=out) is out
    assert out.isnan().all()


def test_references_take_the_same_arguments():
    for kernel, twin in (
        (moe_gemm.grouped_gemm, reference.grouped_gemm),
        (moe_layer, reference_layer.moe_layer),
    ):
        assert inspect.signature(kernel).parameters.keys() == inspect.signature(twin).parameters.keys()


# --- bad input ----------------------------------------------------------------------------------------------


@functools.cache
def _bad_base() -> SimpleNamespace:
    """One good call's arguments (kept unchanged by the tests) and the pieces the bad ones swap in."""
    case = S(3, 4, 2, k=16, n=32, activation="silu_and_mul")
    inputs = build(case, 11)
    return SimpleNamespace(
        args=inputs.call_args(case),
        w=inputs.w,
        plan=inputs.plan,
        fp8_w=inputs.w.float().nan_to_num().to(FP8),
        scales=torch.ones(4, 1, 1, device=DEVICE),
        other_plan=moe.dispatch_plan(torch.zeros(5, 2, dtype=torch.int32, device=DEVICE), 4),
    )


def _zeros(*shape):
    return torch.zeros(*shape, dtype=torch.bfloat16, device=DEVICE)


def _nans(*shape):
    return torch.full(shape, NAN, dtype=torch.bfloat16, device=DEVICE)


BAD = {
    "a 1-D": ("a", lambda b: {"a": b.args["a"][0]}),
    "a int": ("a", lambda b: {"a": b.args["a"].to(torch.int32)}),
    "a columns strided": ("a", lambda b: {"a": b.args["a"].t().contiguous().t()}),
    "K mismatch": ("w", lambda b: {"w": _zeros(4, 32, 17)}),
    "w dtype": ("w", lambda b: {"w": b.w.half()}),
    "w device": ("w", lambda b: {"w": b.w.to("meta")}),
    "w not contiguous": ("w", lambda b: {"w": b.w.transpose(1, 2).contiguous().transpose(1, 2)}),
    "expert count": ("plan", lambda b: {"w": _zeros(5, 32, 16)}),
    "odd N for silu_and_mul": ("w", lambda b: {"w": _zeros(4, 31, 16)}),
    "N zero": ("w", lambda b: {"w": _zeros(4, 0, 16)}),
    "K zero": ("w", lambda b: {"a": b.args["a"][:, :0], "w": _zeros(4, 32, 0)}),
    "fp8 without scales": ("w_scale", lambda b: {"w": b.fp8_w}),
    "fp8 scales of the wrong shape": (
        "w_scale",
        lambda b: {"w": b.fp8_w, "w_scale": b.scales.expand(4, 1, 2)},
    ),
    "fp8 scales fp16": ("w_scale", lambda b: {"w": b.fp8_w, "w_scale": b.scales.half()}),
    "fp8 scales on meta": ("w_scale", lambda b: {"w": b.fp8_w, "w_scale": b.scales.to("meta")}),
    "scales for bf16 weights": ("w_scale", lambda b: {"w_scale": b.scales}),
    "unknown activation": ("activation", lambda b: {"activation": "gelu"}),
    "gather not a bool": ("gather", lambda b: {"gather": 1}),
    "plan not a plan": ("plan", lambda b: {"plan": vars(b.plan)}),
    "plan from another shape": ("plan", lambda b: {"plan": b.other_plan}),
    "gather=True given x_sorted": ("plan", lambda b: {"gather": True}),
    "plan int64 row_token": (
        "plan",
        lambda b: {"plan": dataclasses.replace(b.plan, row_token=b.plan.row_token.long())},
    ),
    "plan align 0": ("plan", lambda b: {"plan": dataclasses.replace(b.plan, align=0)}),
    "out rows": ("out", lambda b: {"out": _nans(7, 16)}),
    "out columns (silu_and_mul halves N)": ("out", lambda b: {"out": _nans(6, 32)}),
    "out dtype": ("out", lambda b: {"out": _nans(6, 16).half()}),
    "out strided": ("out", lambda b: {"out": _nans(16, 6).t()}),
    "out over a": ("out", lambda b: dict.fromkeys(("a", "out"), _nans(*b.args["a"].shape))),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_names_the_argument_and_writes_nothing(case):
    argument, change = BAD[case]
    base = _bad_base()
    out = torch.full((base.plan.row_token.shape[0], 16), NAN, dtype=torch.bfloat16, device=DEVICE)
    kw = {**base.args, "out": out, **change(base)}
    with pytest.raises(ValueError, match=rf"^{argument}[.:]"):
        moe_gemm.grouped_gemm(**kw)
    assert kw["out"].isnan().all()  # the poisoned out, or the bad one in its place, as it was


# --- the composed layer -------------------------------------------------------------------------------------


def layer_inputs(tokens, experts, hidden, inner, fp8, seed):
    gen = generator(seed)
    x = randn((tokens, hidden), torch.bfloat16, DEVICE, gen)
    logits = randn((tokens, experts), torch.float32, DEVICE, gen)
    weights = {}
    for name, shape in (("w13", (experts, 2 * inner, hidden)), ("w2", (experts, hidden, inner))):
        if fp8:
            weights[name] = randn(shape, torch.float32, DEVICE, gen, scale=4.0).to(FP8)
            blocks = (experts, triton.cdiv(shape[1], 128), triton.cdiv(shape[2], 128))
            weights[f"{name}_scale"] = torch.full(blocks, shape[2] ** -0.5 / 4, device=DEVICE)
        else:
            weights[name] = randn(shape, torch.bfloat16, DEVICE, gen, scale=shape[2] ** -0.5)
    return x, logits, weights


DEEPSEEK_LIKE = {
    "top_k": 4,
    "scoring": "sigmoid",
    "num_groups": 4,
    "topk_groups": 2,
    "scale": 2.5,
    "align": 4,
}


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_moe_layer_matches_the_reference_fused_or_not(fp8, request):
    """DeepSeek's routing shape in small (16 experts, 4 groups, top 4); fp8 with odd block edges. The fused
    gather and dispatch's copy give bit-identical layers (the same rows meet the same tiles)."""
    hidden, inner = (136, 70) if fp8 else (40, 24)
    x, logits, weights = layer_inputs(5, 16, hidden, inner, fp8, seed_of(request.node.name))
    bias = randn((16,), torch.float32, DEVICE, generator(1), scale=0.3)
    kw = {**DEEPSEEK_LIKE, **weights, "bias": bias}
    fused = moe_layer(x, logits, **kw)
    copied = moe_layer(x, logits, **kw, fused_gather=False)
    assert torch.equal(fused, copied)
    want = reference_layer.moe_layer(x, logits, **kw)
    assert_close(fused, want, "out", dtype=torch.bfloat16)
    out = torch.full_like(x, NAN)
    assert moe_layer(x, logits, **kw, out=out) is out and torch.equal(out, fused)


def _layer_bad():
    x, logits, weights = layer_inputs(3, 8, 32, 16, False, 2)
    w13, w2 = weights["w13"], weights["w2"]
    return (x, logits, w13, w2), {
        "x int": ("x", {"x": x.int()}),
        "x strided": ("x", {"x": torch.zeros(3, 64, dtype=x.dtype, device=DEVICE)[:, ::2]}),
        "router_logits rows": ("router_logits", {"router_logits": logits[:2]}),
        "w13 K": ("w13", {"w13": torch.zeros(8, 32, 33, dtype=torch.bfloat16, device=DEVICE)}),
        "w13 odd N": ("w13", {"w13": torch.zeros(8, 31, 32, dtype=torch.bfloat16, device=DEVICE)}),
        "w13 experts": ("w13", {"w13": torch.zeros(7, 32, 32, dtype=torch.bfloat16, device=DEVICE)}),
        "w2 K": ("w2", {"w2": torch.zeros(8, 32, 15, dtype=torch.bfloat16, device=DEVICE)}),
        "w2 hidden": ("w2", {"w2": torch.zeros(8, 31, 16, dtype=torch.bfloat16, device=DEVICE)}),
        "w2 fp8 without scales": ("w2_scale", {"w2": w2.to(FP8)}),
        "w13 scales for bf16": ("w13_scale", {"w13_scale": torch.ones(8, 1, 1, device=DEVICE)}),
        "top_k": ("top_k", {"top_k": 9}),
        "align": ("align", {"align": 0}),
        "fused_gather": ("fused_gather", {"fused_gather": "yes"}),
        # Routing keywords go through to route, which names the bad one before anything launches.
        "scoring": ("scoring", {"scoring": "relu"}),
        "topk_groups": ("topk_groups", {"num_groups": 4, "topk_groups": 0}),
    }


@pytest.mark.parametrize("case", list(_layer_bad()[1]))
def test_moe_layer_bad_input_names_the_argument_and_writes_nothing(case):
    (x, logits, w13, w2), cases = _layer_bad()
    argument, change = cases[case]
    out = torch.full_like(x, NAN)
    kw = {"x": x, "router_logits": logits, "w13": w13, "w2": w2, "top_k": 2, "out": out, **change}
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        moe_layer(**kw)
    assert out.isnan().all()


def test_moe_layer_refuses_an_unknown_routing_keyword():
    (x, logits, w13, w2), _ = _layer_bad()
    out = torch.full_like(x, NAN)
    with pytest.raises(TypeError, match="grouping"):
        moe_layer(x, logits, w13, w2, top_k=2, out=out, grouping=4)
    assert out.isnan().all()
