"""gpu-check's orchestration, proved on this machine: the dry run on the CPU under a budget too small for
every step, the step bookkeeping with the steps faked (crashes, the deadline, --only), subprocesses killed
at the deadline, and the L2 flush that reads."""

import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.commands import gpu_check
from bench.commands.gpu_check import STEPS, StepResult, run_subprocess
from bench.measure import results

STATES = ("ok", "failed", "partial", "timed out", "skipped", "not reached", "not selected")


def _states(summary: str) -> dict[str, str]:
    """step -> state, from summary.md's step list."""
    found = dict(
        re.findall(
            r"^- ([a-z-]+): (ok|failed|partial|timed out|skipped|not reached|not selected)",
            summary,
            flags=re.M,
        )
    )
    return {name: found.get(name) for name in STEPS}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU's stand-in for a GPU run")
def test_dry_run_keeps_its_budget_and_lists_every_step(tmp_path):
    """A budget too small for every step: what finished is on disk, what did not is listed as such."""
    budget = 9.0
    start = time.monotonic()
    status = gpu_check.run(str(tmp_path), budget_s=budget, dry_run=True)
    elapsed = time.monotonic() - start
    assert elapsed < budget + 15, f"overran its {budget} s budget by {elapsed - budget:.0f} s"
    summary = (tmp_path / "summary.md").read_text()
    states = _states(summary)
    assert all(states[name] in STATES for name in STEPS), states
    assert "dry run" in summary and "no GPU figure" in summary
    assert states["machine"] == "ok" and (tmp_path / "machine.json").exists()
    assert states["default-shapes"] in ("ok", "partial")
    assert results.load(tmp_path / "run.json")["benchmarks"], "the first shapes measured are written"
    for entry in results.load(tmp_path / "run.json")["benchmarks"]:
        assert entry["extra_info"]["clock"].startswith("wall-clock"), (
            "a dry run must not pass as a GPU figure"
        )
    assert states["tests"] == "not reached", "9 s cannot hold the whole suite: it must say so"
    assert list(states.values()).count("not reached") >= 1
    assert status == (1 if "failed" in states.values() else 0)


def _fake_steps(monkeypatch, behaviour: dict):
    calls = []

    def make(name):
        def step(run):
            calls.append(name)
            assert (run.folder / "summary.md").exists(), "summary.md from the start, then after each step"
            action = behaviour.get(name, "ok")
            if action == "crash":
                raise RuntimeError(f"{name} blew up")
            if action == "sleep":
                while not run.out_of_time(0.5):
                    time.sleep(0.05)
                return StepResult("partial", "stopped at the deadline")
            return StepResult(action, f"{name} did its work")

        return step

    monkeypatch.setattr(gpu_check, "STEP_FUNCTIONS", {name: make(name) for name in STEPS})
    return calls


def test_a_crashing_step_leaves_the_others_and_fails_the_run(tmp_path, monkeypatch):
    calls = _fake_steps(monkeypatch, {"static": "crash", "ncu": "skipped"})
    assert gpu_check.run(str(tmp_path), budget_s=30, dry_run=True) == 1
    assert calls == list(STEPS)
    assert "static blew up" in (tmp_path / "static-error.txt").read_text()
    states = _states((tmp_path / "summary.md").read_text())
    assert states["static"] == "failed" and states["ncu"] == "skipped" and states["tests"] == "ok"


def test_the_deadline_stops_the_run_and_what_was_not_reached_is_listed(tmp_path, monkeypatch):
    calls = _fake_steps(monkeypatch, {"static": "sleep"})
    start = time.monotonic()
    assert gpu_check.run(str(tmp_path), budget_s=5, dry_run=True) == 0  # the budget ending is no failure
    assert time.monotonic() - start < 8
    assert calls == ["machine", "default-shapes", "static"]
    states = _states((tmp_path / "summary.md").read_text())
    assert states["static"] == "partial"
    assert all(states[name] == "not reached" for name in STEPS[3:]), states


