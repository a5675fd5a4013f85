"""decodebench tune (bench/measure/tuning.py, the operators' tune specs, bench/commands/tuning.py) and the
per-GPU launch tables: candidate lists, the spill filter, a table for a faked GPU reaching the launches (seen
through the static capture), heuristics where no entry matches, install, and the deadline. No compiling and
no GPU: every test takes seconds."""

import json
import time
from pathlib import Path

import pytest
import torch

from bench.measure import tuning
from bench.measure.device import slug as device_slug
from bench.measure.static import StaticRow, capture
from bench.operators import CASES
from kernels import _configs

PAGED = CASES["paged_decode"]
TUNED = sorted(name for name, case in CASES.items() if case.tune is not None)


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """Launches look up the table of a GPU named "Fake GPU 9000" in a temporary folder."""
    monkeypatch.setattr(_configs, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(_configs, "device_slug", lambda device: "fake-gpu-9000")
    _configs.clear_cache()
    yield tmp_path / "fake-gpu-9000.json"
    _configs.clear_cache()


def write_table(path: Path, kernels: dict) -> None:
    path.write_text(json.dumps({"gpu": "Fake GPU 9000", "slug": path.stem, "kernels": kernels}))


def paged_launch(shape):
    (decode,) = [launch for launch in capture(PAGED, shape) if launch.kernel == "_paged_decode_kernel"]
    return decode.kwargs


# --- candidates ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TUNED)
def test_candidates_start_at_the_heuristic_and_stay_few_and_valid(name):
    case = CASES[name]
    spec = case.tune
    shape = spec.cheap(case.default_shapes()[0])
    heuristic = case.launch_config(case.build(shape, "cpu", seed=0))["config"]
    candidates = spec.candidates(heuristic)
    assert candidates[0] == {k: heuristic[k] for k in spec.tunable}
    assert 4 <= len(candidates) <= 8, candidates
    assert len({json.dumps(c, sort_keys=True) for c in candidates}) == len(candidates)
    for candidate in candidates:
        assert set(candidate) == set(spec.tunable)
        assert all(_configs._valid(k, v) for k, v in candidate.items()), candidate


def test_fp8_paged_decode_tries_one_two_and_three_stages():
    fp8 = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 1, "HEAD_TILE": 16, "HEAD_DIM_PAD": 128}
    stages = {c["num_stages"] for c in PAGED.tune.candidates(fp8) if c["BLOCK_N"] == 64}
    assert stages == {1, 2, 3}


def test_paged_decode_candidates_vary_a_full_groups_16_warps():
    """A group that fills one program (32 heads of 512) launches on 16 warps: the candidates around it try
    other stages and token tiles on those 16 warps, not the heuristic alone."""
    from kernels.paged_attention import paged_decode_launch_config

    full = paged_decode_launch_config(32, 512, 2)
    sixteen = [c for c in PAGED.tune.candidates(full) if c["num_warps"] == 16]
    assert full["num_warps"] == 16 and len(sixteen) >= 4, sixteen


def test_default_shapes_group_by_the_launchers_key():
    groups = tuning.groups_of(CASES["write_kv"])
    keys = [g.key for g in groups]
    assert len(keys) == len(set(keys))
    assert "in=bfloat16 cache=bfloat16 row=1024" in keys
    assert "in=bfloat16 cache=float8_e4m3fn row=576 key-only" in keys
    assert sum(len(g.shapes) for g in groups) == len(CASES["write_kv"].default_shapes())


def test_cheap_shapes_keep_the_paged_launch_configuration():
    """The split count (grid) and constexprs of a cheap shape are those of the default shape it stands for."""
    from kernels.paged_attention import max_splits_for

    for shape in PAGED.default_shapes():
        cheap = PAGED.tune.cheap(shape)
        width = max(shape.pages) + shape.spare_pages
        assert max(cheap.pages) + cheap.spare_pages == width and cheap.batch == shape.batch
        assert max_splits_for(cheap.batch, cheap.num_kv_heads, width * 16, 132) == max_splits_for(
            shape.batch, shape.num_kv_heads, width * 16, 132
        )


