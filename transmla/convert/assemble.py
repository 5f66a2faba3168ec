r"""One attention layer from grouped-query form to latent form (the weight layout of docs/format.md).

Given the rotary split (`rope`) and the latent factors (`latent`):

* q_rope of head h, slot p = (i, j): U_i[j, g(h)] times the query rows of frequency i (both pair dims), eq. (1)
  of `rope`; q_nope of head h is the source query itself, unrotated.
* k_rope, slot p: the mixed key rows k'_ij = sum_g U_i[j, g] k_g^i.
* k_nope of group g, dims of frequency i: sum over dropped j of U_i[j, g] k'_ij, i.e. the dropped components
  mapped back to head g (the map E_g below), read from the latent: W_UK_g = E_g A_z.
* v of group g: W_UV_g = the rows of A_v for head g.

Attention biases stay exact: the rotary key's bias is rotated with it, so it stays in k_rope; the bias of the
position-free key adds q . b to every score of a query, which softmax ignores, so it is dropped; the value bias
passes through the attention average unchanged (the weights sum to one) and becomes o_proj's bias,
W_o b_v. If the source scales cos and sin by s (YaRN), the rotary part of a score carries s^2, so q_nope is
scaled by s^2 as well.

With q/k norms the layer was converted on its pre-features z = [q_n; k_n; v] (`attention`):
q_proj then reads only the q_n block and kv_a_proj only [k_n; v] (`on_pre_features`).
"""

from __future__ import annotations

import torch

from .attention import PreProjection, SourceAttention
from .latent import LatentFactors
from .rope import RotarySplit


def assemble_layer(
    src: SourceAttention, split: RotarySplit, latent: LatentFactors, attention_scaling: float = 1.0
) -> dict[str, torch.Tensor]:
    """The converted layer's tensors, named as in docs/format.md (without the layer prefix)."""
    h, d, heads, groups = src.q.shape[1], src.head_dim, src.heads, src.groups
    rope_dim, rank = split.k_rope.shape[0], latent.down.shape[0]
    nope_scale = attention_scaling**2
    q_nope = (nope_scale * src.q).view(heads, d, h)
    out: dict[str, torch.Tensor] = {
        "q_proj.weight": torch.cat([q_nope, split.q_rope], dim=1).reshape(heads * (d + rope_dim), h),
        "kv_a_proj.weight": torch.cat([latent.down, split.k_rope]),
    }
    up_key = torch.einsum("gdz,zr->gdr", split.nope_to_heads, latent.up_key)  # W_UK_g = E_g A_z
    up_value = latent.up_value.view(groups, d, rank)
    out["kv_b_proj.weight"] = torch.cat([up_key, up_value], dim=1).reshape(groups * 2 * d, rank)
    out["o_proj.weight"] = src.o
    if src.q_bias is not None or src.k_bias is not None:
        q_bias = src.q_bias if src.q_bias is not None else src.q.new_zeros(heads * d)
        q_rope_bias = split.q_rope_bias if split.q_rope_bias is not None else src.q.new_zeros(heads, rope_dim)
        out["q_proj.bias"] = torch.cat([nope_scale * q_bias.view(heads, d), q_rope_bias], dim=1).reshape(-1)
        k_rope_bias = split.k_rope_bias if split.k_rope_bias is not None else src.q.new_zeros(rope_dim)
        out["kv_a_proj.bias"] = torch.cat([src.q.new_zeros(rank), k_rope_bias])
    if src.v_bias is not None:
        per_head = src.v_bias.view(groups, d)[src.group_of_head].reshape(-1)
        out["o_proj.bias"] = src.o @ per_head
    return out


def on_pre_features(out: dict[str, torch.Tensor], pre: PreProjection, rel_tol: float = 1e-9) -> dict[str, torch.Tensor]:
    """The converted layer's tensors with q_proj reading only q_n and kv_a_proj only [k_n; v], plus the
    pre-feature tensors. The columns dropped are zero by construction; anything else is an error."""
    q_width = pre.widths[0]
    blocks = {"q_proj.weight": (slice(0, q_width), slice(q_width, None)),
              "kv_a_proj.weight": (slice(q_width, None), slice(0, q_width))}
    result = dict(out)
    for name, (kept, dropped) in blocks.items():
        weight = out[name]
        largest, leak = float(weight.abs().max()), float(weight[:, dropped].abs().max())
        if leak > rel_tol * largest:
            raise RuntimeError(f"{name} reads pre-features that the converted layer does not feed it (up to {leak:.3g})")
        result[name] = weight[:, kept].contiguous()
    return result | {k: v.to(out["q_proj.weight"]) for k, v in pre.tensors().items()}
