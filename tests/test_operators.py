"""The operator modules (bench/operators/): the peers timed beside paged_decode, mla_decode, allocate and
grouped_gemm, each checked against the reference (or the kernel) through verify_and_prepare at the shape it is
timed, each saying why it cannot run where it cannot; grouped_gemm's and moe_layer's inputs, cost models and
checks; and the tuning specs the operators give the tuner."""

import warnings

import pytest
import torch

import bench.operators.base
import bench.operators.kv_alloc
import bench.operators.kv_cache
import kernels.kv_cache
import kernels.moe_layer
import reference.kv_cache
from bench.operators import CASES, paged_attention
from bench.operators import moe_gemm as moe_gemm_operator
from bench.operators.base import PeerUnavailable, kernel_expected, verify_and_prepare
from bench.operators.kv_alloc import AllocateShape
from bench.operators.mla_attention import MLA_DECODE
from bench.operators.mla_attention import MLADecodeShape as MLAShape
from bench.operators.mla_attention import build as mla_build
from bench.operators.moe_gemm import GROUPED_GEMM, MOE_LAYER
from bench.operators.paged_attention import (
    FLEX_Q_BLOCK,
    PAGED_DECODE,
    PagedDecodeShape,
    compiled_flex_attention,
    flex_prepare,
    flex_unsupported,
)
from bench.operators.paged_attention import build as paged_build
from bench.serving.models import MOE_MODELS
from bench.testing import Guarded
from reference import moe as reference_moe

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
ROUTE_KEYS = ("scoring", "num_groups", "topk_groups", "bias", "scale", "softmax_after_topk")


def check_peer_against_reference(case, peer: str, shape) -> None:
    """A peer's time means something only if it does the same work: verify_and_prepare (what the benchmarks
    run before timing a peer) checks its output against the reference, and against the kernel, through
    Peer.check; a check that cannot see one wrong element would make that meaningless."""
    inputs = case.build(shape, DEVICE, 9)
    expected = inputs.clone()
    case.run_reference(expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it runs unfused outside torch.compile
        prepared, _ = verify_and_prepare(case, peer, inputs, shape, expected)
        verify_and_prepare(case, peer, inputs, shape, None)  # against the kernel: raises if apart
        out = prepared.call()
    wrong = out.clone()
    wrong.view(-1)[0] += 1.0  # one element off: the check must see it
    with pytest.raises(AssertionError, match="out"):
        case.peers[peer].check(wrong, expected, shape)


# --- paged_decode's peers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "peer, shape",
    [
        ("sdpa-contiguous", PagedDecodeShape("peer", (77, 77, 77), 8, 2, 64, block_size=16)),
        ("flex-attention-paged", PagedDecodeShape("peer", (37, 100, 64), 8, 2, 64, block_size=16)),
        (
            "flex-attention-paged",
            PagedDecodeShape("peer", (90, 40, 64), 8, 1, 64, block_size=16, shared_pages=2),
        ),
        ("flex-attention-paged", PagedDecodeShape("peer", (37, 0, 9), 4, 2, 64, block_size=8)),
    ],
    ids=["sdpa", "flex", "flex-shared-mqa", "flex-empty-sequence"],
)
def test_paged_decode_peers_compute_the_same_attention(peer, shape):
    check_peer_against_reference(PAGED_DECODE, peer, shape)


@pytest.mark.parametrize(
    "peer, shape, reason",
    [
        ("sdpa-contiguous", PagedDecodeShape("p", (5, 9), 4, 2, 64), "one nonzero length"),
        ("sdpa-contiguous", PagedDecodeShape("p", (5, 5), 4, 2, 64, cache_dtype=FP8), "fp8"),
        ("flex-attention-paged", PagedDecodeShape("p", (5, 5), 4, 2, 64, cache_dtype=FP8), "fp8"),
        ("flex-attention-paged", PagedDecodeShape("p", (0, 0), 4, 2, 64), "at least one key"),
    ],
)
def test_paged_decode_peers_that_cannot_run_say_why(peer, shape, reason):
    with pytest.raises(PeerUnavailable, match=reason):
        PAGED_DECODE.peers[peer].prepare(paged_build(shape, DEVICE, 1), shape)


