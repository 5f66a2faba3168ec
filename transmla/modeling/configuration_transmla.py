"""Configuration of a Multi-head Latent Attention model converted by transmla (see docs/format.md)."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class TransMLAConfig(PretrainedConfig):
    """Llama-style decoder whose attention caches a latent of `kv_lora_rank[l]` values plus a shared
    rotary key of `qk_rope_head_dim` values per token and layer. With `qk_norm`, q_proj and kv_a_proj read
    per-head RMS-normalised query and key features (Qwen3) instead of the hidden state."""

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
        self.rope_theta = rope_theta
        self.source_model = source_model
        self.source_architecture = source_architecture
        self.conversion = conversion or {}
        if len(self.kv_lora_rank) != num_hidden_layers or len(self.rope_inv_freq) != num_hidden_layers:
            raise ValueError("kv_lora_rank and rope_inv_freq need one entry per layer")
        if any(len(f) * 2 != qk_rope_head_dim for f in self.rope_inv_freq):
            raise ValueError("each rope_inv_freq entry needs qk_rope_head_dim / 2 frequencies")
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def kv_values_per_token(self) -> list[int]:
        """Values cached per token in each layer: the latent plus the shared rotary key."""
        return [r + self.qk_rope_head_dim for r in self.kv_lora_rank]
