r"""The per-layer recipe: one source attention layer and what is known of its inputs in, latent-attention tensors out.

Every method runs the same steps: plan the shared rotary key (`rope`), split the layer into its rotary part and
its position-free keys, factor those keys and the values into one latent (the method's factorisation, `methods`),
assemble the converted tensors (`assemble`). The weights-only method is this recipe with the identity statistics
of isotropic inputs (`LayerStats.identity`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .assemble import assemble_layer, on_pre_features
from .attention import SourceAttention
from .latent import LatentFactors
from .methods import LayerFit, method
from .rope import RopePlan, plan_rope, rope_stats, split_rotary
from .statistics import LayerStats
from .whiten import head_blocks


@dataclass
class LayerSettings:
    """How every layer is converted: the per-layer view of `ConvertOptions` (`LayerSettings.of`)."""

    method: str
    rope_select: str
    freqfold: int
    shrink: bool  # fold the attention-averaged rotation into the dropped components' queries
    score_weight: float  # lambda: weight of the score error against the output error (whiten)
    rope_context: int  # distances over which a dropped rotation is costed when no attention was measured
    per_frequency: bool  # one rotary component per frequency (exportable to stock DeepSeek code)
    iterations: int = 4  # alternating refinements of the two-covariance objective (whiten)
    output_bias: bool = True  # whiten: the mean value error moved into o_proj's bias (False: fitted by the latent)
    latent_key_scale: float | None = None  # svd only: None = balanced

    @classmethod
    def of(cls, options: Any, **overrides: Any) -> "LayerSettings":
        """The settings of `options` (a resolved ConvertOptions); `freqfold auto` starts from 1."""
        values = dict(method=options.method, rope_select=options.rope_select,
                      freqfold=1 if str(options.freqfold) == "auto" else int(options.freqfold),
                      shrink=method(options.method).shrinks_queries and options.query_shrink,
                      score_weight=options.score_weight,
                      rope_context=options.rope_context, per_frequency=options.rope_per_frequency,
                      output_bias=options.output_bias)
        return cls(**{**values, **overrides})


def layer_plan(src: SourceAttention, stats: LayerStats, inv_freq: torch.Tensor, rope_dim: int,
               settings: LayerSettings) -> RopePlan:
    """The layer's rotary plan from its input moments (and, with the query shrink, its attention distances)."""
    shrink = stats.shrink.to(src.k.dtype) if settings.shrink else None
    rs = rope_stats(src, stats.second, stats.mean, shrink, settings.rope_context)
    return plan_rope(rs, inv_freq.to(src.k.dtype), rope_dim, src.groups, src.group_of_head,
                     settings.rope_select, settings.freqfold, settings.per_frequency)


def convert_layer(src: SourceAttention, stats: LayerStats, inv_freq: torch.Tensor, scaling: float,
                  rank: int, rope_dim: int, settings: LayerSettings) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The layer's latent-attention tensors (o_proj's own bias not included) and its rotary key's inverse
    frequencies. On pre-features, q_proj and kv_a_proj are narrowed to what the converted layer feeds them."""
    plan = layer_plan(src, stats, inv_freq, rope_dim, settings)
    split, q_nope, q_nope_bias = split_rotary(src, plan)
    latent, value_mean = method(settings.method).factor(LayerFit(src, stats, split, q_nope, q_nope_bias, rank, settings))
    shaped = SourceAttention(q_nope, src.k, src.v, src.o, q_nope_bias, src.k_bias, src.v_bias,
                             src.heads, src.groups, src.head_dim, score_divisor=src.score_divisor)
    # assemble_layer builds q_rope from the split and takes q_nope from `shaped.q` (shrunk where asked).
    out = assemble_layer(shaped, split, latent, scaling)
    if value_mean is not None:
        correction = value_bias_correction(src, latent, value_mean)
        out["o_proj.bias"] = out.get("o_proj.bias", 0) + correction
    return (out if src.pre is None else on_pre_features(out, src.pre)), plan.kept_inv_freq


def value_bias_correction(src: SourceAttention, latent: LatentFactors, value_mean: torch.Tensor) -> torch.Tensor:
    """sum_h W_o,h (W_v,g - A_v,g W_down) E[xbar_h]: the mean value error, moved into o_proj's bias."""
    d, groups = src.head_dim, src.groups
    err = (src.v - latent.up_value @ latent.down).view(groups, d, -1)[src.group_of_head]  # [H, d, h]
    o = head_blocks(src.o, src.heads)  # [H, hidden, d]
    per_head = torch.einsum("hdy,hy->hd", err, value_mean)  # contract the input dim first: no [H, hidden, hidden]
    return torch.einsum("hxd,hd->x", o, per_head)


def replace_values(out: dict[str, torch.Tensor], up_value: torch.Tensor, o_bias: torch.Tensor | None, groups: int,
                   head_dim: int) -> dict[str, torch.Tensor]:
    """Swap the value rows of kv_b_proj and o_proj's bias for refitted ones (no bias: none written)."""
    kv_b = out["kv_b_proj.weight"].clone().view(groups, 2 * head_dim, -1)
    kv_b[:, head_dim:] = up_value.view(groups, head_dim, -1).to(kv_b)
    result = {k: v for k, v in out.items() if k != "o_proj.bias"}
    result["kv_b_proj.weight"] = kv_b.reshape(groups * 2 * head_dim, -1)
    return result if o_bias is None else result | {"o_proj.bias": o_bias.to(kv_b)}