# --- the filter ---------------------------------------------------------------------------------------------


def row(**kw) -> StaticRow:
    return StaticRow("_paged_decode_kernel", "key", "sm_90", "aot", 4, **kw)


def test_spilling_and_oversized_candidates_are_dropped_before_timing():
    good = dict(registers=128, spill_bytes=0, stack_bytes=0, shared_bytes=40000)
    candidates = [
        tuning.Candidate({"BLOCK_N": 64}, row(**good)),
        tuning.Candidate({"BLOCK_N": 128}, row(**{**good, "registers": 255, "spill_bytes": 96})),
        tuning.Candidate({"BLOCK_N": 32}, row(**good), worst_spill=8),  # a secondary launch spills
        tuning.Candidate({"BLOCK_N": 16}, row(**{**good, "stack_bytes": 16})),
        tuning.Candidate({"BLOCK_N": 256}, row(**{**good, "shared_bytes": 300_000})),
        tuning.Candidate({"BLOCK_N": 8}, row(error="out of resources")),
        tuning.Candidate({"BLOCK_N": 4}, None),
    ]
    kept = tuning.apply_filter(candidates, 90)
    assert [c.knobs for c in kept] == [{"BLOCK_N": 64}]
    reasons = [c.dropped for c in candidates[1:]]
    assert "spills 96 B" in reasons[0] and "spills 8 B" in reasons[1] and "stack" in reasons[2]
    assert "shared memory" in reasons[3] and "does not compile" in reasons[4] and reasons[5]
    # 100 KB of shared memory fits sm_90, not sm_86.
    big = [tuning.Candidate({"BLOCK_N": 64}, row(**{**good, "shared_bytes": 150_000}))]
    assert tuning.apply_filter(big, 90) and not tuning.apply_filter(
        [tuning.Candidate({"BLOCK_N": 64}, row(**{**good, "shared_bytes": 150_000}))], 86
    )


# --- tables reaching the launchers --------------------------------------------------------------------------


def test_a_table_for_the_running_gpu_changes_the_launch(fake_gpu):
    shape = PAGED.static_shapes()[0]  # Llama-3.1-8B, bf16, group 4, head_dim 128
    heuristic = paged_launch(shape)
    key = "q=bfloat16 kv=bfloat16 group=4 head_dim=128"
    write_table(fake_gpu, {"paged_decode": {key: {"BLOCK_N": 32, "num_warps": 8, "num_stages": 3}}})
    _configs.clear_cache()
    tuned = paged_launch(shape)
    assert (heuristic["BLOCK_N"], heuristic["num_warps"], heuristic["num_stages"]) == (64, 4, 2)
    assert (tuned["BLOCK_N"], tuned["num_warps"], tuned["num_stages"]) == (32, 8, 3)
    assert tuned["HEAD_TILE"] == heuristic["HEAD_TILE"]  # not tunable: derived from the shape
    info = PAGED.launch_config(PAGED.build(shape, "cpu", seed=0))
    assert info["source"] == "tuned:fake-gpu-9000" and info["key"] == key
    assert info["config"]["BLOCK_N"] == 32


def test_heuristics_where_no_entry_matches(fake_gpu):
    shape = PAGED.static_shapes()[0]
    info = PAGED.launch_config(PAGED.build(shape, "cpu", seed=0))
    assert info["source"] == "heuristic"  # no table at all
    write_table(fake_gpu, {"paged_decode": {"q=bfloat16 kv=bfloat16 group=8 head_dim=64": {"BLOCK_N": 32}}})
    _configs.clear_cache()
    assert paged_launch(shape)["BLOCK_N"] == 64
    assert PAGED.launch_config(PAGED.build(shape, "cpu", seed=0))["source"] == "heuristic"


