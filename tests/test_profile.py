"""decodebench profile: the torch tool on this machine, and the nsys and ncu parsers on report files in the
tools' CSV formats (tests/data: written in those formats by hand, since no GPU here could record real
ones; their numbers are illustrations, not measurements)."""

import csv
from pathlib import Path

import pytest
import torch

from bench.commands import cli
from bench.measure import profile
from bench.operators import CASES

DATA = Path(__file__).parent / "data"


def test_nsys_kernel_summary_parser():
    """nsys's header is unquoted (the parser looked for a quoted one and found no table, silently): the
    example follows nsys, and an all-quoted copy of it reads the same."""
    text = (DATA / "nsys_cuda_gpu_kern_sum.csv").read_text()
    rows = profile.parse_nsys_kernel_summary(text)
    assert [r.name for r in rows] == ["_paged_decode_kernel", "_merge_splits_kernel<int, 4>"]
    assert rows[0].launches == 10 and rows[0].seconds == pytest.approx(1.25184e-3)
    assert rows[0].dram_bytes is None
    table = [line for line in text.splitlines() if line.startswith(("Time", "91", "8.8"))]
    quoted = "\n".join(",".join(f'"{field}"' for field in next(csv.reader([line]))) for line in table)
    assert profile.parse_nsys_kernel_summary(quoted) == rows


@pytest.mark.parametrize(
    "parse, printed, message",
    [
        (profile.parse_ncu_metrics, "==WARNING== No kernels were profiled.\n", "ncu profiled no kernel"),
        (profile.parse_nsys_kernel_summary, "", "no kernel in its cuda_gpu_kern_sum"),
        (profile.parse_nsys_kernel_summary, "Time (%),Total Time (ns),Instances,Name\n", "no kernel"),
    ],
)
def test_a_report_without_kernels_is_an_error_not_an_empty_table(parse, printed, message):
    with pytest.raises(ValueError, match=message):
        parse(printed)


def test_example_files_say_they_are_hand_written_and_the_parser_skips_that():
    for path in DATA.glob("*.csv"):
        assert path.read_text().startswith("# Hand-written example"), path.name
    text = (DATA / "nsys_cuda_gpu_kern_sum.csv").read_text()
    header = next(line for line in text.splitlines() if line.startswith("Time (%),"))
    commented = text.replace(header, f"{header}\n# a comment between the header and the rows")
    assert profile.parse_nsys_kernel_summary(commented) == profile.parse_nsys_kernel_summary(text)


def test_ncu_metrics_parser_folds_rows_and_converts_units():
    rows = profile.parse_ncu_metrics((DATA / "ncu_metrics.csv").read_text())
    decode, merge = rows
    assert decode.name == "_paged_decode_kernel" and decode.launches == 1
    assert decode.seconds == pytest.approx(412.35e-6)
    assert decode.dram_bytes == pytest.approx(1074.27e6 + 524.29e3)
    assert decode.dram_pct == pytest.approx(86.52) and decode.sm_pct == pytest.approx(31.07)
    assert merge.dram_bytes == pytest.approx((540.67 + 262.14) * 1e3)


def test_summary_sets_measured_dram_beside_the_byte_model():
    case = CASES["paged_decode"]
    shape = case.default_shapes()[1]
    rows = profile.parse_ncu_metrics((DATA / "ncu_metrics.csv").read_text())
    text = profile.summary(case, shape, rows, calls=1)
    assert "DRAM B/call" in text and "x the model" in text and f"{case.byte_model(shape):.4g}" in text


