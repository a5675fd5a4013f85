"""Model presets and workloads (bench/serving/models.py, workloads.py): sizes and KV bytes against the
published figures, tensor-parallel splits, a Hugging Face config read into the preset it describes, and the
NaturalReasoning-like workload's published shape. The checks on impossible configs are
tests/test_cli_errors.py's."""

import json
from pathlib import Path

import numpy as np
import pytest

from bench.commands.model_inputs import load_model_config
from bench.serving.models import MODEL_SPECS, MODELS, MOE_MODELS, model_from_hf_config
from bench.serving.workloads import WORKLOADS

NATURAL = WORKLOADS["NaturalReasoning-like"]
DATA = Path(__file__).parent / "data"


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
        ("gpt-oss-120b", 36864),  # its 18 full-attention layers; the 18 sliding-window ones hold a window
        ("DeepSeek-R1", 70272),
    ],
)
def test_model_presets_match_the_published_kv_bytes(model, kv_bytes):
    """docs/facts.md#model-shapes' last column, recomputed from the preset's geometry."""
    assert MODELS[model].kv_bytes_per_token() == kv_bytes


def test_tensor_parallel_splits_kv_heads_only_up_to_their_count():
    assert MODELS["Llama-3.1-70B"].kv_heads_per_rank(8) == 1
    assert MODELS["Llama-3.1-70B"].kv_heads_per_rank(16) == 1
    assert MODELS["DeepSeek-R1"].kv_heads_per_rank(8) == 1


def test_parameters_match_the_published_sizes():
    published = {
        "Llama-3.1-8B": 8.03,
        "Llama-3.1-70B": 70.6,
        "Llama-3.1-405B": 405.9,
        "DeepSeek-R1-Distill-Qwen-14B": 14.8,
        "DeepSeek-R1-Distill-Qwen-32B": 32.8,
        "Qwen3-235B-A22B": 235.1,
        "Mixtral-8x7B": 46.7,
        "DeepSeek-R1": 671.0,
    }
    for name, billions in published.items():
        assert MODEL_SPECS[name].params() / 1e9 == pytest.approx(billions, rel=0.01), name


def test_kv_bytes_per_token_match_the_table():
    # docs/facts.md#model-shapes: bytes a token holds over all layers, bf16, one rank.
    for name, nbytes in (("Llama-3.1-8B", 131072), ("Llama-3.1-405B", 516096), ("DeepSeek-R1", 70272)):
        spec = MODEL_SPECS[name]
        assert spec.layers * spec.kv_bytes_per_token_layer() == nbytes, name
    llama, r1 = MODEL_SPECS["Llama-3.1-70B"], MODEL_SPECS["DeepSeek-R1"]
    assert llama.kv_bytes_per_token_layer(tp=16) == llama.kv_bytes_per_token_layer(tp=8)  # 8 KV heads at most
    assert r1.kv_bytes_per_token_layer(tp=8) == r1.kv_bytes_per_token_layer(tp=1)  # the latent is replicated


def test_a_hugging_face_config_reads_into_the_preset(tmp_path):
    for preset in ("DeepSeek-R1", "Llama-3.1-8B"):
        read = load_model_config(DATA / f"hf-config-{preset}.json", name=preset)
        want = MODEL_SPECS[preset]
        assert read.params() == want.params() and read.weight_bytes == want.weight_bytes
        assert read.kv_bytes_per_token_layer(8) == want.kv_bytes_per_token_layer(8)
        assert read.moe == want.moe and read.mla == want.mla
    # The router's rule comes with it: what step's timing routes a config.json's model by.
    read = load_model_config(DATA / "hf-config-DeepSeek-R1.json", name="DeepSeek-R1")
    assert read.moe_model() == MOE_MODELS["DeepSeek-R1"]
    with pytest.raises(ValueError, match="no MoE layers"):
        MODEL_SPECS["Llama-3.1-8B"].moe_model()
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="^config:"):
        load_model_config(path)


def test_gpt_oss_sliding_window_layers_hold_a_window_not_the_context():
    """gpt-oss alternates sliding_attention (window 128) and full_attention layers (config.json's
    layer_types, sliding_window): at 32K tokens a sequence holds about 36,864 B a token (18 layers), plus a
    window's pages in the other 18, not 73,728 (all 36 counted full)."""
    spec = MODEL_SPECS["gpt-oss-120b"]
    context, window = 32768, spec.window_slots(16)
    per_token = spec.kv_bytes_per_token() * (context + window) / context
    assert per_token == pytest.approx(36864, rel=0.01)
    assert window == (128 // 16 + 1) * 16  # vLLM keeps cdiv(window, block) + 1 blocks a sequence
    assert spec.attended_context(context) == pytest.approx((context + 128) / 2)
    assert MODEL_SPECS["Llama-3.1-8B"].window_slots(16) == 0


def test_layer_types_read_into_the_sliding_window_layers():
    """A config.json's layer_types and sliding_window give the windowed layers (the preset's, for
    gpt-oss's alternation); a layer_types that does not name every layer is a ValueError."""
    preset = MODEL_SPECS["gpt-oss-120b"]
    fields = {
        "num_hidden_layers": 36,
        "hidden_size": 2880,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "intermediate_size": 2880,
        "vocab_size": 201088,
        "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * 18,
    }
    read = model_from_hf_config(fields)
    assert (read.windowed, read.sliding_window) == (preset.windowed, preset.sliding_window)
    assert read.kv_bytes_per_token(8) == preset.kv_bytes_per_token(8)
    with pytest.raises(ValueError, match="layer_types"):
        model_from_hf_config({**fields, "layer_types": ["full_attention"] * 35})


def test_natural_reasoning_matches_the_published_shape():
    prompts, outputs = NATURAL.draw(50_000, np.random.default_rng(1))
    assert np.mean((prompts >= 50) & (prompts <= 150)) == pytest.approx(0.77, abs=0.02)
    assert np.mean(outputs > 5000) == pytest.approx(0.45, abs=0.02)
