r"""One attention layer from grouped-query form to latent form (the weight layout of docs/format.md).

Given the RoPE plan (`rope`) and the latent factors (`factorize`):

* q_rope of head h, slot p = (i, j): U_i[j, g(h)] times the query rows of frequency i (both pair dims), eq. (1)
  of `rope`; q_nope of head h is the source query itself, unrotated.
* k_rope, slot p: the mixed key rows k'_ij = sum_g U_i[j, g] k_g^i.
* k_nope of group g, dims of frequency i: sum over dropped j of U_i[j, g] k'_ij, i.e. the dropped components
  mapped back to head g (the map E_g below), read from the latent: W_UK_g = E_g A_z.
* v of group g: W_UV_g = the rows of A_v for head g.

Biases (Qwen2) stay exact: the rotary key's bias is rotated with it, so it stays in k_rope; the bias of the
position-free key adds q . b to every score of a query, which softmax ignores, so it is dropped; the value bias
passes through the attention average unchanged (the weights sum to one) and becomes o_proj's bias,
W_o b_v. If the source scales cos and sin by s (YaRN), the rotary part of a score carries s^2, so q_nope is
scaled by s^2 as well.

Per-head q/k RMSNorm (Qwen3) is not linear in x, but it is a fixed function of linear maps of x: with the
pre-features z = [q_n; k_n; v] (q_n = q_norm(W_q x), k_n = k_norm(W_k x), v = W_v x; `PreProjection`), the
layer is an ordinary attention layer on z whose q, k and v are selections of z's blocks. Converted on z, q_proj
reads only the q_n block and kv_a_proj only [k_n; v] (`on_pre_features`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .factorize import LatentFactors
from .rope import RopePlan, pair_blocks


def _cast(t: torch.Tensor | None, device: torch.device | str | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return None if t is None else t.to(device=device, dtype=dtype)


@dataclass
class PreProjection:
    """The pre-features of a layer with per-head q/k RMSNorm (Qwen3): z = [q_n; k_n; v] with
    q_n = q_norm(W_q x + b_q) and k_n = k_norm(W_k x + b_k), each normalised per head over d dims, v = W_v x + b_v."""

    q: torch.Tensor  # [H*d, h]
    k: torch.Tensor  # [G*d, h]
    v: torch.Tensor  # [G*d, h]
    q_norm: torch.Tensor  # [d], shared by the query heads
    k_norm: torch.Tensor  # [d], shared by the key heads
    eps: float
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None

    @property
    def head_dim(self) -> int:
        return self.q_norm.shape[0]

    @property
    def widths(self) -> tuple[int, int, int]:
        """Widths of z's blocks: H*d, G*d, G*d."""
        return self.q.shape[0], self.k.shape[0], self.v.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PreProjection":
        cast = lambda t: _cast(t, device, dtype)  # noqa: E731
        return PreProjection(cast(self.q), cast(self.k), cast(self.v), cast(self.q_norm), cast(self.k_norm), self.eps,
                             cast(self.q_bias), cast(self.k_bias), cast(self.v_bias))

    def lift(self, x: torch.Tensor) -> torch.Tensor:
        """z [..., (H+2G)*d] of the attention input x [..., h], in x's dtype."""

        def linear(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            return F.linear(x, w.to(x), None if b is None else b.to(x))

        def per_head_norm(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            heads = y.unflatten(-1, (-1, self.head_dim))
            return F.rms_norm(heads, (self.head_dim,), weight.to(y), self.eps).flatten(-2)

        q = per_head_norm(linear(self.q, self.q_bias), self.q_norm)
        k = per_head_norm(linear(self.k, self.k_bias), self.k_norm)
        return torch.cat([q, k, linear(self.v, self.v_bias)], dim=-1)

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The converted layer's inputs from z: q_n for q_proj, [k_n; v] for kv_a_proj."""
        return z[..., : self.widths[0]], z[..., self.widths[0]:]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The pre-feature tensors of the converted layer, named as in docs/format.md."""
        out = {"pre_q_proj.weight": self.q, "pre_k_proj.weight": self.k, "pre_v_proj.weight": self.v,
               "q_norm.weight": self.q_norm, "k_norm.weight": self.k_norm}
        for name, bias in (("pre_q_proj", self.q_bias), ("pre_k_proj", self.k_bias), ("pre_v_proj", self.v_bias)):
            if bias is not None:
                out[f"{name}.bias"] = bias
        return out


@dataclass
class SourceAttention:
    """A grouped-query attention layer: q [H*d, h], k and v [G*d, h], o [h, H*d], optional biases.

    With `pre` set, h is the width of the pre-features z (not the model's hidden size) and q, k, v select z's
    blocks; the layer's input is then `pre.lift(x)`.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    heads: int
    groups: int
    head_dim: int
    pre: PreProjection | None = None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SourceAttention":
        cast = lambda t: _cast(t, device, dtype)  # noqa: E731
        return SourceAttention(
            cast(self.q), cast(self.k), cast(self.v), cast(self.o),
            cast(self.q_bias), cast(self.k_bias), cast(self.v_bias),
            self.heads, self.groups, self.head_dim, None if self.pre is None else self.pre.to(device, dtype),
        )

    def double(self) -> "SourceAttention":
        return self.to(dtype=torch.float64)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input from the normalised hidden state x: x itself, or the pre-features z."""
        return x if self.pre is None else self.pre.lift(x)

    @property
    def group_of_head(self) -> torch.Tensor:
        return torch.arange(self.heads, device=self.q.device) // (self.heads // self.groups)


@dataclass
class RotarySplit:
    """The rotary parts and the position-free key rows W_z of one layer."""

    q_rope: torch.Tensor  # [H, D, h]
    q_rope_bias: torch.Tensor | None  # [H, D]
    k_rope: torch.Tensor  # [D, h]
    k_rope_bias: torch.Tensor | None  # [D]
    key_nope: torch.Tensor  # [G*d - D, h]: rows (i, j, pair dim) of the dropped components
    nope_to_heads: torch.Tensor  # [G, d, G*d - D]: E_g


def rotary_split(src: SourceAttention, plan: RopePlan) -> RotarySplit:
    """Split queries and keys into the shared rotary key, its per-head queries and the position-free key."""
    d, half = src.head_dim, src.head_dim // 2
    u = plan.rotations.to(src.k.dtype)  # [d/2, G(j), G(g)]
    mixed_k = torch.einsum("ijg,imgh->imjh", u, pair_blocks(src.k, src.groups, d))  # [d/2, 2, G(j), h]
    q_blocks = pair_blocks(src.q, src.heads, d)  # [d/2, 2, H, h]
    u_head = u[:, :, src.group_of_head]  # [d/2, G(j), H]

    kept = plan.kept
    k_rope = torch.cat([torch.stack([mixed_k[i, m, j] for i, j in kept]) for m in (0, 1)])
    q_rope = torch.cat(
        [torch.stack([u_head[i, j, :, None] * q_blocks[i, m] for i, j in kept], dim=1) for m in (0, 1)], dim=1
    )
    k_rope_bias = q_rope_bias = None
    if src.k_bias is not None:
        mixed_kb = torch.einsum("ijg,img->imj", u, pair_blocks(src.k_bias, src.groups, d))
        k_rope_bias = torch.cat([torch.stack([mixed_kb[i, m, j] for i, j in kept]) for m in (0, 1)])
    if src.q_bias is not None:
        qb = pair_blocks(src.q_bias, src.heads, d)  # [d/2, 2, H]
        q_rope_bias = torch.cat(
            [torch.stack([u_head[i, j] * qb[i, m] for i, j in kept], dim=1) for m in (0, 1)], dim=1
        )

    dropped = plan.dropped()
    rows = [(i, j, m) for i, j in dropped for m in (0, 1)]
    hidden = src.k.shape[1]
    key_nope = torch.stack([mixed_k[i, m, j] for i, j, m in rows]) if rows else src.k.new_zeros(0, hidden)
    nope_to_heads = src.k.new_zeros(src.groups, d, len(rows))
    for col, (i, j, m) in enumerate(rows):
        nope_to_heads[:, m * half + i, col] = u[i, j]
    return RotarySplit(q_rope, q_rope_bias, k_rope, k_rope_bias, key_nope, nope_to_heads)


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


def pre_feature_attention(pre: PreProjection, o: torch.Tensor, heads: int, groups: int) -> SourceAttention:
    """The attention layer on z = [q_n; k_n; v]: q, k and v are the identity on their blocks of z."""
    widths = pre.widths
    eye = torch.eye(sum(widths), dtype=o.dtype, device=o.device)
    q, k, v = (block.clone() for block in eye.split(list(widths)))
    return SourceAttention(q, k, v, o, None, None, None, heads, groups, pre.head_dim, pre)


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
