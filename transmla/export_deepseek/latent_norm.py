r"""DeepSeek's RMSNorm on the latent, made (nearly) the identity.

Stock DeepSeek normalises the latent before kv_b_proj: n = w * c' / sqrt(mean(c'^2) + eps), with c' the latent
rows of kv_a_proj_with_mqa. The converted model uses c directly. The export writes c' = a * c (a per-channel
scale folded into kv_a_proj_with_mqa's latent rows) and w = 1 / a-like weights, so that n ~ c and kv_b_proj is
unchanged. Two ways:

**exact** (default, no data). Make the latent so small that eps dominates the mean square: with a = alpha,
n = w alpha c / sqrt(eps) / sqrt(1 + beta), beta = alpha^2 mean(c^2) / eps, so w = sqrt(eps) / alpha gives
n = c (1 + beta)^(-1/2). The latent's input is x = g * h / rms(h) (the layer's input RMSNorm), so
|c| <= ||W_lat diag(g)||_2 sqrt(hidden) = B for every token, and alpha = sqrt(delta eps R) / B bounds beta by
delta: every latent is reproduced to a relative error of at most delta / 2. This needs the norm's eps to be the
one assumed (1e-6: transformers hard-codes it; vLLM and SGLang read `rms_norm_eps`, which the export sets to it)
and tiny kv_a_proj latent rows (fine in float32 / bfloat16, whose exponent range is float32's; not in float16).

**calibrated** (weights of ordinary size, e.g. for fine-tuning the export). Fit a per-channel a on calibration
latents so that mean((a c)^2) = sum_r m_r c_r^2 ~= 1 (least squares in m = a^2 / R), and w = 1 / a. Each token's
keys and values are then scaled by 1 / sqrt(sum_r m_r c_r^2): an error that the statistics of the latent set and
that is measured and recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STOCK_EPS = 1e-6  # DeepseekV3RMSNorm's default, used for kv_a_layernorm by transformers
EXACT_DELTA = 1e-6  # largest eps-relative mean square of the scaled latent (relative error <= delta / 2)


@dataclass
class LatentNorm:
    """One layer's latent scaling (folded into kv_a_proj_with_mqa) and kv_a_layernorm weight."""

    pre_scale: torch.Tensor  # [R_l]
    weight: torch.Tensor  # [R_out]
    error: float  # exact: bound on the relative latent error; calibrated: rms of the per-token scale error


def latent_bound(latent_rows: torch.Tensor, input_norm: torch.Tensor) -> float:
    """B = ||W_lat diag(g)||_2 sqrt(hidden): no token's latent is longer."""
    w = latent_rows.double() * input_norm.double()[None, :]
    return float(torch.linalg.matrix_norm(w, ord=2)) * math.sqrt(latent_rows.shape[1])


def exact_norm(latent_rows: torch.Tensor, input_norm: torch.Tensor, rank_out: int,
               eps: float = STOCK_EPS, delta: float = EXACT_DELTA) -> LatentNorm:
    """Scale the latent into the eps-dominated regime, where RMSNorm is a fixed scale."""
    bound = latent_bound(latent_rows, input_norm)
    alpha = math.sqrt(delta * eps * rank_out) / bound if bound > 0 else 1.0
    rank = latent_rows.shape[0]
    weight = torch.full((rank_out,), math.sqrt(eps) / alpha, dtype=torch.float64)
    return LatentNorm(torch.full((rank,), alpha, dtype=torch.float64), weight, delta / 2)


def calibrated_norm(latents: torch.Tensor, rank_out: int, eps: float = STOCK_EPS, floor: float = 1e-3) -> LatentNorm:
    """Per-channel scale fitted on calibration latents [N, R_l] so that the RMSNorm denominator is about 1."""
    c2 = latents.double().pow(2)
    target = torch.ones(c2.shape[0], 1, dtype=torch.float64)
    m = torch.linalg.lstsq(c2, target).solution[:, 0]
    # Every channel keeps a positive weight: a zero would erase it from the normalised latent.
    positive = m[m > 0]
    low = floor * float(positive.mean()) if positive.numel() else 1.0 / float(c2.mean(0).sum().clamp_min(1e-30))
    m = m.clamp_min(low)
    scale = (c2 @ m + eps).rsqrt()  # the factor each token's latent gets
    a = (rank_out * m).sqrt()
    weight = torch.ones(rank_out, dtype=torch.float64)
    weight[: a.numel()] = 1.0 / a
    return LatentNorm(a, weight, float((scale - 1).pow(2).mean().sqrt()))
