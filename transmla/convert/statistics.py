"""What the conversion of one layer knows about its inputs: moments over calibration tokens, or the identity
moments of isotropic inputs that the weights-only method assumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LayerStats:
    """Moments of one attention layer's input x (after input_layernorm) over the calibration tokens.

    shrink[h, i] = (E_p cos(Delta theta_i), E_p sin(Delta theta_i)) under head h's attention weights p;
    value_mean / value_second: moments of the attention-averaged input xbar_h(t) = sum_s p_h(t, s) x(s), the
    second moments averaged over heads (per-head [H, h, h] matrices would not fit for large models).
    """

    tokens: int
    mean: torch.Tensor  # [h]
    second: torch.Tensor  # [h, h], E[x x^T]
    shrink: torch.Tensor  # [H, d/2, 2]
    value_mean: torch.Tensor  # [H, h]
    value_second: torch.Tensor  # [h, h]: mean over heads of E_t xbar_h xbar_h^T
    _memo: dict = field(default_factory=dict, repr=False, compare=False)  # derived matrices, shared by candidates

    def memo(self, key: Any, make: Any) -> Any:
        """`make()`, computed once per key for these moments (e.g. an eigendecomposition every candidate split
        of the layer needs)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @property
    def cov(self) -> torch.Tensor:
        return self.second - torch.outer(self.mean, self.mean)

    def value_cov(self) -> torch.Tensor:
        """[h, h]: the covariance of xbar_h about its per-head mean, averaged over heads."""
        heads = self.value_mean.shape[0]
        return self.value_second - self.value_mean.T @ self.value_mean / heads

    def independent_blocks(self, split: int) -> "LayerStats":
        """These moments with inputs [:split] and [split:] made uncorrelated (cov and value_cov block-diagonal; means and diagonal blocks kept).

        On pre-features z = [q_n; k_n; v] the converted kv_a_proj reads only [k_n; v]. A latent error E with zero
        q_n columns costs tr(M E S E^T) = tr(M E_kv S_kv E_kv^T) whatever S's cross block, and with that block
        zero a latent reading q_n can only cost more: the whitened latent then reads [k_n; v] alone, and is the
        best one that does.
        """
        a, b = slice(0, split), slice(split, None)

        def decoupled(second: torch.Tensor, mean_outer: torch.Tensor) -> torch.Tensor:
            out = second.clone()
            out[a, b], out[b, a] = mean_outer[a, b], mean_outer[b, a]
            return out

        second = decoupled(self.second, torch.outer(self.mean, self.mean))
        heads = self.value_mean.shape[0]
        value_second = decoupled(self.value_second, self.value_mean.T @ self.value_mean / heads)
        return LayerStats(self.tokens, self.mean, second, self.shrink, self.value_mean, value_second)

    @classmethod
    def identity(cls, width: int, heads: int, head_dim: int, dtype: torch.dtype = torch.float64) -> "LayerStats":
        """Statistics of isotropic inputs with no attention pattern: what the weights-only method assumes."""
        eye = torch.eye(width, dtype=dtype)
        return cls(1, torch.zeros(width, dtype=dtype), eye, torch.zeros(heads, head_dim // 2, 2, dtype=dtype),
                   torch.zeros(heads, width, dtype=dtype), eye)

    def to(self, device: torch.device | str) -> "LayerStats":
        return LayerStats(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()
                             if k != "_memo"})