def test_only_runs_the_named_steps(tmp_path, monkeypatch):
    calls = _fake_steps(monkeypatch, {})
    assert gpu_check.run(str(tmp_path), budget_s=30, only="static,tune", dry_run=True) == 0
    assert calls == ["static", "tune"]
    states = _states((tmp_path / "summary.md").read_text())
    assert [name for name, state in states.items() if state == "not selected"] == [
        name for name in STEPS if name not in ("static", "tune")
    ]
    with pytest.raises(SystemExit, match="unknown step nope"):
        gpu_check.run(str(tmp_path), only="static,nope", dry_run=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_only_the_dry_run_runs(tmp_path, capsys):
    assert gpu_check.run(str(tmp_path)) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_subprocess_steps_log_and_are_killed_at_the_deadline(tmp_path):
    done = run_subprocess("hello", tmp_path, [sys.executable, "-c", "print('hi')"], timeout=60)
    assert (
        done.state == "ok"
        and done.detail.startswith("exit 0")
        and (tmp_path / "hello.txt").read_text() == "hi\n"
    )
    failed = run_subprocess("bad", tmp_path, [sys.executable, "-c", "raise SystemExit(3)"], timeout=60)
    assert failed.state == "failed" and "exit 3" in failed.detail
    start = time.monotonic()
    slow = run_subprocess(
        "slow",
        tmp_path,
        [sys.executable, "-c", "print('started', flush=True); import time; time.sleep(30)"],
        1.0,
    )
    assert time.monotonic() - start < 10
    assert slow.state == "timed out"
    log = (tmp_path / "slow.txt").read_text()
    assert "started" in log and "KILLED at the deadline" in log


def test_the_l2_flush_reads_and_writes_nothing_but_its_sum():
    from bench.measure.timing import read_through

    buffer = torch.arange(4096, dtype=torch.float32)
    before, version = buffer.clone(), buffer._version
    total = torch.zeros(())
    read_through(buffer, total)
    assert buffer._version == version and torch.equal(buffer, before), "the flush wrote its buffer"
    assert total.item() == before.sum().item(), "the flush did not read the whole buffer"


def test_no_l2_clearing_by_writing_anywhere_in_bench():
    """A flush that writes leaves dirty lines to be written back inside the next timed call."""
    root = Path(__file__).resolve().parents[1] / "bench"
    offenders = []
    for path in root.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"(flush|l2|cache_clear).*\.(zero_|fill_|copy_|normal_|uniform_)\(", line, re.I):
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_the_sanitizer_target_verifies_one_small_shape(capsys):
    from bench.commands import cli

    assert cli.main(["sanitize-target", "copy_blocks"]) == 0
    assert "copy_blocks" in capsys.readouterr().out


def test_a_shape_that_raises_costs_only_itself(tmp_path, monkeypatch):
    """One bad shape is logged and failed; every other shape of the step is still measured and written."""
    from bench.measure import runner
    from bench.measure.timing import Timing

    def measure(case, shape, **kw):
        if case.name == "paged_decode":
            raise RuntimeError("illegal memory access (pretend)")
        info = {**results.cost_info(case, shape, 1e-3, None), "impl": "triton", "verified": True}
        return [results.entry(f"{case.name} {shape.label}", case.name, Timing.from_samples([1.0, 1.1]), info)]

    monkeypatch.setattr(runner, "measure", measure)
    assert gpu_check.run(str(tmp_path), budget_s=30, only="default-shapes", dry_run=True) == 1
    measured = {e["extra_info"]["kernel"] for e in results.load(tmp_path / "run.json")["benchmarks"]}
    assert measured == {name for name in gpu_check.CASES if name != "paged_decode"}
    assert "illegal memory access" in (tmp_path / "run-errors.txt").read_text()
    assert "paged_decode" in _states_detail((tmp_path / "summary.md").read_text(), "default-shapes")


def _states_detail(summary: str, step: str) -> str:
    return next(line for line in summary.splitlines() if line.startswith(f"- {step}:"))


