"""`decodebench validate`'s harness on a small grid, from the committed extract of AIConfigurator's measured
H200 tables (no package needed), and the table lookups' interpolation."""

import csv
import json
import math
from dataclasses import replace

import pytest

from bench.commands import cli
from bench.commands import validate as command
from bench.serving import measured, validate
from bench.serving.hardware import GPUS, INTERCONNECTS
from bench.serving.measured import Table, TableSpec
from bench.serving.models import MODEL_SPECS
from bench.serving.step import Deployment, Layout


@pytest.fixture(scope="module")
def tables():
    return command.load_tables(use_package=False)


@pytest.fixture(scope="module")
def h100_tables():
    return command.load_tables(use_package=False, system="h100_sxm")


def test_extract_names_its_source_and_every_table(tables):
    assert tables.source.startswith("aiconfigurator-core ")
    for name in measured.TABLES:
        assert tables[name].rows, name


def test_interpolation_is_linear_between_grid_points_and_exact_on_them():
    table = Table(
        "t",
        TableSpec("f", ("d",), ("m", "n")),
        {("a", 1, 10): 1.0, ("a", 3, 10): 3.0, ("a", 1, 20): 2.0, ("a", 3, 20): 6.0},
    )
    assert table.ms(("a",), (1, 10)) == 1.0
    assert table.ms(("a",), (2, 15)) == pytest.approx((1.0 + 3.0 + 2.0 + 6.0) / 4)
    assert table.ms(("a",), (5, 10)) == pytest.approx(5.0)  # the last segment extended
    with pytest.raises(measured.MissingShape):
        table.ms(("b",), (1, 10))


def test_small_grid_gives_every_kind_a_finite_ratio(tables):
    points = validate.grid(
        models=("Llama-3.1-8B", "Qwen3-30B-A3B", "DeepSeek-R1"),
        tps=(1, 8),
        batches=(1, 256),
        contexts=(8192,),
    )
    result = validate.validate(tables, command.load_published(), points)
    kinds = {row["kind"]: row for row in result["kinds"]}
    expected = {"attention", "mla", "mla_attention", "gemm", "allreduce", "moe_experts", "moe_shared", "a2a"}
    expected.add("lm_head")
    assert expected | {"step total"} <= set(kinds)
    for row in kinds.values():
        assert math.isfinite(row["median"]) and row["median"] > 0, row
    assert len(result["published"]) >= 6
    for run in result["published"]:
        assert run["ours_tokens_per_s"] > 0 and run["source"], run


def test_published_runs_each_name_a_source():
    for row in command.load_published():
        assert row["source"].strip() and row["output_tokens_per_s"] > 0


def test_cli_refuses_to_write_an_extract_from_the_extract(tmp_path, capsys):
    assert cli.main(["validate", "--extract", "--write-extract", str(tmp_path / "x.json")]) == 2
    assert "needs AIConfigurator" in capsys.readouterr().err


def test_admission_policy_sets_the_sequences_a_replica_holds():
    """TensorRT-LLM's GUARANTEED_NO_EVICT keeps a sequence's whole answer from admission; engines that grow
    keep on average half of it: the same pool holds (isl + osl) / (isl + osl / 2) times fewer sequences."""
    spec = replace(MODEL_SPECS["Llama-3.1-70B"], weight_bytes=1)
    hw, link, layout = GPUS["h200"], INTERCONNECTS["nvlink"], Layout()
    args = (Deployment(spec, layout, hw, link, 1), 128, 2048, 100_000)
    _, grow = validate.steady_tokens_per_s(*args, admission="grow")
    _, reserve = validate.steady_tokens_per_s(*args, admission="reserve")
    assert reserve < grow
    assert grow / reserve == pytest.approx((128 + 2048) / (128 + 1024), rel=0.01)
    # the engine's batch cap binds before the pool does
    _, capped = validate.steady_tokens_per_s(
        Deployment(spec, layout, hw, link, 1), 128, 2048, 32, admission="reserve"
    )
    assert capped == 32


def test_published_runs_refuse_an_unknown_admission_policy():
    first = next(csv.DictReader(command.PUBLISHED.read_text().splitlines()))
    row = dict(first, admission="eager")
    with pytest.raises(ValueError, match="admission 'eager'"):
        validate.published_runs([row])


def test_published_runs_and_step_totals_hold_their_targets(tables):
    """The model's accuracy as README publishes it: every published run within RUN_TARGET, the step total
    within TOTAL_TARGET over the whole grid (a regression here is a model change that made it worse)."""
    result = validate.validate(tables, command.load_published())
    low, high = command.RUN_TARGET
    for run in result["published"]:
        assert low <= run["ratio"] <= high, run
    total = next(row for row in result["kinds"] if row["kind"] == "step total")
    median_low, median_high, worst_low, worst_high = command.TOTAL_TARGET
    assert median_low <= total["median"] <= median_high and worst_low <= total["worst"] <= worst_high, total