def test_compiled_flex_attention_limits_are_decided_up_front():
    """On a GPU, the shapes the compiled FlexAttention cannot take are named before anything runs, so no
    compile error is ever turned into a skip."""

    def why(shape, device):
        group = shape.num_q_heads // shape.num_kv_heads
        return flex_unsupported(
            shape.cache_dtype, shape.lengths, shape.block_size, shape.head_dim, group, torch.device(device)
        )

    assert why(PagedDecodeShape("p", (5,), 8, 2, 64, block_size=16), "cuda") is None
    assert "pages of 16" in why(PagedDecodeShape("p", (5,), 8, 2, 64, block_size=8), "cuda")
    assert "power-of-two pages" in why(PagedDecodeShape("p", (5,), 8, 2, 64, block_size=48), "cuda")
    assert "power-of-two" in why(PagedDecodeShape("p", (5,), 6, 1, 96, block_size=16), "cuda")
    assert "128 or fewer" in why(PagedDecodeShape("p", (5,), 256, 1, 64, block_size=16), "cuda")
    assert why(PagedDecodeShape("p", (5,), 6, 1, 96, block_size=8), "cpu") is None


def test_flex_blocks_fit_torchs_decode_kernel(monkeypatch):
    """Torch's decode kernel (torch/_inductor/kernel/flex/flex_decoding.py) drops every configuration whose
    BLOCK_M (the query group, a power of two of at least 16) does not divide the mask's query block, and
    PagedAttention maps one key block per page: a query block of 1 left it nothing to run, at every shape."""
    import importlib

    flex = importlib.import_module("torch.nn.attention.flex_attention")

    blocks, create = [], flex.create_block_mask
    monkeypatch.setattr(
        flex, "create_block_mask", lambda *a, **kw: blocks.append(kw["BLOCK_SIZE"]) or create(*a, **kw)
    )
    shape = PagedDecodeShape("p", (37, 20), 8, 2, 64, block_size=16)
    flex_prepare(paged_build(shape, DEVICE, 1), shape)
    assert blocks == [(FLEX_Q_BLOCK, shape.block_size)]
    assert all(FLEX_Q_BLOCK % max(group, 16) == 0 for group in (1, 2, 4, 8, 16, 32, 64, 128))


def test_flex_attention_compiles_for_one_shape_at_a_time(monkeypatch):
    """dynamic=True left batch and heads symbolic, and torch then never picks its decode kernel; each shape
    compiles after a reset, so dynamo's recompile limit (past which it runs flex_attention unfused) is never
    reached."""
    compiled, resets = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(True))
    compiled_flex_attention()
    assert compiled == [{"dynamic": False}] and resets == [True]


def test_sdpa_runs_where_a_fused_backend_takes_the_shape(monkeypatch):
    """The fused-backend rule (a GPU's, applied to the CPU here on any machine, whose flash backend takes GQA
    at equal widths) lets an ordinary decode through."""
    monkeypatch.setattr(paged_attention, "FUSED_SDPA_ONLY_ON", ("cpu", "cuda"))
    shape = PagedDecodeShape("p", (20, 20), 8, 2, 64, block_size=16)
    inputs = paged_build(shape, "cpu", 1)
    assert paged_attention.fused_sdpa_refusal(inputs.args["q"][:, :, None, :], 2, 64, 20) is None
    PAGED_DECODE.peers["sdpa-contiguous"].prepare(inputs, shape)


# --- mla_decode's peers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "peer, shape",
    [
        ("torch-gather-dense", MLAShape("peer", (77, 77), 16, qk_dim=96, v_head_dim=64, block_size=16)),
        ("torch-gather-dense", MLAShape("peer", (40, 40), 8, qk_dim=64, v_head_dim=48, cache_dtype=FP8)),
        ("sdpa-contiguous", MLAShape("peer", (77, 77), 16, qk_dim=96, v_head_dim=64, block_size=16)),
        (
            "flex-attention-paged",
            MLAShape("peer", (37, 100, 0), 16, qk_dim=96, v_head_dim=64, block_size=16, shared_pages=1),
        ),
    ],
    ids=["gather", "gather-fp8", "sdpa", "flex-ragged-shared"],
)
def test_mla_decode_peers_compute_the_same_attention(peer, shape):
    check_peer_against_reference(MLA_DECODE, peer, shape)


