r"""Local refinement of one converted layer: gradient steps on its new factors against the source layer.

The closed-form fit (`whiten`, the value refit) minimises second-order proxies of the attention error: it does
not see the softmax. Refinement minimises the error itself, the relative mean square

    L = E_t |o_conv(x_t) - o_src(x_t)|^2 / E_t |o_src(x_t)|^2

between the converted attention's output (after o_proj) and the source layer's on the same inputs x (the
hidden states that the already converted layers 0..l-1 produce, normalised), over q_proj, kv_a_proj and
kv_b_proj (and o_proj's bias where the fit made one; o_proj's weight and everything outside attention stay
the source's). Adam with a cosine schedule, over
random calibration sequences drawn from a seeded generator. The last `HOLD_OUT` share of the sequences is never
trained on: the layer keeps the refined factors only if they lower the loss there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .attention import SourceAttention

TRAINED = ("q_proj", "kv_a_proj", "kv_b_proj")
HOLD_OUT = 0.125  # share of the calibration sequences that only measures


@dataclass
class RefineSettings:
    """How many steps, at which learning rate, on how many calibration sequences per step."""

    steps: int
    lr: float = 1e-3  # relative: each tensor's step is scaled by its RMS (Adam's update is about lr * RMS)
    batch: int = 4
    seed: int = 0


@dataclass
class RefineReport:
    """The layer's held-out loss before and after, and whether the refined factors were kept."""

    before: float
    after: float
    kept: bool


def refine_layer(runner: Any, layer: int, src: SourceAttention, attention: dict[str, torch.Tensor], rank: int,
                 rope_inv_freq: list[float], settings: RefineSettings) -> tuple[dict[str, torch.Tensor], RefineReport]:
    """The layer's tensors after `settings.steps` steps (or as given, if that did not help on held-out text)."""
    module = runner.converted_layer(layer, attention, rank, rope_inv_freq).self_attn
    held = max(1, math.ceil(runner.samples * HOLD_OUT)) if runner.samples > 1 else 0
    train_rows = runner.samples - held
    if train_rows < 1:
        return attention, RefineReport(math.nan, math.nan, False)
    measure = lambda: relative_error(runner, layer, module, range(train_rows, runner.samples))  # noqa: E731
    before = measure()
    params = {name: p for name, p in module.named_parameters() if name.split(".")[0] in TRAINED or name == "o_proj.bias"}
    scales = {name: float(p.detach().pow(2).mean().sqrt().clamp_min(1e-12)) for name, p in params.items()}
    optimizer = torch.optim.Adam([{"params": [p], "lr": settings.lr * scales[n]} for n, p in params.items()],
                                 betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, settings.steps) / settings.steps)))
    for p in module.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + layer)
    norm = runner.norm(layer)
    with torch.enable_grad():
        for _ in range(settings.steps):
            rows = torch.randint(train_rows, (min(settings.batch, train_rows),), generator=generator)
            x = norm(runner.hidden[rows].to(runner.device))
            with torch.no_grad():
                target, scale = source_output(runner, layer, x)
            loss = (attention_output(runner, module, x) - target).pow(2).mean() / scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    after = measure()
    if not after < before:
        return attention, RefineReport(before, after, False)
    refined = dict(attention)
    for name, p in params.items():
        refined[name] = p.detach().to(attention[name].dtype)
    return refined, RefineReport(before, after, True)


def source_output(runner: Any, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The source attention's output after o_proj (without its bias) on x, and its mean square."""
    target = runner.source_output(layer, x)
    return target, target.pow(2).mean().clamp_min(1e-30)


def attention_output(runner: Any, module: Any, x: torch.Tensor) -> torch.Tensor:
    """The converted attention's output on x (full causal attention, no cache), with the bias of the fit (the
    source's own o_proj bias is added after refinement)."""
    return module(x, runner.positions.expand(x.shape[0], -1), None, None, None)


@torch.no_grad()
def relative_error(runner: Any, layer: int, module: Any, rows: range) -> float:
    """L on the calibration sequences `rows`."""
    norm = runner.norm(layer)
    total = energy = 0.0
    for start in range(rows.start, rows.stop, runner.batch):
        x = norm(runner.hidden[start:min(start + runner.batch, rows.stop)].to(runner.device))
        target, _ = source_output(runner, layer, x)
        total += float((attention_output(runner, module, x) - target).double().pow(2).sum())
        energy += float(target.double().pow(2).sum())
    return total / max(energy, 1e-30)
