"""One attention layer from the converted layout (docs/format.md) to DeepSeek-V3's.

* q_proj: per head [q_nope (d) | q_rope (D)] as before; every row times sqrt((d + D) / d), because stock code
  scales scores by (d + D)^-0.5 where ours uses d^-0.5 (times sqrt(d + D) s for a model of its own scale s); the rope rows also times s^2 (the converted rotary
  multiplies cos and sin by s, stock code by 1) and permuted onto the stock pairs.
* kv_a_proj_with_mqa: [latent rows times the latent pre-scale (zero rows up to the shared rank) | k_rope permuted].
* kv_a_layernorm: the latent norm weight (see `latent_norm`).
* kv_b_proj: stock code has one [k_nope | v] block per query head; head h gets its group's block, zero columns
  up to the shared rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .latent_norm import LatentNorm


@dataclass
class AttentionShape:
    heads: int
    groups: int
    head_dim: int
    rope_dim: int
    hidden: int
    scale: float | None = None  # the softmax scale where it is not head_dim ** -0.5


def export_attention(
    t: dict[str, torch.Tensor], shape: AttentionShape, rope_rows: list[int], rope_gain: float,
    norm: LatentNorm, rank_out: int,
) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 tensors of one layer (names without the layer prefix), in float64."""
    H, G, d, D, h = shape.heads, shape.groups, shape.head_dim, shape.rope_dim, shape.hidden
    q_gain = math.sqrt((d + D) / d) if shape.scale is None else shape.scale * math.sqrt(d + D)
    rows = torch.tensor(rope_rows)

    q = t["q_proj.weight"].double().view(H, d + D, h)
    q = torch.cat([q[:, :d], rope_gain * q[:, d:][:, rows]], dim=1) * q_gain

    kv_a = t["kv_a_proj.weight"].double()
    rank = kv_a.shape[0] - D
    latent = kv_a.new_zeros(rank_out, h)
    latent[:rank] = norm.pre_scale.double()[:, None] * kv_a[:rank]
    k_rope = kv_a[rank:][rows]

    kv_b = t["kv_b_proj.weight"].double().view(G, 2 * d, rank)
    per_head = kv_b[torch.arange(H) // (H // G)]
    kv_b_out = per_head.new_zeros(H, 2 * d, rank_out)
    kv_b_out[..., :rank] = per_head
    return {
        "q_proj.weight": q.reshape(H * (d + D), h),
        "kv_a_proj_with_mqa.weight": torch.cat([latent, k_rope]),
        "kv_a_layernorm.weight": norm.weight.double(),
        "kv_b_proj.weight": kv_b_out.reshape(H * 2 * d, rank_out),
        "o_proj.weight": t["o_proj.weight"],
    }