@pytest.mark.parametrize(
    "peer, shape, reason",
    [
        ("torch-gather-dense", MLAShape("p", (5, 9), 16, qk_dim=64, v_head_dim=64), "one nonzero length"),
        ("sdpa-contiguous", MLAShape("p", (5, 5), 16, qk_dim=64, v_head_dim=64, cache_dtype=FP8), "fp8"),
        ("flex-attention-paged", MLAShape("p", (5, 5), 16, qk_dim=64, v_head_dim=64, cache_dtype=FP8), "fp8"),
        ("flashinfer-mla", MLAShape("p", (5, 5), 16, qk_dim=64, v_head_dim=64), "flashinfer|CUDA|512"),
    ],
)
def test_mla_decode_peers_that_cannot_run_say_why(peer, shape, reason):
    with pytest.raises(PeerUnavailable, match=reason):
        MLA_DECODE.peers[peer].prepare(mla_build(shape, DEVICE, 1), shape)


def test_sdpa_is_refused_where_no_fused_backend_takes_the_shape(monkeypatch):
    """No fused SDPA backend takes 576-wide keys with 512-wide values over one latent head; torch's math
    fallback upcasts to fp32 and repeats K and V for every head (about 220 GB at batch 32, 8K context, 128
    heads). The peer refuses up front, with torch's reasons. The rule is the GPU's; the CPU stands in for it
    here, on any machine (its flash backend refuses the same widths; the peer launches no kernel)."""
    monkeypatch.setattr(paged_attention, "FUSED_SDPA_ONLY_ON", ("cpu", "cuda"))
    shape = MLAShape("p", (40, 40), 16, block_size=16)
    assert (shape.qk_dim, shape.v_head_dim) == (576, 512)
    with pytest.raises(PeerUnavailable, match="no fused SDPA backend takes q/k 576 and v 512.*GB"):
        MLA_DECODE.peers["sdpa-contiguous"].prepare(mla_build(shape, "cpu", 1), shape)


def test_compiled_flex_attention_skips_tiles_too_large_for_shared_memory():
    """MLA's 576-wide rows: the decode kernel's query tile (the heads, padded to a power of two) and a page
    of keys and values must fit in one block's shared memory (an estimate, to be confirmed on a GPU)."""

    def why(heads, block_size):
        return flex_unsupported(torch.bfloat16, (5,), block_size, 576, heads, torch.device("cuda"), v_dim=512)

    assert why(16, 16) is None and why(64, 16) is None and why(16, 64) is None
    assert "shared memory" in why(128, 16) and "shared memory" in why(32, 64)


# --- allocate's peer: the host pool -------------------------------------------------------------------------


def test_host_pool_peer_steps_like_the_kernel_and_resets_outside_its_call():
    """The host-pool peer as the benchmarks run it: prepared once (host copy, id list), checked against the
    kernel's own step (the reference is the peer here), and its reset puts the host pool back, so every
    timed call does the same step. A host pool one step ahead fails the check."""
    case = CASES["allocate"]
    shape = case.small_shapes()[0]
    inputs = case.build(shape, DEVICE, 4)
    prepared, _ = verify_and_prepare(case, "host-pool", inputs, shape, None)
    expected = kernel_expected(case, inputs)
    for _ in range(2):
        prepared.reset()
        case.peers["host-pool"].check(prepared.call(), expected, shape)
    with pytest.raises(AssertionError):
        case.peers["host-pool"].check(prepared.call(), expected, shape)  # no reset: a second step


def test_host_pool_peer_is_unavailable_past_its_size_with_the_reason():
    shape = AllocateShape("big", 4096, 1)
    with pytest.raises(PeerUnavailable, match="past 1024 sequences"):
        CASES["allocate"].peers["host-pool"].prepare(None, shape)


# --- grouped_gemm and moe_layer ----------------------------------------------------------------------------

GEMM_SMALL = {shape.name: shape for shape in GROUPED_GEMM.small_shapes()}


