"""The conversion methods, in one registry: each one's name, whether it reads calibration text, how it factors a
layer's position-free keys and values into the latent, which refits follow, and what the conversion records.

Every method runs the same recipe around its factorisation (`recipe`); nothing else compares method names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from transmla.errors import TransMLAError

from .attention import SourceAttention
from .latent import LatentFactors, balanced_pca, svd_latent
from .rope import RotarySplit
from .statistics import LayerStats
from .whiten import weighted_latent, whiten_problem


@dataclass
class LayerFit:
    """What a factorisation sees of one layer: the source, its input moments, the rotary split and the
    position-free query (shrunk where the method asks), the latent width and the per-layer settings."""

    src: SourceAttention
    stats: LayerStats
    split: RotarySplit
    q_nope: torch.Tensor
    q_nope_bias: torch.Tensor | None
    rank: int
    settings: Any  # recipe.LayerSettings


# The latent factors, and the mean attention-averaged input whose value error o_proj's bias takes (or None).
Factorisation = Callable[[LayerFit], tuple[LatentFactors, "torch.Tensor | None"]]


@dataclass(frozen=True)
class Method:
    """One way of converting a layer."""

    name: str
    summary: str  # for --help
    calibrated: bool  # measures activations on calibration text
    factor: Factorisation
    shrinks_queries: bool  # folds the measured average rotation into the dropped components' queries
    refits_values: bool  # least-squares value up-projection under the converted layer's own attention (--refit-values)
    records: tuple[str, ...] = ()  # settings of `LayerStream.record` that its conversion record keeps


def svd_factors(fit: LayerFit) -> tuple[LatentFactors, None]:
    return svd_latent(fit.split.key_nope, fit.src.v, fit.rank, fit.settings.latent_key_scale), None


def pca_factors(fit: LayerFit) -> tuple[LatentFactors, None]:
    return balanced_pca(fit.split.key_nope, fit.src.v, fit.stats.second.to(fit.src.k.dtype), fit.rank), None


def whiten_factors(fit: LayerFit) -> tuple[LatentFactors, torch.Tensor | None]:
    src, split, settings = fit.src, fit.split, fit.settings
    problem = whiten_problem(src, fit.stats, split.nope_to_heads, split.key_nope, fit.q_nope, fit.q_nope_bias, settings)
    latent = weighted_latent(problem, fit.rank, iterations=settings.iterations)
    return latent, fit.stats.value_mean.to(src.k.dtype) if settings.output_bias else None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("whiten", "covariance-aware: score and output errors on calibration activations", True, whiten_factors,
           shrinks_queries=True, refits_values=True, records=("score_weight", "refit_values", "output_bias")),
    Method("pca", "TransMLA's balanced-KV PCA of activations", True, pca_factors, shrinks_queries=True,
           refits_values=False),
    Method("svd", "weights only: for exactness checks", False, svd_factors, shrinks_queries=False, refits_values=False),
)}


def method(name: str) -> Method:
    """The method called `name`, or one clear error naming them all."""
    if name not in METHODS:
        raise TransMLAError(f"--method {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def calibrated_methods() -> list[str]:
    return [name for name, m in METHODS.items() if m.calibrated]
