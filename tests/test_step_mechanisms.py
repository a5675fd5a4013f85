"""The decode-step model's mechanisms, each as issue 18 asked for it and the measured H200 tables showed it:
pipeline parallelism at steady state, the one-shot all-reduce, fixed costs per kernel, the fp8 ceiling with
a bf16 LM head, routing's power law, per-step host work and chunked prefill."""

import json
from dataclasses import replace

import pytest

from bench.commands import cli
from bench.serving.advisor import memory_plan
from bench.serving.hardware import GPUS, INTERCONNECTS
from bench.serving.models import MODEL_SPECS
from bench.serving.step import (
    KINDS,
    SYNC,
    Deployment,
    Layout,
    busiest_rank,
    expected_experts_touched,
    experts_ceiling,
    prefill_stages,
    seconds_by_bound,
    step_seconds,
    step_stages,
)
from bench.serving.workloads import fixed_workload
from tests import helpers

H200, NVLINK = GPUS["h200"], INTERCONNECTS["nvlink"]
LLAMA_70B, LLAMA_405B = MODEL_SPECS["Llama-3.1-70B"], MODEL_SPECS["Llama-3.1-405B"]


def _seconds(spec, layout, batch, context=2048, hw=H200, link=NVLINK, **kw):
    return step_seconds(step_stages(Deployment(spec, layout, hw, link, **kw), batch, context))


def test_pipeline_at_steady_state_has_no_bubble_and_batch_one_crosses_the_stages_once():
    stages = step_stages(Deployment(LLAMA_70B, Layout(pp=4), H200, NVLINK), 64, 2048)
    assert not [s for s in stages if "bubble" in s.name]
    # One sequence: the stages run in sequence, each weight read once: PP adds only the hand-offs.
    alone, piped = _seconds(LLAMA_70B, Layout(), 1), _seconds(LLAMA_70B, Layout(pp=4), 1)
    assert piped == pytest.approx(alone, rel=0.02)
    # At a compute-bound batch PP8 beats TP8 for 405B (no all-reduce of the whole batch's activations),
    # as NVIDIA published for max-throughput serving; at batch 1 TP8 wins by far. The batch is one both
    # layouts' ranks hold at 2,048 tokens a sequence (fp8 KV: 32,256 bytes a token a rank either way; about
    # 2.5M tokens, 1,230 sequences, fit an H200 rank beside 52 GB of weights): 2,048 of them would not.
    fp8 = replace(LLAMA_405B, weight_bytes=1)
    batch = 1024
    for layout in (Layout(pp=8), Layout(tp=8)):
        assert (
            memory_plan(Deployment(fp8, layout, H200, NVLINK, 1), fixed_workload(128, 1920)).pool_tokens
            >= batch * 2048
        )
    assert _seconds(fp8, Layout(pp=8), batch, kv_bytes=1) < _seconds(fp8, Layout(tp=8), batch, kv_bytes=1)
    assert _seconds(fp8, Layout(tp=8), 1, kv_bytes=1) < _seconds(fp8, Layout(pp=8), 1, kv_bytes=1) / 3


def test_all_reduce_is_one_shot_and_flat_at_decode_sizes_then_bandwidth_bound():
    flat = [sum(NVLINK.all_reduce_s(size, 8)) for size in (8192, 32768)]
    assert max(flat) < 8e-6  # a ring's 14 hops alone would be 21 us
    assert flat[1] < 1.3 * flat[0]
    large = sum(NVLINK.all_reduce_s(64 * 2**20, 8))
    assert large == pytest.approx(2 * 7 / 8 * 64 * 2**20 / (NVLINK.bus_bandwidth(8) * 1e9), rel=0.05)
    ring_only = replace(NVLINK, oneshot_us=0.0)
    assert sum(ring_only.all_reduce_s(8192, 8)) > 2 * flat[0]


