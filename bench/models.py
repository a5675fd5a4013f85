"""Model presets and shape sweeps, from the model table in shared/facts.md (the models' published configs).

One place for the numbers: benchmark cases build their shapes from here, so a head count or a sweep is
written once.
"""

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
        AttentionModel("Llama-3.1-8B", 32, 4096, 32, 8, 128),
        AttentionModel("Llama-3.1-70B", 80, 8192, 64, 8, 128),
        AttentionModel("Llama-3.1-405B", 126, 16384, 128, 8, 128),
        AttentionModel("Qwen3-32B", 64, 5120, 64, 8, 128),
        AttentionModel("Qwen3-30B-A3B", 48, 2048, 32, 4, 128),
        AttentionModel("Qwen3-235B-A22B", 94, 4096, 64, 4, 128),
        AttentionModel("Mixtral-8x7B", 32, 4096, 32, 8, 128),
        AttentionModel("gpt-oss-120b", 36, 2880, 64, 8, 64),
        AttentionModel("DeepSeek-R1", 61, 7168, 128, 1, 576, latent_dim=576),
    )
}

#: Decode: one new token per sequence, batch 1 to 256.
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: Prefill: chunks of new tokens, up to 8192.
PREFILL_CHUNKS = (512, 1024, 2048, 4096, 8192)
#: Context lengths for decode attention, 1K to 128K.
CONTEXT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
#: KV-cache page sizes; 16 is the default.
BLOCK_SIZES = (1, 8, 16, 32, 64, 128)
DEFAULT_BLOCK_SIZE = 16
