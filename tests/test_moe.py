"""route, dispatch and combine against their references: every routing rule, experts 8 to 256, top-k 1 to 8,
odd token counts, ties; alignments 1 to 128, empty experts, skewed loads, one launch and three; combine of
an identity expert gives x times the weight sum; bad input names the argument."""

import dataclasses

import pytest
import torch

import kernels.moe as moe
from bench.measure.runner import verify
from bench.operators.moe import ROUTE, RouteShape
from bench.serving.models import MOE_MODELS
from bench.testing import assert_close, forbid_allocation, generator, randn, seed_of
from reference import moe as reference
from tests import helpers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check(logits, top_k, **kw):
    weights, ids = moe.route(logits, top_k, **kw)
    want_weights, want_ids = reference.route(logits, top_k, **kw)
    assert torch.equal(ids.cpu(), want_ids.cpu()), (ids, want_ids)
    assert_close(weights.cpu(), want_weights.cpu(), "weights", dtype=torch.float32)
    return weights, ids


# Every experts x top_k x dtype at 3 tokens (a partial tile); 1 and 257 tokens (one row, several tiles) at
# the real models' geometries. tests/test_fuzz.py draws the rest of the space.
_SOFTMAX_GRID = [(3, e, k, d) for e in (8, 60, 128, 256) for k in (1, 2, 4, 8) for d in ("fp32", "bf16")] + [
    (t, e, k, d) for t in (1, 257) for e, k in ((8, 2), (128, 8)) for d in ("fp32", "bf16")
]


@pytest.mark.parametrize("tokens, experts, top_k, dtype", _SOFTMAX_GRID)
def test_softmax_top_k(tokens, experts, top_k, dtype, request):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    logits = randn((tokens, experts), dtype, DEVICE, generator(seed_of(request.node.name)), scale=2.0)
    weights, ids = check(logits, top_k)
    assert torch.allclose(weights.sum(-1), torch.ones(tokens, device=DEVICE), atol=1e-6)
    assert all(len(set(row)) == top_k for row in ids.tolist())  # no expert twice for one token


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_top_k_then_softmax(top_k, request):
    logits = randn((33, 128), torch.bfloat16, DEVICE, generator(seed_of(request.node.name)))
    check(logits, top_k, softmax_after_topk=True)


@pytest.mark.parametrize("groups, kept, top_k", [(8, 4, 8), (8, 1, 8), (4, 2, 6), (16, 3, 4)])
@pytest.mark.parametrize("experts", [64, 256])
def test_grouped_sigmoid_routing(groups, kept, top_k, experts, request):
    gen = generator(seed_of(request.node.name))
    logits = randn((19, experts), torch.bfloat16, DEVICE, gen)
    bias = randn((experts,), torch.float32, DEVICE, gen, scale=0.5)
    weights, ids = check(
        logits, top_k, scoring="sigmoid", num_groups=groups, topk_groups=kept, bias=bias, scale=2.5
    )
    assert torch.allclose(weights.sum(-1), torch.full((19,), 2.5, device=DEVICE), atol=1e-5)
    # The rule itself (docs/facts.md#moe-routing: DeepSeek-V3, arXiv 2412.19437; SGLang's
    # biased_grouped_topk), not the reference's code: a group's score is the sum of its two best biased
    # scores; the `kept` best groups win, ties to the lower group id (a stable sort); the top_k biased scores
    # inside them are chosen, ties to the lower expert id.
    biased = torch.sigmoid(logits.float().cpu()) + bias.cpu()
    _assert_group_limited(ids, biased, biased.view(19, groups, -1).topk(2, dim=-1).values.sum(-1), kept)


