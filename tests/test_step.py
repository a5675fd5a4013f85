"""The decode-step model (bench/serving/step.py) and the machine under it (bench/serving/hardware.py): a
step's stages and their sum, monotonicity in bandwidth, the calibration from a gpu-check result folder and
from an all-reduce result file, and the stages timed at their shapes (bench/measure/step_timing.py)."""

import json

import pytest
import torch

from bench.commands import cli
from bench.commands.model_inputs import hardware_of, interconnect_of
from bench.serving.hardware import GPUS, INTERCONNECTS
from bench.serving.models import MODEL_SPECS
from bench.serving.step import Deployment, Layout, step_seconds, step_stages
from tests import helpers

H200, NVLINK = GPUS["h200"], INTERCONNECTS["nvlink"]


def test_more_bandwidth_never_slows_a_step():
    from dataclasses import replace

    for name, layout in (("Llama-3.1-70B", Layout(tp=8)), ("DeepSeek-R1", Layout(dp=8, ep=8))):
        spec = MODEL_SPECS[name]
        times = [
            step_seconds(step_stages(Deployment(spec, layout, replace(H200, copy_gbps=gbps), link), 64, 8192))
            for gbps in (2000, 3000, 4300)
            for link in (INTERCONNECTS["pcie"], NVLINK)
        ]
        assert times[1] <= times[0] and times[3] <= times[2] and times[5] <= times[4]  # a faster link
        assert times[4] <= times[2] <= times[0]  # faster memory


def test_the_step_adds_up_and_names_each_stage():
    stages = step_stages(Deployment(MODEL_SPECS["DeepSeek-R1"], Layout(tp=8), H200, NVLINK), 64, 8192)
    names = {s.name for s in stages}
    assert {"mla_decode", "moe:experts", "moe:attn_all_reduce", "moe:route", "lm_head"} <= names
    assert sum(s.per_step for s in stages if s.name.endswith("mla_decode")) == 61
    ep = step_stages(Deployment(MODEL_SPECS["DeepSeek-R1"], Layout(dp=8, ep=8), H200, NVLINK), 64, 8192)
    assert {"moe:ep_dispatch_a2a", "moe:ep_combine_a2a"} <= {s.name for s in ep}
    assert "moe:attn_all_reduce" not in {s.name for s in ep}  # data-parallel attention: no TP all-reduce


def test_sliding_window_layers_read_their_window_not_the_context():
    """gpt-oss's 18 sliding-window layers (window 128) read at most 128 tokens of cache a sequence: at 32K
    tokens a step's paged-decode bytes are about half of all 36 layers reading the whole context."""
    from dataclasses import replace

    spec = MODEL_SPECS["gpt-oss-120b"]

    def decode_bytes(model):
        stages = step_stages(Deployment(model, Layout(tp=1), H200, NVLINK), 64, 32768)
        return sum(s.bytes * s.per_step for s in stages if s.name.endswith("paged_decode"))

    assert decode_bytes(spec) / decode_bytes(replace(spec, windowed=())) == pytest.approx(0.5, abs=0.01)


def test_a_step_takes_the_slowest_pipeline_stage_each_micro_batch():
    """DeepSeek-R1 over 8 stages as vLLM splits it (7, 7, 8 x 5, 7 layers): with 8 micro-batches in flight
    each stage runs all 8 a step, so a step takes at least 8 x a stage of 8 MoE layers (64 MoE layers'
    time), not the 61 layers once that even stages would come to."""
    spec = MODEL_SPECS["DeepSeek-R1"]
    stages = step_stages(Deployment(spec, Layout(pp=8), H200, NVLINK), 256, 4096)
    moe_layer = sum(s.seconds for s in stages if s.name.startswith("moe:"))
    assert step_seconds(stages) >= 8 * 8 * moe_layer
    assert "pp_imbalance" in {s.name for s in stages}
    even = step_stages(
        Deployment(MODEL_SPECS["Llama-3.1-70B"], Layout(pp=8), H200, NVLINK), 256, 4096
    )  # 10 a stage
    assert "pp_imbalance" not in {s.name for s in even}


def test_cli_step_prints_every_stage(capsys):
    assert cli.main(["step", "DeepSeek-R1", "--tp", "8", "--batch", "64", "--context", "8192"]) == 0
    assert "moe:experts" in capsys.readouterr().out