def test_fp8_weights_run_on_the_fp8_ceiling_and_keep_a_bf16_lm_head():
    fp8 = replace(LLAMA_70B, weight_bytes=1)
    bf16_stages = {s.name: s for s in step_stages(Deployment(LLAMA_70B, Layout(), H200, NVLINK), 4096, 1024)}
    fp8_stages = {s.name: s for s in step_stages(Deployment(fp8, Layout(), H200, NVLINK), 4096, 1024)}
    assert fp8_stages["mlp"].bound == "compute"
    ratio = bf16_stages["mlp"].seconds / fp8_stages["mlp"].seconds
    assert ratio == pytest.approx(2.0, rel=0.1)
    assert fp8_stages["lm_head"].bytes == bf16_stages["lm_head"].bytes  # bf16 in both
    assert fp8_stages["lm_head"].seconds == pytest.approx(bf16_stages["lm_head"].seconds)


def test_every_stage_has_a_kind_and_each_kernel_its_fixed_cost():
    for name, layout in (("Llama-3.1-8B", Layout(tp=2, pp=2)), ("DeepSeek-R1", Layout(dp=8, ep=8))):
        stages = step_stages(
            Deployment(MODEL_SPECS[name], layout, replace(H200, host_us=300.0), NVLINK), 8, 1024
        )
        assert {s.kind for s in stages} <= set(KINDS)
        assert "host" in {s.kind for s in stages}
    stages = {
        s.name: s for s in step_stages(Deployment(MODEL_SPECS["Llama-3.1-8B"], Layout(), H200, NVLINK), 1, 16)
    }
    assert stages["paged_decode"].seconds * 1e6 >= H200.attention_us  # the decode-attention floor
    assert stages["qkv_proj"].seconds * 1e6 >= H200.gemm_us


def test_mla_decode_runs_on_fa3s_measured_floor_and_compute_ceiling():
    """MLA decode attention: FA3's MLA floor at a short context; at 128 heads, batch 256, 8K context it is
    compute-bound at the kernel's own ceiling (587 TFLOP/s measured), not the GEMMs' (0.9 x 790)."""
    spec = MODEL_SPECS["DeepSeek-R1"]
    short = {s.name: s for s in step_stages(Deployment(spec, Layout(tp=8), H200, NVLINK), 1, 16)}
    assert short["moe:mla_decode"].seconds * 1e6 == pytest.approx(H200.mla_attention_us, rel=0.02)
    assert "moe:mla_copies" not in short  # vLLM 0.24 launches none (strided products, FA3 takes q in parts)
    heavy = {s.name: s for s in step_stages(Deployment(spec, Layout(dp=8, ep=8), H200, NVLINK), 256, 8192)}[
        "moe:mla_decode"
    ]
    assert heavy.bound == "compute"
    achieved = heavy.flops / (heavy.seconds - H200.mla_attention_us * 1e-6) / 1e12
    assert achieved == pytest.approx(H200.mla_attention_tflops * H200.compute_efficiency, rel=0.01)
    assert achieved < H200.matmul_tflops * H200.compute_efficiency


def test_routing_skew_is_a_power_law_that_grows_with_the_ranks():
    skews = [busiest_rank(256, ranks)[0] for ranks in (2, 8, 32)]
    assert 1.0 < skews[0] < skews[1] < skews[2]


def test_routing_skew_is_the_measured_tables_random_placement_not_a_sorted_one():
    """AIConfigurator's collector draws each expert's load from the power law in no order and times the
    busiest of the ep contiguous blocks: about 1.3-1.5x the mean at EP8 (sorting the experts by popularity
    onto rank 0 gave 5.4x). The busiest rank holds its 32 experts, none chosen by more than every token."""
    for tokens in (8, 64, 256, 2048):
        skew, mine = busiest_rank(256, 8, tokens, 8)
        assert 1.2 < skew < 1.6, (tokens, skew)
        assert len(mine) == 32 and max(mine) * 8 <= 1.0 + 1e-9


def test_a_token_touches_exactly_top_k_experts():
    """Each expert's share of the choices is at most 1 / top_k (a token picks an expert once): one token
    touches top_k experts, however skewed the popularity."""
    for experts, top_k in ((256, 8), (128, 8), (8, 2)):
        assert expected_experts_touched(experts, top_k, 1) == pytest.approx(top_k)
        assert expected_experts_touched(experts, top_k, 10_000) == pytest.approx(experts, rel=0.02)