def _assert_group_limited(ids, choice, group_scores, kept):
    """The `kept` best groups by group_scores win, ties to the lower group id (a stable sort); the top_k
    selection scores (choice) inside them are chosen, ties to the lower expert id."""
    tokens, experts = choice.shape
    top_k = ids.shape[1]
    best_groups = torch.sort(-group_scores, dim=-1, stable=True).indices[:, :kept]
    size = experts // group_scores.shape[1]
    for token, row in enumerate(ids.long().cpu().tolist()):
        winners = set(best_groups[token].tolist())
        chosen = {e // size for e in row}
        assert len(chosen) <= kept and chosen <= winners, (token, sorted(chosen), sorted(winners))
        allowed = torch.full((experts,), float("-inf"))
        for g in winners:
            allowed[g * size : (g + 1) * size] = choice[token, g * size : (g + 1) * size]
        want = torch.sort(-allowed, stable=True).indices[:top_k].tolist()
        assert row == want, (token, row, want)


# DeepSeek-V2 (160 experts, 8 groups, 3 kept, top-6, scale 16, no renormalisation), smaller and odd ones,
# and groups of one expert (legal without a bias: a group's best score needs one).
@pytest.mark.parametrize(
    "experts, groups, kept, top_k, renormalize",
    [(160, 8, 3, 6, False), (64, 4, 2, 5, True), (24, 3, 1, 3, True), (8, 8, 3, 2, True)],
)
def test_group_limited_routing_without_a_bias_ranks_groups_by_their_best_score(
    experts, groups, kept, top_k, renormalize, request
):
    """Issue 20, item 2: DeepSeek-V2's group_limited_greedy (arXiv 2405.04434's device-limited routing; vLLM's
    grouped_topk with no e_score_correction_bias) ranks a group by its best softmax score. The old rule (the
    sum of the top-2) chose other experts for many of these tokens."""
    logits = randn((21, experts), torch.bfloat16, DEVICE, generator(seed_of(request.node.name)), scale=2.0)
    kw = {"num_groups": groups, "topk_groups": kept, "renormalize": renormalize, "scale": 16.0}
    weights, ids = check(logits, top_k, **kw)
    scores = torch.softmax(logits.float().cpu(), dim=-1)
    _assert_group_limited(ids, scores, scores.view(21, groups, -1).max(dim=-1).values, kept)
    want = scores.gather(1, ids.long().cpu())
    if renormalize:
        want = want / want.sum(-1, keepdim=True)
    assert_close(weights.cpu(), 16.0 * want, "weights", dtype=torch.float32)


def test_the_two_group_rules_disagree_by_hand():
    """Group 0 holds the best expert (logit 3), group 1 the best pair (2.5, 2.5): without a bias group 0 wins
    (its best score), with one (even all zeros) group 1 (e^3 + e^-5 < 2 e^2.5, the sum of the top-2)."""
    logits = torch.tensor([[3.0, -5.0, -5.0, -5.0, 2.5, 2.5, -5.0, -5.0]], device=DEVICE)
    kw = {"num_groups": 2, "topk_groups": 1, "renormalize": False}
    weights, ids = check(logits, 2, **kw)
    assert ids.tolist() == [[0, 1]]  # group 0's best, then the lowest id of its three -5 ties
    scores = torch.softmax(logits.float().cpu(), dim=-1)[0]
    assert_close(weights.cpu(), scores[[0, 1]][None], "weights", dtype=torch.float32)
    weights, ids = check(logits, 2, **kw, bias=torch.zeros(8, device=DEVICE))
    assert ids.tolist() == [[4, 5]]
    assert_close(weights.cpu(), scores[[4, 5]][None], "weights", dtype=torch.float32)


def test_bias_chooses_but_does_not_weigh():
    logits = torch.zeros(1, 8, device=DEVICE)
    bias = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1.0], device=DEVICE)
    weights, ids = moe.route(logits, 2, scoring="sigmoid", bias=bias, renormalize=False)
    assert ids[0, 0].item() == 7 and ids[0, 1].item() == 0  # chosen by the bias, then the lower id
    assert torch.allclose(weights, torch.full_like(weights, 0.5))  # sigmoid(0), the bias left out


def test_ties_go_to_the_lower_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 1.0]], device=DEVICE)
    _, ids = check(logits, 4)
    assert ids.tolist() == [[1, 2, 4, 0]]


INF, NAN = float("inf"), float("nan")