def test_results_folder_calibrates_and_says_what_was_measured(tmp_path, capsys):
    (tmp_path / "machine.json").write_text(json.dumps({"gpu": "NVIDIA H200", "copy_gbps": 4000.0}))
    info = {"kernel": "paged_decode", "impl": "triton", "bytes": 5e8, "pct_of_peak": 50.0}
    entry = {"name": "paged_decode", "stats": {"median": 2.5e-4}, "extra_info": info}
    (tmp_path / "run.json").write_text(json.dumps({"benchmarks": [entry]}))
    hw = hardware_of(str(tmp_path))  # machine.json names an H200: its anchors underneath
    assert hw.copy_gbps == 4000.0 and "measured" in hw.sources["copy_gbps"]
    assert "anchor" in hw.sources["matmul_tflops"]
    llama = MODEL_SPECS["Llama-3.1-70B"]
    measured = {s.name: s for s in step_stages(Deployment(llama, Layout(tp=8), hw, NVLINK), 64, 8192)}
    anchored = {s.name: s for s in step_stages(Deployment(llama, Layout(tp=8), H200, NVLINK), 64, 8192)}
    assert measured["paged_decode"].source == "measured" and anchored["paged_decode"].source == "anchor"
    assert measured["paged_decode"].seconds > anchored["paged_decode"].seconds  # 50% of 4.0 TB/s is slower
    assert cli.main(["step", "Llama-3.1-70B", "--tp", "8", "--gpu", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "measured" in out and "paged_decode" in out


def test_a_measured_kernel_projects_back_to_its_measured_time(tmp_path):
    """A measured time holds the kernel's launch and floor: its efficiency is the bytes' share of what is
    left, so the projection at the measured shape gives the measured time back (the floor was counted twice:
    paged_decode measured at 12 us projected to 21.4 us). A time under the floor keeps less of the floor."""
    llama = MODEL_SPECS["Llama-3.1-8B"]
    nbytes = next(
        s for s in step_stages(Deployment(llama, Layout(), H200, NVLINK), 1, 1024) if s.name == "paged_decode"
    ).bytes
    for seconds in (12e-6, 5e-6, 400e-6):
        info = {"kernel": "paged_decode", "impl": "triton", "bytes": nbytes}
        info["pct_of_peak"] = round(100 * nbytes / seconds / 4.3e12, 1)
        entry = {"name": "paged_decode", "stats": {"median": seconds}, "extra_info": info}
        (tmp_path / "run.json").write_text(json.dumps({"benchmarks": [entry]}))
        (tmp_path / "machine.json").write_text(json.dumps({"gpu": "NVIDIA H200", "copy_gbps": 4300.0}))
        hw = hardware_of(str(tmp_path))
        stage = next(
            s
            for s in step_stages(Deployment(llama, Layout(), hw, NVLINK), 1, 1024)
            if s.name == "paged_decode"
        )
        assert stage.source == "measured" and stage.seconds == pytest.approx(seconds, rel=0.02), seconds


def test_each_stage_runs_at_its_shape_and_the_kernels_are_verified_there(kernel_device):
    """The GPU timing path of `decodebench step`, on this machine: the host clock and the interpreter, at a
    tiny dense-then-MoE model with MLA and one with GQA (on a GPU the same calls run under CUDA graphs)."""
    from bench.measure.step_timing import time_stages
    from bench.measure.timing import time_wall
    from bench.serving.models import MLAGeometry, ModelSpec, MoESpec

    moe = MoESpec(num_experts=8, top_k=2, expert_intermediate=32, shared_experts=1, first_dense_layers=1)
    tiny = dict(layers=2, hidden=64, num_q_heads=4, head_dim=16, intermediate=128, vocab=256, moe=moe)
    gqa = ModelSpec(name="tiny-gqa", num_kv_heads=2, **tiny)
    mla = ModelSpec(
        name="tiny-mla",
        num_kv_heads=4,
        mla=MLAGeometry(kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16),
        q_lora_rank=32,
        v_head_dim=16,
        **tiny,
    )

    def timer(fn, label):
        return time_wall(fn, label=label, rep_ms=1, min_reps=1, max_reps=1)

    for spec, layout in ((gqa, Layout(tp=2)), (mla, Layout(dp=2, ep=2))):
        stages = step_stages(Deployment(spec, layout, H200, NVLINK), 3, 40)
        timed = time_stages(spec, layout, 3, 40, stages, device=kernel_device, timer=timer)
        assert set(timed) == {s.name for s in stages}
        for name, t in timed.items():
            collective = name.endswith(("all_reduce", "_a2a"))
            assert (t.seconds is None) == collective, (spec.name, name, t)
        kernels = [
            n
            for n in timed
            if n.removeprefix("moe:")
            in ("write_kv", "paged_decode", "mla_decode", "route", "dispatch", "experts", "combine")
        ]
        assert kernels and all(timed[n].verified is True for n in kernels), {n: timed[n] for n in kernels}


def test_mxfp4_experts_are_timed_as_bf16_and_say_so(monkeypatch):
    """The suite has no fp4 kernel (and Hopper no fp4 MMA): gpt-oss's MXFP4 experts run through grouped_gemm
    in bf16, and the timing's note says so, as it does for fp8 weights timed as bf16."""
    from bench.measure import step_timing

    shapes = []

    def case_call(name, shape, device, check):
        shapes.append(shape)
        return (lambda: None), True

    monkeypatch.setattr(step_timing, "_case_call", case_call)
    spec = MODEL_SPECS["gpt-oss-120b"]
    _, _, note = step_timing._experts_call(spec, Layout(tp=8), 4, "cpu", check=False)
    assert note.endswith("mxfp4 experts timed as bf16")
    assert {s.weight_dtype for s in shapes} == {torch.bfloat16}
    _, _, note = step_timing._experts_call(MODEL_SPECS["DeepSeek-R1"], Layout(tp=8), 4, "cpu", check=False)
    assert "timed as bf16" not in note  # fp8 experts run as fp8


def test_an_all_reduce_result_calibrates_the_interconnect(tmp_path, capsys):
    path = tmp_path / "ar.json"
    benchmarks = helpers.all_reduce_rows()
    path.write_text(json.dumps({"machine_info": {"gpu": "NVIDIA H200"}, "benchmarks": benchmarks}))
    link = interconnect_of(str(path))
    assert link.hop_us == pytest.approx(21 / 14)
    assert link.gbps == pytest.approx(64 * 2**20 / 400e-6 * 2 * 7 / 8 / 1e9)
    assert "measured" in link.source
    assert cli.main(["step", "Llama-3.1-70B", "--tp", "8", "--interconnect", str(path)]) == 0
    assert "measured: ar.json" in capsys.readouterr().out
    path.write_text(json.dumps({"benchmarks": [benchmarks[0] | {"extra_info": {"kernel": "x"}}]}))
    assert cli.main(["step", "Llama-3.1-70B", "--interconnect", str(path)]) == 2
    assert "--interconnect" in capsys.readouterr().err


def test_a_dry_run_folder_steps_on_the_anchors(tmp_path, capsys):
    """gpu-check's dry run writes machine.json on a CPU with memory_gib 0 (no GPU memory): `step --gpu`
    on that folder keeps the anchors' memory instead of refusing the file (its decode-step step failed so);
    a negative size is still refused."""
    (tmp_path / "machine.json").write_text(json.dumps({"gpu": "cpu", "memory_gib": 0.0}))
    assert cli.main(["step", "Llama-3.1-8B", "--batch", "4", "--context", "512", "--gpu", str(tmp_path)]) == 0
    capsys.readouterr()
    (tmp_path / "machine.json").write_text(json.dumps({"gpu": "cpu", "memory_gib": -1}))
    assert cli.main(["step", "Llama-3.1-8B", "--gpu", str(tmp_path)]) == 2
    assert "memory_gib" in capsys.readouterr().err


def test_moe_stages_run_one_ranks_share_of_the_tokens(monkeypatch):
    """Under EP a replica's tp ranks split its tokens: dispatch, the experts and combine run at batch / tp
    tokens a rank (what the step model projects), not the replica's whole batch."""
    from bench.measure import step_timing

    shapes = {}

    def record(name, shape, device, check):
        shapes.setdefault(name, []).append(shape)
        return (lambda: None), None

    monkeypatch.setattr(step_timing, "_case_call", record)
    spec = MODEL_SPECS["Qwen3-30B-A3B"]
    for layout, per_rank in ((Layout(tp=2, ep=2), 8), (Layout(dp=2, ep=2), 16), (Layout(tp=2), 16)):
        shapes.clear()
        for stage in step_stages(Deployment(spec, layout, H200, NVLINK), 16, 1024):
            if stage.name.removeprefix("moe:") in ("dispatch", "experts", "combine"):
                step_timing.stage_calls(spec, layout, 16, 1024, stage, "cpu", check=False)
        assert {s.tokens for name in ("dispatch", "combine", "grouped_gemm") for s in shapes[name]} == {
            per_rank
        }, layout


def test_a_stage_whose_timing_fails_keeps_its_projection_and_the_rest_go_on(monkeypatch):
    """A failed capture or an out-of-memory in one stage's timing is that stage's note, not the end of the
    step's timing."""
    from bench.measure import step_timing

    monkeypatch.setattr(step_timing, "_case_call", lambda name, shape, device, check: ((lambda: None), None))
    spec = MODEL_SPECS["Llama-3.1-8B"]
    stages = step_stages(Deployment(spec, Layout(), H200, NVLINK), 2, 64)
    timed_names = []

    def timer(fn, label):
        timed_names.append(label)
        if label == "step.paged_decode":
            raise RuntimeError("capture failed")
        from bench.measure.timing import Timing

        return Timing.from_samples([0.001])

    timed = step_timing.time_stages(spec, Layout(), 2, 64, stages, device="cpu", timer=timer)
    assert timed["paged_decode"].seconds is None and "capture failed" in timed["paged_decode"].note
    assert timed["o_proj"].seconds is not None and "step.o_proj" in timed_names
