"""Every public function through bad input: wrong dtype, rank, shape, device (a 'meta' tensor stands for a
wrong device on a CPU box), contiguity, bools for ints, NaN and inf scalars, zero sizes, outputs or
workspace buffers sharing memory with each other or with an input, workspace constructors' sizes no call
can use. Each must raise ValueError naming the argument, with every output, cache, workspace and pool left
bit for bit as it was.

A valid call per function is built first (and run once, so the table cannot pass on a call that fails
anyway); each row changes one argument of it.
"""

import dataclasses

import pytest
import torch

from kernels import _checks, ep, kv_alloc, kv_cache, mla_attention, moe, paged_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
NAN, INF = float("nan"), float("inf")


def _t(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def _randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values, last dimension at stride 2 (not contiguous)."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


def _rows_strided(x: torch.Tensor) -> torch.Tensor:
    """The same values, first dimension at a padded stride (rows not packed)."""
    wide = torch.zeros(x.shape[0], 2 * x[0].numel(), dtype=x.dtype, device=x.device)
    wide[:, : x[0].numel()] = x.reshape(x.shape[0], -1)
    return wide[:, : x[0].numel()].view(x.shape) if x.dim() == 2 else wide[:, : x[0].numel()]


# --- valid calls ------------------------------------------------------------------------------------------


def write_kv_args(cache_dtype=torch.bfloat16):
    key = _randn(3, 2, 8, dtype=torch.bfloat16)
    args = {
        "key": key,
        "value": _randn(3, 2, 8, dtype=torch.bfloat16, seed=1),
        "k_cache": torch.zeros(4, 2, 2, 8, dtype=cache_dtype, device=DEVICE),
        "v_cache": torch.zeros(4, 2, 2, 8, dtype=cache_dtype, device=DEVICE),
        "slot_mapping": _t([0, 5, -1], torch.int64),
    }
    if cache_dtype == FP8:
        args.update(k_scale=0.5, v_scale=2.0)
    return args


def paged_args(cache_dtype=torch.bfloat16):
    return {
        "q": _randn(2, 4, 8, dtype=torch.bfloat16),
        "k_cache": _randn(5, 4, 2, 8, dtype=torch.bfloat16).to(cache_dtype),
        "v_cache": _randn(5, 4, 2, 8, dtype=torch.bfloat16, seed=1).to(cache_dtype),
        "block_tables": _t([[0, 3], [4, 1]]),
        "seq_lens": _t([6, 3]),
        "out": torch.zeros(2, 4, 8, dtype=torch.bfloat16, device=DEVICE),
        **({"k_scale": 0.5, "v_scale": 2.0} if cache_dtype == FP8 else {}),
    }


def paged_workspace_args():
    workspace = paged_attention.paged_decode_workspace(2, 4, 8, max_splits=2, device=DEVICE)
    return {**paged_args(), "num_splits": 2, "workspace": workspace}


def mla_args():
    return {
        "q": _randn(2, 4, 24, dtype=torch.bfloat16),
        "kv_cache": _randn(5, 4, 1, 24, dtype=torch.bfloat16, seed=1),
        "block_tables": _t([[0, 3], [4, 1]]),
        "seq_lens": _t([6, 3]),
        "v_head_dim": 16,
        "num_splits": 2,
        "out": torch.zeros(2, 4, 16, dtype=torch.bfloat16, device=DEVICE),
        "workspace": mla_attention.mla_decode_workspace(2, 4, 16, max_splits=2, device=DEVICE),
    }


def _partials_sharing_memory(batch, heads, splits, width):
    """A decode workspace whose partial_lse starts inside partial_out's last row."""
    rows = batch * heads * splits
    shared = torch.zeros(rows * width + rows, device=DEVICE)
    partial_out = shared[: rows * width].view(batch, heads, splits, width)
    partial_lse = shared[rows * width - 4 : rows * width - 4 + rows].view(batch, heads, splits)
    return paged_attention.PagedDecodeWorkspace(partial_out, partial_lse)


def _replace_workspace(**fields):
    """The call's workspace with some buffers replaced: ``fields`` maps a name to f(workspace, args)."""

    def change(a):
        ws = a["workspace"]
        return {**a, "workspace": dataclasses.replace(ws, **{k: f(ws, a) for k, f in fields.items()})}

    return change


def check_paged_args():
    args = paged_args()
    return {k: args[k] for k in ("k_cache", "block_tables", "seq_lens")}


def route_args(**kw):
    return {"logits": _randn(5, 8), "top_k": 2, **kw}


def grouped_route_args():
    return route_args(scoring="sigmoid", num_groups=2, topk_groups=1, bias=_randn(8, seed=2), scale=2.5)


def dispatch_args():
    return {"x": _randn(3, 16), "ids": _t([[0, 1], [2, 3], [4, 5]]), "num_experts": 8, "align": 4}


def dispatch_workspace_args():
    workspace = moe.DispatchWorkspace.for_shape(3, 2, 8, 16, align=4, dtype=torch.float32, device=DEVICE)
    return {**dispatch_args(), "workspace": workspace}


def dispatch_workspace_sizes():
    return {"num_tokens": 3, "top_k": 2, "num_experts": 8, "hidden": 16, "align": 4, "device": DEVICE}


def ep_workspace_sizes():
    return {**dispatch_workspace_sizes(), "world_size": 2, "max_tokens_per_rank": 4, "dtype": torch.float32}


def decode_workspace_sizes(heads="num_q_heads", width="head_dim"):
    return {"batch": 2, heads: 4, width: 16, "max_splits": 2, "device": DEVICE}


def combine_args():
    x_sorted, plan = moe.dispatch(**dispatch_args())
    return {"y_sorted": x_sorted, "weights": torch.full((3, 2), 0.5, device=DEVICE), "plan": plan}


def pool():
    p = kv_alloc.KVBlockPool(8, 4, 4, 4, device=DEVICE)
    kv_alloc.allocate(p, _t([0]), 5)
    return p


def copy_blocks_args():
    return {
        "k_cache": _randn(4, 2, 1, 8),
        "v_cache": _randn(4, 2, 1, 8, seed=1),
        "copies": _t([[0, 2], [1, 3]]),
    }


def pool_args():
    return {"num_blocks": 8, "block_size": 4, "max_seqs": 4, "max_blocks_per_seq": 4, "device": DEVICE}


FUNCTIONS = {
    "write_kv": (lambda a: kv_cache.write_kv(**a), write_kv_args),
    "write_kv fp8": (lambda a: kv_cache.write_kv(**a), lambda: write_kv_args(FP8)),
    "paged_decode": (lambda a: paged_attention.paged_decode(**a), paged_args),
    "paged_decode fp8": (lambda a: paged_attention.paged_decode(**a), lambda: paged_args(FP8)),
    "paged_decode workspace": (lambda a: paged_attention.paged_decode(**a), paged_workspace_args),
    "paged_decode_workspace": (
        lambda a: paged_attention.paged_decode_workspace(**a),
        decode_workspace_sizes,
    ),
    "mla_decode": (lambda a: mla_attention.mla_decode(**a), mla_args),
    "mla_decode_workspace": (
        lambda a: mla_attention.mla_decode_workspace(**a),
        lambda: decode_workspace_sizes("num_heads", "v_head_dim"),
    ),
    "check_paged_inputs": (lambda a: paged_attention.check_paged_inputs(**a), check_paged_args),
    "route": (lambda a: moe.route(**a), route_args),
    "route grouped": (lambda a: moe.route(**a), grouped_route_args),
    "dispatch": (lambda a: moe.dispatch(**a), dispatch_args),
    "dispatch workspace": (lambda a: moe.dispatch(**a), dispatch_workspace_args),
    "DispatchWorkspace.for_shape": (lambda a: moe.DispatchWorkspace.for_shape(**a), dispatch_workspace_sizes),
    "EPWorkspace.for_shape": (lambda a: ep.EPWorkspace.for_shape(**a), ep_workspace_sizes),
    "combine": (lambda a: moe.combine(**a), combine_args),
    "check_ids_in_range": (
        lambda a: moe.check_ids_in_range(**a),
        lambda: {"ids": _t([[0, 7]]), "num_experts": 8},
    ),
    "KVBlockPool": (lambda a: kv_alloc.KVBlockPool(**a), pool_args),
    "allocate": (
        lambda a: kv_alloc.allocate(**a),
        lambda: {"pool": pool(), "seq_ids": _t([1, 2]), "num_new_tokens": 2},
    ),
    "allocate counts": (
        lambda a: kv_alloc.allocate(**a),
        lambda: {"pool": pool(), "seq_ids": _t([1, 2]), "num_new_tokens": _t([2, 1]), "num_tokens": 3},
    ),
    "fork": (lambda a: kv_alloc.fork(**a), lambda: {"pool": pool(), "src": _t([0]), "dst": _t([1])}),
    "free": (lambda a: kv_alloc.free(**a), lambda: {"pool": pool(), "seq_ids": _t([0])}),
    "copy_blocks": (lambda a: kv_alloc.copy_blocks(**a), copy_blocks_args),
}

# --- the table: (function, argument named in the error, change) -------------------------------------------

FLOAT_TO_INT = lambda x: x.to(torch.int32)  # noqa: E731
INT_TO_FLOAT = lambda x: x.float()  # noqa: E731
TO_BOOL = lambda x: x.to(torch.bool)  # noqa: E731
RANK_UP = lambda x: x.unsqueeze(0)  # noqa: E731
META = lambda x: x.to("meta")  # noqa: E731
HEAD_DIM_2048 = lambda x: x.repeat(*(1,) * (x.dim() - 1), 2048 // x.shape[-1])  # noqa: E731


def _rows(table):
    return {
        f"{fn}: {arg} {what}": (fn, arg, change) for fn, rows in table.items() for arg, what, change in rows
    }


def _set(**values):
    return lambda a: {**a, **values}


def _map(name, f, **also):
    return lambda a: {**a, name: f(a[name]), **{k: g(a[k]) for k, g in also.items()}}


def _metadata(name, dtype, rank=RANK_UP, bools=False, strided=False):
    """The rows every tensor argument gets: ``name`` in a wrong dtype (``dtype`` changes it), of the wrong
    rank (``rank``), on another device; with ``bools``, as bools (an integer argument); with ``strided``, not
    contiguous."""
    return [
        (name, "dtype", _map(name, dtype)),
        *([(name, "bools", _map(name, TO_BOOL))] if bools else []),
        (name, "rank", _map(name, rank)),
        (name, "device", _map(name, META)),
        *([(name, "contiguity", _map(name, _strided))] if strided else []),
    ]


BAD = _rows(
    {
        "write_kv": [
            *_metadata("key", FLOAT_TO_INT),
            ("key", "heads not packed", _map("key", _strided)),
            ("key", "zero heads", _map("key", lambda x: x[:, :0], k_cache=lambda c: c[:, :, :0])),
            ("value", "dtype", _map("value", lambda x: x.half())),
            ("value", "tokens", _map("value", lambda x: x[:2])),
            *_metadata("k_cache", FLOAT_TO_INT, rank=lambda x: x.flatten(0, 1), strided=True),
            ("k_cache", "head_dim", _map("k_cache", lambda x: x[..., :4].contiguous())),
            ("v_cache", "device", _map("v_cache", META)),
            ("v_cache", "blocks", _map("v_cache", lambda x: x[:3])),
            *_metadata("slot_mapping", INT_TO_FLOAT, bools=True, strided=True),
            ("slot_mapping", "length", _map("slot_mapping", lambda x: x[:2])),
            ("k_scale", "on a bf16 cache", _set(k_scale=0.5)),
        ],
        "write_kv fp8": [
            ("k_scale", "nan", _set(k_scale=NAN)),
            ("k_scale", "inf", _set(k_scale=INF)),
            ("k_scale", "a bool", _set(k_scale=True)),
            ("v_scale", "zero", _set(v_scale=0.0)),
            ("v_scale", "-inf", _set(v_scale=-INF)),
            ("k_scale", "int tensor", _set(k_scale=_t([1]))),
            (
                "k_scale",
                "meta tensor",
                _set(k_scale=torch.ones(1, device="meta"), v_scale=torch.ones(1, device="meta")),
            ),
        ],
        "paged_decode": [
            *_metadata("q", INT_TO_FLOAT),
            ("q", "head_dim strided", _map("q", _strided)),
            ("q", "zero heads", _map("q", lambda x: x[:, :0])),
            (
                "q",
                "zero head_dim",
                _map("q", lambda x: x[..., :0], k_cache=lambda c: c[..., :0], v_cache=lambda c: c[..., :0]),
            ),
            # Head tiles serve any group; a head of 2048 is too wide even for a 16-head tile.
            ("q", "head_dim 2048", _map("q", HEAD_DIM_2048, k_cache=HEAD_DIM_2048, v_cache=HEAD_DIM_2048)),
            ("k_cache", "dtype", _map("k_cache", FLOAT_TO_INT)),
            ("k_cache", "device", _map("k_cache", META)),
            ("k_cache", "contiguity", _map("k_cache", _strided)),
            ("k_cache", "zero block_size", _map("k_cache", lambda x: x[:, :0], v_cache=lambda x: x[:, :0])),
            (
                "k_cache",
                "zero kv heads",
                _map("k_cache", lambda x: x[:, :, :0], v_cache=lambda x: x[:, :, :0]),
            ),
            ("v_cache", "shape", _map("v_cache", lambda x: x[:4])),
            *_metadata("block_tables", lambda x: x.long(), rank=lambda x: x[0], bools=True),
            ("block_tables", "rows strided", _map("block_tables", lambda x: x.t().contiguous().t())),
            ("seq_lens", "dtype", _map("seq_lens", INT_TO_FLOAT)),
            ("seq_lens", "device", _map("seq_lens", META)),
            ("seq_lens", "contiguity", _map("seq_lens", _strided)),
            ("seq_lens", "batch", _map("seq_lens", lambda x: x[:1])),
            ("scale", "nan", _set(scale=NAN)),
            ("scale", "inf", _set(scale=INF)),
            ("scale", "a bool", _set(scale=True)),
            ("num_splits", "a bool", _set(num_splits=True)),
            ("num_splits", "zero", _set(num_splits=0)),
            ("out", "dtype", _map("out", lambda x: x.float())),
            ("out", "device", _map("out", META)),
            ("out", "contiguity", _map("out", _strided)),
        ],
        # Issue 20, item 4: overlapping partials gave inf; an out over q or a cache, rows read after written.
        "paged_decode workspace": [
            (
                "workspace.partial_out",
                "over partial_lse",
                _set(workspace=_partials_sharing_memory(2, 4, 2, 8)),
            ),
            ("out", "over q", lambda a: {**a, "out": a["q"]}),
            (
                "out",
                "over the workspace",
                lambda a: {
                    **a,
                    "out": a["workspace"].partial_out.view(torch.bfloat16).view(-1)[:64].view(2, 4, 8),
                },
            ),
            (
                "workspace.partial_lse",
                "over v_cache",
                _replace_workspace(partial_lse=lambda ws, a: a["v_cache"].view(torch.float32).view(-1)[:16]),
            ),
        ],
        "paged_decode_workspace": [
            ("batch", "negative", _set(batch=-1)),
            ("num_q_heads", "zero", _set(num_q_heads=0)),
            ("head_dim", "zero", _set(head_dim=0)),
            ("head_dim", "a float", _set(head_dim=16.0)),
            ("head_dim", "wider than paged_decode takes", _set(head_dim=1025)),
            ("max_splits", "a bool", _set(max_splits=True)),
            ("device", "unknown", _set(device="nope")),
            ("device", "meta", _set(device="meta")),
        ],
        "mla_decode": [
            (
                "workspace.partial_out",
                "over partial_lse",
                _set(workspace=_partials_sharing_memory(2, 4, 2, 16)),
            ),
            ("out", "over kv_cache", lambda a: {**a, "out": a["kv_cache"].view(-1)[:128].view(2, 4, 16)}),
            ("out", "over q", lambda a: {**a, "out": a["q"].view(-1)[:128].view(2, 4, 16)}),
        ],
        # Issue 20, item 5: errors named head_dim and num_q_heads; zero heads built a workspace no call takes.
        "mla_decode_workspace": [
            ("num_heads", "zero", _set(num_heads=0)),
            ("num_heads", "a bool", _set(num_heads=True)),
            ("v_head_dim", "negative", _set(v_head_dim=-1)),
            ("v_head_dim", "wider than a program holds", _set(v_head_dim=4096)),
            ("device", "meta", _set(device="meta")),
        ],
        "paged_decode fp8": [
            ("k_scale", "inf", _set(k_scale=INF)),
            ("v_scale", "nan", _set(v_scale=NAN)),
        ],
        "check_paged_inputs": [
            ("k_cache", "rank", _map("k_cache", lambda x: x[0])),
            ("k_cache", "zero block_size", _map("k_cache", lambda x: x[:, :0])),
            *_metadata("block_tables", INT_TO_FLOAT, rank=lambda x: x[0]),
            ("seq_lens", "batch", _map("seq_lens", lambda x: x[:1])),
            ("seq_lens", "bools", _map("seq_lens", TO_BOOL)),
        ],
        "route": [
            *_metadata("logits", FLOAT_TO_INT),
            ("logits", "experts strided", _map("logits", _strided)),
            ("logits", "zero experts", _map("logits", lambda x: x[:, :0])),
            ("top_k", "a bool", _set(top_k=True)),
            ("top_k", "zero", _set(top_k=0)),
            ("top_k", "a float", _set(top_k=2.0)),
            ("scale", "nan", _set(scale=NAN)),
            ("scale", "inf", _set(scale=INF)),
            ("scale", "negative", _set(scale=-1.0)),
            ("renormalize", "a string", _set(renormalize="no")),
            ("scoring", "unknown", _set(scoring="relu")),
            ("topk_groups", "without groups", _set(topk_groups=1)),
            ("num_groups", "a bool", _set(num_groups=True)),
        ],
        "route grouped": [
            ("topk_groups", "a bool", _set(topk_groups=True)),
            *_metadata("bias", lambda x: x.half(), strided=True),
        ],
        "dispatch": [
            *_metadata("x", FLOAT_TO_INT),
            ("x", "hidden strided", _map("x", _strided)),
            ("x", "zero hidden", _map("x", lambda x: x[:, :0])),
            ("ids", "dtype", _map("ids", lambda x: x.long())),
            ("ids", "bools", _map("ids", TO_BOOL)),
            ("ids", "device", _map("ids", META)),
            ("ids", "contiguity", _map("ids", _strided)),
            ("ids", "zero top_k", _map("ids", lambda x: x[:, :0])),
            ("ids", "tokens", _map("ids", lambda x: x[:2])),
            ("num_experts", "a bool", _set(num_experts=True)),
            ("num_experts", "zero", _set(num_experts=0)),
            ("align", "a bool", _set(align=True)),
            ("align", "a float", _set(align=4.0)),
        ],
        # Issue 20, item 4: a workspace buffer over another, or over x or ids.
        "dispatch workspace": [
            ("workspace.x_sorted", "over x", lambda a: {**a, "x": a["workspace"].x_sorted[:3]}),
            (
                "workspace.row_token",
                "over slot_row",
                _replace_workspace(slot_row=lambda ws, a: ws.row_token[:6].view(3, 2)),
            ),
            ("workspace.slot_row", "over ids", lambda a: {**a, "ids": a["workspace"].slot_row}),
        ],
        # Issue 20, item 5: these ended in ZeroDivisionError, a torch error, or a workspace no call takes.
        "DispatchWorkspace.for_shape": [
            ("num_tokens", "negative", _set(num_tokens=-1)),
            ("num_tokens", "2^31 rows", _set(num_tokens=2**30)),
            ("top_k", "zero", _set(top_k=0)),
            ("num_experts", "zero", _set(num_experts=0)),
            ("num_experts", "past MAX_EXPERTS", _set(num_experts=4096)),
            ("hidden", "zero", _set(hidden=0)),
            ("align", "zero", _set(align=0)),
            ("align", "a bool", _set(align=True)),
            ("dtype", "int32", _set(dtype=torch.int32)),
            ("dtype", "a string", _set(dtype="bfloat16")),
            ("device", "unknown", _set(device="nope")),
            ("device", "meta", _set(device="meta")),
        ],
        "EPWorkspace.for_shape": [
            ("world_size", "zero", _set(world_size=0)),
            ("num_experts", "not a multiple of world_size", _set(world_size=3)),
            ("max_tokens_per_rank", "below num_tokens", _set(max_tokens_per_rank=2)),
            ("max_tokens_per_rank", "None", _set(max_tokens_per_rank=None)),
            ("dedup", "a string", _set(dedup="yes")),
            ("top_k", "negative", _set(top_k=-2)),
            ("hidden", "a float", _set(hidden=16.0)),
            ("dtype", "float64", _set(dtype=torch.float64)),
            ("device", "meta", _set(device="meta")),
        ],
        "combine": [
            # Issue 20, item 4: out=y_sorted[:T] was off by up to 2.4.
            ("out", "over y_sorted", lambda a: {**a, "out": a["y_sorted"][:3]}),
            ("y_sorted", "dtype", _map("y_sorted", FLOAT_TO_INT)),
            ("y_sorted", "device", _map("y_sorted", META)),
            ("y_sorted", "contiguity", _map("y_sorted", _strided)),
            ("y_sorted", "zero hidden", _map("y_sorted", lambda x: x[:, :0])),
            ("weights", "dtype", _map("weights", lambda x: x.double())),
            ("weights", "device", _map("weights", META)),
            ("weights", "shape", _map("weights", lambda x: x[:, :1])),
            ("plan", "a dict", _map("plan", vars)),
        ],
        "check_ids_in_range": [
            ("ids", "floats", _map("ids", INT_TO_FLOAT)),
            ("ids", "a list", _map("ids", lambda x: x.tolist())),
            ("ids", "device", _map("ids", META)),
            ("num_experts", "a float", _set(num_experts=8.0)),
        ],
        "KVBlockPool": [
            ("num_blocks", "zero", _set(num_blocks=0)),
            ("num_blocks", "a bool", _set(num_blocks=True)),
            ("num_blocks", "2^31", _set(num_blocks=2**31, device="meta")),
            ("block_size", "2^31", _set(block_size=2**31, max_blocks_per_seq=1, device="meta")),
            ("block_size", "a float", _set(block_size=4.0)),
            ("max_seqs", "negative", _set(max_seqs=-1)),
            ("device", "meta", _set(device="meta")),
            ("device", "not a device", _set(device="nope")),
        ],
        "allocate": [
            ("pool", "None", _set(pool=None)),
            *_metadata("seq_ids", lambda x: x.long(), bools=True, strided=True),
            ("num_new_tokens", "a bool", _set(num_new_tokens=True)),
            ("num_new_tokens", "negative", _set(num_new_tokens=-1)),
            ("num_new_tokens", "nan", _set(num_new_tokens=NAN)),
        ],
        "allocate counts": [
            ("num_new_tokens", "dtype", _map("num_new_tokens", lambda x: x.long())),
            ("num_new_tokens", "device", _map("num_new_tokens", META)),
            ("num_new_tokens", "length", _map("num_new_tokens", lambda x: x[:1])),
            ("num_tokens", "a bool", _set(num_tokens=True)),
            ("num_tokens", "missing", _set(num_tokens=None)),
        ],
        "fork": [
            ("pool", "a dict", _map("pool", vars)),
            ("src", "dtype", _map("src", INT_TO_FLOAT)),
            ("src", "device", _map("src", META)),
            ("dst", "length", _map("dst", lambda x: x.repeat(2))),
            ("dst", "bools", _map("dst", TO_BOOL)),
        ],
        "free": [
            ("pool", "None", _set(pool=None)),
            *_metadata("seq_ids", INT_TO_FLOAT),
        ],
        "copy_blocks": [
            ("k_cache", "rank", _map("k_cache", lambda x: x[0])),
            ("k_cache", "device", _map("k_cache", META)),
            ("k_cache", "contiguity", _map("k_cache", _strided)),
            ("v_cache", "dtype", _map("v_cache", lambda x: x.half())),
            ("v_cache", "shape", _map("v_cache", lambda x: x[:3])),
            ("v_cache", "device", _map("v_cache", META)),
            ("copies", "dtype", _map("copies", lambda x: x.long())),
            ("copies", "bools", _map("copies", TO_BOOL)),
            ("copies", "shape", _map("copies", lambda x: x.reshape(-1))),
            ("copies", "columns", _map("copies", lambda x: x[:, :1])),
            ("copies", "device", _map("copies", META)),
            ("copies", "contiguity", _map("copies", lambda x: x.t().contiguous().t())),
        ],
    }
)


def _snapshot(args) -> dict:
    """Every tensor the call could write (outputs, caches, pool state), as raw bytes on the host."""
    tensors = {}
    for name, value in args.items():
        if isinstance(value, kv_alloc.KVBlockPool) or dataclasses.is_dataclass(value):  # plans, workspaces
            value = {f"{name}.{k}": v for k, v in vars(value).items() if isinstance(v, torch.Tensor)}
        else:
            value = {name: value}
        for key, tensor in value.items():
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                tensors[key] = (
                    tensor.detach().cpu().clone(memory_format=torch.contiguous_format).view(torch.uint8)
                )
    return tensors


def test_may_overlap_compares_byte_extents():
    """The overlap check behind the 'over' rows: from data_ptr, sizes, strides and element size only."""
    x = torch.zeros(4, 6)
    cases = {
        "adjacent rows": (x[:2], x[2:], False),
        "a shared row": (x[:3], x[2:], True),
        "a row inside a column's extent (conservative)": (x[:, 5], x[1, :1], True),
        "a column past the row it spans": (x[1:, 0], x[0], False),
        "interleaved columns (conservative)": (x[:, ::2], x[:, 1::2], True),
        "another dtype's view": (x.view(torch.int32)[1, 5:], x[1, 5:], True),
        "transposed": (x.t(), x[3], True),
        "expanded": (x[:1].expand(3, 6), x[1], False),
        "empty": (x[:0], x, False),
        "separate tensors": (x, torch.zeros(4, 6), False),
        "meta": (torch.zeros(4, device="meta"), torch.zeros(4, device="meta"), False),
    }
    for name, (a, b, want) in cases.items():
        assert _checks.may_overlap(a, b) is want and _checks.may_overlap(b, a) is want, name


@pytest.mark.parametrize("function", FUNCTIONS)
def test_the_valid_call_of_each_function_runs(function):
    call, make = FUNCTIONS[function]
    call(make())


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_raises_naming_the_argument_and_changes_nothing(case):
    function, argument, change = BAD[case]
    call, make = FUNCTIONS[function]
    args = change(make())
    before = _snapshot(args)
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        call(args)
    after = _snapshot(args)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name} changed"