def _masked_bias():
    bias = torch.full((16,), -INF, device=DEVICE)
    bias[[1, 6, 13]] = 0.0  # three experts choosable, the rest masked
    return bias


# Fewer than top_k experts with a finite (or any non-NaN) selection score: ids must still be distinct.
FEW_FINITE = {
    "-inf masked, softmax top-k": ([[-INF, -INF, 3.0, -INF, 0.5, -INF, -INF, -INF]], 4, {}),
    "-inf masked, top-k then softmax": (
        [[-INF, -INF, 3.0, -INF, 0.5, -INF, -INF, -INF]],
        4,
        {"softmax_after_topk": True},
    ),
    "all -inf, top-k then softmax": ([[-INF] * 8], 3, {"softmax_after_topk": True}),
    "+inf logit, softmax (scores NaN)": ([[0.0, 1.0, INF, 2.0, 0.0, 1.0, 2.0, 3.0]], 3, {}),
    "NaN logit, softmax": ([[0.0, 1.0, NAN, 2.0, 0.0, 1.0, 2.0, 3.0]], 3, {}),
    "NaN logits, sigmoid": ([[NAN, 1.0, NAN, 2.0, NAN, NAN, NAN, NAN]], 4, {"scoring": "sigmoid"}),
    "NaN logits, top-k then softmax": (
        [[NAN, 1.0, NAN, -INF, 2.0, NAN, NAN, NAN]],
        4,
        {"softmax_after_topk": True},
    ),
    "-inf bias, grouped sigmoid": (
        [[0.5 * i - 3.0 for i in range(16)]],
        6,
        {"scoring": "sigmoid", "num_groups": 4, "topk_groups": 2, "bias": "masked"},
    ),
    "-0.0 ties 0.0": ([[0.0, -0.0, 0.0, -0.0]], 3, {"softmax_after_topk": True}),
}


# inf - inf in a softmax over all-masked (or +inf) scores is NaN by design; the interpreter's numpy says so.
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize("case", FEW_FINITE, ids=list(FEW_FINITE))
def test_ids_stay_distinct_with_masked_inf_and_nan_scores(case):
    """Issue 10, item 2: -inf-masked experts, a -inf bias, +inf or NaN logits: each token's ids are distinct,
    in the documented order (NaN after -inf, ties to the lower id), weights as the reference gives them, and a
    bad token changes no other token (nor fails the call)."""
    rows, top_k, kw = FEW_FINITE[case]
    if kw.get("bias") == "masked":
        kw = {**kw, "bias": _masked_bias()}
    clean = [[float((7 * i) % 5) - 2.0 for i in range(len(rows[0]))]]  # a healthy token beside the bad one
    logits = torch.tensor(rows + clean + rows, device=DEVICE)
    weights, ids = moe.route(logits, top_k, **kw)
    want_weights, want_ids = reference.route(logits, top_k, **kw)
    assert all(len(set(row)) == top_k for row in ids.tolist()), ids
    assert torch.equal(ids.cpu(), want_ids.cpu()), (ids, want_ids)
    torch.testing.assert_close(weights.cpu(), want_weights.cpu(), equal_nan=True, rtol=1e-6, atol=1e-6)
    alone_weights, alone_ids = moe.route(logits[1:2], top_k, **kw)
    assert torch.equal(ids[1], alone_ids[0]) and torch.equal(weights[1], alone_weights[0])


def test_the_documented_order_ranks_nan_last():
    logits = torch.tensor([[NAN, -INF, 1.0, NAN, -INF, 2.0]], device=DEVICE)
    _, ids = moe.route(logits, 6, softmax_after_topk=True)
    assert ids.tolist() == [[5, 2, 1, 4, 0, 3]]


def test_case_shapes_verify():
    for shape in ROUTE.small_shapes():
        outcome = verify(ROUTE, shape, DEVICE)
        assert outcome.ok, outcome.message


