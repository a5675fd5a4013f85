"""Plain-torch twin of kernels/moe_layer.py: route, dispatch, the experts' GEMMs and combine from the
references, in fp32 with each stage's output in x's dtype as the kernels write it."""

from reference import moe
from reference.moe_gemm import grouped_gemm


def moe_layer(
    x,
    router_logits,
    w13,
    w2,
    *,
    top_k,
    scoring="softmax",
    renormalize=True,
    num_groups=None,
    topk_groups=None,
    bias=None,
    scale=1.0,
    softmax_after_topk=False,
    w13_scale=None,
    w2_scale=None,
    align=1,
    fused_gather=True,
    out=None,
):
    """Returns out [tokens, hidden] in x's dtype; ``fused_gather`` picks the gather or dispatch's copy."""
    weights, ids = moe.route(
        router_logits,
        top_k,
        scoring=scoring,
        renormalize=renormalize,
        num_groups=num_groups,
        topk_groups=topk_groups,
        bias=bias,
        scale=scale,
        softmax_after_topk=softmax_after_topk,
    )
    experts = w13.shape[0]
    if fused_gather:
        plan = moe.dispatch_plan(ids, experts, align=align)
        rows = x
    else:
        rows, plan = moe.dispatch(x, ids, experts, align=align)
    hidden = grouped_gemm(rows, w13, plan, gather=fused_gather, activation="silu_and_mul", w_scale=w13_scale)
    y = grouped_gemm(hidden, w2, plan, w_scale=w2_scale)
    return moe.combine(y, weights, plan, out=out)
