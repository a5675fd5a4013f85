"""A whole MoE layer from the pieces: route, dispatch (or the gather fused into the first GEMM), the
experts' gate-up GEMM with silu_and_mul, their down GEMM, and combine.

Layouts:
    x              [tokens, hidden] fp16 or bf16
    router_logits  [tokens, E] (route's logits)
    w13            [E, 2 x I, hidden]: gate then up rows (vLLM's w13), a's dtype or fp8 with w13_scale
    w2             [E, hidden, I]: down, a's dtype or fp8 with w2_scale
    out            [tokens, hidden] in x's dtype

Where the time goes at decode (one token, DeepSeek-R1: 8 of 256 experts, hidden 7168, I 2048, fp8): the
two GEMMs read the 8 touched experts' weights, 3 x 7168 x 2048 bytes each (44 MB each, 352 MB together),
against a few kilobytes of rows; routing, dispatch and combine move kilobytes. The layer is a weight read,
and it runs at the GPU's memory bandwidth (about 75 us at 4.8 TB/s) when nothing else gets in the way.
With more tokens the touched experts grow towards all of them (a batch of 64 touches most of 256
experts) while the weight bytes stop growing: each expert's rows then share one read of its weights, and
past about a hundred rows an expert the GEMMs turn compute-bound (kernels/moe_gemm.py's model).
``fused_gather`` (default) skips dispatch's copy of x: the first GEMM reads each token's row itself.
"""

import torch

from kernels import moe
from kernels._checks import check_contiguous, check_int, check_tensor
from kernels.moe_gemm import A_DTYPES, check_weights, grouped_gemm


def check_layer(x, router_logits, w13, w2, w13_scale, w2_scale, out) -> None:
    """Shapes, dtypes and devices of a layer's tensors against each other (metadata only), so a bad one
    fails before route launches anything."""
    check_tensor("x", x, ndim=2, dtypes=A_DTYPES)
    check_tensor("router_logits", router_logits, ndim=2, device=x.device)
    tokens, hidden = x.shape
    if x.stride(1) != 1 and hidden > 1:  # grouped_gemm's rows (it would name them a)
        raise ValueError(f"x: expected rows contiguous (stride 1), got strides {x.stride()}")
    if router_logits.shape[0] != tokens:
        raise ValueError(
            f"router_logits: expected {tokens} rows (x's tokens), got {tuple(router_logits.shape)}"
        )
    experts = router_logits.shape[1]
    names13, names2 = ("w13", "w13_scale"), ("w2", "w2_scale")
    device = x.device
    inner = check_weights(
        w13, w13_scale, "silu_and_mul", k=hidden, dtype=x.dtype, device=device, names=names13
    )
    check_weights(w2, w2_scale, None, k=inner, dtype=x.dtype, device=device, names=names2)
    for name, w in (("w13", w13), ("w2", w2)):
        if w.shape[0] != experts:
            raise ValueError(
                f"{name}: expected {experts} experts (router_logits' columns), got {tuple(w.shape)}"
            )
    if w2.shape[1] != hidden:
        raise ValueError(f"w2: expected [E, {hidden}, {inner}] (hidden x I), got {tuple(w2.shape)}")
    if out is not None:
        check_tensor("out", out, ndim=2, dtypes=(x.dtype,), device=device)
        check_contiguous("out", out)
        if tuple(out.shape) != (tokens, hidden):
            raise ValueError(f"out: expected {(tokens, hidden)} like x, got {tuple(out.shape)}")


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
) -> torch.Tensor:
    """out [tokens, hidden] = sum over each token's top_k experts e of weight x w2[e] @ (silu(gate) * up),
    gate and up from w13[e] @ x. ``routing``: moe.route's keywords (scoring, renormalize, num_groups,
    topk_groups, bias, scale, softmax_after_topk), passed to it as given; ``align`` is dispatch's; ``out`` a
    caller-owned result. No host sync (the intermediate rows are allocated, max_rows of them: known from
    shapes)."""
    check_layer(x, router_logits, w13, w2, w13_scale, w2_scale, out)
    check_int("align", align, 1, 1024)  # dispatch's bound, checked here before route launches
    if not isinstance(fused_gather, bool):
        raise ValueError(f"fused_gather: expected a bool, got {fused_gather!r}")
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