@helpers.property_test(
    lambda st: dict(
        tokens=st.integers(1, 40),
        experts=st.sampled_from([4, 8, 12, 60, 64, 128, 256]),
        top_k=st.integers(1, 8),
        seed=st.integers(0, 2**31 - 1),
        coarse=st.booleans(),
    )
)
def test_hypothesis_random_routing(tokens, experts, top_k, seed, coarse):
    top_k = min(top_k, experts)
    logits = randn((tokens, experts), torch.float32, DEVICE, generator(seed))
    if coarse:  # many exact ties
        logits = logits.round()
    check(logits, top_k)


BAD = {
    "logits 1-D": ("logits", lambda x: moe.route(x[0], 2)),
    "logits int": ("logits", lambda x: moe.route(x.to(torch.int32), 2)),
    "logits strided": ("logits", lambda x: moe.route(x.t().contiguous().t(), 2)),
    "top_k too large": ("top_k", lambda x: moe.route(x, 9)),
    "top_k zero": ("top_k", lambda x: moe.route(x, 0)),
    "scoring": ("scoring", lambda x: moe.route(x, 2, scoring="relu")),
    "groups do not divide": ("num_groups", lambda x: moe.route(x, 2, num_groups=3, topk_groups=1)),
    "groups of one with a bias": (
        "num_groups",
        lambda x: moe.route(x, 2, num_groups=8, topk_groups=2, bias=torch.zeros(8, device=DEVICE)),
    ),
    "topk_groups missing": ("topk_groups", lambda x: moe.route(x, 2, num_groups=2)),
    "topk_groups too few": ("topk_groups", lambda x: moe.route(x, 6, num_groups=4, topk_groups=2)),
    "topk_groups without groups": ("topk_groups", lambda x: moe.route(x, 2, topk_groups=2)),
    "bias shape": ("bias", lambda x: moe.route(x, 2, bias=torch.zeros(7, device=DEVICE))),
    "bias dtype": ("bias", lambda x: moe.route(x, 2, bias=torch.zeros(8, device=DEVICE).half())),
    "softmax_after_topk with groups": (
        "softmax_after_topk",
        lambda x: moe.route(x, 2, num_groups=2, topk_groups=1, softmax_after_topk=True),
    ),
    # Issue 10, item 6: these were accepted.
    "scale nan": ("scale", lambda x: moe.route(x, 2, scale=float("nan"))),
    "scale negative": ("scale", lambda x: moe.route(x, 2, scale=-1.0)),
    "scale inf": ("scale", lambda x: moe.route(x, 2, scale=float("inf"))),
    "topk_groups a bool": ("topk_groups", lambda x: moe.route(x, 2, num_groups=2, topk_groups=True)),
    "renormalize a string": ("renormalize", lambda x: moe.route(x, 2, renormalize="no")),
    "softmax_after_topk an int": ("softmax_after_topk", lambda x: moe.route(x, 2, softmax_after_topk=1)),
    "top_k a bool": ("top_k", lambda x: moe.route(x, True)),
    "logits on meta": ("logits", lambda x: moe.route(x.to("meta"), 2)),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_names_the_argument(case):
    argument, call = BAD[case]
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        call(torch.randn(5, 8, device=DEVICE))


def test_presets_route():
    for name, model in MOE_MODELS.items():
        outcome = verify(ROUTE, RouteShape(9, model), DEVICE)
        assert outcome.ok, (name, outcome.message)


# --- dispatch and combine ---------------------------------------------------------------------------------


def _routed(tokens, experts, top_k, load, seed, hidden=40, dtype=torch.bfloat16):
    from bench.operators.moe import routing_ids

    gen = generator(seed)
    ids = routing_ids(tokens, experts, top_k, load, gen).to(DEVICE)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), dim=1).to(DEVICE)
    x = randn((tokens, hidden), dtype, DEVICE, gen)
    return x, ids, weights


def check_dispatch(x, ids, experts, align):
    x_sorted, plan = moe.dispatch(x, ids, experts, align=align)
    want_rows, want = reference.dispatch(x, ids, experts, align=align)
    for field in ("tokens_per_expert", "expert_offsets", "row_token", "slot_row"):
        assert torch.equal(getattr(plan, field).cpu(), getattr(want, field).cpu()), field
    real = want.row_token >= 0
    assert torch.equal(x_sorted[real].cpu(), want_rows[real].cpu())
    offsets = plan.expert_offsets.cpu()
    assert (offsets % align == 0).all() and (offsets.diff() >= plan.tokens_per_expert.cpu()).all()
    return x_sorted, plan


