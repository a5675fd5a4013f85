"""The measuring side: quantiles, the results schema, reports and the CLI on this machine."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from bench.commands import cli
from bench.measure import results
from bench.measure.device import machine_info, slug
from bench.measure.timing import Timing
from bench.operators import CASES


def test_timing_quantiles():
    timing = Timing.from_samples([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (timing.median_ms, timing.min_ms, timing.mean_ms) == (3.0, 1.0, 3.0)
    assert timing.p20_ms == pytest.approx(1.8) and timing.p80_ms == pytest.approx(4.2)


def test_cost_info_turns_bytes_into_bandwidth():
    case = CASES["write_kv"]
    shape = case.default_shapes()[0]
    info = results.cost_info(case, shape, seconds=1e-6, peak_gbps=2000.0)
    assert info["bytes"] == case.byte_model(shape)
    assert info["gbps"] == pytest.approx(info["bytes"] / 1e-6 / 1e9, rel=1e-3)
    assert info["pct_of_peak"] == pytest.approx(100 * info["gbps"] / 2000.0, abs=0.1)


def _synthetic_results(tmp_path, kernel_ms=(0.010, 0.011, 0.012), reference_ms=(0.050, 0.055, 0.060)):
    case, shape = CASES["write_kv"], CASES["write_kv"].default_shapes()[-1]
    entries = []
    for impl, samples in (("triton", kernel_ms), ("reference", reference_ms), ("some-peer", (0.022,))):
        timing = Timing.from_samples(list(samples))
        info = {**results.cost_info(case, shape, timing.median_ms * 1e-3, 3000.0), "impl": impl}
        if impl == "triton":
            info.update(verified=True, peers_skipped={"other-peer": "not installed here"})
        entries.append(results.entry(f"write_kv[{impl}]", "write_kv", timing, info))
    return results.write(tmp_path / "run.json", entries), shape


def test_results_follow_pytest_benchmarks_schema(tmp_path):
    path, _ = _synthetic_results(tmp_path)
    document = json.loads(path.read_text())
    assert {"machine_info", "benchmarks", "datetime"} <= set(document)
    stats = document["benchmarks"][0]["stats"]
    assert stats["median"] == pytest.approx(11e-6) and stats["rounds"] == 3
    assert {"min", "max", "mean", "stddev", "q1", "q3", "iqr", "ops"} <= set(stats)
    assert document["machine_info"]["torch"] == torch.__version__


def test_report_prints_speedup_over_the_reference(tmp_path, capsys):
    path, shape = _synthetic_results(tmp_path)
    assert cli.main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert shape.label in out and "5.00x" in out and "| 11 " in out and "verified" in out
    assert "some-peer 2.00x" in out and "- other-peer: not installed here" in out


@pytest.mark.parametrize(
    "text, why",
    [
        ("{}", "no 'benchmarks' list"),
        ("not json at all", "not JSON"),
        ('{"benchmarks": [{"name": "x", "stats": {}}]}', "benchmarks[0]: stats.median: expected"),
    ],
)
def test_report_and_compare_name_a_malformed_file_in_one_line(tmp_path, capsys, text, why):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    good, _ = _synthetic_results(tmp_path)
    for argv in (["report", str(bad)], ["compare", str(good), str(bad)], ["compare", str(bad), str(good)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err and why in err, err
    assert cli.main(["report", str(tmp_path / "missing.json")]) == 2
    assert "cannot read it" in capsys.readouterr().err


def test_slug_names_a_results_folder():
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU report; on a GPU `run` times instead")
def test_run_without_gpu_verifies_and_reports(capsys, monkeypatch):
    from bench.commands import run

    # The multi-rank section spawns processes: tests/test_ep.py runs it for real; here, that run uses it.
    ranks = []
    monkeypatch.setattr(run, "_across_ranks", lambda: ranks.append(True) or True)
    assert cli.main(["run"]) == 0
    assert ranks == [True]
    out = capsys.readouterr().out
    for heading in ("Verified against the reference", "Static", "Traffic", "Projections, not measurements"):
        assert heading in out
    assert "_regroup_kernel" in out, "the static-only EP kernel is in the static table"
    assert "published copy bandwidth" in out and "measured on the lent" not in out, "anchors, not readings"
    shapes = sum(len(case.small_shapes()) for case in CASES.values())
    assert "FAILED" not in out and out.count("verified") == shapes


def test_unknown_kernel_is_named(capsys):
    assert cli.main(["static", "--kernel", "nope"]) == 2
    assert "unknown kernel nope" in capsys.readouterr().err


def test_machine_info_names_the_versions():
    info = machine_info()
    assert info.torch == torch.__version__ and info.triton
    assert (info.gpu == "cpu") == (not torch.cuda.is_available())


@pytest.mark.gpu
def test_time_cuda_and_copy_bandwidth():
    from bench.measure.device import copy_bandwidth_gbps
    from bench.measure.timing import time_cuda

    x = torch.ones(1 << 24, device="cuda")
    timing = time_cuda(lambda: x.mul_(1.0), rep_ms=10)
    assert 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms
    graphed = time_cuda(lambda: x.mul_(1.0), rep_ms=10, cuda_graph=True)
    copy = copy_bandwidth_gbps()
    assert copy > 100
    # x.mul_ reads and writes 64 MiB, as the copy does: its implied bandwidth must be the copy's order. Far
    # above it, the events timed nothing (an empty graph, another stream); far below, they timed more than
    # the call (the L2 flush, a host sync).
    moved = 2 * x.numel() * x.element_size()
    for what, t in (("eager", timing), ("graph", graphed)):
        gbps = moved / (t.median_ms * 1e-3) / 1e9
        assert 0.2 * copy < gbps < 1.5 * copy, (what, gbps, copy)


def _kernel_entry(entries):
    return next(e for e in entries if e["extra_info"]["impl"] == "triton")


@pytest.mark.cpu_kernels  # the dry run's path: wall clock, CPU tensors
def test_measure_verifies_times_and_says_why_a_peer_did_not_run():
    """The runner on the CPU (wall clock, as gpu-check's dry run): the kernel verified on the inputs it
    times, the reference timed, and every peer either timed after its check or listed with its reason."""
    from bench.measure.runner import measure

    case = CASES["paged_decode"]
    shape = next(s for s in case.small_shapes() if len(set(s.lengths)) > 1)
    entries = measure(case, shape, device="cpu")
    info = _kernel_entry(entries)["extra_info"]
    assert info["verified"] is True and info["clock"].startswith("wall-clock") and info["setup_s"] >= 0
    impls = {e["extra_info"]["impl"] for e in entries}
    assert {"triton", "reference"} <= impls and not info["peers_failed"]
    assert impls | set(info["peers_skipped"]) == {"triton", "reference", *case.peers}
    assert "one nonzero length" in info["peers_skipped"]["sdpa-contiguous"]
    for entry in entries:
        if entry["extra_info"]["impl"] in case.peers:
            assert entry["extra_info"]["verified"] is True
            assert entry["extra_info"]["checked_against"] == "reference"


def _with_peer(prepare, check=None):
    """paged_decode's case with one made-up peer, for the peer plumbing's failure paths."""
    import dataclasses

    from bench.operators.base import Peer

    case = CASES["paged_decode"]
    shape = case.small_shapes()[0]
    peer = Peer("made-up", prepare, check or (lambda result, expected, shape: 0.0))
    return dataclasses.replace(case, peers={"made-up": peer}), shape, case.build(shape, "cpu", 0)


@pytest.mark.cpu_kernels
def test_a_peer_that_breaks_fails_loudly_and_is_never_a_skip():
    """Only PeerUnavailable means 'cannot run here'; any other error of a peer's set-up propagates out of
    the runner, verify_and_prepare and the benchmarks' prepare_peer (no pytest.skip)."""
    from bench.benchmarks.conftest import prepare_peer
    from bench.measure.runner import measure
    from bench.operators.base import verify_and_prepare

    def broken(inputs, shape):
        raise RuntimeError("the peer's own bug")

    case, shape, inputs = _with_peer(broken)
    info = _kernel_entry(measure(case, shape, device="cpu"))["extra_info"]
    assert (
        info["peers_failed"] == {"made-up": "RuntimeError: the peer's own bug"} and not info["peers_skipped"]
    )
    with pytest.raises(RuntimeError, match="own bug"):
        verify_and_prepare(case, "made-up", inputs, shape, None)
    with pytest.raises(RuntimeError, match="own bug"):
        prepare_peer(case, shape, "made-up", inputs, None)


def test_a_wrong_peer_fails_its_check():
    from bench.benchmarks.conftest import prepare_peer
    from bench.operators.base import Prepared
    from bench.operators.paged_attention import flex_check

    def off_by_one(inputs, shape):  # right layout, wrong values
        q = inputs.args["q"]
        return Prepared(lambda: torch.ones_like(q)[:, :, None, :])

    case, shape, inputs = _with_peer(off_by_one, flex_check)
    expected = inputs.clone()
    case.run_reference(expected)
    with pytest.raises(AssertionError, match="out"):
        prepare_peer(case, shape, "made-up", inputs, expected)


@pytest.mark.cpu_kernels
def test_an_unavailable_peer_is_skipped_with_its_reason():
    from bench.benchmarks.conftest import prepare_peer
    from bench.measure.runner import measure
    from bench.operators.base import PeerUnavailable

    def absent(inputs, shape):
        raise PeerUnavailable("not installed: pip install made-up")

    case, shape, inputs = _with_peer(absent)
    info = _kernel_entry(measure(case, shape, device="cpu"))["extra_info"]
    assert info["peers_skipped"] == {"made-up": "not installed: pip install made-up"}
    with pytest.raises(pytest.skip.Exception, match="made-up: not installed: pip install made-up"):
        prepare_peer(case, shape, "made-up", inputs, None)


def test_a_verified_peer_records_what_it_was_checked_against():
    from bench.benchmarks.conftest import prepare_peer

    case = CASES["paged_decode"]
    shape = next(
        s for s in case.small_shapes() if len(set(s.lengths)) == 1 and s.cache_dtype != torch.float8_e4m3fn
    )
    inputs = case.build(shape, "cpu", 0)
    expected = inputs.clone()
    case.run_reference(expected)
    prepared, info = prepare_peer(case, shape, "sdpa-contiguous", inputs, expected)
    assert info["verified"] is True and info["checked_against"] == "reference" and info["max_error"] < 0.1
    assert prepared.call().shape == (shape.batch, shape.num_q_heads, 1, shape.head_dim)


@pytest.mark.cpu_kernels
def test_moe_layer_names_its_expert_path_and_falls_back_only_when_refused(monkeypatch):
    """bench_moe's experts: grouped_mm where torch takes it (same rows as the per-expert loop); the loop,
    with the reason, only where torch._grouped_mm is missing or refuses the dtype or shape; any other error
    of grouped_mm propagates."""
    import kernels.moe as moe
    from bench.benchmarks import bench_moe

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (10, 1), generator=gen).int()
    ids = torch.cat([ids, (ids + 1) % 4], dim=1)

    def layer(hidden):
        x_sorted, plan = moe.dispatch(torch.randn(10, hidden, generator=gen).bfloat16(), ids, 4, align=16)
        w13 = (torch.randn(4, hidden, 96, generator=gen) * 0.05).bfloat16()
        w2 = (torch.randn(4, 48, hidden, generator=gen) * 0.05).bfloat16()
        return x_sorted, plan, w13, w2

    args = layer(64)
    assert bench_moe.expert_path(*args) == (bench_moe.GROUPED_MM, None)
    real = args[1].row_token >= 0
    grouped = bench_moe.expert_matmuls(*args, bench_moe.GROUPED_MM)[real]
    looped = bench_moe.expert_matmuls(*args, bench_moe.PER_EXPERT)[real]
    torch.testing.assert_close(grouped.float(), looped.float(), rtol=1.6e-2, atol=1e-3)
    path, why = bench_moe.expert_path(*layer(60))  # rows of 120 bytes: not 16-byte strides
    assert path == bench_moe.PER_EXPERT and "16 bytes" in why

    def crashes(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "_grouped_mm", crashes)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench_moe.expert_path(*args)
    monkeypatch.delattr(torch, "_grouped_mm")
    path, why = bench_moe.expert_path(*args)
    assert path == bench_moe.PER_EXPERT and "has no torch._grouped_mm" in why