def _gone(pid: int) -> bool:
    """Dead, or a zombie waiting for a parent that will never read it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _all_gone(pids, within_s: float = 3.0) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if all(_gone(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


# Starts a grandchild in its own process group and one in a session of its own (as torchrun starts its
# workers), prints their ids, then waits, or exits when told to.
_PARENT = (
    "import subprocess, sys, time\n"
    "same = subprocess.Popen(['sleep', '60'])\n"
    "own = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
    "print(same.pid, own.pid, flush=True)\n"
    "time.sleep(0 if sys.argv[1] == 'exit' else 60)\n"
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_step_killed_at_the_deadline_takes_every_process_it_started_with_it(tmp_path):
    """torchrun's workers, ncu's and compute-sanitizer's targets are grandchildren: killing the child alone
    left them running on the GPU, writing after summary.md said the step had timed out."""
    slow = run_subprocess("slow", tmp_path, [sys.executable, "-c", _PARENT, "wait"], timeout=1.5)
    assert slow.state == "timed out"
    pids = [int(pid) for pid in (tmp_path / "slow.txt").read_text().split()[:2]]
    assert _all_gone(pids), f"still running after the step was killed: {[p for p in pids if not _gone(p)]}"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_step_that_exits_leaves_nothing_running_in_its_group(tmp_path):
    done = run_subprocess("quick", tmp_path, [sys.executable, "-c", _PARENT, "exit"], timeout=30)
    assert done.state == "ok"
    same, _ = [int(pid) for pid in (tmp_path / "quick.txt").read_text().split()[:2]]
    assert _all_gone([same]), "a process the step left in its group outlived it"


def test_a_hung_step_is_recorded_by_the_watchdog(tmp_path, monkeypatch):
    """An in-process step checks the deadline only between shapes: one that never comes back (a hung kernel)
    is recorded as timed out while it still runs; on a GPU the process then ends (here, a dry run, not)."""
    monkeypatch.setattr(gpu_check, "HANG_GRACE_S", 0.2)
    monkeypatch.setattr(gpu_check, "MIN_START_S", 0.0)
    ended, seen = [], {}
    monkeypatch.setattr(gpu_check.os, "_exit", ended.append)

    def hangs(run):
        time.sleep(max(run.left(), 0) + 0.8)  # never looks at the deadline
        seen["summary"] = (run.folder / "summary.md").read_text()
        return StepResult("ok", "came back at last")

    monkeypatch.setattr(gpu_check, "STEP_FUNCTIONS", {**gpu_check.STEP_FUNCTIONS, "static": hangs})
    gpu_check.run(str(tmp_path), budget_s=0.3, only="static", dry_run=True)
    assert _states(seen["summary"])["static"] == "timed out" and "past the deadline" in seen["summary"]
    assert not ended, "a dry run must not end the process"
    check = gpu_check.CheckRun(tmp_path, time.monotonic(), dry_run=False, selected=("static",))
    gpu_check._hung(check, "static")
    assert ended == [0] and _states((tmp_path / "summary.md").read_text())["static"] == "timed out"


def test_each_step_gives_the_cached_gpu_memory_back(tmp_path, monkeypatch):
    released = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # as after any step on a GPU
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(True))
    _fake_steps(monkeypatch, {"static": "crash"})
    gpu_check.run(str(tmp_path), budget_s=30, only="machine,static,tune", dry_run=True)
    assert len(released) == 3, "after every step, the crashed one too"


def test_the_sanitizer_step_captures_on_the_gpu_and_runs_without_the_caching_allocator(tmp_path, monkeypatch):
    """On a GPU the launchers refuse CPU tensors: the capture that picks racecheck must use the run's device.
    compute-sanitizer is faked here (a script that prints what it was given)."""
    from bench.measure import static

    tools = tmp_path / "bin"
    tools.mkdir()
    fake = tools / "compute-sanitizer"
    fake.write_text(
        "#!/bin/sh\necho caching=$PYTORCH_NO_CUDA_MEMORY_CACHING args=$*\necho '= ERROR SUMMARY: 0 errors'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    devices = []
    monkeypatch.setattr(static, "capture", lambda case, shape, device=None: devices.append(device) or [])
    check = gpu_check.CheckRun(tmp_path, time.monotonic() + 60, dry_run=False, selected=STEPS)
    result = gpu_check.step_sanitizer(check)
    assert result.state == "ok", result
    assert devices and set(devices) == {"cuda"}, devices
    logs = list(tmp_path.glob("sanitizer-memcheck-*.txt"))
    assert len(logs) == len(gpu_check.CASES)
    assert all("caching=1 " in log.read_text() for log in logs)


def test_decode_step_runs_each_model_with_its_own_arguments(tmp_path, monkeypatch):
    """One model failing must not cost the other its run; a folder with a space stays one argument."""
    calls = []

    def fake(name, folder, command, timeout, env=None, append=False):
        calls.append((command, append))
        return StepResult("failed" if len(calls) == 1 else "ok", f"exit {0 if len(calls) > 1 else 1}")

    monkeypatch.setattr(gpu_check, "run_subprocess", fake)
    folder = tmp_path / "a folder"
    folder.mkdir()
    check = gpu_check.CheckRun(folder, time.monotonic() + 60, dry_run=True, selected=STEPS)
    gpu_check.step_decode_step(check)  # --only decode-step: no machine.json yet, so the card's anchors
    assert all(command[command.index("--gpu") + 1] == "h200" for command, _ in calls), calls
    calls.clear()
    (folder / "machine.json").write_text("{}")
    result = gpu_check.step_decode_step(check)
    assert len(calls) == 2 and [append for _, append in calls] == [False, True]
    for command, _ in calls:
        assert command[:4] == [sys.executable, "-m", "bench", "step"]
        assert command[command.index("--gpu") + 1] == str(folder)
        # each model's stages, projected and measured, where `validate --gpu FOLDER` reads them
        assert command[command.index("--json") + 1] == str(folder / f"decode-step-{command[4]}.json")
    assert result.state == "failed" and "DeepSeek-R1: ok" in result.detail


def test_cpu_tensor_tests_skip_with_the_reason_where_kernels_are_compiled(monkeypatch):
    """The suite's device rule (conftest.py), as on a GPU box: compiled kernels refuse CPU tensors, so a
    test marked cpu_kernels skips with the reason (it failed there, blamed on the kernels)."""
    import conftest
    from bench.measure import device

    class Item:
        def __init__(self, *marks):
            self.keywords, self.added = dict.fromkeys(marks), []

        def add_marker(self, marker):
            self.added.append(marker)

    monkeypatch.setattr(device, "kernel_device", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpu, plain, gpu = Item("cpu_kernels"), Item(), Item("gpu")
    conftest.pytest_collection_modifyitems(None, [cpu, plain, gpu])
    (skip,) = cpu.added
    assert skip.name == "skip" and "CUDA tensors only" in skip.kwargs["reason"]
    assert not plain.added and not gpu.added


def _fake_tool_runs(monkeypatch, state: str, printed: str) -> list:
    """run_subprocess faked: every command 'ends' in ``state`` having printed ``printed`` to its log."""
    calls = []

    def fake(name, folder, command, timeout, env=None, append=False):
        calls.append(name)
        (folder / f"{name}.txt").write_text(printed)
        return StepResult(state, f"{state}: {printed.splitlines()[-1]}")

    monkeypatch.setattr(gpu_check, "run_subprocess", fake)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda tool: f"/opt/nvidia/{tool}")
    return calls


def test_a_sanitizer_run_cut_by_the_deadline_is_no_failure(tmp_path, monkeypatch):
    """The budget, not the kernel, ended it: the step is partial and gpu-check exits 0 (it was failed)."""
    from bench.measure import static

    monkeypatch.setattr(static, "capture", lambda case, shape, device=None: [])
    calls = _fake_tool_runs(monkeypatch, "timed out", "killed at the deadline")
    assert gpu_check.run(str(tmp_path), budget_s=60, only="sanitizer", dry_run=True) == 0
    assert len(calls) == len(gpu_check.CASES)
    assert _states((tmp_path / "summary.md").read_text())["sanitizer"] == "partial"


# What the tools printed on this workplace's gVisor machines (KINDS.md, 2026-11-04).
NCU_REFUSED = "==ERROR== Failed to initialize the profiler: LibraryNotLoaded"
SANITIZER_REFUSED = "========= Error: Device not supported\n========= Target application returned an error"


def test_tools_the_machine_will_not_run_are_skipped_with_their_line(tmp_path, monkeypatch):
    """ncu without counters and compute-sanitizer on a device it refuses (gVisor) failed both steps and the
    whole gpu-check over a machine limit; now each is skipped with the tool's line, after one probe run."""
    from bench.measure import static

    monkeypatch.setattr(static, "capture", lambda case, shape, device=None: [])
    calls = _fake_tool_runs(
        monkeypatch, "failed", f"Traceback ...\nRuntimeError: ncu failed (1):\n{NCU_REFUSED}"
    )
    assert gpu_check.run(str(tmp_path / "ncu"), budget_s=60, only="ncu", dry_run=True) == 0
    line = _states_detail((tmp_path / "ncu" / "summary.md").read_text(), "ncu")
    assert "skipped" in line and "LibraryNotLoaded" in line
    calls = _fake_tool_runs(monkeypatch, "failed", SANITIZER_REFUSED)
    assert gpu_check.run(str(tmp_path / "san"), budget_s=60, only="sanitizer", dry_run=True) == 0
    line = _states_detail((tmp_path / "san" / "summary.md").read_text(), "sanitizer")
    assert "skipped" in line and "Device not supported" in line and len(calls) == 1, calls
    # an ordinary failure (errors found) still fails
    _fake_tool_runs(monkeypatch, "failed", "========= ERROR SUMMARY: 1 error")
    assert gpu_check.run(str(tmp_path / "bad"), budget_s=60, only="sanitizer", dry_run=True) == 1


