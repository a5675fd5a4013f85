"""route against its reference: every routing rule, experts 8 to 256, top-k 1 to 8, odd token counts, ties,
bf16/fp16/fp32 logits; bad input names the argument. (dispatch and combine are not built yet.)"""

import pytest
import torch

import kernels.moe as moe
from bench.cases.moe import ROUTE, RouteShape
from bench.models import MOE_MODELS, MoEModel
from bench.runner import verify
from bench.testing import assert_close, generator, randn, seed_of
from reference import moe as reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check(logits, top_k, **kw):
    weights, ids = moe.route(logits, top_k, **kw)
    want_weights, want_ids = reference.route(logits, top_k, **kw)
    assert torch.equal(ids.cpu(), want_ids.cpu()), (ids, want_ids)
    assert_close(weights.cpu(), want_weights.cpu(), "weights", dtype=torch.float32)
    return weights, ids


@pytest.mark.parametrize("tokens", [1, 3, 257])
@pytest.mark.parametrize("experts", [8, 60, 128, 256])
@pytest.mark.parametrize("top_k", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_softmax_top_k(tokens, experts, top_k, dtype, request):
    logits = randn((tokens, experts), dtype, DEVICE, generator(seed_of(request.node.name)), scale=2.0)
    weights, ids = check(logits, top_k)
    assert torch.allclose(weights.sum(-1), torch.ones(tokens, device=DEVICE), atol=1e-6)
    assert (ids[:, 1:] != ids[:, :1]).all() if top_k > 1 else True


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
    chosen_groups = (ids.long() // (experts // groups)).unique(dim=None)
    assert chosen_groups.numel() <= kept * 19


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


def test_case_shapes_verify():
    for shape in ROUTE.small_shapes():
        outcome = verify(ROUTE, shape, DEVICE)
        assert outcome.ok, outcome.message


def test_hypothesis_random_routing():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.given(
        tokens=st.integers(1, 40),
        experts=st.sampled_from([4, 8, 12, 60, 64, 128, 256]),
        top_k=st.integers(1, 8),
        seed=st.integers(0, 2**31 - 1),
        coarse=st.booleans(),
    )
    def run(tokens, experts, top_k, seed, coarse):
        top_k = min(top_k, experts)
        logits = randn((tokens, experts), torch.float32, DEVICE, generator(seed))
        if coarse:  # many exact ties
            logits = logits.round()
        check(logits, top_k)

    run()


BAD = {
    "logits 1-D": ("logits", lambda x: moe.route(x[0], 2)),
    "logits int": ("logits", lambda x: moe.route(x.to(torch.int32), 2)),
    "logits strided": ("logits", lambda x: moe.route(x.t().contiguous().t(), 2)),
    "top_k too large": ("top_k", lambda x: moe.route(x, 9)),
    "top_k zero": ("top_k", lambda x: moe.route(x, 0)),
    "scoring": ("scoring", lambda x: moe.route(x, 2, scoring="relu")),
    "groups do not divide": ("num_groups", lambda x: moe.route(x, 2, num_groups=3, topk_groups=1)),
    "groups of one": ("num_groups", lambda x: moe.route(x, 2, num_groups=8, topk_groups=2)),
    "topk_groups missing": ("topk_groups", lambda x: moe.route(x, 2, num_groups=2)),
    "topk_groups too few": ("topk_groups", lambda x: moe.route(x, 6, num_groups=4, topk_groups=2)),
    "topk_groups without groups": ("topk_groups", lambda x: moe.route(x, 2, topk_groups=2)),
    "bias shape": ("bias", lambda x: moe.route(x, 2, bias=torch.zeros(7, device=DEVICE))),
    "bias dtype": ("bias", lambda x: moe.route(x, 2, bias=torch.zeros(8, device=DEVICE).half())),
    "softmax_after_topk with groups": (
        "softmax_after_topk",
        lambda x: moe.route(x, 2, num_groups=2, topk_groups=1, softmax_after_topk=True),
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_names_the_argument(case):
    argument, call = BAD[case]
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        call(torch.randn(5, 8, device=DEVICE))


def test_presets_route():
    for name, model in MOE_MODELS.items():
        outcome = verify(ROUTE, RouteShape(name, 9, model), DEVICE)
        assert outcome.ok, (name, outcome.message)
    assert isinstance(MoEModel("x", 1, 8, 2, 1), MoEModel)
