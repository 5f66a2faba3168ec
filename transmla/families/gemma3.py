"""Gemma 3 (text): Gemma 2's layout, plus an RMSNorm (1 + w) over each query and key head before RoPE (converted
on the pre-features, as Qwen3) and a rotary table per layer type (local and global theta)."""

from __future__ import annotations

from typing import Any

import torch

from transmla.errors import TransMLAError

from .base import QKNorm
from .gemma2 import Gemma2


class Gemma3(Gemma2):
    model_type = "gemma3_text"
    summary = "Gemma 3 text (Gemma 2's layout, per-head (1 + w) q/k norm, local and global RoPE)"
    transformers_module = "transformers.models.gemma3.modeling_gemma3"
    decoder_layer_class = "Gemma3DecoderLayer"
    rotary_class = "Gemma3RotaryEmbedding"
    qk_norm = QKNorm(per_head=True)

    def check(self, config: Any) -> None:
        super().check(config)
        if getattr(config, "use_bidirectional_attention", False):
            raise TransMLAError("use_bidirectional_attention: this Gemma 3 attends both ways (an embedding model), "
                                "which a causal latent cache can not express")

    def rope_parameter_sets(self, config: Any) -> list[dict[str, Any]]:
        return [params or {} for params in (config.rope_parameters or {}).values()]

    def rotary(self, config: Any) -> list[tuple[torch.Tensor, float]]:
        module = self.source_rotary(config)
        tables = {kind: (getattr(module, f"{kind}_inv_freq").double().cpu(),
                         float(getattr(module, f"{kind}_attention_scaling"))) for kind in set(config.layer_types)}
        return [tables[kind] for kind in config.layer_types]

    def position_embeddings(self, rotary: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor,
                            layer: int, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary(x, positions, config.layer_types[layer])
