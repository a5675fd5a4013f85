"""No pointer offset can overflow int32: a lint over kernels/*.py, and writes and reads past 2^31 bytes.

The lint parses every @triton.jit function and finds each multiplication inside a pointer argument (of
tl.load, tl.store and the atomics), following the names the pointer is built from. A multiplication whose
operand may be large (derived from device data: block ids, slots, expert ids, lengths; from the grid's row
axis, program_id(0): rows, tokens, pairs, sequences; from a loop over a runtime count; or a helper's
runtime argument) must have an operand that is int64 already (``.to(tl.int64)``, or a name only ever
assigned int64 values), so the multiply runs in int64. Values inside a ``.to(tl.int64)`` are indices, not
offsets: they are bounded by int32 counts, so the lint does not look into them.
"""

import ast
from pathlib import Path

import pytest
import torch

from kernels import kv_alloc, kv_cache, paged_attention
from reference import kv_cache as kv_cache_reference
from reference import paged_attention as paged_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
POINTER_OPS = {"load", "store", "atomic_add", "atomic_max", "atomic_min", "atomic_cas", "atomic_xchg"}


def _is_jit(decorator) -> bool:
    return ast.unparse(decorator).split("(")[0] in ("triton.jit", "jit")


def _tl_call(node, names) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "tl"
        and node.func.attr in names
    )


def _is_int64_cast(node) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "to"
        and bool(node.args)
        and ast.unparse(node.args[0]) == "tl.int64"
    )


class Function:
    """Assignments, int64 names and possibly-large names of one @triton.jit function."""

    def __init__(self, fn: ast.FunctionDef, loading_helpers: set[str]):
        self.fn = fn
        self.assigned: dict[str, list[ast.AST]] = {}
        self.loop_iters: dict[str, list[ast.AST]] = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            self.assigned.setdefault(name.id, []).append(node.value)
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                self.assigned.setdefault(node.target.id, []).append(node.value)
            elif isinstance(node, ast.AugAssign):
                value = ast.BinOp(left=ast.Name(id=node.target.id), op=node.op, right=node.value)
                self.assigned.setdefault(node.target.id, []).append(value)
            elif isinstance(node, ast.For):
                for name in ast.walk(node.target):
                    if isinstance(name, ast.Name):
                        self.loop_iters.setdefault(name.id, []).append(node.iter)
        args = fn.args.args
        constexpr = {a.arg for a in args if a.annotation and "constexpr" in ast.unparse(a.annotation)}
        self.runtime_params = {a.arg for a in args if a.arg not in constexpr and not a.arg.endswith("_ptr")}
        # A helper's runtime arguments may be anything its callers pass: possibly large.
        helper = not fn.name.endswith("_kernel")
        self.large = set(self.runtime_params) if helper else set()
        self.helpers = loading_helpers
        self._taint()
        self._widen()

    def _source(self, node) -> bool:
        """A call whose result may be large: a load, an atomic, program_id(0), a helper that loads."""
        if _tl_call(node, POINTER_OPS - {"store"}):
            return True
        if _tl_call(node, {"program_id"}):
            return ast.unparse(node.args[0]) == "0"
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in self.helpers

    def _mentions_large(self, expr) -> bool:
        return any(
            self._source(n) or (isinstance(n, ast.Name) and n.id in self.large) for n in ast.walk(expr)
        )

    def _taint(self) -> None:
        changed = True
        while changed:
            changed = False
            for name, values in self.assigned.items():
                if name not in self.large and any(self._mentions_large(v) for v in values):
                    self.large.add(name)
                    changed = True
            for name, iters in self.loop_iters.items():
                names = {n.id for it in iters for n in ast.walk(it) if isinstance(n, ast.Name)}
                runtime = bool(names & self.runtime_params)
                if name not in self.large and (runtime or any(self._mentions_large(it) for it in iters)):
                    self.large.add(name)
                    changed = True

    def wide(self, expr) -> bool:
        if _is_int64_cast(expr):
            return True
        if isinstance(expr, ast.Name):
            return expr.id in self.int64_names
        if isinstance(expr, ast.Subscript):
            return self.wide(expr.value)
        if isinstance(expr, ast.BinOp):
            return self.wide(expr.left) or self.wide(expr.right)
        if _tl_call(expr, {"where"}):
            return self.wide(expr.args[1]) or self.wide(expr.args[2])
        if _tl_call(expr, {"full", "zeros"}):
            return "tl.int64" in ast.unparse(expr)
        return False

    def _widen(self) -> None:
        # The greatest fixpoint: a name is int64 when every assignment to it is (loop targets never are).
        self.int64_names = {n for n in self.assigned if n not in self.loop_iters}
        changed = True
        while changed:
            changed = False
            for name in list(self.int64_names):
                if not all(self.wide(v) for v in self.assigned[name]):
                    self.int64_names.discard(name)
                    changed = True

    def products(self, expr, seen):
        """Multiplications that form ``expr`` as an offset: through sums, differences, products, subscripts,
        tl.where's values and the assignments of the names met, not into int64 casts (their receivers are
        indices), comparisons, divisions or other calls (values that are not offsets)."""
        if _is_int64_cast(expr):
            return
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, (ast.Add, ast.Sub, ast.Mult)):
            if isinstance(expr.op, ast.Mult):
                yield expr
            yield from self.products(expr.left, seen)
            yield from self.products(expr.right, seen)
        elif isinstance(expr, ast.Subscript):
            yield from self.products(expr.value, seen)
        elif _tl_call(expr, {"where"}):
            yield from self.products(expr.args[1], seen)
            yield from self.products(expr.args[2], seen)
        elif isinstance(expr, ast.Name) and expr.id not in seen:
            seen.add(expr.id)
            for value in self.assigned.get(expr.id, []):
                yield from self.products(value, seen)

    def violations(self):
        for node in ast.walk(self.fn):
            if _tl_call(node, POINTER_OPS) and node.args:
                for product in self.products(node.args[0], set()):
                    large = self._mentions_large(product.left) or self._mentions_large(product.right)
                    if large and not (self.wide(product.left) or self.wide(product.right)):
                        yield f"{self.fn.name}:{product.lineno}: {ast.unparse(product)}"