def test_other_kernels_read_their_entries(fake_gpu):
    write_kv, dispatch = CASES["write_kv"], CASES["dispatch"]
    wkv_shape = write_kv.static_shapes()[0]
    d_shape = dispatch.static_shapes()[0]
    wkv_key = write_kv.launch_config(write_kv.build(wkv_shape, "cpu", seed=0))["key"]
    d_key = dispatch.launch_config(dispatch.build(d_shape, "cpu", seed=0))["key"]
    write_table(
        fake_gpu,
        {
            "write_kv": {wkv_key: {"TOKENS": 4, "num_warps": 8}},
            "dispatch": {d_key: {"CHUNK_TOKENS": 8, "HIDDEN_TILE": 512}},
        },
    )
    _configs.clear_cache()
    (launch,) = capture(write_kv, wkv_shape)
    assert launch.kwargs["TOKENS"] == 4 and launch.kwargs["num_warps"] == 8
    assert launch.grid[0] == -(-wkv_shape.num_tokens // 4)
    copy = [launch for launch in capture(dispatch, d_shape) if launch.kernel == "_dispatch_kernel"][0]
    assert copy.kwargs["CHUNK_TOKENS"] == 8 and copy.kwargs["HIDDEN_TILE"] == 512


def test_an_invalid_entry_is_dropped_with_a_warning(fake_gpu):
    key = "q=bfloat16 kv=bfloat16 group=4 head_dim=128"
    write_table(fake_gpu, {"paged_decode": {key: {"BLOCK_N": 48}}})
    _configs.clear_cache()
    with pytest.warns(UserWarning, match="invalid knobs"):
        assert paged_launch(PAGED.static_shapes()[0])["BLOCK_N"] == 64


def test_the_documented_table_key_is_the_one_the_launcher_derives():
    """The table entry kernels/_configs.py and kernels/configs/README.md show (Llama-3.1-8B's paged_decode,
    bf16) has the key the launcher looks up: dtypes as torch names them."""
    import re

    from kernels.paged_attention import paged_decode_config_key

    key = paged_decode_config_key(torch.bfloat16, torch.bfloat16, 4, 128)
    for text in (_configs.__doc__, (_configs.CONFIG_DIR / "README.md").read_text()):
        assert re.findall(r'"(q=[^"]*)"', text) == [key]


def test_cpu_tensors_read_no_table():
    assert _configs.device_slug(torch.device("cpu")) == "cpu"
    assert not (_configs.CONFIG_DIR / "cpu.json").exists()
    assert _configs.slug("NVIDIA H100 80GB HBM3") == device_slug("NVIDIA H100 80GB HBM3")


def test_forced_knobs_win_and_are_restored():
    shape = PAGED.static_shapes()[0]
    with _configs.forced("paged_decode", {"BLOCK_N": 16}):
        assert paged_launch(shape)["BLOCK_N"] == 16
        assert PAGED.launch_config(PAGED.build(shape, "cpu", seed=0))["source"] == "forced"
    assert paged_launch(shape)["BLOCK_N"] == 64


# --- run, install -------------------------------------------------------------------------------------------


def fake_compile(groups, arch, deadline=None):
    """Static figures without a compile: the candidates with BLOCK_N 128 or 8 warps 'spill'."""
    for group in groups:
        for candidate in group.candidates:
            spills = 64 if candidate.knobs.get("BLOCK_N") == 128 or candidate.knobs["num_warps"] == 8 else 0
            candidate.static = row(registers=100, spill_bytes=spills, stack_bytes=0, shared_bytes=1024)
            candidate.worst_spill = spills


def test_dry_run_lists_candidates_and_drops_spills(monkeypatch, tmp_path):
    monkeypatch.setattr(tuning, "compile_candidates", fake_compile)
    text, ok = tuning.run([PAGED, CASES["allocate"]], out=tmp_path, deadline=None, dry_run=True)
    assert ok
    assert "## paged_decode [q=bfloat16 kv=float8_e4m3fn group=4 head_dim=128]" in text
    assert "dropped: spills 64 B" in text and "heuristic" in text
    assert "Not tunable (no launch knobs): allocate" in text
    rows = json.loads((tmp_path / tuning.TIMINGS_FILE).read_text())
    assert {r["kernel"] for r in rows} == {"paged_decode"}
    assert all((r["dropped"] is not None) == (r["static"]["spill_bytes"] > 0) for r in rows)
    assert not (tmp_path / tuning.RESULT_FILE).exists()  # a dry run chooses nothing


def test_dry_run_over_every_tunable_kernel(monkeypatch, tmp_path):
    """The dry run of every tunable kernel, all but the compiler: its candidates at one default shape per
    key are captured through the launcher as the compiling child does (_compile_job), and take made-up
    figures. A candidate its launcher refuses (mla_decode's 64-head tile at 512 value columns, planted: the
    dry run once died there) is dropped with the launcher's reason and never goes to the child."""
    import dataclasses

    mla = CASES["mla_decode"]
    taller = (lambda h: {"HEAD_BLOCK": h["HEAD_BLOCK"] * 2, "num_warps": 16},)
    planted = dataclasses.replace(mla.tune, changes=mla.tune.changes + taller)
    monkeypatch.setitem(CASES, "mla_decode", dataclasses.replace(mla, tune=planted))
    cases = [_one_shape_per_key(monkeypatch, CASES[name]) for name in TUNED]
    monkeypatch.setattr(tuning, "compile_aot", lambda launch, arch: None)
    monkeypatch.setattr(
        tuning,
        "_figures",
        lambda compiled, kernel, key, arch, num_warps: StaticRow(
            kernel, key, f"sm_{arch}", "aot", num_warps, registers=64, spill_bytes=0, stack_bytes=0
        ),
    )
    compiled = []

    def compile_without_a_compiler(groups, arch, deadline=None):
        jobs = tuning.compile_jobs(groups, arch)
        compiled.extend((job[0], job[2], tuning.knobs_label(job[3])) for job in jobs)
        tuning.take_figures(groups, [tuning._compile_job(job) for job in jobs])

    monkeypatch.setattr(tuning, "compile_candidates", compile_without_a_compiler)
    text, ok = tuning.run(cases, out=tmp_path, deadline=None, dry_run=True)
    assert ok, text
    rows = json.loads((tmp_path / tuning.TIMINGS_FILE).read_text())
    assert {r["kernel"] for r in rows} == set(TUNED)
    refused = [r for r in rows if r["dropped"]]
    assert refused and all(r["kernel"] == "mla_decode" and r["knobs"]["HEAD_BLOCK"] == 64 for r in refused)
    assert all(r["dropped"].startswith("the launcher refuses it: v_head_dim") for r in refused)
    assert all(r["static"] is None for r in refused)
    assert all(r["static"] for r in rows if not r["dropped"])
    assert len(compiled) == len(rows) - len(refused)
    assert not {(r["kernel"], r["key"], tuning.knobs_label(r["knobs"])) for r in refused} & set(compiled)
    assert "dropped: the launcher refuses it: v_head_dim" in text


def _one_shape_per_key(monkeypatch, case):
    """``case`` at the first of its default shapes per launch key, each built once (the dry run builds a
    candidate's inputs again for its compile): the keys and candidates of the full dry run, at a fraction
    of the building. CASES maps the name to it while the test runs (the compile job looks it up there)."""
    import dataclasses
    import functools

    spec, build = case.tune, functools.cache(case.build)
    first = {}
    for shape in case.default_shapes():
        first.setdefault(case.launch_config(build(spec.cheap(shape), "cpu", seed=0))["key"], shape)
    narrowed = dataclasses.replace(case, build=build, default_shapes=lambda: list(first.values()))
    monkeypatch.setitem(CASES, case.name, narrowed)
    return narrowed


def test_a_past_deadline_stops_cleanly(monkeypatch, tmp_path):
    monkeypatch.setattr(tuning, "compile_candidates", fake_compile)
    text, ok = tuning.run([PAGED], out=tmp_path, deadline=time.monotonic() - 1, dry_run=True)
    assert "Not reached before the deadline" in text and (tmp_path / tuning.SUMMARY_FILE).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_timing_without_a_gpu_says_so(tmp_path):
    text, ok = tuning.run([PAGED], out=tmp_path, deadline=None, dry_run=False)
    assert not ok and "--dry-run" in text


def test_install_merges_into_the_gpu_table(tmp_path):
    out, configs = tmp_path / "out", tmp_path / "configs"
    out.mkdir()
    configs.mkdir()
    (configs / "fake-gpu.json").write_text(
        json.dumps({"slug": "fake-gpu", "kernels": {"write_kv": {"old": {"TOKENS": 2}}}})
    )
    document = {"gpu": "Fake GPU", "slug": "fake-gpu", "kernels": {"paged_decode": {"k": {"BLOCK_N": 32}}}}
    (out / tuning.RESULT_FILE).write_text(json.dumps(document))
    path = tuning.install(out, configs)
    merged = json.loads(path.read_text())
    assert path.name == "fake-gpu.json" and merged["gpu"] == "Fake GPU"
    assert merged["kernels"] == {"write_kv": {"old": {"TOKENS": 2}}, "paged_decode": {"k": {"BLOCK_N": 32}}}


def test_cli_has_a_tune_command(monkeypatch, tmp_path, capsys):
    from bench.commands import cli

    seen = {}

    def fake_run(cases, *, out, deadline, dry_run):
        seen.update(cases=[c.name for c in cases], out=out, deadline=deadline, dry_run=dry_run)
        return "summary", True

    monkeypatch.setattr(tuning, "run", fake_run)
    assert cli.main(["tune", "write_kv", "--dry-run", "--out", str(tmp_path), "--budget", "30"]) == 0
    assert seen["cases"] == ["write_kv"] and seen["dry_run"] and seen["out"] == tmp_path
    assert seen["deadline"] > time.monotonic()
    assert "summary" in capsys.readouterr().out


def test_timing_picks_the_fastest_verified_candidate(monkeypatch, kernel_device):
    """The GPU path with the clock faked: every kept candidate is verified (in the interpreter here) and
    timed at every shape of its key; the lowest geometric mean of time over the fastest wins; a candidate
    that fails verification is dropped and reported; the table holds the winner."""
    from bench.measure import runner, timing
    from bench.operators.kv_cache import WriteKVShape

    case = CASES["write_kv"]
    shapes = [WriteKVShape("t", "decode", n, 2, 64, 64) for n in (3, 40)]
    (group,) = {g.key: g for g in _groups(case, shapes)}.values()
    fast = {"TOKENS": group.heuristic["TOKENS"] * 2}
    wrong = {"num_warps": group.heuristic["num_warps"] * 2}

    def fake_time(fn, **kw):
        fn()
        knobs = _configs._forced["write_kv"]
        ms = 1.0 if knobs["TOKENS"] == fast["TOKENS"] else 2.0
        return timing.Timing.from_samples([ms, ms])

    real_verify = runner.verify

    def verify(case, shape, device):
        result = real_verify(case, shape, device)
        if _configs._forced["write_kv"]["num_warps"] == wrong["num_warps"]:
            result.ok, result.message = False, "made up"
        return result

    monkeypatch.setattr(timing, "time_cuda", fake_time)
    monkeypatch.setattr(runner, "verify", verify)
    for candidate in group.candidates:
        candidate.static = row(registers=32, spill_bytes=0, stack_bytes=0, shared_bytes=0)
    tuning.apply_filter(group.candidates, 90)
    assert tuning._time_group(group, None, device=kernel_device)
    assert (
        group.winner["TOKENS"] == fast["TOKENS"] and group.winner["num_warps"] == group.heuristic["num_warps"]
    )
    failed = [c for c in group.candidates if c.dropped]
    assert failed and all("FAILED verification" in c.dropped for c in failed)
    assert all(len(c.medians_ms) == 2 for c in group.candidates if not c.dropped)
    document = tuning.table_document([group])
    assert document["kernels"] == {"write_kv": {group.key: group.winner}} and document["slug"]
    assert "chosen" in tuning.group_table(group)


def _groups(case, shapes):
    """groups_of for the given shapes instead of the case's defaults."""
    import dataclasses

    return tuning.groups_of(dataclasses.replace(case, default_shapes=lambda: shapes))
