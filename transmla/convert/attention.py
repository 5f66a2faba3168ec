r"""A source attention layer as the conversion sees it: grouped-query q/k/v/o weights and biases, read from the
checkpoint one layer at a time through the source's family (which names the tensors and splits fused ones).

Notation: G key heads of width d, H query heads, query head h reads key head g(h) = h // (H/G). RoPE in the
rotate-half layout turns dims (i, i + d/2) of every head at frequency theta_i, i < d/2 (`pair_blocks`).

A q/k RMSNorm (per head or over all heads: the family's `qk_norm`) is not linear in x, but it is a fixed function
of linear maps of x: with the pre-features z = [q_n; k_n; v] (q_n = q_norm(W_q x), k_n = k_norm(W_k x),
v = W_v x; `PreProjection`, computed by the converted model's own code), the layer is an ordinary attention layer
on z whose q, k and v are selections of z's blocks (`pre_feature_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from transmla.errors import TransMLAError
from transmla.families import AttentionWeights, Family
from transmla.io.reader import TensorSource

from .geometry import Geometry


def _cast(t: torch.Tensor | None, device: torch.device | str | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return None if t is None else t.to(device=device, dtype=dtype)


@dataclass
class PreProjection:
    """The pre-features of a layer with a q/k RMSNorm: z = [q_n; k_n; v] with q_n = q_norm(W_q x + b_q) and
    k_n = k_norm(W_k x + b_k) (normalised per head over d dims with [d] weights, or over all heads at once with
    [H*d] and [G*d] weights), v = W_v x + b_v."""

    q: torch.Tensor  # [H*d, h]
    k: torch.Tensor  # [G*d, h]
    v: torch.Tensor  # [G*d, h]
    q_norm: torch.Tensor  # [d] shared by the query heads, or [H*d]
    k_norm: torch.Tensor  # [d] shared by the key heads, or [G*d]
    head_dim: int
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None

    @property
    def widths(self) -> tuple[int, int, int]:
        """Widths of z's blocks: H*d, G*d, G*d."""
        return self.q.shape[0], self.k.shape[0], self.v.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PreProjection":
        cast = lambda t: _cast(t, device, dtype)  # noqa: E731
        return PreProjection(cast(self.q), cast(self.k), cast(self.v), cast(self.q_norm), cast(self.k_norm),
                             self.head_dim, cast(self.q_bias), cast(self.k_bias), cast(self.v_bias))

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
    blocks. `score_divisor` is n of the softmax scale n ** -0.5 (None: head_dim).
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
    score_divisor: float | None = None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SourceAttention":
        cast = lambda t: _cast(t, device, dtype)  # noqa: E731
        return SourceAttention(
            cast(self.q), cast(self.k), cast(self.v), cast(self.o),
            cast(self.q_bias), cast(self.k_bias), cast(self.v_bias),
            self.heads, self.groups, self.head_dim, None if self.pre is None else self.pre.to(device, dtype),
            self.score_divisor,
        )

    def double(self) -> "SourceAttention":
        return self.to(dtype=torch.float64)

    @property
    def score_scale_divisor(self) -> float:
        """1 / scale^2 of the softmax scale: what the squared score error is divided by."""
        return self.head_dim if self.score_divisor is None else self.score_divisor

    @property
    def group_of_head(self) -> torch.Tensor:
        return torch.arange(self.heads, device=self.q.device) // (self.heads // self.groups)


def pre_feature_attention(pre: PreProjection, o: torch.Tensor, heads: int, groups: int,
                          score_divisor: float | None = None) -> SourceAttention:
    """The attention layer on z = [q_n; k_n; v]: q, k and v are the identity on their blocks of z."""
    widths = pre.widths
    eye = torch.eye(sum(widths), dtype=o.dtype, device=o.device)
    q, k, v = (block.clone() for block in eye.split(list(widths)))
    return SourceAttention(q, k, v, o, None, None, None, heads, groups, pre.head_dim, pre, score_divisor)


def pair_blocks(weight: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """Rows of a [G*d, ...] projection arranged as [d/2 frequencies, 2 pair dims, G heads, ...]."""
    w = weight.reshape(groups, 2, head_dim // 2, *weight.shape[1:])
    return w.permute(2, 1, 0, *range(3, w.dim()))


def attention_weights(tensors: TensorSource, layer: int, family: Family) -> AttentionWeights:
    """The layer's attention tensors (float64) as its family names and splits them."""
    prefix = f"model.layers.{layer}.{family.attention_prefix}"

    def get(name: str) -> torch.Tensor | None:
        key = prefix + name
        return tensors.get(key, torch.float64) if tensors.has(key) else None

    return family.attention_weights(get)


def read_attention(tensors: TensorSource, layer: int, geo: Geometry,
                   family: Family) -> tuple[SourceAttention, torch.Tensor | None]:
    """The layer's q/k/v/o weights and biases, and o_proj's own bias if any. With q/k norms, the attention on the
    pre-features (see the module docstring)."""
    prefix = f"model.layers.{layer}.{family.attention_prefix}"
    weights = attention_weights(tensors, layer, family)
    src = SourceAttention(
        q=weights.q, k=weights.k, v=weights.v, o=weights.o,
        q_bias=weights.q_bias, k_bias=weights.k_bias, v_bias=weights.v_bias,
        heads=geo.heads, groups=geo.groups, head_dim=geo.head_dim, score_divisor=geo.score_divisor,
    )
    expected = {"q": (geo.heads * geo.head_dim, geo.hidden), "k": (geo.groups * geo.head_dim, geo.hidden),
                "v": (geo.groups * geo.head_dim, geo.hidden), "o": (geo.hidden, geo.heads * geo.head_dim)}
    for name, shape in expected.items():
        tensor = getattr(src, name)
        if tensor is None:
            raise TransMLAError(f"tensor {prefix}{name}_proj.weight is missing from the checkpoint")
        if tuple(tensor.shape) != shape:
            raise TransMLAError(f"{prefix}{name}_proj.weight has shape {tuple(tensor.shape)} but the config implies {shape}: the config does not match the weights")
    if family.qk_norm is not None:
        pre = read_pre_projection(src, weights, prefix, geo, family.qk_norm.per_head)
        src = pre_feature_attention(pre, src.o, geo.heads, geo.groups, geo.score_divisor)
    return src, weights.o_bias


def read_pre_projection(src: SourceAttention, weights: Any, prefix: str, geo: Geometry,
                        per_head: bool) -> PreProjection:
    """The q/k/v projections and the q/k norms that make the layer's pre-features."""
    widths = {"q_norm": geo.head_dim if per_head else geo.heads * geo.head_dim,
              "k_norm": geo.head_dim if per_head else geo.groups * geo.head_dim}
    for name, width in widths.items():
        weight = getattr(weights, name)
        if weight is None:
            raise TransMLAError(f"tensor {prefix}{name}.weight is missing from the checkpoint")
        if tuple(weight.shape) != (width,):
            raise TransMLAError(f"{prefix}{name}.weight has shape {tuple(weight.shape)} but the config implies ({width},): the config does not match the weights")
    return PreProjection(src.q, src.k, src.v, weights.q_norm, weights.k_norm, geo.head_dim,
                         src.q_bias, src.k_bias, src.v_bias)