class _Recorder:
    """The GPU timing of bench_moe and bench_moe_gemm simulated on the CPU: time_cuda answers from a table
    by label (graph replays) or 300 us (eager calls) without running anything, and records how each was
    asked; the capture and the benchmark's clock hand the call straight through; the benchmark's rounds
    run the round's setup once and read 20 us."""

    def __init__(self, monkeypatch, module, graph_us: dict):
        self.asked, self.captured, self.flushed, self.extra_info = [], [], [], {}
        self.graph_us = graph_us
        self.stats = type("Stats", (), {"stats": type("Median", (), {"median": 20e-6})()})()
        clock = type("Clock", (), {"timed": staticmethod(lambda fn, label="", host=False: fn)})()
        monkeypatch.setattr(module, "time_cuda", self.time_cuda)
        monkeypatch.setattr(module, "capture_graph", lambda fn: self.captured.append(fn) or fn)
        monkeypatch.setattr(module, "flush_l2", lambda: self.flushed.append(True))
        monkeypatch.setattr(module, "CUDA_CLOCK", clock)

    def time_cuda(self, fn, label, cuda_graph=False, **kw):
        self.asked.append((label, cuda_graph))
        us = self.graph_us.get(label.rsplit(" ", 1)[-1], 30.0) if cuda_graph else 300.0
        return Timing.from_samples([us / 1e3])

    def pedantic(self, fn, setup=None, **kw):
        setup()


