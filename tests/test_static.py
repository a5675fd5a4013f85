"""CPU-side performance proxies from the sm_90/sm_80 compile: no spills, 16-byte global accesses. The compile
is also the proof, on a machine with no GPU, that each kernel compiles for one at all.

"Compiles" and "no spills" hold under any Triton. The exact access widths (and compile error texts) are what
the Triton that wrote bench/baselines/cpu-proxies.json produces: under another Triton (the GPU boxes run 3.6)
those checks are report-only, skipped with what they found. The AOT compile specializes arguments with
Triton's private API (bench/measure/static.py ``_specialize``); where that is not importable, the tests that
compile ahead of time skip with the reason, and "compiles" and "no spills" read a real launch's cubin on a
GPU instead (without either, they fail: nothing would prove the kernels compile).
"""

import functools
import os
import subprocess
import sys

import pytest
import torch
import triton

from bench.measure import proxies
from bench.measure.static import access_widths, capture, missing_aot_api, static_report
from bench.operators import CASES

BASELINE_TRITON = proxies.load()["triton"]


MISSING_API = missing_aot_api()
needs_aot = pytest.mark.skipif(MISSING_API is not None, reason=MISSING_API or "")


def hold_or_report(problems: list[str]) -> None:
    """Exact-width expectations: held under the baseline's Triton, reported (as a skip) under another."""
    if triton.__version__ == BASELINE_TRITON:
        assert not problems, "\n".join(problems)
        return
    found = "; ".join(problems) if problems else "all as under the baseline's Triton"
    pytest.skip(
        f"report only: widths hold for Triton {BASELINE_TRITON} (the baseline's), this is Triton "
        f"{triton.__version__}: {found}"
    )


def compiled_rows(name: str) -> list:
    """Rows that prove ``name`` compiles for sm_90: the AOT compile, or without its private API a real
    launch on this GPU (sm_90 on the lent machines)."""
    if MISSING_API is None:
        return static_report(CASES[name])
    if torch.cuda.is_available():
        return static_report(CASES[name], real=True)
    pytest.fail(f"nothing can compile {name} here: {MISSING_API}, and no GPU to launch it")


