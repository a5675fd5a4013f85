"""Model presets and workloads (bench/serving/models.py, workloads.py): sizes and KV bytes against the
published figures, tensor-parallel splits, the presets' config files read as a user's are, and the
NaturalReasoning-like workload's published shape. The checks on impossible configs are
tests/test_cli_errors.py's."""

import json

import numpy as np
import pytest

from bench.commands.model_inputs import load_model_config
from bench.serving.models import CONFIGS, MODEL_SPECS, MODELS, MOE_MODELS, model_from_hf_config
from bench.serving.workloads import WORKLOADS

NATURAL = WORKLOADS["NaturalReasoning-like"]


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


#: docs/facts.md#model-shapes (and its MLP widths): layers, hidden, Q heads, KV heads, head_dim, and the MLP
#: width where facts.md gives one. Every preset is here: a new one must say what it should read into.
PUBLISHED_SHAPES = {
    "Llama-3.1-8B": (32, 4096, 32, 8, 128, 14336),
    "Llama-3.1-70B": (80, 8192, 64, 8, 128, 28672),
    "Llama-3.1-405B": (126, 16384, 128, 8, 128, 53248),
    "DeepSeek-R1-Distill-Llama-8B": (32, 4096, 32, 8, 128, 14336),
    "DeepSeek-R1-Distill-Llama-70B": (80, 8192, 64, 8, 128, 28672),
    "DeepSeek-R1-Distill-Qwen-14B": (48, 5120, 40, 8, 128, 13824),
    "DeepSeek-R1-Distill-Qwen-32B": (64, 5120, 40, 8, 128, 27648),
    "Qwen3-32B": (64, 5120, 64, 8, 128, None),
    "Qwen3-30B-A3B": (48, 2048, 32, 4, 128, None),
    "Qwen3-235B-A22B": (94, 4096, 64, 4, 128, None),
    "Mixtral-8x7B": (32, 4096, 32, 8, 128, None),
    "gpt-oss-120b": (36, 2880, 64, 8, 64, None),
    "DeepSeek-R1": (61, 7168, 128, 128, 192, 18432),
}


def test_every_preset_reads_into_its_published_shape():
    """Each preset's config.json, through the reader a user's --config goes through, against the shapes
    docs/facts.md publishes (the Python table the presets were before held the same figures)."""
    assert list(PUBLISHED_SHAPES) == list(MODEL_SPECS)
    for name, (layers, hidden, heads, kv_heads, head_dim, mlp) in PUBLISHED_SHAPES.items():
        spec = MODEL_SPECS[name]
        assert (spec.layers, spec.hidden, spec.num_q_heads, spec.num_kv_heads, spec.head_dim) == (
            layers,
            hidden,
            heads,
            kv_heads,
            head_dim,
        ), name
        assert mlp is None or spec.intermediate == mlp, name


def test_a_config_file_that_describes_no_model_is_refused_naming_it(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="^config:"):
        load_model_config(path)


@pytest.mark.parametrize(
    "name, experts, top_k, width, scoring",
    [
        ("DeepSeek-R1", 256, 8, 2048, "sigmoid"),
        ("Qwen3-30B-A3B", 128, 8, 768, "softmax"),
        ("Qwen3-235B-A22B", 128, 8, 1536, "softmax"),
        ("Mixtral-8x7B", 8, 2, 14336, "softmax"),
        ("gpt-oss-120b", 128, 4, 2880, "softmax"),
    ],
)
def test_moe_presets_match_the_published_routing(name, experts, top_k, width, scoring):
    """docs/facts.md#moe-routing's table, against what the config files read into: every one renormalises
    its top-k weights (gpt-oss by its softmax over the chosen logits); only DeepSeek-R1 routes by groups, with
    a score bias."""
    moe = MODEL_SPECS[name].moe
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate, moe.scoring) == (
        experts,
        top_k,
        width,
        scoring,
    )
    assert moe.softmax_after_topk == (name == "gpt-oss-120b")  # top-4 on logits, softmax over the 4 chosen
    assert moe.renormalize, name
    router = MOE_MODELS[name]
    grouped = name == "DeepSeek-R1"
    assert (router.num_groups is not None, router.bias, router.renormalize) == (grouped, grouped, True), name