@pytest.mark.cpu_kernels  # the GPU path simulated on CPU tensors
def test_fused_gather_figures_are_graph_replays(monkeypatch):
    """A decode layer's launches take longer to issue than to run: every figure of the fused-gather
    comparison (the layers, each stage, the saving, the copy, routing's share) is a CUDA-graph replay with
    L2 flushed; the eager medians are there too, named eager_*."""
    import dataclasses

    from bench.benchmarks import bench_moe_gemm
    from bench.operators.moe_gemm import MOE_LAYER, LayerShape
    from bench.serving.models import MoEModel

    stages = {"route": 3.0, "plan": 2.0, "dispatch": 6.0, "gate_up": 10.0, "down": 8.0, "combine": 1.0}
    bench = _Recorder(monkeypatch, bench_moe_gemm, stages)
    build = MOE_LAYER.build
    on_the_cpu = dataclasses.replace(MOE_LAYER, build=lambda shape, device, seed: build(shape, "cpu", seed))
    monkeypatch.setattr(bench_moe_gemm, "MOE_LAYER", on_the_cpu)
    monkeypatch.setattr(bench_moe_gemm, "grouped_gemm", lambda *a, **kw: torch.empty(0))  # timed, not run
    shape = LayerShape("tiny", 2, MoEModel("tiny", 32, 4, 2, 16))  # a few programs a GEMM
    bench_moe_gemm.test_fused_gather_saves_dispatchs_copy(bench, shape)
    graphed = [label for label, graph in bench.asked if graph]
    assert len(graphed) == 1 + len(stages) and all(
        graph != label.endswith(" eager") for label, graph in bench.asked
    )
    assert len(bench.captured) == 1 and bench.flushed  # the benchmark's rounds: the fused layer's graph
    info = bench.extra_info
    assert info["cuda_graph"] and info["stage_median_us"] == stages
    assert (info["fused_us"], info["unfused_us"], info["saved_us"]) == (20.0, 30.0, 10.0)
    assert info["dispatch_copy_us"] == 4.0 and info["target_met"]
    assert info["routing_share"] == round(6 / 24, 3)
    assert info["eager_fused_us"] == info["eager_unfused_us"] == 300.0


