"""Gemma 2: RMSNorm scaled by (1 + w), norms before and after the attention and the MLP, token embeddings times
sqrt(hidden), softmax scale query_pre_attn_scalar ** -0.5, tanh soft-capping of the attention scores and the
logits, and sliding-window layers alternating with global ones."""

from __future__ import annotations

from typing import Any

from .base import Family


class Gemma2(Family):
    model_type = "gemma2"
    summary = "Gemma 2 (soft-capping, sliding-window layers, (1 + w) norms before and after attention and MLP)"
    transformers_module = "transformers.models.gemma2.modeling_gemma2"
    decoder_layer_class = "Gemma2DecoderLayer"
    rotary_class = "Gemma2RotaryEmbedding"
    norm_placement = "pre_and_post"
    norm_offset = 1.0

    def activation(self, config: Any) -> str:
        return config.hidden_activation

    def score_divisor(self, config: Any) -> float | None:
        return config.query_pre_attn_scalar

    def attention_softcap(self, config: Any) -> float | None:
        return getattr(config, "attn_logit_softcapping", None)

    def final_softcap(self, config: Any) -> float | None:
        return getattr(config, "final_logit_softcapping", None)

    def embedding_multiplier(self, config: Any) -> float:
        return config.hidden_size**0.5
