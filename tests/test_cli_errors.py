"""Every command through bad input: nonsense numbers, missing and malformed files, unknown names. Each must
exit 2 with one line on stderr naming what was wrong, no traceback, and nothing on stdout: the arguments
are checked before any work starts (every function that does work is replaced by one that fails the test).

The table runs in-process (cli.main, a few milliseconds a row); one subprocess run proves the exit status
and the single stderr line end to end. model_from_hf_config's own checks have a table of their own.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.commands import cli
from bench.commands.model_inputs import load_model_config
from bench.measure import results
from bench.measure.timing import Timing
from bench.serving import advisor
from bench.serving.models import CONFIGS, MODEL_SPECS
from bench.serving.step import Layout, check_layout

ROOT = Path(__file__).resolve().parents[1]

# Two presets' Hugging Face config.json files, as the presets are read from them.
LLAMA_CONFIG = json.loads((CONFIGS / "Llama-3.1-8B.json").read_text())
DEEPSEEK_CONFIG = json.loads((CONFIGS / "DeepSeek-R1.json").read_text())

#: Functions that start work: none may run before a bad argument is reported.
WORK = [
    ("bench.commands.step", "step_stages"),
    ("bench.serving.advisor", "advise"),
    ("bench.serving.capacity", "capacity_table"),
    ("bench.measure.runner", "static_rows"),
    ("bench.measure.runner", "traffic_rows"),
    ("bench.measure.runner", "verify"),
    ("bench.measure.proxies", "collect"),
    ("bench.measure.profile", "profile_torch"),
    ("bench.measure.profile", "target"),
    ("bench.commands.run", "run_cpu"),
    ("bench.commands.run", "run_gpu"),
    ("bench.commands.gpu_check", "run"),
    ("bench.measure.tuning", "run"),
    ("bench.measure.tuning", "install"),
    ("bench.measure.distributed", "spawn"),
    ("bench.measure.distributed", "init_from_env"),
]


@pytest.fixture
def no_work(monkeypatch):
    """Replaces every function in WORK by one recording its call (and failing the command)."""
    import importlib

    started = []

    def refuse(name):
        def work(*args, **kwargs):
            started.append(name)
            raise AssertionError(f"{name} started before the arguments were checked")

        return work

    for module, name in WORK:
        monkeypatch.setattr(importlib.import_module(module), name, refuse(f"{module}.{name}"))
    monkeypatch.delenv("RANK", raising=False)  # not a torchrun rank
    return started


def _entry(impl="triton", median_s=1e-5, **info):
    timing = Timing.from_samples([median_s * 1e3] * 3)
    extra = {"kernel": "write_kv", "shape": "s", "impl": impl, "verified": True, **info}
    return results.entry(f"write_kv[{impl}]", "write_kv", timing, extra)


def _write(path: Path, content) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _result(path: Path, benchmarks, **document) -> str:
    return _write(path, {"machine_info": {"gpu": "cpu"}, "benchmarks": benchmarks, **document})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Good and bad files by name, for the table's {placeholders}."""
    d = tmp_path_factory.mktemp("cli-errors")
    good = [_entry(), _entry("reference", 5e-5)]
    f = {
        "dir": str(d),
        "missing": str(d / "missing.json"),
        "folder": str(d),
        "text": _write(d / "text.json", "not json at all"),
        "latin1": _write(d / "latin1.json", b'{"name": "caf\xe9"}'),
        "list": _write(d / "list.json", [1, 2]),
        "good": _result(d / "good.json", good),
        "no_min": _result(d / "no-min.json", [{"name": "x", "stats": {"median": 1e-5}}]),
        "extra_null": _result(d / "extra-null.json", [{**_entry(), "extra_info": None}]),
        "extra_list": _result(d / "extra-list.json", [{**_entry(), "extra_info": [1]}]),
        "shape_list": _result(d / "shape-list.json", [_entry(shape=["a"])]),
        "name_list": _result(d / "name-list.json", [{**_entry(), "name": ["a"]}]),
        "p20_text": _result(d / "p20.json", [{**_entry(), "extra_info": {"kernel": "k", "p20_s": "fast"}}]),
        "machine_text": _write(d / "machine-text.json", {"machine_info": "h100", "benchmarks": good}),
        "median_nan": _result(d / "median-nan.json", [{"name": "x", "stats": {"median": "NaN"}}]),
        "llama_bad": _write(d / "llama-bad.json", {**LLAMA_CONFIG, "num_attention_heads": 0}),
        "tuned_bad": _write(d / "tuned-bad" / "tuned-configs.json", {"slug": "../../x", "kernels": {}}),
        "no_machine": str(d / "folder-without-machine"),
        "machine_bad": str(Path(_write(d / "gpu-bad" / "machine.json", "{not json")).parent),
        "machine_list": str(Path(_write(d / "gpu-list" / "machine.json", [])).parent),
        "machine_gbps": str(Path(_write(d / "gpu-gbps" / "machine.json", {"copy_gbps": "fast"})).parent),
        "run_bad": str(Path(_write(d / "gpu-run" / "machine.json", {"gpu": "H200"})).parent),
        "allreduce_1": _result(d / "ar1.json", [_entry(kernel="all_reduce", impl="nccl", bytes=8)]),
    }
    _write(
        Path(f["run_bad"]) / "run.json",
        {"benchmarks": [{"name": "x", "stats": {"median": 1}, "extra_info": 1}]},
    )
    (d / "folder-without-machine").mkdir()
    f["under_file"] = f["good"] + "/sub/out.png"  # a folder can never be made under a file
    return f