def test_validate_gpu_folder_compares_the_suites_own_stage_timings(tmp_path, capsys):
    """`validate --gpu FOLDER` re-projects each decode-step document gpu-check wrote there (on the folder's
    measured ceilings) and sets it against the stages the GPU timed: here every timed stage took 1.25x its
    projection, a collective kept its projection (not timed) and is left out."""
    folder = tmp_path / "h200-run"
    folder.mkdir()
    (folder / "machine.json").write_text('{"gpu": "NVIDIA H200", "copy_gbps": 4100.0}')
    document = folder / "decode-step-Qwen3-30B-A3B.json"
    step = ["step", "Qwen3-30B-A3B", "--tp", "2", "--batch", "8", "--context", "2048", "--gpu", str(folder)]
    assert cli.main([*step, "--project", "--json", str(document)]) == 0
    written = json.loads(document.read_text())
    for stage in written["stages"]:
        timed = stage["kind"] != "allreduce"
        stage.update(measured_ms=stage["ms"] * 1.25 if timed else None, verified=timed or None, note="")
    document.write_text(json.dumps(written))
    capsys.readouterr()
    out = tmp_path / "validate.json"
    assert cli.main(["validate", "--extract", "--gpu", str(folder), "--json", str(out)]) == 0
    assert "against this GPU's own stage timings" in capsys.readouterr().out
    own = json.loads(out.read_text())["own_timings"]
    assert own["stages"] and all(s["kind"] != "allreduce" for s in own["stages"])
    for row in own["kinds"]:
        assert row["median"] == pytest.approx(0.8) and row["worst"] == pytest.approx(0.8), row
    assert {"gemm", "attention", "moe_experts", "step (timed stages)"} <= {r["kind"] for r in own["kinds"]}


def test_validate_gpu_folder_refuses_a_broken_step_document(tmp_path, capsys):
    (tmp_path / "machine.json").write_text('{"gpu": "NVIDIA H200"}')
    for text in ('{"stages": []}', "[1, 2]"):
        (tmp_path / "decode-step-x.json").write_text(text)
        assert cli.main(["validate", "--extract", "--gpu", str(tmp_path)]) == 2
        assert "decode-step-x.json: expected a `step --json` document" in capsys.readouterr().err


def test_validate_gpu_folder_says_when_nothing_was_timed(tmp_path, capsys):
    (tmp_path / "machine.json").write_text('{"gpu": "NVIDIA H200"}')
    step = ["step", "Llama-3.1-8B", "--batch", "4", "--context", "1024", "--project"]
    assert cli.main([*step, "--json", str(tmp_path / "decode-step-Llama-3.1-8B.json")]) == 0
    capsys.readouterr()
    assert cli.main(["validate", "--extract", "--gpu", str(tmp_path)]) == 0
    assert "hold no timed stage (written without a GPU)" in capsys.readouterr().out


def test_the_mla_module_is_projected_as_its_benchmark_ran_it():
    """vLLM 0.24's MLA module rows ran RMSNorm and rope as native eager chains (29 kernels a layer more than
    serving): validate adds them at the model's small-kernel cost to the module it compares; step does not."""
    spec = MODEL_SPECS["DeepSeek-R1"]
    hw, layout = GPUS["h200"], Layout(tp=8)
    extra = validate.native_chains_ms(spec, layout, 1, hw)
    kernels = validate.NATIVE_EXTRA_KERNELS
    assert kernels == 2 * (validate.NATIVE_NORM_KERNELS - 1) + validate.NATIVE_ROPE_KERNELS - 1 == 29
    per_layer_us = extra * 1e3 / spec.layers
    assert kernels * hw.launch_us <= per_layer_us < kernels * hw.launch_us * 1.01  # batch 1: launches only
    assert validate.native_chains_ms(spec, layout, 256, hw) > extra  # their fp32 tensors grow with the batch
    point = validate.Point("DeepSeek-R1", layout, 1, 1024)
    stages = validate.step_model.step_stages(Deployment(spec, layout, hw, INTERCONNECTS["nvlink"]), 1, 1024)
    (row,) = validate.compare_kernels(
        command.load_tables(use_package=False), [point], hw, INTERCONNECTS["nvlink"]
    )
    assert row["kinds"]["mla"]["ours_ms"] == pytest.approx(validate.ours_ms(stages)["mla"] + extra)


def test_an_expert_parallel_point_keeps_its_moe_figure_without_an_all_to_all_row(tables):
    """The all-to-all table has DeepSeek's hidden 7168 only: Qwen3's miss there leaves the MoE table's figure
    standing (it dropped both)."""
    spec = MODEL_SPECS["Qwen3-30B-A3B"]
    point = validate.Point("Qwen3-30B-A3B", Layout(dp=8, ep=8), 16, 1024)
    found = validate.measured_ms(tables, spec, point)
    assert "moe_experts" in found and found["moe_experts"] > 0
    assert "a2a" not in found