def test_only_the_busiest_ranks_extra_rows_wait_as_routing():
    """The others wait for the busiest rank's rows over the mean, not for its weights or fixed cost: at one
    token the experts stage's time is nearly all weight reads and fixed cost, so little of it is SYNC."""
    r1 = MODEL_SPECS["DeepSeek-R1"]
    for batch in (1, 256):
        experts = next(
            s
            for s in step_stages(Deployment(r1, Layout(dp=8, ep=8, dedup=True), H200, NVLINK), batch, 1024)
            if s.name == "moe:experts"
        )
        if batch == 1:
            assert experts.split[SYNC] < 0.05 * experts.seconds
        skew = busiest_rank(256, 8, 8 * batch, 8)[0]
        assert 0 < experts.split[SYNC] < (1 - 1 / skew) * experts.seconds


def test_host_work_is_paid_once_a_step_by_each_engine_process():
    spec, host = MODEL_SPECS["Llama-3.1-8B"], replace(H200, host_us=500.0)
    for layout in (Layout(), Layout(tp=4), Layout(pp=2)):
        extra = _seconds(spec, layout, 64, hw=host) - _seconds(spec, layout, 64)
        assert extra == pytest.approx(500e-6)


def test_prefill_chunks_are_compute_bound_and_grow_with_what_they_attend_to():
    spec = MODEL_SPECS["Llama-3.1-8B"]
    short = step_seconds(prefill_stages(Deployment(spec, Layout(), H200, NVLINK), 8192, 4096))
    long = step_seconds(prefill_stages(Deployment(spec, Layout(), H200, NVLINK), 8192, 32768))
    flops = 2 * spec.params() * 8192
    assert short >= flops / (H200.matmul_tflops * 1e12)  # at least the GEMMs' FLOPs at the ceiling
    assert long > 1.2 * short


def test_step_json_has_the_promised_schema(tmp_path):
    path = tmp_path / "step.json"
    argv = ["step", "DeepSeek-R1", "--dp", "8", "--ep", "8", "--batch", "16", "--json", str(path)]
    assert cli.main(argv + ["--weights", "bf16", "--host-us", "100"]) == 0
    document = json.loads(path.read_text())
    assert document["total_ms"] == pytest.approx(sum(s["ms"] for s in document["stages"]))
    for stage in document["stages"]:
        assert set(stage) == {"name", "kind", "ms", "bytes", "flops", "bound", "source"}
        assert stage["kind"] in KINDS
    kinds = {s["kind"] for s in document["stages"]}
    assert {"attention", "a2a", "moe_experts", "moe_route", "host", "lm_head"} <= kinds


def test_advise_fixed_lengths_under_a_tpot_limit(tmp_path, capsys):
    path = tmp_path / "advise.json"
    argv = ["advise", "Llama-3.1-8B", "--gpus", "2", "--workload", "fixed:512:256", "--requests", "16"]
    argv += ["--kv", "fp8", "--weights", "fp8", "--max-seqs", "8", "--max-tpot", "50", "--json", str(path)]
    assert cli.main(argv) == 0
    document = json.loads(path.read_text())
    assert document["workload"] == "fixed 512/256" and document["weights"] == "fp8"
    for row in document["layouts"]:
        assert row["max_num_seqs"] == 8
        assert {"dp", "tp", "pp", "ep", "seconds", "tokens_per_s", "tpot_ms", "bound", "fits"} <= set(row)
        assert row["tokens_per_s_per_gpu"] == pytest.approx(row["tokens_per_s"] / 2, rel=0.01)
        assert not row["fits"] or row["tpot_ms"] <= 50
    assert cli.main(argv[:-2] + ["--max-tpot", "0.001"]) == 2  # no layout meets it: said so, exit 2
    assert "fits no layout" in capsys.readouterr().err


def test_fewer_requests_than_replicas_leave_replicas_idle():
    from bench.serving.advisor import simulate
    from bench.serving.workloads import fixed_workload

    outcome = simulate(
        Deployment(MODEL_SPECS["Llama-3.1-8B"], Layout(dp=8), H200, NVLINK), fixed_workload(128, 64), 3, 64
    )
    assert outcome.fits and outcome.peak_sequences == 3


def test_a_dist_result_with_one_shot_rows_calibrates_the_one_shot_all_reduce():
    from bench.serving.hardware import Interconnect

    link = Interconnect.from_all_reduce({"benchmarks": helpers.all_reduce_rows()}, "ar.json")
    assert link.oneshot_us == pytest.approx(11.0) and "one-shot 11.0 us" in link.source
    assert sum(link.all_reduce_s(8192, 8)) < 21e-6  # the one-shot form beats the measured ring


