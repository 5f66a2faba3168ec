r"""Moving RoPE into a small rotary key shared by all heads.

Notation (one layer): G key heads of width d, H query heads, query head h reads key head g(h). RoPE in the
rotate-half layout turns dims (i, i + d/2) of every head at frequency theta_i, i < d/2. Write k_g^i and q_h^i
for these 2-vectors and R_i(t) for the 2x2 rotation by t * theta_i. The score is

    s_h(t, s) = sum_i (R_i(t) q_h^i) . (R_i(s) k_g(h)^i) = sum_i q_h^i . R_i(s - t) k_g(h)^i.

**Mixing key heads per frequency.** For each frequency take an orthogonal G x G matrix U_i and new key
components k'_ij = sum_g U_i[j, g] k_g^i. U_i mixes heads, not the two dims of a pair, so it commutes with
R_i, and since U_i^T U_i = I:

    q_h^i . R_i k_g^i = sum_j (U_i[j, g] q_h^i) . R_i k'_ij.                                          (1)

Each component (i, j) is one 2-dim rotary key shared by *all* query heads, query head h seeing it through
the query U_i[j, g(h)] q_h^i. Keeping every (i, j) gives a shared rotary key of G*d dims and reproduces the
scores exactly. A budget of D dims keeps D/2 components; each dropped one loses its rotation (R_i -> I in (1))
and is then a plain, position-free key that joins the latent (see `factorize`).

**Which components to keep.** U_i diagonalises the key energy of frequency i, C_i = sum_pair E[k^i k^i^T]
(G x G, summed over both dims of the pair; from the weights alone E[x x^T] = I), so that the energy lands in
the first components (TransMLA's RoRoPE). Dropping the rotation of (i, j) changes a score by
q . (R_i(Delta) - I) k', whose mean square over distances Delta in [0, L] is about
|q_ij|^2 |k'_ij|^2 * 2 (1 - sin(theta_i L) / (theta_i L)): low frequencies barely rotate over a context and cost
almost nothing to drop. The components with the largest such cost are kept, so a high frequency may keep
several components and a low one none. L (`--rope-context`) defaults to 16: attention weight sits mostly on
nearby tokens, so short distances are the ones that matter. Weights-only on SmolLM2-135M (R=320, D=64,
perplexity on 2 windows of the WikiText-2 validation text, original 13.8): L = 4096: 376, 256: 209, 64: 110,
16: 69.8, 4: 69.8. Calibrated methods replace this prior by the measured attention distances (`rope_select`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RopePlan:
    """Per-frequency head mixing and the kept rotary components of one layer."""

    rotations: torch.Tensor  # [d/2, G, G]: U_i, rows are components
    kept: list[tuple[int, int]]  # D/2 pairs (frequency i, component j), sorted
    inv_freq: torch.Tensor  # [d/2] source inverse frequencies

    @property
    def kept_inv_freq(self) -> list[float]:
        return [float(self.inv_freq[i]) for i, _ in self.kept]

    def dropped(self) -> list[tuple[int, int]]:
        """Components that lose their rotation and join the latent, in (frequency, component) order."""
        kept = set(self.kept)
        n_freq, groups = self.rotations.shape[:2]
        return [(i, j) for i in range(n_freq) for j in range(groups) if (i, j) not in kept]


def source_rope(config) -> tuple[torch.Tensor, float]:
    """The source model's inverse frequencies (any RoPE scaling applied) and cos/sin scaling factor."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config=config)
    return rotary.inv_freq.double().cpu(), float(rotary.attention_scaling)


def pair_blocks(weight: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """Rows of a [G*d, ...] projection arranged as [d/2 frequencies, 2 pair dims, G heads, ...]."""
    w = weight.reshape(groups, 2, head_dim // 2, *weight.shape[1:])
    return w.permute(2, 1, 0, *range(3, w.dim()))


def unpair_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of `pair_blocks`: [d/2, 2, G, ...] back to [G*d, ...]."""
    w = blocks.permute(2, 1, 0, *range(3, blocks.dim()))
    return w.reshape(-1, *blocks.shape[3:])


def key_rotations(key_cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-rotations U_i (rows sorted by decreasing energy, deterministic signs) and energies [d/2, G]."""
    energy, vectors = torch.linalg.eigh(key_cov)  # ascending
    energy, vectors = energy.flip(-1), vectors.flip(-1)
    rows = vectors.transpose(-1, -2)
    # Sign convention: the largest-magnitude entry of each component is positive.
    idx = rows.abs().argmax(-1, keepdim=True)
    rows = rows * torch.sign(torch.gather(rows, -1, idx))
    return rows, energy.clamp_min(0)


def drop_cost_weight(inv_freq: torch.Tensor, context: int) -> torch.Tensor:
    """Mean over distances in [0, context] of |R(Delta theta) - I|^2 / |x|^2 = 2 (1 - cos(Delta theta))."""
    x = inv_freq * context
    return 2.0 * (1.0 - torch.where(x > 1e-6, torch.sin(x) / x, 1.0 - x * x / 6))


def plan_rope(
    key_cov: torch.Tensor,
    query_energy: torch.Tensor,
    inv_freq: torch.Tensor,
    rope_dim: int,
    context: int = 4096,
    per_frequency: bool = False,
) -> RopePlan:
    """Choose U_i and the D/2 kept components.

    key_cov: [d/2, G, G] key energy per frequency; query_energy: [d/2, G] query energy of the heads reading
    each key head at frequency i (summed over heads and pair dims). `per_frequency` keeps the best component of
    each of the D/2 fastest frequencies instead, so the kept frequencies are the standard theta^(-2p/D) with
    theta' = theta^(D/d) (the source's own at D = d), as stock DeepSeek rotary code computes them.
    """
    rotations, energy = key_rotations(key_cov)
    # Query energy seen by component j: sum_g U_i[j, g]^2 Q_i[g].
    q_seen = torch.einsum("ijg,ig->ij", rotations**2, query_energy)
    cost = energy * q_seen * drop_cost_weight(inv_freq, context)[:, None]
    n_freq, groups = energy.shape
    if per_frequency:
        if rope_dim // 2 > n_freq:
            raise ValueError(f"per-frequency selection keeps at most {n_freq} frequencies, not {rope_dim // 2}")
        kept = [(i, int(torch.argmax(cost[i]))) for i in range(rope_dim // 2)]
        return RopePlan(rotations=rotations, kept=kept, inv_freq=inv_freq)
    # Break ties by frequency then component, so equal costs (e.g. zero weights) give a stable choice.
    order = sorted(range(n_freq * groups), key=lambda k: (-float(cost.flatten()[k]), k))
    kept = sorted((k // groups, k % groups) for k in order[: rope_dim // 2])
    return RopePlan(rotations=rotations, kept=kept, inv_freq=inv_freq)
