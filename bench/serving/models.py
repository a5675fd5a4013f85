"""Model presets and shape sweeps, from the models' published configs (docs/facts.md#model-shapes).

One place for the numbers: benchmark cases, the decode-step model, the capacity study and the advisor build
their shapes from here, so a head count or a sweep is written once. The presets are the models' own
config.json files (data/configs/), read by the same reader as a user's config.json; a user's file is read by
the caller (bench/commands) and passed in as its fields.
"""

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path, PurePath


@dataclass(frozen=True)
class Decoder:
    """What every model description here starts with: a decoder's name, depth, width and attention heads
    (config.json's num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads, head_dim)."""

    name: str
    layers: int
    hidden: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class AttentionModel(Decoder):
    """Attention geometry of one model. For MLA models the cache holds one latent of ``latent_dim`` per token
    (num_kv_heads is 1 and there is no separate V cache)."""

    latent_dim: int | None = None  # MLA: cached width (512 + 64 rope for DeepSeek)
    params_b: float = 0.0  # parameters, billions (ModelSpec.params())
    # bytes a parameter, on average, as the model ships (ModelSpec.shipped_weight_bytes): 2 (bf16), about 1
    # (fp8, DeepSeek-R1 as released), about 0.56 (gpt-oss-120b's MXFP4 experts beside bf16 attention)
    weight_bytes: float = 2
    windowed_layers: int = 0  # of ``layers``, those attending to a sliding window (ModelSpec.windowed)
    sliding_window: int | None = None

    @property
    def is_mla(self) -> bool:
        return self.latent_dim is not None

    @property
    def full_layers(self) -> int:
        """Layers whose cache holds the whole context (every layer but the sliding-window ones)."""
        return full_context_layers(self.layers, self.windowed_layers)

    def kv_heads_per_rank(self, tp: int = 1) -> int:
        """GQA KV heads split across ranks only up to their count; MLA's latent is on every rank."""
        if self.is_mla:
            return 1
        return max(1, self.num_kv_heads // tp)

    def q_heads_per_rank(self, tp: int = 1) -> int:
        return self.num_q_heads // tp

    def kv_bytes_per_token(self, *, bytes_per_element: int = 2, tp: int = 1) -> int:
        """KV-cache bytes one token holds on one rank across the layers that keep the whole context; the
        sliding-window layers' cache is a fixed window a sequence (window_slots)."""
        if self.is_mla:
            return self.full_layers * self.latent_dim * bytes_per_element
        return 2 * self.full_layers * self.kv_heads_per_rank(tp) * self.head_dim * bytes_per_element

    def window_slots(self, block: int) -> int:
        """Token slots of the pool one running sequence's sliding-window layers hold (window_slots)."""
        return window_slots(self.layers, self.windowed_layers, self.sliding_window, block)


def full_context_layers(layers: int, windowed: int) -> int:
    """The layers a KV pool's token slot covers: those keeping the whole context, or, where every layer
    attends to a window (no preset), all of them (the pool's unit is then over-counted, not undefined)."""
    return layers - windowed if windowed < layers else layers


def window_slots(layers: int, windowed: int, window: int | None, block: int) -> int:
    """Token slots (each the KV of one token in the full_context_layers) that one running sequence's
    ``windowed`` sliding-window layers of ``layers`` hold, as vLLM's hybrid KV cache manager keeps them
    (docs/facts.md#model-shapes): sliding-window and full-attention layers in groups of equal size sharing
    one block pool, a windowed group keeping a sequence's last window - 1 tokens, cdiv(window, block) + 1
    blocks at most (the window need not start on a block)."""
    if not windowed or window is None or windowed >= layers:
        return 0
    held = (-(-window // block) + 1) * block
    return -(-windowed * held // (layers - windowed))


@dataclass(frozen=True)
class MLAGeometry:
    """Multi-head latent attention as decode runs it, absorbed (docs/facts.md#mla-decode-absorbed-form):
    q_nope is multiplied by W_UK first, so every head's query is kv_lora_rank + qk_rope_head_dim wide,
    attends over the cached latent rows, and its kv_lora_rank-wide output goes through W_UV afterwards.
    Fields are the model's config.json names."""

    kv_lora_rank: int  # the compressed KV: the cached latent, and the value width of absorbed decode
    qk_rope_head_dim: int  # the decoupled rope key, cached after the latent
    qk_nope_head_dim: int
    rope_factor: float = 1.0  # rope_scaling.factor (YaRN)
    mscale_all_dim: float = 0.0  # rope_scaling.mscale_all_dim

    @property
    def cached_width(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def qk_width(self) -> int:
        """Each head's query and key width before absorption, qk_nope + qk_rope: an MLA model's head_dim."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_nope + qk_rope) times YaRN's attention factor squared, as DeepSeek's modelling code
        computes it (0.1 x mscale_all_dim x ln(factor) + 1, when the factor is above 1)."""
        scale = self.qk_width**-0.5
        if self.rope_factor > 1 and self.mscale_all_dim:
            mscale = 0.1 * self.mscale_all_dim * math.log(self.rope_factor) + 1.0
            scale *= mscale * mscale
        return scale


#: Decode: one new token per sequence, batch 1 to 256.
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: Prefill: chunks of new tokens, up to 8192.
PREFILL_CHUNKS = (512, 1024, 2048, 4096, 8192)
#: KV-cache page sizes; 16 is the default.
BLOCK_SIZES = (1, 8, 16, 32, 64, 128)
DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class MoEModel:
    """An MoE layer's routing (docs/facts.md#moe-routing): experts, top-k, the expert MLP's width, and its
    rule. With groups, ``bias`` also picks how groups rank (kernels/moe.py): the sum of their top-2 biased
    scores with it (DeepSeek-V3/R1), their best score without (DeepSeek-V2)."""

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
    renormalize: bool = True  # the chosen weights rescaled to sum to 1 (config.json's norm_topk_prob)


#: Tokens through one MoE layer: decode batches and prefill chunks.
MOE_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 8192, 16384)


# --- whole models: what the decode-step model and the advisor need -----------------------------------------


@dataclass(frozen=True)
class MoESpec:
    """A model's MoE layers: routed experts, top-k, each expert's MLP width, shared experts (always run),
    and the dense layers before the first MoE one (DeepSeek's first_k_dense_replace)."""

    num_experts: int
    top_k: int
    expert_intermediate: int
    shared_experts: int = 0
    first_dense_layers: int = 0
    # Group-limited routing (DeepSeek's n_group / topk_group): a token's experts lie in topk_groups of
    # num_groups groups, so an expert-parallel dispatch that sends a row once per rank reaches fewer ranks.
    num_groups: int = 1
    topk_groups: int = 1
    # The router's rule, as kernels/moe.py's route takes it (config.json's scoring_func,
    # routed_scaling_factor, topk_method "noaux_tc" for the score bias); docs/facts.md#moe-routing.
    scoring: str = "softmax"
    routed_scale: float = 1.0
    softmax_after_topk: bool = False  # gpt-oss: top-k on the logits, softmax over the chosen
    score_bias: bool = False
    renormalize: bool = True  # norm_topk_prob: false in DeepSeek-V2, whose weights are the raw scores

    def ranks_reached(self, ranks: int) -> float:
        """The ranks one token's top_k choices reach, on average, with the experts spread over ``ranks`` in
        contiguous blocks (vLLM's placement): with groups aligned to ranks (ranks dividing num_groups), the
        ranks the token's topk_groups kept groups cover, drawn as if uniform; otherwise top_k choices
        uniform over the ranks. docs/facts.md#moe-routing."""
        if ranks <= 1:
            return 1.0
        if self.num_groups > 1 and self.num_groups % ranks == 0:
            per_rank, kept = self.num_groups // ranks, min(self.topk_groups, self.num_groups)
            missed = math.comb(self.num_groups - per_rank, kept) / math.comb(self.num_groups, kept)
            return ranks * (1.0 - missed)
        return ranks * (1.0 - (1.0 - 1.0 / ranks) ** self.top_k)


@dataclass(frozen=True)
class ModelSpec(Decoder):
    """A decoder-only model as its config.json describes it: enough for weight bytes, KV bytes per token per
    rank, and each decode stage's bytes and FLOPs. Attention is GQA (num_kv_heads x head_dim cached twice)
    or, with ``mla``, DeepSeek's latent attention (one kv_lora_rank + rope latent per token, all heads)."""

    intermediate: int  # the dense MLP's width (gate, up, down)
    vocab: int
    tied_embeddings: bool = False
    weight_bytes: int = 2  # 1: fp8 weights (DeepSeek-R1 as released)
    # The routed experts' bytes a parameter where they ship narrower than the rest (None: weight_bytes):
    # MXFP4_BYTES for gpt-oss, whose attention, router, embedding and head stay bf16.
    expert_weight_bytes: float | None = None
    mla: MLAGeometry | None = None
    q_lora_rank: int | None = None  # MLA: the query's low-rank width (None: a full projection)
    v_head_dim: int | None = None  # MLA: each head's value width after W_UV
    moe: MoESpec | None = None
    # Sliding-window attention (config.json's sliding_window, and layer_types' "sliding_attention" layers,
    # by index: gpt-oss alternates them with full attention): these layers attend to, and cache, only the
    # last ``sliding_window`` tokens.
    sliding_window: int | None = None
    windowed: tuple[int, ...] = ()

    # -- shapes per layer ------------------------------------------------------------------------------------

    @property
    def moe_layers(self) -> int:
        return 0 if self.moe is None else self.layers - self.moe.first_dense_layers

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    def attention_params(self) -> int:
        """Projection parameters of one attention layer (q, k, v, o; MLA's down and up projections)."""
        h = self.hidden
        if self.mla is None:
            q = self.num_q_heads * self.head_dim
            kv = self.num_kv_heads * self.head_dim
            return h * q + 2 * h * kv + q * h
        g, heads = self.mla, self.num_q_heads
        qk = g.qk_width
        q = (h * self.q_lora_rank + self.q_lora_rank * heads * qk) if self.q_lora_rank else h * heads * qk
        kv = h * g.cached_width + g.kv_lora_rank * heads * (g.qk_nope_head_dim + self.v_head_dim)
        return q + kv + heads * self.v_head_dim * h

    def mlp_params(self, width: int) -> int:
        return 3 * self.hidden * width  # gate, up, down

    def expert_params(self) -> int:
        return self.mlp_params(self.moe.expert_intermediate)

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def routed_expert_params(self) -> int:
        return sum(self.layer_params(i)[1] for i in range(self.layers))

    @property
    def routed_expert_bytes(self) -> float:
        """Bytes a routed expert's parameter takes: expert_weight_bytes where given, else weight_bytes."""
        return self.weight_bytes if self.expert_weight_bytes is None else self.expert_weight_bytes

    @property
    def precision(self) -> str:
        """The weights' precision as step and advise report it: "bf16" or "fp8", and the routed experts'
        where they ship apart ("bf16, experts mxfp4" for gpt-oss)."""
        label = "fp8" if self.weight_bytes == 1 else "bf16"
        if self.routed_expert_bytes == self.weight_bytes:
            return label
        experts = (
            "mxfp4" if self.routed_expert_bytes == MXFP4_BYTES else f"{8 * self.routed_expert_bytes:g}-bit"
        )
        return f"{label}, experts {experts}"

    def shipped_weight_bytes(self) -> float:
        """Every weight's bytes as the checkpoint ships: routed experts at routed_expert_bytes, the embedding
        and LM head in bf16 (fp8 and MXFP4 checkpoints keep them so), the rest at weight_bytes."""
        experts = self.routed_expert_params()
        rest = self.params() - experts - self.embedding_params()
        return experts * self.routed_expert_bytes + rest * self.weight_bytes + self.embedding_params() * 2

    def with_weights(self, precision: str) -> "ModelSpec":
        """This model with every weight, its routed experts' too, at ``precision`` ("fp8": 1 byte a
        parameter, "bf16": 2), as `--weights` and a published run's weights column give it."""
        return replace(self, weight_bytes=1 if precision == "fp8" else 2, expert_weight_bytes=None)

    def layer_params(self, layer: int) -> tuple[int, int]:
        """(parameters split TP ways, routed experts' parameters) of decoder layer ``layer``: attention and
        the dense MLP, or in an MoE layer (from first_dense_layers on) the shared experts and the router
        beside the routed experts."""
        m, split = self.moe, self.attention_params()
        if m is None or layer < m.first_dense_layers:
            return split + self.mlp_params(self.intermediate), 0
        split += m.shared_experts * self.expert_params() + self.hidden * m.num_experts
        return split, m.num_experts * self.expert_params()

    def params(self) -> int:
        """Every parameter: each layer's (layer_params), embeddings."""
        return sum(sum(self.layer_params(i)) for i in range(self.layers)) + self.embedding_params()

    # -- the KV cache ----------------------------------------------------------------------------------------

    def tensor_parallel_problem(self, tp: int) -> str | None:
        """Why ``tp`` ranks cannot split this model's attention (None when they can): tp must divide the
        query heads, and GQA's KV heads must either split evenly or be whole on each rank (tp a multiple of
        them), as serving engines require."""
        if tp < 1 or self.num_q_heads % tp:
            return f"tp: expected a divisor of {self.name}'s {self.num_q_heads} query heads, got {tp}"
        kv = self.num_kv_heads
        if self.mla is None and kv % tp and tp % kv:
            return f"tp: {tp} neither divides {self.name}'s {kv} KV heads nor is a multiple of them"
        return None

    def kv_heads_per_rank(self, tp: int) -> int:
        """GQA KV heads split across ranks only up to their count; MLA's latent is on every rank."""
        return 1 if self.mla is not None else max(1, self.num_kv_heads // tp)

    def kv_bytes_per_token_layer(self, tp: int = 1, kv_bytes: int = 2) -> int:
        """Cache bytes one token holds in one layer on one tensor-parallel rank."""
        if self.mla is not None:
            return self.mla.cached_width * kv_bytes
        return 2 * self.kv_heads_per_rank(tp) * self.head_dim * kv_bytes

    def windowed_layers(self, start: int = 0, stop: int | None = None) -> int:
        """Sliding-window layers among layers start to stop - 1 (all of them by default)."""
        stop = self.layers if stop is None else stop
        return sum(start <= i < stop for i in self.windowed)

    def kv_bytes_per_token(self, *, tp: int = 1, kv_bytes: int = 2, start: int = 0, stop: int | None = None):
        """Cache bytes one token of context holds on one rank over layers start to stop - 1: those keeping
        the whole context (full_context_layers); the sliding-window ones hold window_slots a sequence."""
        stop = self.layers if stop is None else stop
        full = full_context_layers(stop - start, self.windowed_layers(start, stop))
        return full * self.kv_bytes_per_token_layer(tp, kv_bytes)

    def window_slots(self, block: int, start: int = 0, stop: int | None = None) -> int:
        """Token slots (kv_bytes_per_token's) one running sequence's sliding-window layers among start to
        stop - 1 hold in a pool of ``block``-token pages."""
        stop = self.layers if stop is None else stop
        return window_slots(stop - start, self.windowed_layers(start, stop), self.sliding_window, block)

    def attended_context(self, context: float) -> float:
        """The context a layer attends to (and reads from its cache), on average over the layers, when
        sequences have ``context`` tokens: the sliding-window layers see at most their window."""
        if not self.windowed or self.sliding_window is None:
            return context
        windowed = len(self.windowed)
        seen = (self.layers - windowed) * context + windowed * min(context, self.sliding_window)
        return seen / self.layers

    def moe_model(self, name: str | None = None) -> MoEModel:
        """The MoE layer's routing view (MoEModel) the routing, dispatch and expert-GEMM cases and the step
        timing use; ``name`` defaults to the model's."""
        m = self.moe
        if m is None:
            raise ValueError(f"{self.name} has no MoE layers")
        grouped = m.num_groups > 1
        return MoEModel(
            name=name or self.name,
            hidden=self.hidden,
            num_experts=m.num_experts,
            top_k=m.top_k,
            intermediate=m.expert_intermediate,
            scoring=m.scoring,
            num_groups=m.num_groups if grouped else None,
            topk_groups=m.topk_groups if grouped else None,
            scale=m.routed_scale,
            softmax_after_topk=m.softmax_after_topk,
            bias=m.score_bias,
            renormalize=m.renormalize,
        )

    def attention_model(self) -> AttentionModel:
        """The attention geometry the capacity study and the decode cases use."""
        latent = self.mla.cached_width if self.mla is not None else None
        return AttentionModel(
            name=self.name,
            layers=self.layers,
            hidden=self.hidden,
            num_q_heads=self.num_q_heads,
            num_kv_heads=1 if latent else self.num_kv_heads,
            head_dim=latent or self.head_dim,
            latent_dim=latent,
            params_b=self.params() / 1e9,
            weight_bytes=self.shipped_weight_bytes() / self.params(),
            windowed_layers=self.windowed_layers(),
            sliding_window=self.sliding_window,
        )


def pipeline_stages(layers: int, pp: int) -> list[range]:
    """Each pipeline stage's layers as vLLM's get_pp_indices splits them (vllm/distributed/utils.py; no
    VLLM_PP_LAYER_PARTITION): layers // pp a stage, the remainder one more each on the stages just before
    the last (which holds the final norm and the LM head)."""
    sizes = [layers // pp] * pp
    for i in range(2, layers % pp + 2):
        sizes[-i] += 1
    starts = [sum(sizes[:i]) for i in range(pp)]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


#: MXFP4 (OCP Microscaling, FP4 E2M1): a 4-bit value a parameter and one 8-bit scale per 32, 4.25 bits.
MXFP4_BYTES = (4 + 8 / 32) / 8

_REQUIRED = object()


class _ConfigFields:
    """A config.json's fields (or one of its objects), each checked as it is read: a ValueError names the
    file and the field, and says what was expected."""

    def __init__(self, path: str, fields: dict, prefix: str = ""):
        self.path, self.fields, self.prefix = path, fields, prefix

    def problem(self, name: str, expected: str, value) -> ValueError:
        return ValueError(f"config: {self.path}: {self.prefix}{name}: expected {expected}, got {value!r:.60}")

    def integer(self, *names: str, default=_REQUIRED, minimum: int = 1, maximum: int | None = None, of=""):
        """The first of ``names`` set (null counts as unset): an int from ``minimum`` to ``maximum`` (``of``
        says what the maximum is); ``default`` where none is set."""
        for name in names:
            value = self.fields.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise self.problem(name, "a positive integer" if minimum else "a non-negative integer", value)
            if maximum is not None and value > maximum:
                raise self.problem(name, f"at most {maximum} ({of})", value)
            return value
        if default is _REQUIRED:
            raise ValueError(f"config: {self.path} names none of {', '.join(self.prefix + n for n in names)}")
        return default

    def number(self, name: str, default: float, positive: bool) -> float:
        value = self.fields.get(name)
        if value is None:
            return default
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not numeric or value < 0 or (positive and value == 0):
            raise self.problem(name, "a positive number" if positive else "a non-negative number", value)
        return float(value)

    def object(self, name: str) -> "_ConfigFields":
        value = self.fields.get(name)
        if value is not None and not isinstance(value, dict):
            raise self.problem(name, "an object or null", value)
        return _ConfigFields(self.path, value or {}, f"{self.prefix}{name}.")

    def choice(self, name: str, types: tuple, default):
        value = self.fields.get(name)
        if value is None:
            return default
        if not isinstance(value, types):
            raise self.problem(name, " or ".join(t.__name__ for t in types), value)
        return value


def _moe_of(config: _ConfigFields, layers: int) -> MoESpec | None:
    experts = config.integer("n_routed_experts", "num_experts", "num_local_experts", default=0, minimum=0)
    if not experts:
        return None
    groups = config.integer("n_group", default=1, maximum=experts, of="the experts")
    return MoESpec(
        num_experts=experts,
        top_k=config.integer(
            "num_experts_per_tok",
            "num_experts_per_token",
            "experts_per_token",
            maximum=experts,
            of="the experts",
        ),
        expert_intermediate=config.integer("moe_intermediate_size", "intermediate_size"),
        shared_experts=config.integer("n_shared_experts", default=0, minimum=0),
        first_dense_layers=config.integer(
            "first_k_dense_replace", default=0, minimum=0, maximum=layers - 1, of="the layers but one"
        ),
        num_groups=groups,
        topk_groups=config.integer("topk_group", default=1, maximum=groups, of="n_group"),
        scoring=_scoring_of(config),
        routed_scale=config.number("routed_scaling_factor", 1.0, positive=True),
        softmax_after_topk=config.choice("model_type", (str,), "") == "gpt_oss",  # its router: top-k, softmax
        score_bias=config.choice("topk_method", (str,), "") == "noaux_tc",  # e_score_correction_bias
        renormalize=config.choice("norm_topk_prob", (bool,), True),  # unset: Mixtral's, renormalised
    )


def _scoring_of(config: _ConfigFields) -> str:
    scoring = config.choice("scoring_func", (str,), "softmax")
    if scoring not in ("softmax", "sigmoid"):
        raise config.problem("scoring_func", '"softmax" or "sigmoid"', scoring)
    return scoring


def _windowed_of(config: _ConfigFields, layers: int) -> tuple[int, ...]:
    """The layers layer_types names "sliding_attention" (none without layer_types)."""
    types = config.choice("layer_types", (list,), [])
    if types and (len(types) != layers or not all(isinstance(t, str) for t in types)):
        raise config.problem("layer_types", f"a list of {layers} strings (num_hidden_layers)", types)
    return tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")


def _precision_of(quantization: _ConfigFields) -> tuple[int, float | None]:
    """(weight_bytes, expert_weight_bytes) from a config.json's quantization_config: none is bf16; fp8
    (DeepSeek's "fp8", "fbgemm_fp8", compressed-tensors with 8-bit float weights, modelopt's quant_algo
    "FP8") is 1 byte a parameter; "mxfp4" (gpt-oss) is MXFP4 routed experts beside bf16 weights. Any other
    method is refused rather than counted as bf16."""
    method = quantization.choice("quant_method", (str,), "").lower()
    if not method:
        return 2, None
    if "fp8" in method:
        return 1, None
    if method == "mxfp4":
        return 2, MXFP4_BYTES
    if method == "modelopt" and str(quantization.choice("quant_algo", (str,), "")).upper() == "FP8":
        return 1, None
    if method == "compressed-tensors" and _fp8_groups(quantization):
        return 1, None
    expected = (
        'none, an fp8 method, "mxfp4", "modelopt" with quant_algo "FP8" or "compressed-tensors" with 8-bit '
        "float weights"
    )
    raise quantization.problem("quant_method", expected, method)


def _fp8_groups(quantization: _ConfigFields) -> bool:
    """Whether every compressed-tensors config group quantises its weights to 8-bit floats."""
    groups = quantization.object("config_groups").fields
    weights = [g.get("weights") if isinstance(g, dict) else None for g in groups.values()]
    return bool(weights) and all(
        isinstance(w, dict) and w.get("num_bits") == 8 and w.get("type") == "float" for w in weights
    )


def _mla_of(config: _ConfigFields) -> MLAGeometry | None:
    kv_lora_rank = config.integer("kv_lora_rank", default=None)
    if kv_lora_rank is None:
        return None
    rope = config.object("rope_scaling")
    return MLAGeometry(
        kv_lora_rank=kv_lora_rank,
        qk_rope_head_dim=config.integer("qk_rope_head_dim"),
        qk_nope_head_dim=config.integer("qk_nope_head_dim"),
        rope_factor=rope.number("factor", 1.0, positive=True),
        mscale_all_dim=rope.number("mscale_all_dim", 0.0, positive=False),
    )


def model_from_hf_config(fields: dict, source: str = "config.json", name: str | None = None) -> ModelSpec:
    """A ModelSpec from the fields of a Hugging Face config.json (what a model already ships with; the caller
    reads the file): Llama, Qwen, Mixtral, gpt-oss and DeepSeek-V3/R1 naming. The weights' precision from
    its quantization_config (_precision_of: bf16, fp8, MXFP4 experts; any other method refused);
    sliding-window layers from layer_types and sliding_window. A config no model could have (a field of the
    wrong type, zero heads, KV heads that do not divide the query heads,
    top-k above the experts, ...) is a ValueError naming ``source`` (the file) and the field. The name:
    ``name``, else _name_or_path, else the file's folder."""
    config = _ConfigFields(source, fields)
    layers = config.integer("num_hidden_layers")
    hidden = config.integer("hidden_size")
    heads = config.integer("num_attention_heads")
    kv_heads = config.integer("num_key_value_heads", default=heads, maximum=heads, of="num_attention_heads")
    if heads % kv_heads:
        raise config.problem("num_key_value_heads", f"a divisor of num_attention_heads ({heads})", kv_heads)
    mla = _mla_of(config)
    if mla is None and config.fields.get("head_dim") is None and hidden < heads:
        raise config.problem(
            "hidden_size", f"at least num_attention_heads ({heads}) without head_dim", hidden
        )
    config.object("rope_scaling").number("factor", 1.0, positive=True)  # checked for every model
    weight_bytes, expert_weight_bytes = _precision_of(config.object("quantization_config"))
    windowed = _windowed_of(config, layers)
    return ModelSpec(
        name=name or str(fields.get("_name_or_path") or PurePath(source).parent.name),
        layers=layers,
        hidden=hidden,
        num_q_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=mla.qk_width if mla else config.integer("head_dim", default=hidden // heads),
        intermediate=config.integer("intermediate_size"),
        vocab=config.integer("vocab_size"),
        tied_embeddings=config.choice("tie_word_embeddings", (bool,), False),
        weight_bytes=weight_bytes,
        expert_weight_bytes=expert_weight_bytes,
        mla=mla,
        q_lora_rank=config.integer("q_lora_rank", default=None) if mla else None,
        v_head_dim=config.integer("v_head_dim") if mla else None,
        moe=_moe_of(config, layers),
        sliding_window=config.integer("sliding_window") if windowed else None,
        windowed=windowed,
    )


#: The presets' config.json files (data/configs/SOURCES.md: where each came from).
CONFIGS = Path(__file__).parent / "data" / "configs"

#: The distills the scaling study (arXiv 2605.19775) ran, under their published names: presets for step and
#: the advisor; neither the kernel cases nor the capacity study (MODELS) sweep them.
DISTILLS = (
    "DeepSeek-R1-Distill-Llama-8B",
    "DeepSeek-R1-Distill-Llama-70B",
    "DeepSeek-R1-Distill-Qwen-14B",
    "DeepSeek-R1-Distill-Qwen-32B",
)

#: Every model of docs/facts.md#model-shapes, each read from its own config.json by the reader a user's
#: --config goes through, so a preset and the checkpoint it names cannot drift apart.
MODEL_SPECS: dict[str, ModelSpec] = {
    name: model_from_hf_config(json.loads((CONFIGS / f"{name}.json").read_text()), f"{name}.json", name)
    for name in (
        "Llama-3.1-8B",
        "Llama-3.1-70B",
        "Llama-3.1-405B",
        *DISTILLS,
        "Qwen3-32B",
        "Qwen3-30B-A3B",
        "Qwen3-235B-A22B",
        "Mixtral-8x7B",
        "gpt-oss-120b",
        "DeepSeek-R1",
    )
}

#: The MLA geometry the attention cases sweep: DeepSeek-R1's (= V3's attention: kv_lora_rank 512, rope 64,
#: nope 128, YaRN factor 40, mscale_all_dim 1).
MLA_MODELS: dict[str, MLAGeometry] = {"DeepSeek-R1": MODEL_SPECS["DeepSeek-R1"].mla}

#: The MoE layers the routing, dispatch and expert-GEMM cases sweep, derived from MODEL_SPECS like MODELS.
MOE_MODELS: dict[str, MoEModel] = {
    name: MODEL_SPECS[name].moe_model()
    for name in ("DeepSeek-R1", "Qwen3-30B-A3B", "Qwen3-235B-A22B", "Mixtral-8x7B", "gpt-oss-120b")
}

#: The attention view of the models the cases and the capacity study sweep (every preset but the distills),
#: derived from MODEL_SPECS so each number is written once.
MODELS: dict[str, AttentionModel] = {
    name: spec.attention_model() for name, spec in MODEL_SPECS.items() if name not in DISTILLS
}