def test_deepseek_r1_reads_into_its_published_shape():
    """docs/facts.md#model-shapes (DeepSeek-R1 in full): first 3 layers dense, 1 shared expert, 8 groups
    keeping 4, scores scaled by 2.5 with a correction bias; MLA q_lora 1536, kv_lora 512, qk 128 + 64 (a
    head's query and key 192 wide, its head_dim), v_head 128, YaRN factor 40; fp8 weights."""
    r1 = MODEL_SPECS["DeepSeek-R1"]
    moe, mla = r1.moe, r1.mla
    assert (moe.first_dense_layers, moe.shared_experts, moe.num_groups, moe.topk_groups) == (3, 1, 8, 4)
    assert (moe.routed_scale, moe.score_bias, moe.renormalize) == (2.5, True, True)
    assert (r1.q_lora_rank, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim) == (
        1536,
        512,
        128,
        64,
    )
    assert (r1.head_dim, r1.v_head_dim, mla.rope_factor, mla.mscale_all_dim) == (192, 128, 40.0, 1.0)
    assert (r1.weight_bytes, r1.intermediate, r1.vocab) == (1, 18432, 129280)
    with pytest.raises(ValueError, match="no MoE layers"):
        MODEL_SPECS["Llama-3.1-8B"].moe_model()


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
    assert read.kv_bytes_per_token(tp=8) == preset.kv_bytes_per_token(tp=8)
    with pytest.raises(ValueError, match="layer_types"):
        model_from_hf_config({**fields, "layer_types": ["full_attention"] * 35})


def test_natural_reasoning_matches_the_published_shape():
    prompts, outputs = NATURAL.draw(50_000, np.random.default_rng(1))
    assert np.mean((prompts >= 50) & (prompts <= 150)) == pytest.approx(0.77, abs=0.02)
    assert np.mean(outputs > 5000) == pytest.approx(0.45, abs=0.02)


@pytest.mark.parametrize(
    "quantization, weight_bytes, expert_bytes",
    [
        (None, 2, 2),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, 1, 1),
        # gpt-oss: MXFP4 experts (4.25 bits a parameter), attention, router, embedding and head bf16
        ({"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}, 2, 4.25 / 8),
        ({"quant_method": "modelopt", "quant_algo": "FP8"}, 1, 1),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "float-quantized",
                "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float"}}},
            },
            1,
            1,
        ),
    ],
)
def test_a_config_reads_its_weights_precision(quantization, weight_bytes, expert_bytes):
    fields = json.loads((CONFIGS / "Llama-3.1-8B.json").read_text())
    fields.pop("quantization_config", None)
    if quantization is not None:
        fields["quantization_config"] = quantization
    spec = model_from_hf_config(fields)
    assert spec.weight_bytes == weight_bytes and spec.routed_expert_bytes == expert_bytes


@pytest.mark.parametrize(
    "quantization",
    [
        {"quant_method": "gptq", "bits": 4},
        {"quant_method": "modelopt", "quant_algo": "NVFP4"},
        {
            "quant_method": "compressed-tensors",
            "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}},
        },
    ],
)
def test_a_config_with_an_unknown_quantization_is_refused(quantization):
    """Counting an unrecognised method's weights as bf16 would misstate every memory plan built on it."""
    fields = json.loads((CONFIGS / "Llama-3.1-8B.json").read_text())
    fields["quantization_config"] = quantization
    with pytest.raises(ValueError, match="quantization_config.quant_method"):
        model_from_hf_config(fields)


def test_gpt_oss_counts_its_experts_in_mxfp4():
    """gpt-oss-120b's MoE weights ship in MXFP4, 4.25 bits a parameter, and are over 90% of its 116.8B
    parameters (OpenAI's model card; docs/facts.md#model-shapes): about 65 GB in all, on one 80 GB GPU."""
    spec = MODEL_SPECS["gpt-oss-120b"]
    assert spec.params() / 1e9 == pytest.approx(116.8, rel=0.01)
    assert spec.routed_expert_params() > 0.9 * spec.params()
    assert 60e9 <= spec.shipped_weight_bytes() <= 70e9
    assert MODELS["gpt-oss-120b"].weight_bytes * spec.params() == pytest.approx(spec.shipped_weight_bytes())
    assert MODELS["gpt-oss-120b"].weight_bytes == pytest.approx(65 / 116.8, abs=0.02)  # the card's GB a param


def test_norm_topk_prob_reaches_the_router():
    """DeepSeek-V2's config.json sets norm_topk_prob false: its routed weights are the raw top-k scores (times
    routed_scaling_factor). The flag travels from the config to the route case's keywords, which step's GPU
    timing and the benchmarks route with."""
    import torch

    import reference.moe
    from bench.operators.moe import route_kwargs

    fields = json.loads((CONFIGS / "DeepSeek-R1.json").read_text())
    assert load_model_config(CONFIGS / "DeepSeek-R1.json").moe.renormalize  # true: renormalised
    spec = model_from_hf_config({**fields, "norm_topk_prob": False})
    assert spec.moe.renormalize is False and spec.moe_model().renormalize is False
    kwargs = route_kwargs(spec.moe_model())
    assert kwargs["renormalize"] is False
    logits = torch.randn(3, spec.moe.num_experts)
    weights, _ = reference.moe.route(logits, spec.moe.top_k, bias=torch.zeros(spec.moe.num_experts), **kwargs)
    assert not torch.allclose(weights.sum(-1), torch.full((3,), spec.moe.routed_scale))
    with pytest.raises(ValueError, match="norm_topk_prob"):
        model_from_hf_config({**fields, "norm_topk_prob": "no"})
