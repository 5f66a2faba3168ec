"""OLMo 2: no norm before the attention or the MLP, RMSNorms of their outputs instead, and an RMSNorm over the whole
query and key projections (all heads at once) before RoPE, so that its layers convert on their pre-features."""

from __future__ import annotations

from .base import Family, QKNorm


class Olmo2(Family):
    model_type = "olmo2"
    summary = "OLMo 2 (q/k RMSNorm over all heads, norms after attention and MLP)"
    transformers_module = "transformers.models.olmo2.modeling_olmo2"
    decoder_layer_class = "Olmo2DecoderLayer"
    rotary_class = "Olmo2RotaryEmbedding"
    norm_placement = "post"
    qk_norm = QKNorm(per_head=False)
