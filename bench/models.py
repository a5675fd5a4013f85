"""Model presets and shape sweeps, from the model table in shared/facts.md (the models' published configs).

One place for the numbers: benchmark cases build their shapes from here, so a head count or a sweep is
written once.
"""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionModel:
    """Attention geometry of one model. For MLA models the cache holds one latent of ``latent_dim`` per token
    (num_kv_heads is 1 and there is no separate V cache)."""

    name: str
    layers: int
    hidden: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    latent_dim: int | None = None  # MLA: cached width (512 + 64 rope for DeepSeek)
    params_b: float = 0.0  # parameters, billions (the model's name); weights counted at 2 bytes each

    @property
    def is_mla(self) -> bool:
        return self.latent_dim is not None

    def kv_heads_per_rank(self, tp: int = 1) -> int:
        """GQA KV heads split across ranks only up to their count; MLA's latent is on every rank."""
        if self.is_mla:
            return 1
        return max(1, self.num_kv_heads // tp)

    def q_heads_per_rank(self, tp: int = 1) -> int:
        return self.num_q_heads // tp

    def kv_bytes_per_token(self, bytes_per_element: int = 2, tp: int = 1) -> int:
        """KV-cache bytes one token holds across all layers on one rank."""
        if self.is_mla:
            return self.layers * self.latent_dim * bytes_per_element
        return 2 * self.layers * self.kv_heads_per_rank(tp) * self.head_dim * bytes_per_element


MODELS: dict[str, AttentionModel] = {
    m.name: m
    for m in (
        AttentionModel("Llama-3.1-8B", 32, 4096, 32, 8, 128, params_b=8.0),
        AttentionModel("Llama-3.1-70B", 80, 8192, 64, 8, 128, params_b=70.6),
        AttentionModel("Llama-3.1-405B", 126, 16384, 128, 8, 128, params_b=405.0),
        AttentionModel("Qwen3-32B", 64, 5120, 64, 8, 128, params_b=32.8),
        AttentionModel("Qwen3-30B-A3B", 48, 2048, 32, 4, 128, params_b=30.5),
        AttentionModel("Qwen3-235B-A22B", 94, 4096, 64, 4, 128, params_b=235.0),
        AttentionModel("Mixtral-8x7B", 32, 4096, 32, 8, 128, params_b=46.7),
        AttentionModel("gpt-oss-120b", 36, 2880, 64, 8, 64, params_b=117.0),
        AttentionModel("DeepSeek-R1", 61, 7168, 128, 1, 576, latent_dim=576, params_b=671.0),
    )
}


@dataclass(frozen=True)
class MLAGeometry:
    """Multi-head latent attention as decode runs it, absorbed (shared/facts.md): q_nope is multiplied by
    W_UK first, so every head's query is kv_lora_rank + qk_rope_head_dim wide, attends over the cached
    latent rows, and its kv_lora_rank-wide output goes through W_UV afterwards. Fields are the model's
    config.json names."""

    kv_lora_rank: int  # the compressed KV: the cached latent, and the value width of absorbed decode
    qk_rope_head_dim: int  # the decoupled rope key, cached after the latent
    qk_nope_head_dim: int
    rope_factor: float = 1.0  # rope_scaling.factor (YaRN)
    mscale_all_dim: float = 0.0  # rope_scaling.mscale_all_dim

    @property
    def cached_width(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_nope + qk_rope) times YaRN's attention factor squared, as DeepSeek's modelling code
        computes it (0.1 x mscale_all_dim x ln(factor) + 1, when the factor is above 1)."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if self.rope_factor > 1 and self.mscale_all_dim:
            mscale = 0.1 * self.mscale_all_dim * math.log(self.rope_factor) + 1.0
            scale *= mscale * mscale
        return scale


#: DeepSeek-R1 (= V3's attention): kv_lora_rank 512, rope 64, nope 128, YaRN factor 40, mscale_all_dim 1.
MLA_MODELS: dict[str, MLAGeometry] = {"DeepSeek-R1": MLAGeometry(512, 64, 128, 40.0, 1.0)}

#: Decode: one new token per sequence, batch 1 to 256.
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: Prefill: chunks of new tokens, up to 8192.
PREFILL_CHUNKS = (512, 1024, 2048, 4096, 8192)
#: KV-cache page sizes; 16 is the default.
BLOCK_SIZES = (1, 8, 16, 32, 64, 128)
DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class ReasoningWorkload:
    """Prompt and output lengths of a reasoning evaluation (shared/facts.md), drawn log-normally around the
    medians and clipped to the evaluation's generation cap; each question is answered by ``samples``
    parallel samples that share its prompt."""

    name: str
    prompt_median: int
    output_median: int
    output_sigma: float  # log-normal spread of the output length
    max_output: int  # the evaluation's generation cap: what a contiguous reservation must hold
    samples: int

    def draw(self, questions: int, rng) -> tuple:
        """(prompt lengths [questions], output lengths [questions, samples]) as numpy int arrays."""
        prompts = rng.lognormal(math.log(self.prompt_median), 0.4, questions).clip(32, 2048).astype(int)
        outputs = rng.lognormal(math.log(self.output_median), self.output_sigma, (questions, self.samples))
        return prompts, outputs.clip(64, self.max_output).astype(int)


#: MATH-500 / GSM8K-like: outputs of 1K to 3K tokens; AIME / GPQA-like: 10K to 12K with a tail to the 32K cap.
WORKLOADS: dict[str, ReasoningWorkload] = {
    w.name: w
    for w in (
        ReasoningWorkload("MATH-500-like", 200, 2000, 0.6, 32768, samples=4),
        ReasoningWorkload("AIME-like", 250, 10500, 0.55, 32768, samples=16),
    )
}


@dataclass(frozen=True)
class MoEModel:
    """An MoE layer's routing (shared/facts.md): experts, top-k, the expert MLP's width, and its rule."""

    name: str
    hidden: int
    num_experts: int
    top_k: int
    intermediate: int
    scoring: str = "softmax"
    num_groups: int | None = None
    topk_groups: int | None = None
    scale: float = 1.0
    softmax_after_topk: bool = False
    bias: bool = False  # DeepSeek's e_score_correction_bias


MOE_MODELS: dict[str, MoEModel] = {
    m.name: m
    for m in (
        MoEModel("DeepSeek-R1", 7168, 256, 8, 2048, "sigmoid", 8, 4, 2.5, bias=True),
        MoEModel("Qwen3-30B-A3B", 2048, 128, 8, 768),
        MoEModel("Qwen3-235B-A22B", 4096, 128, 8, 1536),
        MoEModel("Mixtral-8x7B", 4096, 8, 2, 14336),
        MoEModel("gpt-oss-120b", 2880, 128, 4, 2880, softmax_after_topk=True),
    )
}

#: Tokens through one MoE layer: decode batches and prefill chunks.
MOE_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 8192, 16384)