BAD = [
    # step: nonsense numbers, layouts the model cannot run, unknown names, bad files
    ("step Llama-3.1-70B --tp 0", "--tp"),
    ("step Llama-3.1-70B --pp 0", "--pp"),
    ("step Llama-3.1-70B --tp -1", "--tp"),
    ("step Llama-3.1-70B --batch -1", "--batch"),
    ("step Llama-3.1-70B --context -1", "--context"),
    ("step Llama-3.1-70B --dp 1.5", "--dp"),
    ("step Llama-3.1-70B --ep x", "--ep"),
    ("step Llama-3.1-70B --tp 3", "tp: expected a divisor of Llama-3.1-70B's 64 query heads"),
    ("step DeepSeek-R1-Distill-Qwen-14B --tp 5", "tp: 5 neither divides"),
    ("step Llama-3.1-70B --pp 81", "pp: expected at most Llama-3.1-70B's 80 layers"),
    ("step Llama-3.1-70B --ep 2 --tp 2", "ep: Llama-3.1-70B is dense"),
    ("step DeepSeek-R1 --tp 8 --ep 4", "ep: expected 1 or dp x tp = 8"),
    ("step Mixtral-8x7B --dp 3 --ep 3", "ep: expected a divisor of Mixtral-8x7B's 8 experts"),
    ("step nope", "MODEL: unknown nope"),
    ("step Llama-3.1-70B --kv fp4", "--kv"),
    ("step Llama-3.1-70B --gpu b300", "--gpu"),
    ("step Llama-3.1-70B --gpu {no_machine}", "--gpu"),
    ("step Llama-3.1-70B --gpu {machine_bad}", "machine.json: not JSON"),
    ("step Llama-3.1-70B --gpu {machine_list}", "machine.json: expected a JSON object"),
    ("step Llama-3.1-70B --gpu {machine_gbps}", "copy_gbps: expected a positive number"),
    ("step Llama-3.1-70B --gpu {run_bad}", "run.json: benchmarks[0]: extra_info"),
    ("step Llama-3.1-70B --interconnect infiniband", "--interconnect"),
    ("step Llama-3.1-70B --interconnect {text}", "--interconnect: {text}: not JSON"),
    ("step Llama-3.1-70B --interconnect {list}", "--interconnect: {list}: expected a JSON object"),
    ("step Llama-3.1-70B --interconnect {allreduce_1}", "no all-reduce measured on 2 or more ranks"),
    ("step x --config {missing}", "--config: {missing}: cannot read it"),
    ("step x --config {folder}", "--config"),
    ("step x --config {text}", "--config: {text}: not JSON"),
    ("step x --config {latin1}", "--config: {latin1}: not JSON"),
    ("step x --config {list}", "--config: {list}: expected a JSON object"),
    ("step x --config {llama_bad}", "num_attention_heads: expected a positive integer"),
    ("step Llama-3.1-70B --plot {under_file}", "--plot: cannot create"),
    ("step Llama-3.1-70B --plot {folder}", "--plot: {folder} is a folder"),
    # advise
    ("advise Llama-3.1-8B --gpus 0", "--gpus"),
    ("advise Llama-3.1-8B --gpus -1", "--gpus"),
    ("advise Llama-3.1-8B", "--gpus"),
    ("advise Llama-3.1-8B --gpus 2 --requests 0", "--requests"),
    ("advise Llama-3.1-8B --gpus 2 --requests -1", "--requests"),
    ("advise Llama-3.1-8B --gpus 2 --workload gsm8k", "--workload"),
    ("advise Llama-3.1-8B --gpus 2 --json {under_file}", "--json: cannot create"),
    ("advise Llama-3.1-8B --gpus 2 --plot {under_file}", "--plot: cannot create"),
    ("advise x --gpus 2 --config {llama_bad}", "num_attention_heads"),
    ("advise Llama-3.1-8B --gpus 2 --workload fixed:0:5", "positive lengths"),
    ("advise Llama-3.1-8B --gpus 2 --workload fixed:a", "--workload: expected fixed:ISL:OSL"),
    ("advise Llama-3.1-8B --gpus 2 --max-seqs 0", "--max-seqs"),
    ("advise Llama-3.1-8B --gpus 2 --max-tpot -1", "--max-tpot"),
    ("advise Llama-3.1-8B --gpus 2 --weights fp4", "--weights"),
    ("advise Llama-3.1-8B --gpus 2 --host-us nan", "--host-us"),
    ("step Llama-3.1-70B --weights int4", "--weights"),
    ("step Llama-3.1-70B --json {folder}", "--json: {folder} is a folder"),
    ("validate --json {folder}", "--json: {folder} is a folder"),
    ("validate --system a100", "--system"),
    # capacity
    ("capacity --tp 0", "--tp"),
    ("capacity --tp -1", "--tp"),
    ("capacity --tp 3", "tp: expected a divisor of Llama-3.1-8B's 32 query heads"),
    ("capacity --gpu-gib nan", "--gpu-gib"),
    ("capacity --gpu-gib inf", "--gpu-gib"),
    ("capacity --gpu-gib 0", "--gpu-gib"),
    ("capacity --gpu-gib 1e300", "--gpu-gib"),
    ("capacity --gpu-gib 0.001", "--gpu-gib: 0.001 GiB holds no KV cache"),
    ("capacity --arrival-rate -1", "--arrival-rate"),
    ("capacity --arrival-rate nan", "--arrival-rate"),
    ("capacity --arrival-rate 1e20", "--arrival-rate"),
    ("capacity --model Llama-4", "--model"),
    ("capacity --plot {under_file}", "--plot: cannot create"),
    # dist: checked in the parent, before any rank starts
    ("dist ep --nproc -1", "--nproc"),
    ("dist ep --nproc 0", "--nproc"),
    ("dist ep --nproc 2 --models Llama-3.1-8B", "--models: unknown 'Llama-3.1-8B'"),
    ("dist ep --nproc 2 --tokens 0", "--tokens"),
    ("dist ep --nproc 2 --tokens 1,x", "--tokens"),
    ("dist ep --nproc 2 --tokens ''", "--tokens"),
    ("dist ep --nproc 2 --loads skewed", "--loads: unknown 'skewed'"),
    ("dist ep --nproc 2 --modes exact,", "--modes: unknown ''"),
    ("dist ep --nproc 2 --reps 0", "--reps"),
    ("dist ep --nproc 2 --warmup -1", "--warmup"),
    ("dist ep --nproc 2 --timeout nan", "--timeout"),
    ("dist ep --nproc 2 --timeout 1e300", "--timeout"),
    ("dist ep --nproc 2 --out {under_file}", "--out: cannot create"),
    ("dist allreduce --nproc 2 --sizes -8", "--sizes"),
    ("dist ep --nproc 3 --models Mixtral-8x7B", "experts dividing over 3 ranks"),
    ("dist ep", "torchrun"),
    ("dist nope --nproc 2", "invalid choice: 'nope'"),
    # compare and report: thresholds, missing and malformed files and entries
    ("compare {good} {good} --fail median", "--fail"),
    ("compare {good} {good} --fail median:1.2.3%", "--fail"),
    ("compare {good} {good} --fail p99:5%", "--fail"),
    ("compare {good} {good} --fail median:-5%", "--fail"),
    ("compare {good} {no_min} --fail min:5%", "{no_min}: benchmarks[0]: stats.min"),
    ("compare {missing} {good}", "{missing}: cannot read it"),
    ("compare {good} {folder}", "cannot read it"),
    ("compare {latin1} {good}", "{latin1}: not JSON"),
    ("compare {good} {list}", "{list}: expected a JSON object"),
    ("compare {good} {shape_list}", "extra_info.shape: expected a string"),
    ("compare {name_list} {good}", "name: expected a string"),
    ("report {extra_null}", "{extra_null}: benchmarks[0]: extra_info: expected an object"),
    ("report {extra_list}", "extra_info: expected an object"),
    ("report {shape_list}", "extra_info.shape: expected a string"),
    ("report {name_list}", "benchmarks[0]: name: expected a string"),
    ("report {p20_text}", "extra_info.p20_s: expected a non-negative number"),
    ("report {machine_text}", "machine_info: expected an object"),
    ("report {median_nan}", "stats.median"),
    ("report {good} {text}", "{text}: not JSON"),  # the good file's table is not printed first
    ("report {good} --plot {under_file}", "--plot: cannot create"),
    ("report {good} --plot {good}", "--plot: {good} exists and is not a folder"),
    # kernels, profiles, gpu-check, tune
    ("run --kernel nope", "unknown kernel nope"),
    ("run --out {under_file}", "--out: cannot create"),
    ("static --kernel nope", "unknown kernel nope"),
    ("static --json {under_file}", "--json: cannot create"),
    ("traffic --kernel nope", "unknown kernel nope"),
    ("proxies --kernel nope", "unknown kernel nope"),
    ("profile nope", "unknown kernel nope"),
    ("profile write_kv --calls 0", "--calls"),
    ("profile write_kv --calls -3", "--calls"),
    ("profile write_kv --shape -1", "--shape"),
    ("profile write_kv --shape 999", "--shape: expected 0 to"),
    ("profile write_kv --tool perf", "--tool"),
    ("profile write_kv --out {under_file}", "--out: cannot create"),
    ("profile-target write_kv --calls 0", "--calls"),
    ("profile-target write_kv --shape 999", "--shape"),
    ("profile-target nope", "unknown kernel nope"),
    ("sanitize-target nope", "unknown kernel nope"),
    ("gpu-check --dry-run --budget 0", "--budget"),
    ("gpu-check --dry-run --budget nan", "--budget"),
    ("gpu-check --dry-run --budget 1e300", "--budget"),
    ("gpu-check --dry-run --only machine,nope", "--only: unknown 'nope'"),
    ("gpu-check --dry-run --out {good}", "--out: {good} exists and is not a folder"),
    ("tune nope --dry-run", "unknown kernel nope"),
    ("tune --dry-run --budget -1", "--budget"),
    ("tune --install", "--install: name the folder"),
    ("tune --install --out {dir}", "tuned-configs.json: cannot read it"),
    ("tune --install --out {tuned_bad_dir}", "slug: expected"),
    ("tune --out {under_file}", "--out: cannot create"),
    # the command line itself
    ("", "command"),
    ("bench", "invalid choice: 'bench'"),
    ("static --kernels write_kv", "unrecognized arguments: --kernels"),
]


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit:  # argparse's errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command, why", BAD, ids=[command or "(none)" for command, _ in BAD])
def test_bad_input_is_one_line_and_exit_2_before_any_work(command, why, files, no_work, capsys):
    names = {**files, "tuned_bad_dir": str(Path(files["tuned_bad"]).parent)}
    argv = [arg.format(**names) for arg in shlex.split(command)]
    code, out, err = _main(argv, capsys)
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and err.startswith("decodebench"), err
    assert "Traceback" not in err and why.format(**names) in err, err
    assert out == "" and no_work == [], (out, no_work)


