"""The TransMLAConfig of a conversion: the source's decoder settings (as its family describes them) with the latent
sizes and rotary frequencies."""

from __future__ import annotations

from typing import Any

import torch

from transmla.families import family_of
from transmla.modeling.configuration_transmla import TransMLAConfig

from .geometry import Geometry

AUTO_MAP = {"AutoConfig": "configuration_transmla.TransMLAConfig",
            "AutoModelForCausalLM": "modeling_transmla.TransMLAForCausalLM"}


def build_config(source_config: Any, ranks: list[int], inv_freqs: list[list[float]], scaling: float,
                 tensors: set[str], layer: int | None = None, source_name: str | None = None,
                 conversion: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> TransMLAConfig:
    """The config of a converted model (or, with `layer`, of that one layer alone, as layer 0) whose tensors are
    named in `tensors`.

    Biases follow the tensors of layer 0; `source_name`, `conversion` and `dtype` are what a written checkpoint
    records (a config for calibration leaves them out and has no vocabulary)."""
    src, geo = source_config, Geometry.of(source_config)
    text = src.get_text_config() if hasattr(src, "get_text_config") else src
    rope = getattr(src, "rope_parameters", None) or {}
    whole_model = layer is None
    runtime = family_of(src).runtime_config(src)
    if not whole_model and runtime["layer_types"] is not None:
        runtime["layer_types"] = runtime["layer_types"][layer:layer + 1]
    record: dict[str, Any] = {}
    if whole_model:
        record = dict(vocab_size=src.vocab_size, max_position_embeddings=src.max_position_embeddings,
                      pad_token_id=src.pad_token_id, bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id,
                      tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
                      rope_theta=float(rope.get("rope_theta", getattr(src, "rope_theta", 10000.0))),
                      source_model=source_name, source_architecture=src.model_type, conversion=conversion,
                      auto_map=AUTO_MAP, dtype=str(dtype).removeprefix("torch."))
    else:
        record = dict(vocab_size=1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    prefix = "model.layers.0.self_attn."
    return TransMLAConfig(
        hidden_size=src.hidden_size, intermediate_size=src.intermediate_size,
        num_hidden_layers=geo.layers if whole_model else 1, num_attention_heads=geo.heads,
        num_key_value_heads=geo.groups, head_dim=geo.head_dim, kv_lora_rank=ranks,
        qk_rope_head_dim=2 * len(inv_freqs[0]), rope_inv_freq=inv_freqs, rope_attention_scaling=scaling,
        attention_bias=prefix + "q_proj.bias" in tensors or prefix + "kv_a_proj.bias" in tensors,
        attention_out_bias=prefix + "o_proj.bias" in tensors,
        qk_norm=geo.qk_norm, pre_proj_bias=prefix + "pre_q_proj.bias" in tensors, **runtime, **record,
    )


def shared_scaling(tables: list[tuple[torch.Tensor, float]]) -> float:
    """The cos/sin scaling of every layer's rotary table: one for all (`Family.check` refuses sources where not)."""
    return tables[0][1]
