"""Phi-3: the Llama layout with fused projections, split on reading: `qkv_proj` rows are [q (H*d) | k (G*d) |
v (G*d)] and `gate_up_proj` rows [gate (I) | up (I)]. A sliding window, where the config sets one, covers every
layer."""

from __future__ import annotations

from typing import Any

import torch

from transmla.errors import TransMLAError

from .base import AttentionWeights, Family, TensorGetter


class Phi3(Family):
    model_type = "phi3"
    summary = "Phi-3 (fused qkv_proj and gate_up_proj)"
    transformers_module = "transformers.models.phi3.modeling_phi3"
    decoder_layer_class = "Phi3DecoderLayer"
    rotary_class = "Phi3RotaryEmbedding"

    def check(self, config: Any) -> None:
        super().check(config)
        factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise TransMLAError(f"partial_rotary_factor {factor}: only some dims of each head rotate, which the "
                                "conversion does not handle; supported are Phi-3 models whose heads rotate whole")

    def attention_weights(self, get: TensorGetter) -> AttentionWeights:
        fused, out = get("qkv_proj.weight"), get("o_proj.weight")
        if fused is None:
            return AttentionWeights(None, None, None, out)
        heads_width = out.shape[1]  # H*d
        kv_width = (fused.shape[0] - heads_width) // 2
        q, k, v = fused.split([heads_width, kv_width, kv_width])
        return AttentionWeights(q, k, v, out, o_bias=get("o_proj.bias"))

    def layer_tensor(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if name == "mlp.gate_up_proj.weight":
            gate, up = tensor.chunk(2, dim=0)
            return {"mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up}
        return {name: tensor}