def test_ncu_error_lines_reach_the_log(monkeypatch, tmp_path):
    """ncu prints ==ERROR== on stdout: the error raised carried stderr only, so the log lacked the line."""
    import subprocess

    from bench.measure import profile

    monkeypatch.setattr(gpu_check.shutil, "which", lambda tool: "/opt/nvidia/ncu")
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda command, **kw: subprocess.CompletedProcess(command, 1, NCU_REFUSED + "\n", ""),
    )
    with pytest.raises(RuntimeError, match="LibraryNotLoaded"):
        profile.profile_ncu("write_kv", 0, 1, tmp_path)


def test_a_default_results_folder_is_never_shared(tmp_path, monkeypatch, capsys):
    """The default folder was named to the minute and reused (exist_ok): two runs in one minute wrote into
    one folder. It is named to the second, and one that exists already is refused."""
    from bench.measure import device

    calls = _fake_steps(monkeypatch, {})
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    gpu = device.MachineInfo(**{**device.machine_info().as_dict(), "gpu": "NVIDIA H200", "slug": "h200"})
    monkeypatch.setattr(gpu_check, "machine_info", lambda: gpu)
    monkeypatch.setattr(
        gpu_check.time, "strftime", lambda fmt, t=None: "2026-12-01-195407" if "%S" in fmt else ""
    )
    assert gpu_check.run(None, budget_s=30, only="static") == 0
    (folder,) = results.results_dir_for(gpu.slug).iterdir()
    assert folder.name == "2026-12-01-195407" and (folder / "summary.md").exists()
    assert gpu_check.run(None, budget_s=30, only="static") == 2
    assert "exists" in capsys.readouterr().err and calls == ["static"]