def test_a_deduplicated_ep_dispatch_sends_one_row_per_rank_a_token_reaches():
    """Issue 22 in the step model: with dedup, an EP layer's all-to-alls carry one row per (token, rank)
    (plus its pairs), not one per choice. DeepSeek-R1's routing keeps 4 of 8 groups, and at EP8 a group is a
    rank's experts: a token reaches 4 ranks, 3.5 of them remote, where 7 of its 8 choices leave the rank."""
    from bench.serving.models import MoESpec
    from bench.serving.step import check_layout

    r1 = MODEL_SPECS["DeepSeek-R1"]
    assert r1.moe.ranks_reached(8) == pytest.approx(4.0)
    assert r1.moe.ranks_reached(4) == pytest.approx(4 * (1 - 15 / 70))  # 2 groups a rank
    uniform = MoESpec(num_experts=128, top_k=8, expert_intermediate=64)
    assert uniform.ranks_reached(8) == pytest.approx(8 * (1 - (7 / 8) ** 8))
    assert uniform.ranks_reached(1) == 1.0

    def a2a_bytes(dedup):
        stages = step_stages(Deployment(r1, Layout(dp=8, ep=8, dedup=dedup), H200, NVLINK), 64, 8192)
        return {s.name: s.bytes for s in stages if s.kind == "a2a"}

    plain, dedup = a2a_bytes(False), a2a_bytes(True)
    rows, row = 64 * 8 * 7 / 8, 7168 * 2
    assert plain["moe:ep_dispatch_a2a"] == pytest.approx(rows * row)
    assert dedup["moe:ep_combine_a2a"] == pytest.approx(64 * 3.5 * row)
    assert dedup["moe:ep_dispatch_a2a"] == pytest.approx(64 * 3.5 * (row + 8 * 8))
    with pytest.raises(ValueError, match="^dedup:"):
        check_layout(r1, Layout(tp=8, dedup=True))


def test_advise_ranks_each_ep_layout_with_and_without_dedup():
    from bench.serving import advisor

    found = advisor.layouts(MODEL_SPECS["DeepSeek-R1"], 8)
    ep = [layout for layout in found if layout.ep > 1]
    assert ep and {layout.dedup for layout in ep} == {False, True}
    assert all(not layout.dedup for layout in found if layout.ep == 1)


def test_a_steps_time_by_bound_adds_up_to_the_step():
    """seconds_by_bound splits each stage's time among its bounds (the advisor reports it): the parts sum to
    the step, EP's routing wait included (it is a share of the busiest rank's experts time, not extra)."""
    for name, layout in (
        ("DeepSeek-R1", Layout(dp=8, ep=8)),
        ("DeepSeek-R1", Layout(dp=4, tp=2, ep=8, dedup=True)),
        ("Qwen3-30B-A3B", Layout(tp=2, pp=2)),
        ("Llama-3.1-70B", Layout(tp=4, pp=2)),
    ):
        for batch in (1, 16, 256):
            stages = step_stages(
                Deployment(MODEL_SPECS[name], layout, replace(H200, host_us=50.0), NVLINK), batch, 4096
            )
            assert sum(seconds_by_bound(stages).values()) == pytest.approx(step_seconds(stages)), (
                layout,
                batch,
            )


R1, QWEN3_30B, QWEN3_235B = (7168, 2048), (2048, 768), (4096, 1536)  # experts' (hidden, inter)