# Every geometry x align at 3 tokens; 1 and 257 tokens (an empty-ish and a many-program layout) at two
# geometries and the aligns that pad most and least. tests/test_fuzz.py draws the rest of the space.
_DISPATCH_GRID = [
    (3, e, k, a) for e, k in ((8, 2), (60, 4), (128, 8), (256, 8), (256, 1)) for a in (1, 16, 64, 128)
]
_DISPATCH_GRID += [(t, e, k, a) for t in (1, 257) for e, k in ((60, 4), (256, 8)) for a in (1, 128)]


@pytest.mark.parametrize("tokens, experts, top_k, align", _DISPATCH_GRID)
def test_dispatch_matches_reference(tokens, experts, top_k, align, request):
    x, ids, _ = _routed(tokens, experts, top_k, "zipf", seed_of(request.node.name))
    check_dispatch(x, ids, experts, align)


@pytest.mark.parametrize("load", ["uniform", "zipf", "hot"])
def test_dispatch_past_one_launch(load, request):
    """Past _FUSED_PAIRS choices dispatch counts and scans in their own launches: same layout."""
    tokens = moe._FUSED_PAIRS // 8 + 37
    x, ids, _ = _routed(tokens, 128, 8, load, seed_of(request.node.name), hidden=24)
    check_dispatch(x, ids, 128, 16)


def test_empty_experts_get_empty_segments():
    x = torch.randn(5, 16, device=DEVICE)
    ids = torch.tensor([[3, 1]] * 5, dtype=torch.int32, device=DEVICE)
    _, plan = check_dispatch(x, ids, 8, 16)
    assert plan.tokens_per_expert.tolist() == [0, 5, 0, 5, 0, 0, 0, 0]
    assert plan.expert_offsets.tolist() == [0, 0, 16, 16, 32, 32, 32, 32, 32]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("align", [1, 64])
def test_combine_of_identity_experts_is_x_times_the_weight_sum(dtype, align, request):
    x, ids, weights = _routed(33, 64, 8, "uniform", seed_of(request.node.name), hidden=72, dtype=dtype)
    x_sorted, plan = moe.dispatch(x, ids, 64, align=align)
    out = moe.combine(x_sorted, weights, plan)
    assert out.dtype == dtype
    assert_close(out, (x.float() * weights.sum(1, keepdim=True)).to(dtype), "out", dtype=dtype)
    assert_close(out, reference.combine(x_sorted, weights, plan), "out vs reference", dtype=dtype)


def test_dispatch_and_combine_are_bit_identical_across_runs():
    x, ids, weights = _routed(50, 32, 4, "zipf", 3)

    def layer():
        x_sorted, plan = moe.dispatch(x, ids, 32, align=16)
        return x_sorted, moe.combine(x_sorted, weights, plan)

    (rows, out), (rows_again, out_again) = layer(), layer()
    real = reference.dispatch(x, ids, 32, align=16)[1].row_token >= 0
    assert torch.equal(rows[real], rows_again[real]) and torch.equal(out, out_again)