def _jit_functions(tree):
    return [n for n in tree.body if isinstance(n, ast.FunctionDef) and any(map(_is_jit, n.decorator_list))]


def lint(source: str) -> list[str]:
    functions = _jit_functions(ast.parse(source))
    loading = set()
    changed = True
    while changed:  # helpers that load, directly or through another helper
        changed = False
        for fn in functions:
            calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call)]
            helpers = {c.func.id for c in calls if isinstance(c.func, ast.Name)}
            if fn.name not in loading and (
                any(_tl_call(c, POINTER_OPS - {"store"}) for c in calls) or helpers & loading
            ):
                loading.add(fn.name)
                changed = True
    return [v for fn in functions for v in Function(fn, loading).violations()]


# Products the lint cannot bound that are bounded, and why.
BOUNDED = {
    "_write_layout: tl.cdiv(counts, align) * align": "a row below max_rows < 2^31, which dispatch checks",
    "_grouped_gemm_kernel: n_tile * BLOCK_N": "a column below N_OUT + BLOCK_N: n_tile < cdiv(N_OUT, BLOCK_N)",
}


@pytest.mark.parametrize("module", sorted(p.name for p in KERNELS.glob("*.py")))
def test_every_pointer_offset_is_int64_before_it_multiplies(module):
    found = [
        v
        for v in lint((KERNELS / module).read_text())
        if v.split(":")[0] + ":" + v.split(":", 2)[2] not in BOUNDED
    ]
    assert found == []


def test_the_lint_catches_an_int32_offset():
    planted = """
@triton.jit
def _copy_kernel(src_ptr, dst_ptr, table_ptr, stride, ROW: tl.constexpr):
    row = tl.load(table_ptr + tl.program_id(0))
    token = tl.program_id(0)
    wide = tl.load(table_ptr + 1).to(tl.int64)
    x = tl.load(src_ptr + row * ROW + tl.arange(0, ROW))
    tl.store(dst_ptr + token * stride + wide * ROW, x)
"""
    assert [v.split(": ")[1] for v in lint(planted)] == ["row * ROW", "token * stride"]


# --- past 2^31 bytes: an fp8 cache of a little over 2 GiB, touched only where the test writes and reads ---