def uninterpreted(script: str) -> list[str]:
    """The words ``script`` prints, run in a child with Triton's interpreter off (as the static report
    compiles): in this process the kernels may be the interpreter's, which the AOT compile cannot take."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@functools.cache
def write_kv_rows():
    return compiled_rows("write_kv")


def test_every_launch_configuration_compiles_for_sm90():
    rows = [r for r in write_kv_rows() if r.arch == "sm_90"]
    assert len(rows) == len(CASES["write_kv"].static_shapes())
    assert all(r.error is None for r in rows), [r.error for r in rows if r.error]


def test_no_spills_at_sm90():
    for row in write_kv_rows():
        if row.arch == "sm_90":
            assert row.spill_bytes == 0 and row.stack_bytes == 0, row


@needs_aot
def test_16_byte_global_accesses_for_cache_rows():
    """Every store is 16 bytes wide; the only narrower loads are the slot index (8 B) and fp8's two
    per-tensor scales (4 B each)."""
    problems = []
    for row in write_kv_rows():
        if row.error:
            continue
        narrow = {width: count for width, count in row.load_widths.items() if width != 16}
        if set(row.store_widths) != {16}:
            problems.append(f"{row.shape} {row.arch}: stores {row.store_widths}")
        if narrow != ({8: 1, 4: 2} if "fp8" in row.shape else {8: 1}) or not row.load_widths.get(16):
            problems.append(f"{row.shape} {row.arch}: loads {row.load_widths}")
    hold_or_report(problems)


@needs_aot
def test_fp8_at_sm80_is_reported_not_raised():
    fp8_sm80 = [r for r in static_report(CASES["write_kv"], archs=(80,)) if "fp8" in r.shape]
    assert fp8_sm80 and all(r.error for r in fp8_sm80)  # a row with the reason, not an exception
    hold_or_report([f"{r.shape}: {r.error}" for r in fp8_sm80 if "fp8e4nv" not in r.error])


def test_capture_sees_the_launch_the_launcher_makes():
    """The captured launch is the one the launcher makes for these inputs: the same tensors, and a grid
    whose programs cover every token and every element of the widest row (not a restated heuristic)."""
    for shape in CASES["write_kv"].static_shapes():
        inputs = CASES["write_kv"].build(shape, "cpu", seed=0)
        (launch,) = capture(CASES["write_kv"], shape)
        assert launch.kernel == "_write_kv_kernel"
        assert isinstance(launch.args[0], torch.Tensor) and launch.args[0].shape == inputs.args["key"].shape
        tokens, row = inputs.args["key"].shape[0], inputs.args["key"][0].numel()
        assert launch.grid[0] * launch.kwargs["TOKENS"] >= tokens, (shape.label, launch.grid)
        assert launch.grid[1] * launch.kwargs["BLOCK"] >= row, (shape.label, launch.grid)
        assert launch.kwargs["num_warps"] in (1, 2, 4, 8, 16)


def test_access_width_parser():
    sass = """
        /*0080*/  LDG.E.64 R2, desc[UR4][R2.64] ;
        /*00e0*/  @!P0 LDG.E.128 R8, desc[UR4][R4.64] ;
        /*00f0*/  LDG.E.U16.CONSTANT R9, desc[UR4][R6.64] ;
        /*0100*/  LDG.E R10, desc[UR4][R6.64] ;
        /*0110*/  STG.E.128 desc[UR4][R4.64], R8 ;
        /*0120*/  STG.E.U8 desc[UR4][R4.64], R8 ;
        /*0130*/  LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0140*/  LDGDEPBAR ;
    """
    loads, stores = access_widths(sass)
    assert dict(loads) == {8: 1, 16: 2, 2: 1, 4: 1}
    assert dict(stores) == {16: 1, 1: 1}


def test_access_width_parser_reads_ptx():
    """The tuner's listing (PTX: no disassembly): the vector and type suffixes give the width, cp.async its
    copy size; stores counted apart from loads; a listing it cannot read is refused."""
    ptx = """
        @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
        ld.global.L1::evict_last.b16 { %rs1 }, [ %rd2 + 0 ];
        cp.async.cg.shared.global [ %r16 + 0 ], [ %rd21 + 0 ], 0x10, %r97;
    """
    loads, stores = access_widths(ptx, listing="ptx")
    assert dict(loads) == {16: 2, 2: 1} and not stores and max(loads) == 16
    assert dict(access_widths("ld.global.b16 { %rs1 }, [ %rd2 + 0 ];", listing="ptx")[0]) == {2: 1}
    assert dict(access_widths("ld.global.v2.b64 { %rd1, %rd2 }, [ %rd3 + 0 ];", listing="ptx")[0]) == {16: 1}
    loads, stores = access_widths("st.global.b32 [ %rd1 + 0 ], { %r1 };", listing="ptx")
    assert not loads and dict(stores) == {4: 1}
    with pytest.raises(ValueError, match="listing"):
        access_widths(ptx, listing="cubin")


@needs_aot
@pytest.mark.gpu
def test_real_launch_matches_the_aot_compile():
    """On a GPU: the cubin a real launch compiles has the same registers and access widths as the AOT one."""
    major, minor = torch.cuda.get_device_capability()
    aot = {r.shape: r for r in static_report(CASES["write_kv"], archs=(major * 10 + minor,))}
    for row in static_report(CASES["write_kv"], real=True):
        assert row.spill_bytes == 0
        same = aot[row.shape]
        assert (row.load_widths, row.store_widths) == (same.load_widths, same.store_widths)


@needs_aot
def test_static_report_compiles_what_a_gpu_runs():
    """Without a GPU the launchers run in the interpreter, where write_kv rounds fp8 by hand; the static
    report's compile (made with TRITON_INTERPRET=0) must hold the hardware's saturating cvt and none of the
    hand rounding (its 2^14 constant)."""
    script = (
        "from bench.operators import CASES; from bench.measure.static import capture, compile_aot; "
        "fp8 = next(s for s in CASES['write_kv'].static_shapes() if 'fp8' in s.label); "
        "(launch,) = capture(CASES['write_kv'], fp8); "
        "assert launch.kwargs['INTERPRETER_FP8_ROUNDING'] is False, launch.kwargs; "
        "ptx = compile_aot(launch, 90).asm['ptx']; "
        "print('cvt.rn.satfinite.e4m3x2.f32' in ptx, '0f46800000' in ptx)"
    )
    assert uninterpreted(script) == ["True", "False"]


@needs_aot
def test_fork_and_free_compile_for_sm90():
    """The proxies' kv_alloc case compiles allocate's kernel only; fork's and free's must compile for a GPU
    too (the interpreter runs what the compiler refuses, such as a global a kernel reads that is no
    tl.constexpr instance)."""
    script = (
        "import torch; from kernels import kv_alloc; from bench.measure.device import kernel_device; "
        "from bench.measure.static import capture_launches, compile_aot; "
        "pool = kv_alloc.KVBlockPool(16, 4, 4, 4, device=kernel_device()); "
        "ids = torch.arange(2, dtype=torch.int32, device=pool.device)\n"
        "with capture_launches(kv_alloc) as launches:\n"
        "    kv_alloc.fork(pool, ids[:1], ids[1:]); kv_alloc.free(pool, ids)\n"
        "for launch in launches: compile_aot(launch, 90); print(launch.kernel)"
    )
    assert uninterpreted(script) == ["_fork_kernel", "_free_kernel"]


@functools.cache
def paged_rows():
    return compiled_rows("paged_decode")


def test_paged_decode_compiles_without_spills_at_sm90():
    rows = [r for r in paged_rows() if r.arch == "sm_90"]
    assert {r.kernel for r in rows} == {"_paged_decode_kernel", "_merge_splits_kernel"}
    for row in rows:
        assert row.error is None and row.spill_bytes == 0 and row.stack_bytes == 0, row


def narrow_loads(rows, case: str, kernel: str, per_lane) -> list[str]:
    """``kernel``'s rows whose 16-byte loads do not cover ``per_lane(shape)`` bytes (a lane's share of one
    loop iteration's tiles), or with a load narrower than a 4-byte block id."""
    shapes = {s.label: s for s in CASES[case].static_shapes()}
    problems = []
    for row in rows:
        if row.kernel != kernel or row.error:
            continue
        need = per_lane(shapes[row.shape])
        if row.load_widths.get(16, 0) * 16 < need or min(row.load_widths) < 4:
            problems.append(f"{row.shape} {row.arch}: loads {row.load_widths}, {need} B a lane to cover")
    return problems