@pytest.mark.cpu_kernels  # the GPU path simulated on CPU tensors
def test_moe_layer_kernel_entry_is_a_graph_replay(monkeypatch):
    """bench_moe_gemm's test_moe_layer through gpu_benchmark's graph option (conftest.time_case): the
    kernel's entry is its graph's replays (L2 flushed before each), cuda_graph true, its GB/s from them; the
    eager median beside it as eager_us."""
    import functools

    from bench.benchmarks import bench_moe_gemm
    from bench.benchmarks import conftest as harness
    from bench.operators.moe_gemm import MOE_LAYER, LayerShape
    from bench.serving.models import MoEModel

    bench = _Recorder(monkeypatch, harness, {})
    monkeypatch.setattr(harness, "_inputs", lambda case, shape: case.build(shape, "cpu", 1))
    monkeypatch.setattr(harness, "expected_of", lambda case, shape, inputs: None)
    monkeypatch.setattr(harness, "verify_kernel", lambda *a: {"verified": True})
    monkeypatch.setattr(harness, "copy_bandwidth_gbps", lambda: 3000.0)
    monkeypatch.setattr(harness, "matmul_tflops", lambda: 700.0)
    shape = LayerShape("tiny", 2, MoEModel("tiny", 32, 4, 2, 16))
    bench_moe_gemm.test_moe_layer(functools.partial(harness.time_case, bench), shape, "triton")
    info = bench.extra_info
    assert info["cuda_graph"] and len(bench.captured) == 1 and bench.flushed
    assert info["gbps"] == round(MOE_LAYER.byte_model(shape) / 20e-6 / 1e9, 2)
    assert bench.asked == [(f"moe_layer[triton graph] {shape.label} eager", False)]
    assert info["eager_us"] == 300.0 and info["verified"]