BLOCK_SIZE, HEAD_DIM = 16, 128
BLOCK_BYTES = BLOCK_SIZE * HEAD_DIM  # fp8, one KV head
NUM_BLOCKS = 2**31 // BLOCK_BYTES + 4  # the last four blocks start past byte 2^31
FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def big_caches():
    """Two fp8 caches of 2 GiB + 8 KiB each, left uninitialised: only the pages a test touches are mapped."""
    try:
        k = torch.empty(NUM_BLOCKS, BLOCK_SIZE, 1, HEAD_DIM, dtype=FP8, device=DEVICE)
        v = torch.empty_like(k)
    except (RuntimeError, MemoryError) as error:  # a device with no 4 GiB to spare
        pytest.skip(f"cannot allocate two fp8 caches of 2 GiB: {error}")
    return k, v


def test_write_kv_lands_past_2_to_the_31_bytes(big_caches):
    k, v = big_caches
    last = NUM_BLOCKS * BLOCK_SIZE - 1  # byte offset (last) * 128 > 2^31
    assert last * HEAD_DIM >= 2**31 + 3 * BLOCK_BYTES
    slots = torch.tensor([last, 5, last - BLOCK_SIZE], dtype=torch.int64, device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(3, 1, HEAD_DIM, generator=gen).to(torch.bfloat16).to(DEVICE)
    value = torch.randn(3, 1, HEAD_DIM, generator=gen).to(torch.bfloat16).to(DEVICE)
    rows_k, rows_v = k.view(-1, HEAD_DIM), v.view(-1, HEAD_DIM)
    for row in slots.tolist():  # the rows written, and a row either side of each, set to a sentinel
        for r in (row - 1, row, row + 1):
            if 0 <= r < rows_k.shape[0]:
                rows_k[r].view(torch.uint8).fill_(0x11)
                rows_v[r].view(torch.uint8).fill_(0x11)
    kv_cache.write_kv(key, value, k, v, slots, k_scale=0.5, v_scale=2.0)
    want_k = kv_cache_reference._quantize(key[:, 0], 0.5, FP8)
    want_v = kv_cache_reference._quantize(value[:, 0], 2.0, FP8)
    for i, row in enumerate(slots.tolist()):
        assert torch.equal(rows_k[row].view(torch.uint8), want_k[i].view(torch.uint8)), row
        assert torch.equal(rows_v[row].view(torch.uint8), want_v[i].view(torch.uint8)), row
    for row in (last - 1, 4, 6, last - BLOCK_SIZE - 1, last - BLOCK_SIZE + 1):
        assert (rows_k[row].view(torch.uint8) == 0x11).all() and (rows_v[row].view(torch.uint8) == 0x11).all()


def test_copy_blocks_and_paged_decode_past_2_to_the_31_bytes(big_caches):
    k, v = big_caches
    far, near = NUM_BLOCKS - 1, 3
    gen = torch.Generator().manual_seed(1)
    for block in (near, far - 1):
        k[block] = (torch.randn(BLOCK_SIZE, 1, HEAD_DIM, generator=gen) * 4).to(FP8).to(DEVICE)
        v[block] = (torch.randn(BLOCK_SIZE, 1, HEAD_DIM, generator=gen) * 4).to(FP8).to(DEVICE)
    copies = torch.tensor([[near, far], [far - 1, 7]], dtype=torch.int32, device=DEVICE)
    expected = {7: (k[far - 1].clone(), v[far - 1].clone()), far: (k[near].clone(), v[near].clone())}
    kv_alloc.copy_blocks(k, v, copies)
    for block, (want_k, want_v) in expected.items():
        assert torch.equal(k[block].view(torch.uint8), want_k.view(torch.uint8)), block
        assert torch.equal(v[block].view(torch.uint8), want_v.view(torch.uint8)), block

    # A sequence whose pages are block 7 and the last block, read by the decode kernel with forced splits.
    q = torch.randn(1, 4, HEAD_DIM, generator=gen).to(torch.bfloat16).to(DEVICE)
    tables = torch.tensor([[7, far]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([2 * BLOCK_SIZE - 3], dtype=torch.int32, device=DEVICE)
    for splits in (1, 2):
        out = paged_attention.paged_decode(
            q, k, v, tables, lens, k_scale=0.5, v_scale=0.25, num_splits=splits
        )
        want = paged_reference.paged_decode(q, k, v, tables, lens, k_scale=0.5, v_scale=0.25)
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
