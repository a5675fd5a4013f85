"""CPU-side performance proxies from the sm_90/sm_80 compile: no spills, 16-byte global accesses. The compile
is also the proof, on a machine with no GPU, that each kernel compiles for one at all."""

import functools

import pytest
import torch

from bench.cases import CASES
from bench.static import access_widths, capture, static_report


@functools.cache
def write_kv_rows():
    return static_report(CASES["write_kv"])


def test_every_launch_configuration_compiles_for_sm90():
    rows = [r for r in write_kv_rows() if r.arch == "sm_90"]
    assert len(rows) == len(CASES["write_kv"].static_shapes())
    assert all(r.error is None for r in rows), [r.error for r in rows if r.error]


def test_no_spills_at_sm90():
    for row in write_kv_rows():
        if row.arch == "sm_90":
            assert row.spill_bytes == 0 and row.stack_bytes == 0, row


def test_16_byte_global_accesses_for_cache_rows():
    """Every store is 16 bytes wide; the only narrower loads are the slot index (8 B) and fp8's two
    per-tensor scales (4 B each)."""
    for row in write_kv_rows():
        if row.error:
            continue
        assert set(row.store_widths) == {16}, row
        narrow = {width: count for width, count in row.load_widths.items() if width != 16}
        assert narrow == ({8: 1, 4: 2} if "fp8" in row.shape else {8: 1}), row
        assert row.load_widths.get(16), row


def test_fp8_at_sm80_is_reported_not_raised():
    fp8_sm80 = [r for r in write_kv_rows() if "fp8" in r.shape and r.arch == "sm_80"]
    assert fp8_sm80 and all("fp8e4nv" in r.error for r in fp8_sm80)


def test_capture_sees_the_launch_the_launcher_makes():
    shape = CASES["write_kv"].static_shapes()[0]
    (launch,) = capture(CASES["write_kv"], shape)
    assert launch.kernel == "_write_kv_kernel"
    assert launch.kwargs["BLOCK"] * launch.kwargs["TOKENS"] >= 1024 and launch.kwargs["num_warps"] == 4
    assert isinstance(launch.args[0], torch.Tensor)


def test_access_width_parser():
    sass = """
        /*0080*/  LDG.E.64 R2, desc[UR4][R2.64] ;
        /*00e0*/  @!P0 LDG.E.128 R8, desc[UR4][R4.64] ;
        /*00f0*/  LDG.E.U16.CONSTANT R9, desc[UR4][R6.64] ;
        /*0100*/  LDG.E R10, desc[UR4][R6.64] ;
        /*0110*/  STG.E.128 desc[UR4][R4.64], R8 ;
        /*0120*/  STG.E.U8 desc[UR4][R4.64], R8 ;
    """
    loads, stores = access_widths(sass)
    assert dict(loads) == {8: 1, 16: 1, 2: 1, 4: 1}
    assert dict(stores) == {16: 1, 1: 1}


@pytest.mark.gpu
def test_real_launch_matches_the_aot_compile():
    """On a GPU: the cubin a real launch compiles has the same registers and access widths as the AOT one."""
    major, minor = torch.cuda.get_device_capability()
    aot = {r.shape: r for r in static_report(CASES["write_kv"], archs=(major * 10 + minor,))}
    for row in static_report(CASES["write_kv"], real=True):
        assert row.spill_bytes == 0
        same = aot[row.shape]
        assert (row.load_widths, row.store_widths) == (same.load_widths, same.store_widths)


def test_interpreter_workarounds_are_compiled_out():
    """The capture runs under the interpreter, where write_kv rounds fp8 by hand; the sm_90 compile must
    be what a GPU runs: the hardware's saturating cvt, and none of the hand rounding (its 2^14 constant)."""
    from bench.static import compile_aot

    fp8 = next(s for s in CASES["write_kv"].static_shapes() if "fp8" in s.label)
    (launch,) = capture(CASES["write_kv"], fp8)
    ptx = compile_aot(launch, 90).asm["ptx"]
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert "0f46800000" not in ptx  # 16384.0
