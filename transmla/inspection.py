"""`transmla inspect`: attention geometry and KV-cache size per token, before and after conversion."""

from __future__ import annotations

from typing import Any

from .convert.geometry import Geometry
from .errors import TransMLAError
from .kv_cache import describe, is_transmla
from .io.source import auto_config, check_architecture, resolve


def load_config(spec: str) -> Any:
    """The config of a source model or a converted folder, without loading weights."""
    folder, gguf = resolve(spec)
    return auto_config(folder, gguf, trust_remote_code=gguf is None)


def inspect_model(spec: str, kv_lora_rank: int | None, rope_dim: int | None, bytes_per_value: int = 2) -> dict[str, Any]:
    """Per-layer geometry with values per token before and after; a converted folder reports its own R and D."""
    if bytes_per_value < 1:
        raise TransMLAError(f"--bytes-per-value {bytes_per_value} must be at least 1 (2 for bf16/fp16, 4 for float32)")
    config = load_config(spec)
    layers = describe(config)
    if is_transmla(config):
        if kv_lora_rank is not None or rope_dim is not None:
            raise TransMLAError(f"{spec} is converted already and reports its own R and D: leave out --kv-lora-rank and --rope-dim")
        after = [(g.kv_lora_rank, g.qk_rope_head_dim) for g in layers]
        before = [2 * g.num_kv_heads * g.head_dim for g in layers]
    else:
        check_architecture(config)
        geo = Geometry.of(config)
        rope_dim = geo.default_rope_dim() if rope_dim is None else rope_dim
        rank = geo.default_rank(rope_dim) if kv_lora_rank is None else kv_lora_rank
        geo.check(rank, rope_dim)
        after = [(rank, rope_dim)] * len(layers)
        before = [g.kv_values_per_token for g in layers]
    rows = [
        {"layer": g.layer, "heads": g.num_heads, "kv_heads": g.num_kv_heads, "head_dim": g.head_dim,
         "values_before": b, "R": r, "D": d, "values_after": r + d}
        for g, b, (r, d) in zip(layers, before, after)
    ]
    bytes_before = sum(r["values_before"] for r in rows) * bytes_per_value
    bytes_after = sum(r["values_after"] for r in rows) * bytes_per_value
    return {"model": spec, "layers": rows, "bytes_before": bytes_before, "bytes_after": bytes_after,
            "compression": bytes_before / bytes_after}
