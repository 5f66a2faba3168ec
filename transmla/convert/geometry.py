"""The source's attention shape, read from its config, and the default cache sizes it implies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transmla.errors import TransMLAError
from transmla.families import family_of

from .latent import max_latent_rank


@dataclass
class Geometry:
    """The source's attention shape."""

    hidden: int
    heads: int
    groups: int
    head_dim: int
    layers: int
    qk_norm: bool = False  # RMSNorm on q and k before RoPE: the layer is converted on its pre-features
    norm_eps: float = 1e-6
    score_divisor: float | None = None  # n of the softmax scale n ** -0.5 (None: head_dim, the usual scale)

    @classmethod
    def of(cls, config: Any) -> "Geometry":
        family = family_of(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        groups = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.hidden_size, config.num_attention_heads, groups, head_dim, config.num_hidden_layers,
                   family.qk_norm is not None, float(getattr(config, "rms_norm_eps", 1e-6)),
                   family.score_divisor(config))

    @property
    def kv_values(self) -> int:
        return 2 * self.groups * self.head_dim

    @property
    def input_width(self) -> int:
        """Width of the input the converted matrices act on: the hidden size, or (H+2G)*d pre-features."""
        return (self.heads + 2 * self.groups) * self.head_dim if self.qk_norm else self.hidden

    @property
    def key_dims(self) -> int:
        """G*d: every key dim, the widest rotary key."""
        return self.groups * self.head_dim

    def is_lossless(self, rank: int, rope_dim: int) -> bool:
        """Whether a rotary key of D dims beside a latent of R keeps everything: all key dims rotate (D = G*d)
        and the latent holds the values' full rank."""
        return rope_dim == self.key_dims and rank >= max_latent_rank(self.input_width, 0, self.key_dims)

    def check(self, rank: int, rope_dim: int) -> None:
        """One clear error for an impossible (R, D)."""
        if rope_dim % 2 or not 2 <= rope_dim <= self.groups * self.head_dim:
            raise TransMLAError(f"--rope-dim {rope_dim} must be even and in 2..{self.groups * self.head_dim} (key heads x head_dim)")
        limit = max_latent_rank(self.input_width, self.groups * self.head_dim - rope_dim, self.groups * self.head_dim)
        if not 1 <= rank <= limit:
            raise TransMLAError(f"--kv-lora-rank {rank} is out of range: with --rope-dim {rope_dim} this model allows 1..{limit}")

    def default_rope_dim(self) -> int:
        """64 (DeepSeek's and FlashMLA's width), or all key dims when there are fewer."""
        return min(64, self.groups * self.head_dim)

    def default_rank(self, rope_dim: int) -> int:
        """Half of the source's per-token cache: R + D = G*d."""
        return max(1, self.groups * self.head_dim - rope_dim)