@pytest.mark.parametrize(
    "peer, name",
    [
        ("torch-loop", "odd"),
        ("torch-loop", "fp8 odd blocks"),
        ("torch-grouped-mm", "odd"),
        ("torch-grouped-mm", "ep hot"),
    ],
    ids=["loop-gather", "loop-fp8", "grouped-mm-gather", "grouped-mm-ep"],
)
def test_grouped_gemm_peers_compute_the_same_rows(peer, name):
    """Each peer at a shape it runs (the gather, fp8 block scales, an EP rank's padded plan) agrees with the
    reference on every row holding a token; one element off in such a row fails its check."""
    shape = GEMM_SMALL[name]
    inputs = GROUPED_GEMM.build(shape, DEVICE, 9)
    expected = inputs.clone()
    GROUPED_GEMM.run_reference(expected)
    prepared, _ = verify_and_prepare(GROUPED_GEMM, peer, inputs, shape, expected)
    wrong = prepared.call().clone()
    wrong.view(-1)[int((expected.args["plan"].row_token >= 0).nonzero()[0]) * shape.columns] += 1.0
    with pytest.raises(AssertionError, match="out"):
        GROUPED_GEMM.peers[peer].check(wrong, expected, shape)


def test_grouped_gemm_peers_that_cannot_run_say_why(monkeypatch):
    fp8, gate_up = GEMM_SMALL["fp8 odd blocks"], GEMM_SMALL["odd"]
    with pytest.raises(PeerUnavailable, match="16-bit weights, not fp8"):
        GROUPED_GEMM.peers["torch-grouped-mm"].prepare(GROUPED_GEMM.build(fp8, DEVICE, 1), fp8)
    with pytest.raises(PeerUnavailable, match="CUDA devices only|SwiGLU"):
        GROUPED_GEMM.peers["triton-kernels-matmul-ogs"].prepare(
            GROUPED_GEMM.build(gate_up, DEVICE, 1), gate_up
        )
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    with pytest.raises(PeerUnavailable, match="has no torch._grouped_mm"):
        GROUPED_GEMM.peers["torch-grouped-mm"].prepare(GROUPED_GEMM.build(gate_up, DEVICE, 1), gate_up)


