"""Mistral: the Llama layout; a sliding window, where the config sets one, covers every layer."""

from __future__ import annotations

from .base import Family


class Mistral(Family):
    model_type = "mistral"
    summary = "Mistral (full attention or one sliding window for every layer)"
    transformers_module = "transformers.models.mistral.modeling_mistral"
    decoder_layer_class = "MistralDecoderLayer"
    rotary_class = "MistralRotaryEmbedding"
