"""Spreading a KV-cache budget over layers and between the latent (R) and the rotary key (D).

For a layer and a rotary width D, the covariance-aware SVD (`whiten`) of the position-free keys and the values
has squared singular values sigma_1^2 >= sigma_2^2 >= ...: keeping rank R leaves a loss of sum_{k > R}
sigma_k^2, and dropping rotary components costs their summed drop cost (`rope`), both in the same units
(weighted squared attention-output error per token). With D fixed, the ranks that minimise the summed loss under
sum_l R_l = L * R are the globally largest sigma^2 (each layer's list is sorted): water-filling (CARE).
`--rank-allocation loss` compares the whitened losses as they are: an error added to the residual stream
travels on largely unchanged, so equal units mean equal harm. `energy` divides each layer's losses by its
residual-stream energy first (a relative error). `--kv-budget` also tries every D on a grid and keeps the one
with the least total loss; at D = G*d and R = G*d (100% of the source's cache) both losses are zero, so that
split is exact.

The proxy compares layers only roughly (no later layer's response to an error is modelled), so water-filling
never takes a layer below `RANK_FLOOR` of the uniform rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from transmla.errors import TransMLAError

from .attention import SourceAttention
from .recipe import LayerSettings, layer_plan
from .rope import split_rotary
from .statistics import LayerStats
from .whiten import weighted_spectrum, whiten_problem

RANK_FLOOR = 0.5


@dataclass
class Sizes:
    """The rotary width D (all layers) and the latent width of every layer."""

    rope_dim: int
    ranks: list[int]
    losses: dict[int, float] | None = None  # loss per candidate D, when a budget was split
    measure: str = "whitened proxy"  # what `losses` are

    def summary(self) -> dict[str, Any]:
        """What the conversion record (config `conversion`) notes about the chosen sizes."""
        out: dict[str, Any] = {}
        if self.losses is not None:
            out["kv_budget_split"] = {"rope_dim": self.rope_dim, "measure": self.measure,
                                      "loss": {str(k): v for k, v in self.losses.items()}}
        return out


@dataclass
class LayerSpectrum:
    """One layer's loss curves: per candidate D, the rotary loss and the latent's squared singular values."""

    rope_loss: dict[int, float]
    sigma2: dict[int, torch.Tensor]  # descending, length = the largest useful rank for that D
    scale: float = 1.0  # the layer's losses are divided by this (e.g. its residual-stream energy)

    def latent_loss(self, rope_dim: int, rank: int) -> float:
        return float(self.sigma2[rope_dim][rank:].sum()) / self.scale

    def max_rank(self, rope_dim: int) -> int:
        return int(self.sigma2[rope_dim].numel())


def allocate_ranks(spectra: list[LayerSpectrum], rope_dim: int, total_rank: int, min_rank: int | None = None) -> list[int]:
    """Per-layer ranks summing to `total_rank` (capped by each layer's useful maximum) by water-filling; no layer
    gets less than `min_rank` (default: `RANK_FLOOR` of the uniform rank)."""
    if min_rank is None:
        min_rank = max(1, int(RANK_FLOOR * total_rank / len(spectra)))
    caps = [s.max_rank(rope_dim) for s in spectra]
    if total_rank < min_rank * len(spectra):
        raise TransMLAError(f"a total latent width of {total_rank} can not give every layer {min_rank}")
    total_rank = min(total_rank, sum(caps))
    ranks = [min(min_rank, c) for c in caps]
    gains = []
    for layer, s in enumerate(spectra):
        values = (s.sigma2[rope_dim] / s.scale).tolist()
        gains += [(v, layer, k) for k, v in enumerate(values) if k >= ranks[layer]]
    gains.sort(key=lambda g: (-g[0], g[1], g[2]))
    for _, layer, _ in gains[: total_rank - sum(ranks)]:
        ranks[layer] += 1
    return ranks


def total_loss(spectra: list[LayerSpectrum], rope_dim: int, ranks: list[int]) -> float:
    return sum(s.rope_loss[rope_dim] / s.scale + s.latent_loss(rope_dim, r) for s, r in zip(spectra, ranks))


def choose_split(spectra: list[LayerSpectrum], values_per_layer: int, candidates: list[int],
                 allocation: str = "uniform") -> tuple[int, list[int], dict[int, float]]:
    """(D, per-layer R, loss per candidate D) for `values_per_layer` cached values per layer on average."""
    losses: dict[int, float] = {}
    best: tuple[float, int, list[int]] | None = None
    layers = len(spectra)
    for rope_dim in sorted(candidates, reverse=True):
        rank = values_per_layer - rope_dim
        if rank < 1:
            continue
        if allocation != "uniform":
            ranks = allocate_ranks(spectra, rope_dim, rank * layers)
        else:
            ranks = [min(rank, s.max_rank(rope_dim)) for s in spectra]
        losses[rope_dim] = total_loss(spectra, rope_dim, ranks)
        # Larger D first: on a tie (e.g. both exact) the wider rotary key wins.
        if best is None or losses[rope_dim] < best[0] * (1 - 1e-9):
            best = (losses[rope_dim], rope_dim, ranks)
    if best is None:
        raise TransMLAError(f"a budget of {values_per_layer} values per token and layer leaves no room for a latent")
    return best[1], best[2], losses


def split_grid(geo: Any, values: int, widest: int | None = None) -> list[int]:
    """Rotary widths D worth measuring for `values` cached values per layer: multiples k * d/4 of a quarter head
    (k = 1, 2, 3, 4, 5, 6, 8, 12, 16, 24, ...: finer where D is small), up to every key dim (or `widest`) and leaving
    R >= d/4."""
    step = max(2, geo.head_dim // 4 // 2 * 2)
    top = min(geo.key_dims if widest is None else widest, values - step)
    multiples = sorted({m * 2**i for m in (1, 3) for i in range(16)} | {5})  # 1, 2, 3, 4, 5, 6, 8, 12, 16, 24, ...
    grid = [k * step for k in multiples if k * step <= top]
    return grid or [min(geo.key_dims, max(2, (values - 1) // 2 * 2))]


def midpoints(grid: list[int], best: int, step: int) -> list[int]:
    """Untried widths halfway between `best` and its neighbours on `grid` (multiples of `step`)."""
    i = grid.index(best)
    out = []
    for other in grid[max(0, i - 1):i] + grid[i + 1:i + 2]:
        mid = (best + other) // 2 // step * step
        if mid not in grid and mid != best:
            out.append(mid)
    return out


def measured_layers(layers: int, count: int) -> list[int]:
    """`count` evenly spaced layers, the first and the last among them."""
    if count >= layers:
        return list(range(layers))
    return sorted({round(i * (layers - 1) / (count - 1)) for i in range(count)})


def rope_candidates(geo: Any, fixed: int | None) -> list[int]:
    """D on a grid: quarter and half head widths, then whole and half-head steps up to every key dim."""
    if fixed is not None:
        return [fixed]
    full = geo.groups * geo.head_dim
    grid = {geo.head_dim // 4, geo.head_dim // 2} | set(range(geo.head_dim // 2, full + 1, geo.head_dim // 2)) | {full}
    return sorted(d for d in grid if d >= 2 and d % 2 == 0)


def layer_spectrum(src: SourceAttention, stats: LayerStats, inv_freq: torch.Tensor, settings: LayerSettings,
                   candidates: list[int], scale: float) -> LayerSpectrum:
    """The layer's rotary loss and latent spectrum for each candidate D, in the units of the `whiten` loss."""
    rope_loss, sigma2 = {}, {}
    for rope_dim in candidates:
        plan = layer_plan(src, stats, inv_freq, rope_dim, settings)
        split, q_nope, q_nope_bias = split_rotary(src, plan)
        problem = whiten_problem(src, stats, split.nope_to_heads, split.key_nope, q_nope, q_nope_bias, settings)
        sigma2[rope_dim] = weighted_spectrum(problem).cpu()
        rope_loss[rope_dim] = settings.score_weight * plan.dropped_cost() / src.score_scale_divisor
    return LayerSpectrum(rope_loss, sigma2, scale)
