"""Qwen2 / Qwen2.5: the Llama layout with q/k/v biases (kept exact: docs/format.md)."""

from __future__ import annotations

from .base import Family


class Qwen2(Family):
    model_type = "qwen2"
    summary = "Qwen2 / Qwen2.5 (q/k/v biases)"
    transformers_module = "transformers.models.qwen2.modeling_qwen2"
    decoder_layer_class = "Qwen2DecoderLayer"
    rotary_class = "Qwen2RotaryEmbedding"