def test_torch_tool_runs_without_nsight(tmp_path, capsys):
    """The profile holds the calls made: without a GPU, one row for the case's calls, 2 of them (one a
    call in the table), with time; on a GPU, the kernel's own launches."""
    assert (
        cli.main(
            ["profile", "write_kv", "--shape", "0", "--tool", "torch", "--calls", "2", "--out", str(tmp_path)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "byte model" in out and (tmp_path / "write_kv-0-torch.md").read_text().strip() in out
    case = CASES["write_kv"]
    rows, _ = profile.profile_torch(case, case.default_shapes()[0], calls=2)
    if torch.cuda.is_available():
        kernel = next(r for r in rows if "write_kv" in r.name)
    else:
        (kernel,) = rows
        assert kernel.name == "write_kv call"
        assert "| write_kv call | 1 " in out
    assert kernel.launches == 2 and kernel.seconds > 0


def test_a_missing_tool_is_named():
    import shutil

    if shutil.which("ncu"):
        pytest.skip("ncu is installed here")
    with pytest.raises(RuntimeError, match="ncu is not on PATH"):
        profile.profile_ncu("write_kv", 0, 1, Path("."))


def test_profile_target_runs_the_calls(monkeypatch):
    """One warm-up call outside the NVTX range ncu selects, then exactly --calls calls inside it."""
    from contextlib import contextmanager

    from bench.operators.base import Case

    inside, calls = [False], []

    @contextmanager
    def recorded_range(name):
        assert name == profile.PROFILE_RANGE
        inside[0] = True
        yield
        inside[0] = False

    run_kernel = Case.run_kernel
    monkeypatch.setattr(profile, "nvtx_range", recorded_range)
    monkeypatch.setattr(
        Case, "run_kernel", lambda self, inputs: (calls.append(inside[0]), run_kernel(self, inputs))
    )
    assert cli.main(["profile-target", "copy_blocks", "--shape", "0", "--calls", "2"]) == 0
    assert calls == [False, True, True]


def test_report_plots_a_roofline_and_decode_bandwidth(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    from bench.measure import results
    from bench.measure.timing import Timing

    entries = []
    for case_name, shape_index in (("paged_decode", 0), ("paged_decode", 1), ("write_kv", 0), ("route", 1)):
        case = CASES[case_name]
        shape = case.default_shapes()[shape_index]
        info = {**results.cost_info(case, shape, 1e-4, 3000.0), "impl": "triton"}
        entries.append(results.entry(shape.label, case.name, Timing.from_samples([0.1, 0.1]), info))
    path = results.write(tmp_path / "run.json", entries)
    assert cli.main(["report", str(path), "--plot", str(tmp_path)]) == 0
    for name in ("run-roofline.png", "run-decode-gbps.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_profile_target_resets_outside_the_range(monkeypatch):
    """allocate's pool is put back before every call: outside the NVTX range, or ncu profiles the reset's
    copies and counts them as the kernel's launches."""
    import dataclasses
    from contextlib import contextmanager

    from bench.operators.base import Case

    events = []

    @contextmanager
    def recorded_range(name):
        events.append("(")
        yield
        events.append(")")

    case = CASES["allocate"]
    build = case.build

    def build_recording_resets(shape, device, seed, **kw):
        inputs = build(shape, device, seed, **kw)
        reset = inputs.reset
        inputs.reset = lambda: (events.append("reset"), reset())
        return inputs

    run_kernel = Case.run_kernel
    monkeypatch.setattr(profile, "nvtx_range", recorded_range)
    monkeypatch.setattr(
        Case, "run_kernel", lambda self, inputs: (events.append("call"), run_kernel(self, inputs))
    )
    recording = dataclasses.replace(case, build=build_recording_resets)
    profile.target(recording, case.small_shapes()[0], calls=2)
    warm_up, profiled = ["reset", "call"], ["reset", "(", "call", ")"]
    assert events == warm_up + 2 * profiled


def test_ncu_reports_base_units_and_an_unknown_unit_is_an_error(monkeypatch, tmp_path):
    """A unit the parser did not know counted as x1; ncu is asked for base units, and anything else the
    parser cannot convert is refused, naming the unit."""
    import shutil
    import subprocess

    seen = {}

    def ncu(command, **kw):
        seen["command"] = command
        return subprocess.CompletedProcess(command, 0, (DATA / "ncu_metrics.csv").read_text(), "")

    monkeypatch.setattr(shutil, "which", lambda name: f"/opt/nsight/{name}")
    monkeypatch.setattr(subprocess, "run", ncu)
    assert profile.profile_ncu("write_kv", 0, 1, tmp_path)
    command = seen["command"]
    assert command[command.index("--print-units") + 1] == "base"
    text = (DATA / "ncu_metrics.csv").read_text().replace('"nsecond"', '"cycle"', 1)
    with pytest.raises(ValueError, match="cycle"):
        profile.parse_ncu_metrics(text)


def test_the_profile_scripts_run_python3_or_PYTHON():
    """They called `python`, which a machine with only python3 (the lent GPU machines' torch) lacks."""
    import re

    for script in (Path(__file__).parents[1] / "profiles").glob("*.sh"):
        commands = [line for line in script.read_text().splitlines() if not line.startswith("#")]
        assert not any(re.search(r"(^|[\s(])python\s", line) for line in commands), script.name
        assert '"${PYTHON:-python3}" -m bench profile' in script.read_text(), script.name
