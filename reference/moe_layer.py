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
    w13_scale=None,
    w2_scale=None,
    align=1,
    fused_gather=True,
    out=None,
    **routing,
):
    """Returns out [tokens, hidden] in x's dtype; ``routing`` goes to route as given; ``fused_gather``
    picks the gather or dispatch's copy."""
    weights, ids = moe.route(router_logits, top_k, **routing)
    experts = w13.shape[0]
    if fused_gather:
        plan = moe.dispatch_plan(ids, experts, align=align)
        rows = x
    else:
        rows, plan = moe.dispatch(x, ids, experts, align=align)
    hidden = grouped_gemm(rows, w13, plan, gather=fused_gather, activation="silu_and_mul", w_scale=w13_scale)
    y = grouped_gemm(hidden, w2, plan, w_scale=w2_scale)
    return moe.combine(y, weights, plan, out=out)
