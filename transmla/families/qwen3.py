"""Qwen3: the Llama layout with an RMSNorm over each query and key head before RoPE, so that its layers convert on
their pre-features (docs/format.md)."""

from __future__ import annotations

from .base import Family, QKNorm


class Qwen3(Family):
    model_type = "qwen3"
    summary = "Qwen3 (per-head q/k RMSNorm, converted on its pre-features)"
    transformers_module = "transformers.models.qwen3.modeling_qwen3"
    decoder_layer_class = "Qwen3DecoderLayer"
    rotary_class = "Qwen3RotaryEmbedding"
    qk_norm = QKNorm(per_head=True)