def test_backend_nccl_without_cuda_is_refused_before_spawning(no_work, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nccl is a good backend here")
    code, out, err = _main(["dist", "ep", "--nproc", "2", "--backend", "nccl"], capsys)
    assert code == 2 and "--backend nccl" in err and len(err.splitlines()) == 1 and no_work == []


def test_more_nccl_ranks_than_gpus_are_refused_before_spawning(no_work, monkeypatch, capsys):
    """A second NCCL rank on a one-GPU box would fail to set its device and leave rank 0 in NCCL's set-up."""
    from bench.commands import dist

    monkeypatch.setattr(dist, "_has_cuda", lambda: True)
    monkeypatch.setattr(dist, "_cuda_devices", lambda: 1)
    code, out, err = _main(["dist", "ep", "--nproc", "2", "--backend", "nccl"], capsys)
    assert code == 2 and "--nproc 2: NCCL puts a rank on each GPU" in err and no_work == [], err


def test_good_arguments_reach_the_work(files, no_work, monkeypatch, capsys):
    """The checks refuse nothing a command should take: defaults, lists, presets, files."""
    from bench.measure import distributed, tuning

    monkeypatch.setattr(distributed, "spawn", lambda fn, world, **kw: no_work.append(("spawn", world)) or [])
    monkeypatch.setattr(tuning, "install", lambda out: no_work.append(("install", out)) or "x.json")
    argv = [
        "dist",
        "ep",
        "--nproc",
        "2",
        "--backend",
        "gloo",
        "--tokens",
        "1,8",
        "--models",
        "Qwen3-235B-A22B",
    ]
    assert _main(argv, capsys)[0] == 0
    tuned = Path(files["dir"]) / "tuned-good" / "tuned-configs.json"
    _write(tuned, {"slug": "nvidia-h200", "kernels": {"write_kv": {}}})
    assert _main(["tune", "--install", "--out", str(tuned.parent)], capsys)[0] == 0
    assert no_work == [("spawn", 2), ("install", tuned.parent)]


def test_an_output_file_in_a_folder_yet_to_be_made_is_written(tmp_path, capsys):
    path = tmp_path / "new" / "folder" / "advise.json"
    argv = ["advise", "Llama-3.1-8B", "--gpus", "1", "--requests", "4", "--json", str(path)]
    assert cli.main(argv) == 0
    assert json.loads(path.read_text())["requests"] == 4


def test_a_zero_median_beside_a_reference_is_reported_without_a_ratio(tmp_path, capsys):
    zero = _entry()
    zero["stats"]["median"] = 0.0
    path = _result(tmp_path / "zero.json", [zero, _entry("reference", 5e-5)])
    assert cli.main(["report", path]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| write_kv"))
    assert "x |" not in row, row  # no "inf x" nor a division by zero


def test_every_layout_the_advisor_proposes_is_one_step_accepts():
    for spec in MODEL_SPECS.values():
        for gpus in range(1, 17):
            for layout in advisor.layouts(spec, gpus):
                check_layout(spec, layout)
    qwen = MODEL_SPECS["DeepSeek-R1-Distill-Qwen-14B"]  # 40 query heads, 8 KV heads: tp 5 splits neither
    assert all(layout.tp != 5 for layout in advisor.layouts(qwen, 5))
    with pytest.raises(ValueError, match="^tp: 5"):
        check_layout(qwen, Layout(tp=5))


def test_one_real_process_exits_2_with_one_line():
    """What a shell sees: `decodebench static --kernel nope` was SystemExit(message), exit status 1."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "static", "--kernel", "nope"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 2, done
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("decodebench static: error: unknown kernel nope; known: write_kv, ")
    assert done.stdout == ""


# --- model_from_hf_config: a config no model could have is a ValueError naming the field ------------------


def _without(config: dict, key: str) -> dict:
    return {k: v for k, v in config.items() if k != key}


BAD_CONFIGS = [
    ({**LLAMA_CONFIG, "num_attention_heads": 0}, "num_attention_heads: expected a positive integer"),
    ({**LLAMA_CONFIG, "num_attention_heads": -32}, "num_attention_heads"),
    ({**LLAMA_CONFIG, "num_attention_heads": "32"}, "num_attention_heads"),
    ({**LLAMA_CONFIG, "num_attention_heads": 32.0}, "num_attention_heads"),
    ({**LLAMA_CONFIG, "num_attention_heads": True}, "num_attention_heads"),
    ({**LLAMA_CONFIG, "num_hidden_layers": 0}, "num_hidden_layers"),
    ({**LLAMA_CONFIG, "hidden_size": -4096}, "hidden_size"),
    ({**LLAMA_CONFIG, "hidden_size": 16}, "hidden_size: expected at least num_attention_heads"),
    ({**LLAMA_CONFIG, "head_dim": 0}, "head_dim"),
    ({**LLAMA_CONFIG, "intermediate_size": 0}, "intermediate_size"),
    (_without(LLAMA_CONFIG, "vocab_size"), "names none of vocab_size"),
    ({**LLAMA_CONFIG, "num_key_value_heads": 5}, "num_key_value_heads: expected a divisor"),
    ({**LLAMA_CONFIG, "num_key_value_heads": 64}, "num_key_value_heads: expected at most 32"),
    ({**LLAMA_CONFIG, "num_key_value_heads": 0}, "num_key_value_heads"),
    ({**LLAMA_CONFIG, "tie_word_embeddings": "no"}, "tie_word_embeddings"),
    ({**LLAMA_CONFIG, "rope_scaling": "yarn"}, "rope_scaling: expected an object"),
    ({**LLAMA_CONFIG, "rope_scaling": {"factor": "8"}}, "rope_scaling.factor"),
    ({**LLAMA_CONFIG, "quantization_config": "fp8"}, "quantization_config: expected an object"),
    ({**LLAMA_CONFIG, "quantization_config": {"quant_method": 8}}, "quantization_config.quant_method"),
    ({**DEEPSEEK_CONFIG, "num_experts_per_tok": 0}, "num_experts_per_tok"),
    ({**DEEPSEEK_CONFIG, "num_experts_per_tok": 257}, "num_experts_per_tok: expected at most 256"),
    ({**DEEPSEEK_CONFIG, "n_routed_experts": -1}, "n_routed_experts"),
    ({**DEEPSEEK_CONFIG, "n_shared_experts": -1}, "n_shared_experts"),
    ({**DEEPSEEK_CONFIG, "scoring_func": "relu"}, 'scoring_func: expected "softmax" or "sigmoid"'),
    ({**DEEPSEEK_CONFIG, "routed_scaling_factor": 0}, "routed_scaling_factor: expected a positive number"),
    ({**DEEPSEEK_CONFIG, "topk_method": 1}, "topk_method"),
    ({**DEEPSEEK_CONFIG, "first_k_dense_replace": 61}, "first_k_dense_replace: expected at most 60"),
    ({**DEEPSEEK_CONFIG, "first_k_dense_replace": 100}, "first_k_dense_replace"),
    (_without(DEEPSEEK_CONFIG, "qk_rope_head_dim"), "names none of qk_rope_head_dim"),
    (_without(DEEPSEEK_CONFIG, "qk_nope_head_dim"), "names none of qk_nope_head_dim"),
    (_without(DEEPSEEK_CONFIG, "v_head_dim"), "names none of v_head_dim"),
    ({**DEEPSEEK_CONFIG, "kv_lora_rank": "512"}, "kv_lora_rank"),
    ({**DEEPSEEK_CONFIG, "q_lora_rank": 0}, "q_lora_rank"),
    ({**DEEPSEEK_CONFIG, "rope_scaling": [40]}, "rope_scaling: expected an object"),
    ({**DEEPSEEK_CONFIG, "rope_scaling": {"factor": 0}}, "rope_scaling.factor: expected a positive number"),
    (
        {**DEEPSEEK_CONFIG, "rope_scaling": {"factor": 40, "mscale_all_dim": -1}},
        "rope_scaling.mscale_all_dim",
    ),
]


@pytest.mark.parametrize("config, why", BAD_CONFIGS, ids=[why for _, why in BAD_CONFIGS])
def test_an_impossible_config_names_its_field(tmp_path, config, why):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="^config: ") as raised:
        load_model_config(path)
    assert why in str(raised.value) and str(path) in str(raised.value)


def test_the_good_configs_read(tmp_path):
    for config in (LLAMA_CONFIG, DEEPSEEK_CONFIG, {**LLAMA_CONFIG, "head_dim": None, "q_lora_rank": None}):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        assert load_model_config(path).params() > 0


@pytest.mark.parametrize("content", [b"[]", b"{", b"\xff\xfe{}", None])
def test_a_config_that_is_no_json_object_names_the_file(tmp_path, content):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="^config: ") as raised:
        load_model_config(path)
    assert str(path) in str(raised.value)
