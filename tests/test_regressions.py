"""Regression tracking: timing comparisons that fail past a threshold (on synthetic result files), and the
committed CPU-side proxy baseline that a spill, a narrower access or more traffic fails against."""

import copy
import functools

import pytest
import triton

from bench.commands import cli, compare
from bench.measure import proxies, results
from bench.measure.timing import Timing
from bench.operators import static_cases
from kernels import INTERPRETED


def _results(path, medians_us: dict):
    entries = []
    for (kernel, shape), median in medians_us.items():
        timing = Timing.from_samples([median * 1e-3 * f for f in (0.98, 1.0, 1.02)])
        info = {"kernel": kernel, "shape": shape, "impl": "triton"}
        entries.append(results.entry(f"{kernel} {shape}", kernel, timing, info))
    return results.write(path, entries)


def test_compare_prints_deltas_and_fails_past_the_threshold(tmp_path, capsys):
    base = _results(
        tmp_path / "base.json",
        {("write_kv", "a"): 10.0, ("paged_decode", "b"): 100.0, ("route", "gone"): 5.0},
    )
    new = _results(
        tmp_path / "new.json",
        {("write_kv", "a"): 10.5, ("paged_decode", "b"): 125.0, ("route", "added"): 5.0},
    )
    assert cli.main(["compare", str(base), str(new), "--fail", "median:10%"]) == 1
    out = capsys.readouterr().out
    assert "+25.0%" in out and "+5.0%" in out and "FAILED" in out
    assert "only in BASE: route triton gone" in out and "only in NEW: route triton added" in out
    assert cli.main(["compare", str(base), str(new), "--fail", "median:30%"]) == 0


def test_compare_refuses_other_gpus_and_other_clocks(tmp_path, capsys):
    """compare never read machine_info: an H100 file against an H200 one, or a dry run's wall clock
    against CUDA events, came out as a regression or a win. Another GPU needs --allow-other-gpu; another
    clock is refused outright."""
    import json

    def on(path, gpu, clock=None):
        document = json.loads(path.read_text())
        document["machine_info"]["gpu"] = gpu
        for entry in document["benchmarks"]:
            if clock:
                entry["extra_info"].update(timer="host", clock=clock)
        (tmp_path / f"{gpu}-{clock}.json").write_text(json.dumps(document))
        return str(tmp_path / f"{gpu}-{clock}.json")

    written = _results(tmp_path / "r.json", {("write_kv", "a"): 10.0})
    h100, h200 = on(written, "NVIDIA H100 80GB HBM3"), on(written, "NVIDIA H200")
    assert cli.main(["compare", h100, h200]) == 2
    assert "measured on NVIDIA H100 80GB HBM3" in capsys.readouterr().err
    assert cli.main(["compare", h100, h200, "--allow-other-gpu"]) == 0
    dry = on(written, "NVIDIA H200", "wall-clock (dry run)")
    assert cli.main(["compare", h200, dry, "--allow-other-gpu"]) == 2
    assert "different clocks" in capsys.readouterr().err


def test_thresholds_parse_percent_and_time():
    assert compare.Threshold.parse("median:10%").exceeded(1.0, 1.11)
    assert not compare.Threshold.parse("min:5us").exceeded(1e-3, 1e-3 + 4e-6)
    with pytest.raises(ValueError, match="^--fail: "):
        compare.Threshold.parse("p99:10%")


@functools.cache
def current():
    return proxies.collect(static_cases())


# The proxies are the interpreter's traffic and the pinned compiler's cubins: CI's setting. On a GPU the
# timings are the check (and traffic cannot be counted there).
needs_ci_setting = pytest.mark.skipif(
    not INTERPRETED or proxies.load()["triton"] != triton.__version__,
    reason="CPU-side proxies are checked in the interpreter with the baseline's Triton (CI pins it)",
)


@needs_ci_setting
def test_the_committed_baseline_holds():
    """The check CI runs: no kernel spills more, loads narrower or moves more bytes than the baseline says.
    An intended change updates bench/baselines/cpu-proxies.json (decodebench proxies --update)."""
    problems = proxies.check(current(), proxies.load())
    assert not problems, "\n".join(problems)


def _first_compiled(state):
    return next(k for k, v in state["static"].items() if "error" not in v and v["load_widths"].get("16"))


@needs_ci_setting
def test_a_planted_spill_fails():
    planted = copy.deepcopy(current())
    key = _first_compiled(planted)
    planted["static"][key]["spill_bytes"] += 64
    assert any("spills" in p and key in p for p in proxies.check(planted, current()))


@needs_ci_setting
def test_a_planted_narrower_load_fails():
    planted = copy.deepcopy(current())
    key = _first_compiled(planted)
    widths = planted["static"][key]["load_widths"]
    widths["2"] = widths.pop("16")  # the 16-byte loads became 2-byte ones
    assert any("loads" in p and key in p for p in proxies.check(planted, current()))


@needs_ci_setting
def test_planted_traffic_and_lost_shapes_fail():
    planted = copy.deepcopy(current())
    key = next(iter(planted["traffic"]))
    planted["traffic"][key] += 0.05
    gone = next(iter(planted["static"]))
    del planted["static"][gone]
    problems = proxies.check(planted, current())
    assert any("traffic ratio" in p for p in problems) and any("gone" in p for p in problems)


@needs_ci_setting
def test_registers_compare_only_under_the_same_triton():
    planted = copy.deepcopy(current())
    key = _first_compiled(planted)
    planted["static"][key]["registers"] += 40
    assert any("registers" in p for p in proxies.check(planted, current()))
    planted["triton"] = "0.0-other"
    assert not any("registers" in p for p in proxies.check(planted, current()))
    planted["static"][key]["spill_bytes"] += 8
    assert any("spills" in p for p in proxies.check(planted, current()))  # spills count under any compiler


def test_every_kernel_is_in_the_static_baseline():
    """Each @triton.jit kernel the kernels/ package launches (a ``_<name>_kernel``) is compiled for sm_90 by
    some static shape, so the baseline holds its figures and the compile proves it builds for a GPU at all
    (the interpreter runs what the compiler refuses: free once read a global that was no tl.constexpr)."""
    import importlib
    import pkgutil

    import kernels
    from bench.measure.static import _is_triton_kernel

    launched = set()
    for module in pkgutil.iter_modules(kernels.__path__):
        found = vars(importlib.import_module(f"kernels.{module.name}"))
        launched |= {
            name for name, obj in found.items() if _is_triton_kernel(obj) and name.endswith("_kernel")
        }
    static = proxies.load()["static"].items()
    compiled = {key.split(" | ")[1] for key, row in static if key.endswith("sm_90") and "error" not in row}
    assert launched, "no kernels found"
    assert launched <= compiled, f"kernels no static shape compiles: {sorted(launched - compiled)}"