@needs_aot
def test_paged_decode_moves_k_and_v_16_bytes_a_lane():
    """Per loop iteration a thread must load its share of a K and a V tile; 16-byte loads (LDG.128 or
    cp.async .128) must cover all of it, and no load is narrower than a 4-byte block id."""
    from kernels.paged_attention import paged_decode_launch_config

    def per_lane(shape) -> int:
        config = paged_decode_launch_config(
            shape.num_q_heads // shape.num_kv_heads, shape.head_dim, shape.cache_dtype.itemsize
        )
        tile_bytes = config["BLOCK_N"] * shape.head_dim * shape.cache_dtype.itemsize
        return 2 * tile_bytes // (32 * config["num_warps"])

    hold_or_report(narrow_loads(paged_rows(), "paged_decode", "_paged_decode_kernel", per_lane))


@pytest.mark.parametrize("name", ["allocate", "copy_blocks", "route"])
def test_kernels_compile_without_spills_at_sm90(name):
    rows = [r for r in compiled_rows(name) if r.arch == "sm_90"]
    assert rows and all(r.error is None and r.spill_bytes == 0 and r.stack_bytes == 0 for r in rows), rows


@needs_aot
def test_copy_blocks_moves_16_bytes_a_lane():
    problems = [
        f"{row.shape} {row.arch}: loads {row.load_widths}, stores {row.store_widths}"
        for row in static_report(CASES["copy_blocks"])
        if set(row.store_widths) != {16} or not row.load_widths.get(16)
    ]
    hold_or_report(problems)


@functools.cache
def mla_rows():
    return compiled_rows("mla_decode")


def test_mla_decode_compiles_without_spills_at_16_to_128_heads():
    """The issue's bar: 0 spills at 16, 32, 64 and 128 heads, pages of 16 and 64, bf16 and fp8 caches (the
    static shapes cover each value; the fp32 accumulator [heads x 512] must fit in registers)."""
    shapes = CASES["mla_decode"].static_shapes()
    assert {s.num_heads for s in shapes} == {16, 32, 64, 128}
    assert {s.block_size for s in shapes} == {16, 64}
    assert {s.cache_dtype for s in shapes} == {torch.bfloat16, torch.float8_e4m3fn}
    rows = [r for r in mla_rows() if r.arch == "sm_90"]
    assert {r.kernel for r in rows} == {"_mla_decode_kernel", "_merge_splits_kernel"}
    assert len([r for r in rows if r.kernel == "_mla_decode_kernel"]) == len(shapes)
    for row in rows:
        assert row.error is None and row.spill_bytes == 0 and row.stack_bytes == 0, row


