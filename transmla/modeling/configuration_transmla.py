"""Configuration of a Multi-head Latent Attention model converted by transmla (see docs/format.md)."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

NORM_PLACEMENTS = ("pre", "pre_and_post", "post")


class TransMLAConfig(PretrainedConfig):
    """Decoder whose attention caches a latent of `kv_lora_rank[l]` values plus a shared rotary key of
    `qk_rope_head_dim` values per token and layer. With `qk_norm`, q_proj and kv_a_proj read RMS-normalised query
    and key features (per head, or over all heads with `qk_norm_per_head` off) instead of the hidden state.

    Outside the attention the source's computation is described by fields: `norm_placement` ("pre": a norm before
    the attention and one before the MLP; "pre_and_post": norms before and after both; "post": after both only),
    `rms_norm_offset` (every RMSNorm multiplies by offset + w), `embedding_multiplier`, `attention_scale` (None:
    head_dim ** -0.5), `attn_logit_softcapping` / `final_logit_softcapping` (c * tanh(x / c) of the scaled scores /
    the logits), and `layer_types` with `sliding_window` (a "sliding_attention" layer lets query t see keys
    t - sliding_window < s <= t)."""

    model_type = "transmla"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        kv_lora_rank: int | list[int] = 512,
        qk_rope_head_dim: int = 64,
        rope_inv_freq: list[list[float]] | None = None,
        rope_attention_scaling: float = 1.0,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = False,
        attention_bias: bool = False,
        attention_out_bias: bool = False,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        pre_proj_bias: bool = False,
        attention_dropout: float = 0.0,
        qk_norm_per_head: bool = True,
        norm_placement: str = "pre",
        rms_norm_offset: float = 0.0,
        embedding_multiplier: float = 1.0,
        attention_scale: float | None = None,
        attn_logit_softcapping: float | None = None,
        final_logit_softcapping: float | None = None,
        layer_types: list[str] | None = None,
        sliding_window: int | None = None,
        rope_theta: float = 10000.0,
        source_model: str | None = None,
        source_architecture: str | None = None,
        conversion: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        if isinstance(kv_lora_rank, int):
            kv_lora_rank = [kv_lora_rank] * num_hidden_layers
        self.kv_lora_rank = list(kv_lora_rank)
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_nope_head_dim = self.head_dim
        self.v_head_dim = self.head_dim
        if rope_inv_freq is None:
            half = qk_rope_head_dim // 2
            base = [rope_theta ** (-2.0 * i / qk_rope_head_dim) for i in range(half)]
            rope_inv_freq = [base] * num_hidden_layers
        self.rope_inv_freq = [list(map(float, f)) for f in rope_inv_freq]
        self.rope_attention_scaling = rope_attention_scaling
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_out_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm  # per-head RMSNorm on q and k before the projections (see docs/format.md)
        self.pre_proj_bias = pre_proj_bias  # biases on pre_q_proj / pre_k_proj / pre_v_proj
        self.attention_dropout = attention_dropout
        self.qk_norm_per_head = qk_norm_per_head
        self.norm_placement = norm_placement
        self.rms_norm_offset = rms_norm_offset
        self.embedding_multiplier = embedding_multiplier
        self.attention_scale = attention_scale
        self.attn_logit_softcapping = attn_logit_softcapping
        self.final_logit_softcapping = final_logit_softcapping
        self.sliding_window = sliding_window
        self.layer_types = list(layer_types) if layer_types is not None else None
        self.rope_theta = rope_theta
        self.source_model = source_model
        self.source_architecture = source_architecture
        self.conversion = conversion or {}
        if len(self.kv_lora_rank) != num_hidden_layers or len(self.rope_inv_freq) != num_hidden_layers:
            raise ValueError("kv_lora_rank and rope_inv_freq need one entry per layer")
        if any(len(f) * 2 != qk_rope_head_dim for f in self.rope_inv_freq):
            raise ValueError("each rope_inv_freq entry needs qk_rope_head_dim / 2 frequencies")
        if norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"norm_placement must be one of {NORM_PLACEMENTS}, not {norm_placement!r}")
        if self.layer_types is not None and (len(self.layer_types) != num_hidden_layers or not sliding_window):
            raise ValueError("layer_types needs one entry per layer, and sliding_window the window of its sliding layers")
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None where it attends to the whole context."""
        if self.layer_types is None or self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def kv_values_per_token(self) -> list[int]:
        """Values cached per token in each layer: the latent plus the shared rotary key."""
        return [r + self.qk_rope_head_dim for r in self.kv_lora_rank]