def test_block_fp8_fused_moe_rate_follows_rows_an_expert():
    """The fused MoE's compute rate for block-fp8 experts is the measured one at each anchor's rows (over the
    efficiency every compute-bound stage reaches), below the first anchor one tile's time whatever the
    rows, flat past the last; experts of a dtype with no curve (MXFP4) keep the matmul ceiling."""
    eff = H200.compute_efficiency
    for rows, achieved in H200.moe_rates[(1, *R1)]:
        assert H200.moe_tflops(1, rows, R1) * eff == pytest.approx(achieved)
    assert H200.moe_tflops(1, 96, R1) * eff == pytest.approx((371.3 + 526.2) / 2)
    first_rows, first_rate = H200.moe_rates[(1, *R1)][0]
    for rows in (1, 4, 8):  # a tile of first_rows rows costs the same however few fill it
        tile = first_rows / H200.moe_tflops(1, first_rows, R1)
        assert rows / H200.moe_tflops(1, rows, R1) == pytest.approx(tile)
    assert H200.moe_tflops(1, 4096, R1) == H200.moe_tflops(1, 256, R1)
    assert H200.moe_tflops(0.5625, 8, R1) == H200.moe_tflops(0.5625, 4096, R1) == H200.matmul_tflops


def test_bf16_fused_moe_rate_follows_rows_an_expert_on_its_own_shape():
    """bf16 experts run at their shape's measured rate by rows an expert (Qwen3-30B-A3B's and
    Qwen3-235B-A22B's experts, the larger reaching more at the same rows), flat past 512 rows; an expert of
    another size takes the curve nearest its size."""
    eff = H200.compute_efficiency
    for shape in (QWEN3_30B, QWEN3_235B):
        for rows, achieved in H200.moe_rates[(2, *shape)]:
            assert H200.moe_tflops(2, rows, shape) * eff == pytest.approx(achieved)
        assert H200.moe_tflops(2, 4096, shape) == H200.moe_tflops(2, 512, shape) < H200.matmul_tflops
    assert H200.moe_tflops(2, 128, QWEN3_30B) < 0.85 * H200.moe_tflops(2, 128, QWEN3_235B)
    assert H200.moe_tflops(2, 128, (2048, 1024)) == H200.moe_tflops(2, 128, QWEN3_30B)
    assert H200.moe_tflops(2, 128, (5120, 1536)) == H200.moe_tflops(2, 128, QWEN3_235B)


def test_fused_moe_ceiling_takes_each_experts_own_rows():
    """Over experts of equal shares the ceiling is the rate at their rows; with the same rows spread
    unevenly (a power law) the lightly loaded experts' part-filled tiles pull it below the mean's rate."""
    even = experts_ceiling(H200, 1, R1, [1 / 32] * 32, 2048, 8, 1 / 8)
    assert even == pytest.approx(H200.moe_tflops(1, 64, R1))
    _, popular = busiest_rank(256, 8, 2048, 8)
    mean_rows = 2048 * 8 * sum(popular) / len(popular)
    uneven = experts_ceiling(H200, 1, R1, popular, 2048, 8)
    assert uneven < 0.95 * H200.moe_tflops(1, mean_rows, R1)
    assert experts_ceiling(H200, 0.5625, R1, popular, 2048, 8) == pytest.approx(H200.matmul_tflops)


def test_deepseek_r1_ep8_experts_are_compute_bound_at_the_measured_rate():
    """DeepSeek-R1 at EP8, 2,048 tokens: ~100 rows an expert on the busiest rank, its experts' stage bound by
    the block-fp8 rate there (a few hundred TFLOP/s), not by reading its weights at the fp8 ceiling."""
    assert 300 < _ep8_experts_tflops("DeepSeek-R1") < 500


def test_qwen3_ep8_bf16_experts_run_at_their_measured_rate():
    """Qwen3-30B-A3B at EP8, 2,048 tokens: ~128 rows an expert on average over the busiest rank's 16, its
    bf16 experts' stage bound by the bf16 fused MoE's rate there (a few hundred TFLOP/s over the power-law
    shares, under the curve's 453 at 512 rows), not by reading its weights at the bf16 matmul ceiling."""
    assert 200 < _ep8_experts_tflops("Qwen3-30B-A3B") < 453


def _ep8_experts_tflops(model: str) -> float:
    """The experts stage's achieved TFLOP/s past its fixed cost at DP8 x EP8, batch 256 a replica (it must
    be compute-bound there)."""
    layout = Layout(dp=8, ep=8)
    stages = step_stages(Deployment(MODEL_SPECS[model], layout, H200, NVLINK), 256, 1024)
    stage = next(s for s in stages if s.name == "moe:experts")
    assert stage.bound == "compute"
    return stage.flops / (stage.seconds - (H200.moe_us - 2 * H200.launch_us) * 1e-6) / 1e12