@needs_aot
def test_mla_decode_moves_the_latent_16_bytes_a_lane():
    """Per loop iteration a thread loads its share of a [BLOCK_N x qk_dim] latent tile; 16-byte loads (LDG.128
    or cp.async .128) must cover all of it, and no load is narrower than a 4-byte block id."""
    from kernels.mla_attention import mla_decode_launch_config

    def per_lane(shape) -> int:
        nbytes = shape.cache_dtype.itemsize
        config = mla_decode_launch_config(shape.num_heads, shape.qk_dim, shape.v_head_dim, nbytes)
        return config["BLOCK_N"] * shape.qk_dim * nbytes // (32 * config["num_warps"])

    hold_or_report(narrow_loads(mla_rows(), "mla_decode", "_mla_decode_kernel", per_lane))


@needs_aot
def test_ep_regroup_moves_rows_16_bytes_a_lane_without_spills():
    """EP's regroup (no single-process case: STATIC_ONLY) at DeepSeek-R1's EP8 shape, and dedup's pack, its
    regroup both ways and its partials' sum: no spills, no stack, and their row copies 16 bytes a lane both
    ways (the counts matrix and meta rows they read may take narrower loads)."""
    from bench.operators import STATIC_ONLY
    from bench.operators.ep import VARIANTS

    rows = static_report(STATIC_ONLY["ep"])
    assert {r.shape.split()[2] for r in rows} == set(VARIANTS)
    for row in rows:
        assert row.error is None and row.spill_bytes == 0 and row.stack_bytes == 0, row
    hold_or_report(
        [
            f"{r.shape} {r.arch}: {r.load_widths} / {r.store_widths}"
            for r in rows
            if r.widest_load != 16 or r.widest_store != 16
        ]
    )


def test_capture_builds_its_inputs_where_the_kernels_run(monkeypatch, kernel_device):
    """On a GPU box the launchers are compiled and refuse CPU tensors: capture (the static report's, and the
    sanitizer step's racecheck choice) builds on the device kernels take, not on the CPU."""
    import dataclasses

    from bench.measure import device

    case, seen = CASES["write_kv"], []

    def build(shape, on, seed, **kw):
        seen.append(on)
        return case.build(shape, kernel_device, seed, **kw)  # where the launcher takes them, GPU or not

    monkeypatch.setattr(device, "kernel_device", lambda: "a device")
    (launch,) = capture(dataclasses.replace(case, build=build), case.static_shapes()[0])
    assert seen == ["a device"] and launch.kernel == "_write_kv_kernel"


def test_kernels_take_cuda_tensors_where_they_are_compiled_on_a_gpu(monkeypatch):
    import kernels
    from bench.measure.device import kernel_device

    monkeypatch.setattr(kernels, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kernel_device() == "cuda"
    monkeypatch.setattr(kernels, "INTERPRETED", True)
    assert kernel_device() == "cpu"


@functools.cache
def grouped_gemm_rows():
    return compiled_rows("grouped_gemm")


def test_grouped_gemm_compiles_without_spills_at_sm90():
    """The benchmarks' launch configurations (32, 128 and 256 experts, decode and prefill M tiles, fp8 and
    bf16 weights, the gather) each compile for sm_90 with no spills and no stack."""
    rows = [r for r in grouped_gemm_rows() if r.arch == "sm_90"]
    assert {r.shape for r in rows} == {s.label for s in CASES["grouped_gemm"].static_shapes()}
    for row in rows:
        assert row.error is None and row.spill_bytes == 0 and row.stack_bytes == 0, row


@needs_aot
def test_grouped_gemm_loads_weights_16_bytes_a_lane():
    """Per K step a thread loads its share of the weight tiles (gate and up for the gate-up GEMM) and of the
    row tile: 16-byte loads (LDG.128 or cp.async .128) must cover all of it, and no load is narrower than a
    4-byte count, offset, token id or scale."""
    from kernels.moe_gemm import grouped_gemm_launch_config

    shapes = {s.label: s for s in CASES["grouped_gemm"].static_shapes()}
    problems = []
    for row in grouped_gemm_rows():
        if row.error:
            continue
        shape = shapes[row.shape]
        rows_per_expert = -(-shape.plan_tokens * shape.plan_top_k // shape.experts)
        config = grouped_gemm_launch_config(rows_per_expert)
        weight_tiles = 2 if shape.activation else 1
        tile_bytes = weight_tiles * config["BLOCK_N"] * config["BLOCK_K"] * shape.weight_dtype.itemsize
        tile_bytes += config["BLOCK_M"] * config["BLOCK_K"] * shape.dtype.itemsize
        per_lane = tile_bytes // (32 * config["num_warps"])
        if row.load_widths.get(16, 0) * 16 < per_lane or min(row.load_widths) < 4:
            problems.append(f"{row.shape} {row.arch}: loads {row.load_widths}, {per_lane} B a lane to cover")
    hold_or_report(problems)