def test_matmul_ogs_gather_index_reads_each_rows_token():
    """matmul_ogs reads x[index // top_k] for its i-th row: the index the adapter passes must give, in the
    plan's row order, the rows dispatch would have copied."""
    shape = GEMM_SMALL["odd"]
    inputs = GROUPED_GEMM.build(shape, DEVICE, 2)
    plan, x = inputs.args["plan"], inputs.args["a"]
    index = moe_gemm_operator.ogs_gather_index(plan, shape.top_k)
    real = plan.row_token >= 0
    assert torch.equal(x[index.long() // shape.top_k], moe_gemm_operator.sorted_rows(x, plan)[real])


def test_grouped_gemm_inputs_poison_what_no_kernel_reads_and_the_model_counts_them():
    """Untouched experts' weights (and fp8 scales) are NaN, touched ones finite; dispatch's padding rows
    NaN; the byte model counts exactly the experts the built plan touches (the routing is the shape's),
    and at 8192 tokens every expert, as the expectation under uniform routing says."""
    for name in ("odd", "ep hot", "fp8 odd blocks"):
        shape = GEMM_SMALL[name]
        a = GROUPED_GEMM.build(shape, DEVICE, 5).args
        touched = a["plan"].tokens_per_expert > 0
        assert a["w"][~touched].float().isnan().all() and a["w"][touched].float().isfinite().all()
        if a["w_scale"] is not None:
            assert a["w_scale"][~touched].isnan().all() and a["w_scale"][touched].isfinite().all()
        padding = a["plan"].row_token < 0
        if not a["gather"]:  # the gather reads x itself: no padding rows there
            assert padding.any() == (shape.align > 1) and a["a"][padding].isnan().all()
        assert moe_gemm_operator.touched_experts(shape) == int(touched.sum())
        # By hand from the built tensors: each touched expert's weights (and fp8 block scales) once, every
        # routed row (padding apart) written (the output's columns) and read (K) from the dispatched rows,
        # or with the gather each token's row of x once (its other choices' reads are L2's), the plan's
        # counts, offsets and each routed row's token id.
        w, plan = a["w"], a["plan"]
        experts, n, k = w.shape
        rows = int((plan.row_token >= 0).sum())
        read = a["a"].shape[0] if a["gather"] else rows
        scales = -(-n // 128) * -(-k // 128) * 4 if a["w_scale"] is not None else 0
        columns = n // 2 if a["activation"] == "silu_and_mul" else n
        by_hand = int(touched.sum()) * (n * k * w.element_size() + scales)
        by_hand += (read * k + rows * columns) * a["a"].element_size() + (2 * experts + 1) * 4 + rows * 4
        assert GROUPED_GEMM.byte_model(shape) == by_hand, name
    prefill = moe_gemm_operator._preset("DeepSeek-R1 TP8", "down", 8192)
    assert moe_gemm_operator.touched_experts(prefill) == prefill.experts
    assert moe_gemm_operator.expected_byte_model(prefill) == pytest.approx(GROUPED_GEMM.byte_model(prefill))


def test_grouped_gemm_expected_touched_is_uniform_routings():
    """expected_touched is the expectation for what the presets' inputs draw (uniform routing): at DeepSeek-R1
    TP8's 64 tokens, 256 x (1 - (1 - 8/256)^64) = 222 experts, and the drawn routing within 5% of it (the
    built inputs touch 215)."""
    shape = moe_gemm_operator._preset("DeepSeek-R1 TP8", "gate_up", 64)
    assert shape.load == "uniform"
    expected = moe_gemm_operator.expected_touched(shape)
    assert expected == pytest.approx(222, rel=0.05)
    assert moe_gemm_operator.touched_experts(shape) == pytest.approx(expected, rel=0.05)
    ep = moe_gemm_operator._preset("DeepSeek-R1 EP8", "gate_up", 1)  # 8 rows, one choice each, of 32 experts
    assert moe_gemm_operator.expected_touched(ep) == pytest.approx(32 * (1 - (31 / 32) ** 8))


def test_the_layer_routes_deepseek_near_uniformly_as_its_projection_assumes():
    """The MoE layer's DeepSeek inputs (grouped sigmoid with the score bias) touch about as many experts as
    uniform routing would (222 of 256 at 64 tokens): a bias as large as the saturated scores' spread sent
    every row to 99 experts, far from the byte model's projection."""
    model = MOE_MODELS["DeepSeek-R1"]
    _, bias, ids = moe_gemm_operator._layer_routing("DeepSeek-R1 TP8", 64, model)
    assert bias is not None
    assert len(set(ids.flatten().tolist())) >= 0.9 * 256 * (1 - (1 - 8 / 256) ** 64)


def test_grouped_gemm_compare_sees_a_written_padding_row_and_a_stray_read():
    """The kernel on guarded inputs passes; a padding row written, a NaN in a row holding a token (what
    reading an untouched expert's weights gives) or a sentinel overwritten each fail."""
    shape = GEMM_SMALL["ep hot"]
    inputs = GROUPED_GEMM.build(shape, DEVICE, 6, guarded=True)
    expected = inputs.clone()
    GROUPED_GEMM.run_reference(expected)
    GROUPED_GEMM.run_kernel(inputs)
    GROUPED_GEMM.compare(inputs, expected, shape)
    out, row_token = inputs.args["out"], inputs.args["plan"].row_token
    real, padding = int((row_token >= 0).nonzero()[0]), int((row_token < 0).nonzero()[0])
    guard = inputs.guards["out"]
    for plant, why in (
        (lambda: out[padding].zero_(), "padding row"),
        (lambda: out[real, 0].fill_(float("nan")), "out"),
        (lambda: guard.buffer[-1:].zero_(), "sentinel"),
    ):
        kept = guard.buffer.clone()
        plant()
        with pytest.raises(AssertionError, match=why):
            GROUPED_GEMM.compare(inputs, expected, shape)
        guard.buffer.copy_(kept)


def test_moe_layer_inputs_poison_untouched_experts_and_compare_sees_nan():
    shape = MOE_LAYER.small_shapes()[0]
    inputs = MOE_LAYER.build(shape, DEVICE, 3, guarded=True)
    a = inputs.args
    ids = reference_moe.route(a["router_logits"], a["top_k"], **{k: a[k] for k in ROUTE_KEYS})[1]
    touched = torch.bincount(ids.reshape(-1).long(), minlength=a["w13"].shape[0]) > 0
    assert not touched.all() and touched.any()
    for name in ("w13", "w2"):
        assert a[name][~touched].float().isnan().all() and a[name][touched].float().isfinite().all()
    expected = inputs.clone()
    MOE_LAYER.run_reference(expected)
    MOE_LAYER.run_kernel(inputs)
    MOE_LAYER.compare(inputs, expected, shape)
    a["out"][0, 0] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        MOE_LAYER.compare(inputs, expected, shape)


# --- tuning specs -------------------------------------------------------------------------------------------


def test_tune_specs_name_their_kernel_and_the_launchers_knobs():
    """Each tune spec names a @triton.jit kernel of its case's kernel module (the one whose figures the tuner
    reports) and limits exactly the knobs it tunes, on a case whose launcher reports its configuration;
    route stays out of tuning (its candidates' compiles cost more than every other kernel's together)."""
    tuned = {name: case.tune for name, case in CASES.items() if case.tune is not None}
    assert set(tuned) == {"write_kv", "paged_decode", "mla_decode", "dispatch", "combine", "grouped_gemm"}
    for name, spec in tuned.items():
        assert hasattr(CASES[name].kernel_module, spec.primary), (name, spec.primary)
        assert set(spec.limits) == set(spec.tunable), name
        assert CASES[name].launch_config is not None, name


# --- Case.by_convention -------------------------------------------------------------------------------------


def test_case_by_convention_reads_the_module_and_explicit_keywords_win():
    """The launcher and its reference come from kernels/ and reference/ by the module's name, the rest from
    the namespace by conventional names (with a prefix where a module holds several cases); a keyword given
    wins; a required field nobody gives is refused as Case(...) refuses it."""
    namespace = vars(bench.operators.kv_cache)
    case = bench.operators.base.Case.by_convention(
        namespace, "write_kv", traffic_shapes=tuple, flop_model=len
    )
    assert (case.module, case.kernel, case.reference) == (
        "kv_cache",
        kernels.kv_cache.write_kv,
        reference.kv_cache.write_kv,
    )
    assert (
        case.build is namespace["build"] and case.tune is namespace["TUNE"] and case.traffic_shapes is tuple
    )
    assert case.flop_model is len  # the module's flop_model, overridden
    copy = CASES["copy_blocks"]
    assert (
        copy.build is bench.operators.kv_alloc.copy_build
        and copy.compare is bench.operators.kv_alloc.copy_compare
    )
    with pytest.raises(TypeError, match="compare"):
        bench.operators.base.Case.by_convention(
            {k: v for k, v in namespace.items() if k != "compare"}, "write_kv"
        )
    # moe_gemm.py's second case is another kernel module's: named, it gives the launcher and the module
    assert (MOE_LAYER.module, MOE_LAYER.kernel) == ("moe_layer", kernels.moe_layer.moe_layer)


def test_written_out_is_the_out_given_or_the_result_and_refuses_another_tensor():
    """compare's first step: the guards checked, then ``out`` where the caller passed it (the launcher
    returning it or nothing), the result where it did not; a launcher returning a different tensor fails."""
    out, other = torch.zeros(3), torch.ones(3)
    Inputs = bench.operators.base.Inputs
    assert Inputs({"out": out}, ("out",), result=out).written_out("k") is out
    assert Inputs({"out": out}, ("out",)).written_out("k") is out
    assert Inputs({"out": None}, ("out",), result=other).written_out("k") is other
    with pytest.raises(AssertionError, match="k: returned a tensor other than out"):
        Inputs({"out": out}, ("out",), result=other).written_out("k")
    guarded = Guarded.empty((3,), torch.float32, "cpu", guard=4)
    guarded.buffer[0] = 0.0  # a write before the output
    with pytest.raises(AssertionError, match="out: a sentinel"):
        Inputs({"out": guarded.tensor}, ("out",), {"out": guarded}).written_out("k")