def test_routing_generators_and_load_statistics():
    from bench.operators.moe import load_statistics, routing_ids

    gen = generator(1)
    for load in ("uniform", "zipf", "hot"):
        ids = routing_ids(512, 64, 8, load, gen)
        assert all(len(set(row)) == 8 for row in ids.tolist())  # no expert twice for one token
    hot = load_statistics(routing_ids(512, 64, 8, "hot", gen), 64, 64)
    uniform_ids = routing_ids(512, 64, 8, "uniform", gen)
    uniform = load_statistics(uniform_ids, 64, 64)
    assert hot["max_over_mean"] > 5 > uniform["max_over_mean"]
    counts = torch.bincount(uniform_ids.reshape(-1).long(), minlength=64)
    assert uniform["padding_rows"] == int(((counts + 63) // 64 * 64 - counts).sum())
    assert load_statistics(torch.tensor([[0, 1]], dtype=torch.int32), 8, 4) == {
        "max_over_mean": 4.0,
        "empty_experts": 6,
        "padding_rows": 6,
    }


@pytest.mark.parametrize("tokens", [5, moe._FUSED_PAIRS // 8 + 3], ids=["one-launch", "three-launches"])
def test_dispatch_into_a_workspace_allocates_nothing_and_matches(tokens, monkeypatch, request):
    x, ids, _ = _routed(tokens, 64, 8, "zipf", seed_of(request.node.name), hidden=24)
    want_rows, want = moe.dispatch(x, ids, 64, align=16)
    workspace = moe.DispatchWorkspace.for_shape(tokens, 8, 64, 24, align=16, dtype=x.dtype, device=DEVICE)
    forbid_allocation(monkeypatch, moe)
    x_sorted, plan = moe.dispatch(x, ids, 64, align=16, workspace=workspace)
    monkeypatch.undo()
    assert x_sorted is workspace.x_sorted and plan.slot_row is workspace.slot_row
    for field in ("tokens_per_expert", "expert_offsets", "row_token", "slot_row"):
        assert torch.equal(getattr(plan, field), getattr(want, field)), field
    real = want.row_token >= 0
    assert torch.equal(x_sorted[real], want_rows[real])


@pytest.mark.parametrize("tokens", [5, moe._FUSED_PAIRS // 8 + 3], ids=["one-launch", "three-launches"])
def test_dispatch_plan_is_dispatchs_plan_without_the_copy(tokens, monkeypatch, request):
    """The plan a fused gather reads: dispatch's own, from one launch or three; into a workspace it
    allocates nothing and leaves the workspace's x_sorted as it was (no row is copied)."""
    _, ids, _ = _routed(tokens, 64, 8, "zipf", seed_of(request.node.name), hidden=24)
    x = torch.randn(tokens, 24, device=DEVICE)
    _, want = moe.dispatch(x, ids, 64, align=16)
    workspace = moe.DispatchWorkspace.for_shape(tokens, 8, 64, 1, align=16, device=DEVICE)
    workspace.x_sorted.fill_(float("nan"))
    for plan in (moe.dispatch_plan(ids, 64, align=16), reference.dispatch_plan(ids, 64, align=16)):
        for field in ("tokens_per_expert", "expert_offsets", "row_token", "slot_row"):
            assert torch.equal(getattr(plan, field).cpu(), getattr(want, field).cpu()), field
    forbid_allocation(monkeypatch, moe)
    plan = moe.dispatch_plan(ids, 64, align=16, workspace=workspace)
    monkeypatch.undo()
    assert plan.row_token is workspace.row_token and plan.align == 16
    assert torch.equal(plan.slot_row, want.slot_row) and torch.equal(plan.row_token, want.row_token)
    assert workspace.x_sorted.isnan().all()


@pytest.mark.parametrize("tokens", [0, 5])
def test_combine_into_out_allocates_nothing_and_matches(tokens, monkeypatch, request):
    x, ids, weights = _routed(max(tokens, 1), 16, 4, "zipf", seed_of(request.node.name), hidden=24)
    x, ids, weights = x[:tokens], ids[:tokens], weights[:tokens]
    x_sorted, plan = moe.dispatch(x, ids, 16, align=8)
    want = moe.combine(x_sorted, weights, plan)
    out = torch.full_like(want, float("nan"))
    forbid_allocation(monkeypatch, moe)
    got = moe.combine(x_sorted, weights, plan, out=out)
    monkeypatch.undo()
    assert got is out and torch.equal(out, want)
    assert torch.equal(
        reference.combine(x_sorted, weights, plan, out=torch.empty_like(want)),
        reference.combine(x_sorted, weights, plan),
    )
    for bad, why in (
        (torch.empty(tokens, 25, dtype=x.dtype, device=DEVICE), "out: expected"),
        (torch.empty(tokens, 24, dtype=torch.float32, device=DEVICE), "out: "),
        (torch.empty(24, max(tokens, 2), dtype=x.dtype, device=DEVICE).t()[: max(tokens, 2)], "out: "),
    ):
        with pytest.raises(ValueError, match=f"^{why}"):
            moe.combine(x_sorted, weights, plan, out=bad)


def test_references_take_the_same_arguments():
    import inspect

    for name in ("route", "dispatch", "dispatch_plan", "combine"):
        kernel, twin = inspect.signature(getattr(moe, name)), inspect.signature(getattr(reference, name))
        assert kernel.parameters.keys() == twin.parameters.keys(), name


def test_a_dispatch_workspace_that_does_not_fit_names_the_argument():
    x, ids, _ = _routed(300, 16, 8, "uniform", 1, hidden=24)
    good = moe.DispatchWorkspace.for_shape(300, 8, 16, 24, dtype=x.dtype, device=DEVICE)
    bad = {
        "other hidden": moe.DispatchWorkspace.for_shape(300, 8, 16, 32, dtype=x.dtype, device=DEVICE),
        "other align": moe.DispatchWorkspace.for_shape(300, 8, 16, 24, align=4, dtype=x.dtype, device=DEVICE),
        "fp32 rows": moe.DispatchWorkspace.for_shape(300, 8, 16, 24, dtype=torch.float32, device=DEVICE),
        "no chunk room": dataclasses.replace(good, chunk_prefix=good.chunk_prefix[:10]),
        "int64 slots": dataclasses.replace(good, slot_row=good.slot_row.long()),
        "a dict": vars(good),
    }
    for name, workspace in bad.items():
        with pytest.raises(ValueError, match=r"^workspace: "):
            moe.dispatch(x, ids, 16, workspace=workspace)
            pytest.fail(name)


DISPATCH_BAD = {
    "x 1-D": ("x", lambda x, ids: moe.dispatch(x[0], ids, 8)),
    "x int": ("x", lambda x, ids: moe.dispatch(x.to(torch.int32), ids, 8)),
    "ids int64": ("ids", lambda x, ids: moe.dispatch(x, ids.long(), 8)),
    "ids rows": ("ids", lambda x, ids: moe.dispatch(x, ids[:2], 8)),
    "num_experts zero": ("num_experts", lambda x, ids: moe.dispatch(x, ids, 0)),
    "align zero": ("align", lambda x, ids: moe.dispatch(x, ids, 8, align=0)),
    "weights shape": ("weights", lambda x, ids: moe.combine(*_plan(x, ids, lambda w: w[:, :1]))),
    "weights dtype": ("weights", lambda x, ids: moe.combine(*_plan(x, ids, lambda w: w.half()))),
    "plan type": ("plan", lambda x, ids: moe.combine(x, torch.ones(3, 2, device=DEVICE), "plan")),
    "y_sorted rows": ("y_sorted", lambda x, ids: moe.combine(*_plan(x, ids, lambda w: w, rows=3))),
    # Issue 10, item 4: these failed inside the kernel.
    "top_k zero": ("ids", lambda x, ids: moe.dispatch(x, ids[:, :0], 8)),
    "hidden zero": ("x", lambda x, ids: moe.dispatch(x[:, :0], ids, 8)),
    "y_sorted hidden zero": ("y_sorted", lambda x, ids: moe.combine(*_plan(x, ids, lambda w: w, hidden=0))),
    "num_experts a bool": ("num_experts", lambda x, ids: moe.dispatch(x, ids, True)),
    "align a bool": ("align", lambda x, ids: moe.dispatch(x, ids, 8, align=True)),
    "plan ids int64": ("ids", lambda x, ids: moe.dispatch_plan(ids.long(), 8)),
    "plan top_k zero": ("ids", lambda x, ids: moe.dispatch_plan(ids[:, :0], 8)),
    "plan num_experts zero": ("num_experts", lambda x, ids: moe.dispatch_plan(ids, 0)),
    "plan align zero": ("align", lambda x, ids: moe.dispatch_plan(ids, 8, align=0)),
}


def _plan(x, ids, change_weights, rows=None, hidden=None):
    x_sorted, plan = moe.dispatch(x, ids, 8)
    weights = change_weights(torch.full(ids.shape, 0.5, device=DEVICE))
    return x_sorted[:rows, :hidden], weights, plan


@pytest.mark.parametrize("case", DISPATCH_BAD, ids=list(DISPATCH_BAD))
def test_dispatch_and_combine_bad_input(case):
    argument, call = DISPATCH_BAD[case]
    x = torch.randn(3, 16, device=DEVICE)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        call(x, ids)


def test_a_token_naming_one_expert_twice_gets_two_rows():
    x = torch.randn(3, 16, device=DEVICE)
    ids = torch.tensor([[7, 7], [1, 7], [7, 1]], dtype=torch.int32, device=DEVICE)
    check_dispatch(x, ids, 8, 4)


def test_ids_out_of_range_are_dropped_not_written_through():
    x = torch.randn(4, 16, device=DEVICE)
    ids = torch.tensor([[0, 9], [1, -3], [2, 3], [8, 7]], dtype=torch.int32, device=DEVICE)
    x_sorted, plan = moe.dispatch(x, ids, 8, align=4)
    assert plan.slot_row[:, 1].tolist()[:2] == [-1, -1] and plan.slot_row[3, 0].item() == -1
    assert plan.tokens_per_expert.sum().item() == 5
    out = moe.combine(x_sorted, torch.full((4, 2), 0.5, device=DEVICE), plan)
    torch.testing.assert_close(out[0], x[0] * 0.5)  # the dropped choice adds nothing


def test_opt_in_id_check():
    moe.check_ids_in_range(torch.tensor([[0, 7]], dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="^ids: .* got 8"):
        moe.check_ids_in_range(torch.tensor([[0, 8]], dtype=torch.int32), 8)
    # Issue 10, item 6: float ids passed, a list raised AttributeError.
    for bad in (torch.tensor([[0.5, 7.0]]), [[0, 7]], torch.zeros(1, 2, dtype=torch.int32, device="meta")):
        with pytest.raises(ValueError, match="^ids: "):
            moe.check_ids_in_range(bad, 8)
    with pytest.raises(ValueError, match="^num_experts: "):
        moe.check_ids_in_range(torch.tensor([[0, 7]], dtype=torch.int32), 8.0)


@pytest.mark.gpu
def test_dispatch_and_combine_replay_in_a_cuda_graph_with_a_workspace():
    """A decode step's MoE shuffle under a CUDA graph: dispatch writes into a workspace allocated once;
    replays with new ids and rows give the reference's layout."""
    tokens, experts, top_k, hidden = 64, 256, 8, 512
    x, ids, weights = _routed(tokens, experts, top_k, "uniform", 1, hidden=hidden)
    workspace = moe.DispatchWorkspace.for_shape(tokens, top_k, experts, hidden, align=16, device="cuda")
    out = torch.empty_like(x)
    rows, first = moe.dispatch(x, ids, experts, align=16, workspace=workspace)  # compile outside the capture
    moe.combine(rows, weights, first, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x_sorted, plan = moe.dispatch(x, ids, experts, align=16, workspace=workspace)
        moe.combine(x_sorted, weights, plan, out=out)  # identity experts: rows straight back
    for seed in (2, 3):
        new_x, new_ids, _ = _routed(tokens, experts, top_k, "zipf", seed, hidden=hidden)
        x.copy_(new_x)
        ids.copy_(new_ids)
        graph.replay()
        want_rows, want = reference.dispatch(x, ids, experts, align=16)
        for field in ("tokens_per_expert", "expert_offsets", "row_token", "slot_row"):
            assert torch.equal(getattr(plan, field), getattr(want, field)), field
        real = want.row_token >= 0
        assert torch.equal(x_sorted[real], want_rows[real])
        assert_close(out, reference.combine(want_rows, weights, want), "out", dtype=torch.bfloat16)