@pytest.mark.cpu_kernels  # the GPU path simulated on CPU tensors
@pytest.mark.parametrize("grouped_mm", [True, False])
def test_moe_layer_share_is_timed_as_graphs_with_l2_flushed(monkeypatch, grouped_mm):
    """bench_moe's layer: the layer and its stages as CUDA-graph replays, L2 flushed before the layer's
    rounds as before every stage's; eager where the experts fall back to the per-expert loop (it syncs:
    no graph). Its routing share is named for the bf16 torch experts it runs against."""
    from bench.benchmarks import bench_moe
    from bench.serving.models import MoEModel

    monkeypatch.setitem(bench_moe.MOE_MODELS, "tiny", MoEModel("tiny", 64, 4, 2, 48))
    if not grouped_mm:
        monkeypatch.delattr(torch, "_grouped_mm")
    bench = _Recorder(
        monkeypatch, bench_moe, {"route": 2.0, "dispatch": 3.0, "experts": 14.0, "combine": 1.0}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning
        info = bench_moe.layer_share(bench, "tiny", 3, bench_moe.layer_inputs("tiny", 3, "cpu"))
    assert bench.flushed, "the layer's rounds must start from a cold L2, as each stage's do"
    assert info["cuda_graph"] is grouped_mm and len(bench.captured) == int(grouped_mm)
    assert all(graph == (grouped_mm and not label.endswith(" eager")) for label, graph in bench.asked)
    assert "routing_share" not in info and info["experts"].startswith("bf16, torch")
    if grouped_mm:
        assert info["routing_share_bf16_torch_experts"] == round(6 / 20, 3)


@pytest.mark.cpu_kernels  # the GPU path simulated on CPU tensors
def test_a_host_only_peer_is_timed_on_the_host_clock(monkeypatch):
    """CUDA events after the L2 flush read a host-only step (the host pool) as about 0 us: such a peer is
    timed on the host clock and its entry says so. measure's GPU path on this machine: the inputs built on
    the CPU, the CUDA-event timer replaced by a recorder."""
    import dataclasses

    from bench.measure import runner
    from bench.measure.timing import Timing

    case = CASES["allocate"]
    build = case.build
    on_the_cpu = lambda shape, device, seed, **kw: build(shape, "cpu", seed, **kw)  # noqa: E731
    gpu_like = dataclasses.replace(case, build=on_the_cpu)
    on_events = []

    def time_cuda(fn, label, **kw):
        on_events.append(label)
        return Timing.from_samples([1.0, 1.0])

    monkeypatch.setattr(runner, "time_cuda", time_cuda)
    monkeypatch.setattr(runner, "copy_bandwidth_gbps", lambda: 3000.0)
    monkeypatch.setattr(runner, "matmul_tflops", lambda: 700.0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    entries = runner.measure(gpu_like, case.small_shapes()[0], graph=False, device="cuda")
    timers = {e["extra_info"]["impl"]: (e["extra_info"]["timer"], e["extra_info"]["clock"]) for e in entries}
    assert timers == {
        "triton": ("cuda-events", "cuda-events"),
        "host-pool": ("host", "host clock (host-only work)"),
    }
    assert on_events and not any("host-pool" in label for label in on_events)


def test_the_benchmark_clock_times_host_only_calls_on_the_host():
    import time

    from bench.measure.timing import CudaClock

    clock = CudaClock()
    before = clock()
    clock.timed(lambda: time.sleep(0.02), label="host step", host=True)()
    assert clock() - before >= 0.02


def test_a_failed_peer_counts_once_per_shape():
    """The kernel's graph and eager entries carry the same peer record: one failure, not two."""
    from bench.commands.run import failures

    record = {"kernel": "paged_decode", "shape": "s", "impl": "triton", "peers_failed": {"flex": "boom"}}
    entries = [
        {"name": "paged_decode[triton graph] s", "extra_info": {**record, "cuda_graph": True}},
        {"name": "paged_decode[triton] s", "extra_info": record},
    ]
    assert failures(entries) == ["flex (paged_decode s)"]


def test_run_on_a_gpu_keeps_every_shape_measured_before_one_that_raises(tmp_path, monkeypatch, capsys):
    """One shape raising lost every result (no per-shape try, --out written only at the end): now the file
    holds what was measured, the traceback is logged beside it, and the run exits 1."""
    from bench.commands import run
    from bench.measure import runner

    calls = []

    def measure(case, shape, **kw):
        calls.append(shape.label)
        if len(calls) == 2:
            raise RuntimeError("illegal memory access (pretend)")
        info = {**results.cost_info(case, shape, 1e-3, None), "impl": "triton", "verified": True}
        return [results.entry(f"{case.name} {shape.label}", case.name, Timing.from_samples([1.0]), info)]

    monkeypatch.setattr(runner, "measure", measure)
    monkeypatch.setattr(run, "copy_bandwidth_gbps", lambda: 3000.0)
    out = tmp_path / "run.json"
    case = CASES["write_kv"]
    assert len(case.default_shapes()) >= 2
    assert run.run_gpu([case], graph=False, out=str(out)) == 1
    written = [e["extra_info"]["shape"] for e in results.load(out)["benchmarks"]]
    assert written == [calls[0], *calls[2:]]
    assert "illegal memory access" in (tmp_path / "run-errors.txt").read_text()
    assert f"write_kv {calls[1]} (raised)" in capsys.readouterr().err


def test_results_are_replaced_whole_never_rewritten_in_place(tmp_path, monkeypatch):
    """run.json is rewritten after every shape: written in place, a process ended mid-write (gpu-check's
    watchdog) left half a file. Now the new document is written beside it and renamed over it."""
    import os

    path = results.write(tmp_path / "run.json", [])
    seen = []

    def replace(source, target):
        seen.append((json.loads(Path(source).read_text()), json.loads(Path(target).read_text())))
        real_replace(source, target)

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", replace)
    entry = results.entry("k s", "k", Timing.from_samples([1.0]), {"kernel": "k", "shape": "s"})
    results.write(path, [entry])
    ((new, old),) = seen
    assert old["benchmarks"] == [] and new["benchmarks"] == [entry], "the old file whole until the rename"
    assert results.load(path)["benchmarks"] == [entry]
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"], "no temporary file left"


def test_a_peer_on_another_clock_has_its_ratio_labelled_with_both():
    """The host pool (host clock) over the kernel's CUDA-event time read as a plain speedup: host time is
    set beside device time, and the table says so; peers timed like the kernel are unlabelled."""
    from bench.measure import reports

    def entry(impl, timer, median_s):
        info = {"kernel": "allocate", "shape": "s", "impl": impl, "timer": timer, "verified": True}
        return results.entry(f"allocate[{impl}] s", "allocate", Timing.from_samples([median_s * 1e3]), info)

    gpu = reports.results_table([entry("triton", "cuda-events", 1e-5), entry("host-pool", "host", 4e-5)])
    assert "host-pool 4.00x (host clock vs device time)" in gpu
    dry = reports.results_table([entry("triton", "host", 1e-5), entry("host-pool", "host", 4e-5)])
    assert "host-pool 4.00x" in dry and "vs device time" not in dry


def test_a_result_file_keeps_a_plain_writes_mode_and_a_failed_write_keeps_the_old_one(tmp_path, monkeypatch):
    """write_text_atomic renames a finished file over the old one (no reader sees half of it), leaves no
    temporary file behind, and keeps the mode a plain write gives (mkstemp's 0600 would survive the
    rename and hide the results from other users)."""
    path = tmp_path / "run.json"
    path.write_text("old")
    (tmp_path / "plain").write_text("")
    results.write_text_atomic(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["plain", "run.json"]
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777

    def broken_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", broken_replace)
    with pytest.raises(OSError):
        results.write_text_atomic(path, "newer")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["plain", "run.json"]
