"""KV-cache geometry of a source (grouped-query attention) or converted (transmla) config, from the config alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import TransMLAError

TRANSMLA_MODEL_TYPE = "transmla"


@dataclass
class LayerGeometry:
    """Attention geometry of one layer. `kv_lora_rank` and `qk_rope_head_dim` are None for a source model."""

    layer: int
    num_heads: int  # H, query heads
    num_kv_heads: int  # G, key/value heads (groups)
    head_dim: int  # d
    kv_lora_rank: int | None  # R_l
    qk_rope_head_dim: int | None  # D
    kv_values_per_token: int  # values cached per token in this layer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _get(config: Any, key: str, default: Any = None) -> Any:
    """Read a field from a config object or a plain dict."""
    value = config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)
    return default if value is None else value


def _require(config: Any, key: str) -> Any:
    value = _get(config, key)
    if value is None:
        raise TransMLAError(f"config has no `{key}`: pass a model config (config.json of a causal LM)")
    return value


def is_transmla(config: Any) -> bool:
    """True for a converted (MLA) config."""
    return _get(config, "model_type") == TRANSMLA_MODEL_TYPE


def _ranks(config: Any, num_layers: int) -> list[int]:
    ranks = _require(config, "kv_lora_rank")
    if isinstance(ranks, int):
        return [ranks] * num_layers
    ranks = [int(r) for r in ranks]
    if len(ranks) != num_layers:
        raise TransMLAError(
            f"config has {len(ranks)} kv_lora_rank entries for {num_layers} layers: "
            "kv_lora_rank needs one entry per layer"
        )
    return ranks


def describe(config: Any) -> list[LayerGeometry]:
    """Per-layer attention geometry of a config object or dict."""
    num_layers = int(_require(config, "num_hidden_layers"))
    heads = int(_require(config, "num_attention_heads"))
    kv_heads = int(_get(config, "num_key_value_heads", heads))
    head_dim = _get(config, "head_dim")
    if head_dim is None:
        head_dim = int(_require(config, "hidden_size")) // heads
    head_dim = int(head_dim)

    if is_transmla(config):
        rope_dim = int(_require(config, "qk_rope_head_dim"))
        return [
            LayerGeometry(layer, heads, kv_heads, head_dim, rank, rope_dim, rank + rope_dim)
            for layer, rank in enumerate(_ranks(config, num_layers))
        ]
    per_layer = 2 * kv_heads * head_dim
    return [LayerGeometry(layer, heads, kv_heads, head_dim, None, None, per_layer) for layer in range(num_layers)]


def kv_values_per_token(config: Any) -> list[int]:
    """Values cached per token, one entry per layer."""
    return [layer.kv_values_per_token for layer in describe(config)]


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Bytes cached per token over all layers, at `dtype_bytes` bytes per value."""
    return sum(kv_values_per_token(config)) * int(dtype_bytes)
