r"""A source attention layer as the conversion sees it: grouped-query q/k/v/o weights and biases, read from the
checkpoint one layer at a time.

Notation: G key heads of width d, H query heads, query head h reads key head g(h) = h // (H/G). RoPE in the
rotate-half layout turns dims (i, i + d/2) of every head at frequency theta_i, i < d/2 (`pair_blocks`).

Per-head q/k RMSNorm (Qwen3) is not linear in x, but it is a fixed function of linear maps of x: with the
pre-features z = [q_n; k_n; v] (q_n = q_norm(W_q x), k_n = k_norm(W_k x), v = W_v x; `PreProjection`), the
layer is an ordinary attention layer on z whose q, k and v are selections of z's blocks (`pre_feature_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from transmla.errors import TransMLAError
from transmla.io.reader import TensorSource

from .geometry import Geometry


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


def pre_feature_attention(pre: PreProjection, o: torch.Tensor, heads: int, groups: int) -> SourceAttention:
    """The attention layer on z = [q_n; k_n; v]: q, k and v are the identity on their blocks of z."""
    widths = pre.widths
    eye = torch.eye(sum(widths), dtype=o.dtype, device=o.device)
    q, k, v = (block.clone() for block in eye.split(list(widths)))
    return SourceAttention(q, k, v, o, None, None, None, heads, groups, pre.head_dim, pre)


def pair_blocks(weight: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """Rows of a [G*d, ...] projection arranged as [d/2 frequencies, 2 pair dims, G heads, ...]."""
    w = weight.reshape(groups, 2, head_dim // 2, *weight.shape[1:])
    return w.permute(2, 1, 0, *range(3, w.dim()))


def read_attention(tensors: TensorSource, layer: int, geo: Geometry) -> tuple[SourceAttention, torch.Tensor | None]:
    """The layer's q/k/v/o weights and biases, and o_proj's own bias if any. With per-head q/k norms, the
    attention on the pre-features (see the module docstring)."""
    prefix = f"model.layers.{layer}.self_attn."

    def get(name: str) -> torch.Tensor | None:
        key = prefix + name
        return tensors.get(key, torch.float64) if tensors.has(key) else None

    src = SourceAttention(
        q=get("q_proj.weight"), k=get("k_proj.weight"), v=get("v_proj.weight"), o=get("o_proj.weight"),
        q_bias=get("q_proj.bias"), k_bias=get("k_proj.bias"), v_bias=get("v_proj.bias"),
        heads=geo.heads, groups=geo.groups, head_dim=geo.head_dim,
    )
    expected = {"q": (geo.heads * geo.head_dim, geo.hidden), "k": (geo.groups * geo.head_dim, geo.hidden),
                "v": (geo.groups * geo.head_dim, geo.hidden), "o": (geo.hidden, geo.heads * geo.head_dim)}
    for name, shape in expected.items():
        tensor = getattr(src, name)
        if tensor is None:
            raise TransMLAError(f"tensor {prefix}{name}_proj.weight is missing from the checkpoint")
        if tuple(tensor.shape) != shape:
            raise TransMLAError(f"{prefix}{name}_proj.weight has shape {tuple(tensor.shape)} but the config implies {shape}: the config does not match the weights")
    if geo.qk_norm:
        src = pre_feature_attention(read_pre_projection(src, get, prefix, geo), src.o, geo.heads, geo.groups)
    return src, get("o_proj.bias")


def read_pre_projection(src: SourceAttention, get: Any, prefix: str, geo: Geometry) -> PreProjection:
    """The q/k/v projections and the per-head q/k norms that make the layer's pre-features."""
    norms = {}
    for name in ("q_norm", "k_norm"):
        weight = get(f"{name}.weight")
        if weight is None:
            raise TransMLAError(f"tensor {prefix}{name}.weight is missing from the checkpoint")
        if tuple(weight.shape) != (geo.head_dim,):
            raise TransMLAError(f"{prefix}{name}.weight has shape {tuple(weight.shape)} but the config implies ({geo.head_dim},): the config does not match the weights")
        norms[name] = weight
    return PreProjection(src.q, src.k, src.v, norms["q_norm"], norms["k_norm"], geo.norm_eps,
                         src.q_bias, src.k_bias, src.v_bias)