def _pidfds_work() -> bool:
    """Whether this kernel hands out pidfds (Linux 5.3+; a sandbox may refuse them, and the code then
    signals by number, as it should)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


@pytest.mark.skipif(not _pidfds_work(), reason="no pidfds here (Linux 5.3+, and not every sandbox)")
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_the_processes_below_a_killed_step_are_held_by_pidfd(tmp_path, monkeypatch):
    """The processes below were SIGKILLed by number up to TERM_GRACE_S after they were listed: a number
    freed meanwhile could name another process. They are signalled through pidfds taken at the listing."""
    import signal

    by_number, by_handle = [], []
    kill, send = os.kill, signal.pidfd_send_signal
    monkeypatch.setattr(os, "kill", lambda pid, sig: (by_number.append(pid), kill(pid, sig)))
    monkeypatch.setattr(
        signal, "pidfd_send_signal", lambda fd, sig, *a: (by_handle.append(fd), send(fd, sig, *a))
    )
    slow = run_subprocess("slow", tmp_path, [sys.executable, "-c", _PARENT, "wait"], timeout=1.5)
    assert slow.state == "timed out"
    pids = [int(pid) for pid in (tmp_path / "slow.txt").read_text().split()[:2]]
    assert _all_gone(pids) and len(by_handle) >= 2 and not by_number, (by_handle, by_number)