def test_tensorrt_llm_runs_take_their_kv_from_the_memory_left_after_the_weights():
    """vLLM's pool is 0.9 of the whole GPU less weights and activations; TensorRT-LLM's is 0.9 of what the
    weights and activations leave free (free_gpu_memory_fraction): a published run says which in kv_memory."""
    spec = replace(MODEL_SPECS["Llama-3.1-70B"], weight_bytes=1)
    hw, link, layout = GPUS["h200"], INTERCONNECTS["nvlink"], Layout()
    args = (Deployment(spec, layout, hw, link, 1), 128, 2048, 100_000, "reserve")
    _, of_total = validate.steady_tokens_per_s(*args, kv_memory="of_total")
    _, of_free = validate.steady_tokens_per_s(*args, kv_memory="of_free")
    weights, reserve = spec.params() * 1 + spec.embedding_params(), 2 * 2**30  # fp8, embeddings bf16
    per_sequence = 80 * 8 * 128 * 2 * (128 + 2048)  # fp8 KV: layers x KV heads x head_dim x K and V
    assert of_total == int((0.9 * hw.memory_bytes - weights - reserve) // per_sequence)
    assert of_free == int(0.9 * (hw.memory_bytes - weights - reserve) // per_sequence) > of_total
    assert {run["kv_memory"] for run in command.load_published() if run["engine"] == "TensorRT-LLM"} == {
        "of_free"
    }
    first = next(csv.DictReader(command.PUBLISHED.read_text().splitlines()))
    with pytest.raises(ValueError, match="kv_memory 'half'"):
        validate.published_runs([dict(first, kv_memory="half")])


@pytest.mark.parametrize("gpu", ["h200", "h100"])
def test_moe_rate_anchors_reproduce_their_tensorrt_llm_rows(tables, h100_tables, gpu):
    """Each anchor of a fused MoE's rate by rows an expert is its source row's FLOPs over its latency less the
    one-token row's, in its own GPU's table (TensorRT-LLM's, EP8, balanced: not the vLLM table compared):
    block-fp8 at DeepSeek-R1's shape, bf16 at each Qwen3 MoE's."""
    found = validate.moe_rate_anchors(tables if gpu == "h200" else h100_tables, GPUS[gpu])
    experts = {("fp8_block", 7168, 2048): 256, ("bfloat16", 2048, 768): 128, ("bfloat16", 4096, 1536): 128}
    rows = {curve: [row["rows"] for row in found if row["curve"] == curve] for curve in experts}
    assert rows == {
        ("fp8_block", 7168, 2048): [16, 32, 64, 128, 256],
        ("bfloat16", 2048, 768): [16, 32, 64, 128, 256, 512],
        ("bfloat16", 4096, 1536): [16, 32, 64, 128, 256, 512],
    }
    for row in found:
        assert row["tokens"] * 8 == row["rows"] * experts[row["curve"]]  # top 8: tokens x 8 / experts
        assert row["anchor"] == pytest.approx(row["measured"], rel=0.005), row


def test_the_h100_preset_holds_every_target_against_the_h100_tables(h100_tables):
    """The step model on the H100's anchors against NVIDIA's H100 tables (the committed H100 extract): every
    kind's median and worst ratio and the step total within their targets, as README publishes them."""
    result = validate.validate(h100_tables, [], hw=GPUS["h100"])
    assert result["kinds"], result
    for row in result["kinds"]:
        assert command._verdict(row) == "yes", row


def test_deepseek_r1_ep8_batch_256_fused_moe_within_target(tables):
    """At EP8, 2,048 tokens the busiest rank's experts get about 50-200 rows each: block-fp8 grouped GEMMs
    there run at 370-580 TFLOP/s, not the fp8 ceiling x 0.9 (which read 0.40 of the measured time)."""
    point = validate.Point("DeepSeek-R1", Layout(dp=8, ep=8), 256, 1024)
    [row] = validate.compare_kernels(tables, [point], GPUS["h200"], INTERCONNECTS["nvlink"])
    kind = row["kinds"]["moe_experts"]
    assert 0.55 <= kind["ours_ms"] / kind["measured_ms"] <= 1.40, kind


@pytest.mark.parametrize("model", ["Qwen3-30B-A3B", "Qwen3-235B-A22B"])
def test_qwen3_ep8_batch_256_fused_moe_within_target(tables, model):
    """At EP8, 2,048 tokens the busiest rank's bf16 experts get ~128 rows each on average: the bf16 fused MoE
    there runs at 100-450 TFLOP/s, not the bf16 ceiling x 0.9 (which read 0.39 and 0.44 of the measured
    time)."""
    point = validate.Point(model, Layout(dp=8, ep=8), 256, 1024)
    [row] = validate.compare_kernels(tables, [point], GPUS["h200"], INTERCONNECTS["nvlink"])
    kind = row["kinds"]["moe_experts"]
    assert 0.55 <= kind["ours_ms"] / kind["measured_ms"] <= 1.40, kind
