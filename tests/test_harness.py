"""The measuring side: quantiles, the results schema, reports, model presets and the CLI on this machine."""

import json

import pytest
import torch

from bench.cases import CASES
from bench.commands import cli
from bench.measure import results
from bench.measure.device import machine_info, slug
from bench.measure.timing import Timing
from bench.models import MODELS


def test_timing_quantiles():
    timing = Timing.from_samples([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (timing.median_ms, timing.min_ms, timing.mean_ms) == (3.0, 1.0, 3.0)
    assert timing.p20_ms == pytest.approx(1.8) and timing.p80_ms == pytest.approx(4.2)


@pytest.mark.parametrize(
    "model, kv_bytes",
    [
        ("Llama-3.1-8B", 131072),
        ("Llama-3.1-70B", 327680),
        ("Llama-3.1-405B", 516096),
        ("Qwen3-32B", 262144),
        ("Qwen3-30B-A3B", 98304),
        ("Qwen3-235B-A22B", 192512),
        ("Mixtral-8x7B", 131072),
        ("gpt-oss-120b", 73728),
        ("DeepSeek-R1", 70272),
    ],
)
def test_model_presets_match_the_published_kv_bytes(model, kv_bytes):
    """shared/facts.md's last column, recomputed from the preset's geometry."""
    assert MODELS[model].kv_bytes_per_token() == kv_bytes


def test_tensor_parallel_splits_kv_heads_only_up_to_their_count():
    assert MODELS["Llama-3.1-70B"].kv_heads_per_rank(8) == 1
    assert MODELS["Llama-3.1-70B"].kv_heads_per_rank(16) == 1
    assert MODELS["DeepSeek-R1"].kv_heads_per_rank(8) == 1


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
        ('{"benchmarks": [{"name": "x", "stats": {}}]}', "benchmarks[0] has no name or no stats.median"),
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
def test_run_without_gpu_verifies_and_reports(capsys):
    assert cli.main(["run"]) == 0
    out = capsys.readouterr().out
    for heading in ("Verified against the reference", "Static", "Traffic", "Projections, not measurements"):
        assert heading in out
    shapes = sum(len(case.small_shapes()) for case in CASES.values())
    assert "FAILED" not in out and out.count("verified") == shapes


def test_unknown_kernel_is_named():
    with pytest.raises(SystemExit, match="unknown nope"):
        cli.main(["static", "--kernel", "nope"])


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
    assert graphed.median_ms > 0
    assert copy_bandwidth_gbps() > 100
