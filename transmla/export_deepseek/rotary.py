"""Matching each layer's rotary key to the frequencies that stock DeepSeek code computes.

Stock DeepSeek (transformers, vLLM, SGLang) turns rotary pair p of the D-wide key at theta^(-2p/D), the same in
every layer. A converted layer keeps D/2 (frequency, component) slots at the source's frequencies; the export
permutes the slots onto the stock pairs, which works when every layer's frequencies are exactly that set for one
theta. A per-frequency conversion (`--rope-per-frequency`) keeps the D/2 fastest source frequencies
theta_s^(-2i/d), i < D/2, which is the stock set for theta = theta_s^(D/d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import TransMLAError

REL_TOL = 1e-6  # float32 frequencies computed along different paths agree to a few ulps
PLAN_HINT = (
    "convert with `--format deepseek` (or `--rope-per-frequency`), which keeps one rotary component of each of the "
    "D/2 fastest frequencies"
)
SCALING_HINT = (
    "the source's RoPE scaling (llama3, yarn) changed some of the kept frequencies; convert with a --rope-dim "
    "small enough that only unscaled fast frequencies are kept"
)


@dataclass
class RotaryMatch:
    """The stock theta and, per layer, the converted slot that feeds each stock pair."""

    theta: float
    slots: list[list[int]]  # slots[l][p] = converted slot for stock pair p
    max_rel_error: float


def stock_inv_freq(theta: float, rope_dim: int) -> torch.Tensor:
    """Inverse frequencies of DeepSeek's default rotary embedding (float32, as the stock code computes them)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    config = DeepseekV3Config(qk_rope_head_dim=rope_dim, rope_parameters={"rope_type": "default", "rope_theta": theta})
    return DeepseekV3RotaryEmbedding.compute_default_rope_parameters(config)[0].float()


def fitted_theta(freqs: list[float], rope_dim: int) -> float | None:
    """theta such that the sorted frequencies are theta^(-2p/D), by least squares on log f_p (None if f_0 != 1)."""
    f = sorted(freqs, reverse=True)
    if abs(f[0] - 1.0) > REL_TOL or any(x <= 0 for x in f):
        return None
    num = sum(p * math.log(x) for p, x in enumerate(f))
    den = sum(p * p for p in range(len(f)))
    return math.exp(-0.5 * rope_dim * num / den) if den else None


def assign(freqs: list[float], stock: torch.Tensor) -> tuple[list[int], float] | None:
    """Slot of `freqs` for each stock frequency, and the largest relative mismatch (None if they differ)."""
    ours = torch.tensor(freqs, dtype=torch.float32).double()
    order_ours = torch.argsort(ours, descending=True, stable=True)
    order_stock = torch.argsort(stock.double(), descending=True, stable=True)
    a, b = ours[order_ours], stock.double()[order_stock]
    err = float(((a - b).abs() / b.abs().clamp_min(1e-30)).max())
    if err > REL_TOL:
        return None
    slots = [0] * len(freqs)
    for k in range(len(freqs)):
        slots[int(order_stock[k])] = int(order_ours[k])
    return slots, err


def match_rotary(inv_freqs: list[list[float]], rope_dim: int, source_theta: float, head_dim: int,
                 per_frequency: bool = False) -> RotaryMatch:
    """Find theta and the slot permutations, or explain why stock code can not compute these frequencies.

    `per_frequency`: whether the conversion kept one component per frequency (it only chooses the hint)."""
    if any(len(set(freqs)) != len(freqs) for freqs in inv_freqs):
        raise TransMLAError(
            "the rotary key keeps several components of one frequency, but stock DeepSeek code turns every pair at "
            f"a different frequency: {PLAN_HINT}"
        )
    candidates = [source_theta ** (rope_dim / head_dim)]
    fitted = fitted_theta(inv_freqs[0], rope_dim)
    if fitted is not None:
        candidates.append(fitted)
    for theta in candidates:
        stock = stock_inv_freq(theta, rope_dim)
        matched = [assign(freqs, stock) for freqs in inv_freqs]
        if all(m is not None for m in matched):
            return RotaryMatch(theta, [m[0] for m in matched], max(m[1] for m in matched))
    bad = next(
        layer for layer, freqs in enumerate(inv_freqs)
        if assign(freqs, stock_inv_freq(candidates[-1], rope_dim)) is None
    )
    hint = PLAN_HINT
    if per_frequency:
        unscaled = leading_unscaled(inv_freqs[bad], source_theta, head_dim)
        hint = SCALING_HINT + (f" (here --rope-dim {2 * unscaled})" if unscaled else "")
    raise TransMLAError(
        f"the rotary frequencies of layer {bad} are not theta^(-2p/D) for any theta shared by all layers, which is "
        f"all that stock DeepSeek RoPE computes: {hint}"
    )


def leading_unscaled(freqs: list[float], theta: float, head_dim: int) -> int:
    """How many of the fastest frequencies are the plain theta^(-2i/d), i = 0, 1, ... (untouched by RoPE scaling)."""
    count = 0
    for i, f in enumerate(sorted(freqs, reverse=True)):
        plain = theta ** (-2.0 * i / head_dim)
        if abs(f - plain) > REL_TOL * plain:
            break
        count += 1
    return count


def rope_rows(slots: list[int], rope_dim: int, interleave: bool) -> list[int]:
    """Converted rotate-half dims (pair p = dims p, p + D/2) in the exported order.

    Interleaved (DeepSeek's checkpoints, vLLM, SGLang): stock pair p is dims (2p, 2p + 1); otherwise (p, p + D/2).
    """
    half = rope_dim // 2
    if interleave:
        return [s + m * half for s in slots for m in (0, 1)]
    return [s + m * half for m in (0, 1) for s in slots]
