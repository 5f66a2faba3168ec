r"""Local refinement of one converted layer: gradient steps on its new factors against the source layer.

The closed-form fit (`whiten`, the value refit) minimises second-order proxies of the attention error: it does
not see the softmax. Refinement minimises the error itself, the relative mean square

    L = E_t |o_conv(x_t) - y_t|^2 / E_t |y_t|^2

between the converted attention's output (after o_proj) on the inputs x that the already converted layers 0..l-1
produce (normalised) and a target y, over q_proj, kv_a_proj and kv_b_proj (and o_proj's bias where the fit made
one; with `train_output`, o_proj's weight too; everything outside attention stays the source's). The target is

* `local`: the source layer's attention output on the same inputs x;
* `residual`: the source layer's attention output on the source model's own inputs (the hidden states of the
  unconverted layers 0..l-1, carried beside the converted ones), plus the drift itself (source hidden state
  minus converted hidden state): the converted residual stream after attention is fitted to the source's, so
  that a layer also learns to undo what the layers before it lost (sequential targets, as in AA-SVD).

(The source layer's output on the source inputs without the drift term measured worse than `local` on the dev
texts; docs/calibration.md.)

Adam with a cosine schedule, over random calibration sequences drawn from a seeded generator. The last
`HOLD_OUT` share of the sequences is never trained on: the layer keeps the refined factors only if they lower
the loss there. Targets are computed once per layer (they do not change while the layer trains).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .attention import SourceAttention

TRAINED = ("q_proj", "kv_a_proj", "kv_b_proj")
HOLD_OUT = 0.125  # share of the calibration sequences that only measures
TARGETS = ("local", "residual")


@dataclass
class RefineSettings:
    """How many steps, at which learning rate, on how many calibration sequences per step, against which target."""

    steps: int
    lr: float = 1e-3  # relative: each tensor's step is scaled by its RMS (Adam's update is about lr * RMS)
    batch: int = 4
    seed: int = 0
    target: str = "residual"
    train_output: bool = True  # o_proj's weight trains too

    @property
    def tracks_source(self) -> bool:
        """Whether the calibration must also carry the source model's own hidden states."""
        return self.steps > 0 and self.target != "local"


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
    norm = runner.norm(layer)
    targets = layer_targets(runner, layer, settings.target)  # [N, T, hidden]
    measure = lambda: relative_error(runner, norm, module, targets, range(train_rows, runner.samples))  # noqa: E731
    before = measure()
    trained = TRAINED + (("o_proj",) if settings.train_output else ())
    params = {name: p for name, p in module.named_parameters() if name.split(".")[0] in trained or name == "o_proj.bias"}
    scales = {name: float(p.detach().pow(2).mean().sqrt().clamp_min(1e-12)) for name, p in params.items()}
    optimizer = torch.optim.Adam([{"params": [p], "lr": settings.lr * scales[n]} for n, p in params.items()],
                                 betas=(0.9, 0.99), fused=runner.device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, settings.steps) / settings.steps)))
    for p in module.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + layer)
    energy = float(targets[:train_rows].double().pow(2).mean().clamp_min(1e-30))
    with torch.enable_grad():
        for _ in range(settings.steps):
            rows = torch.randint(train_rows, (min(settings.batch, train_rows),), generator=generator)
            x = norm(runner.hidden[rows].to(runner.device))
            loss = (attention_output(runner, module, x) - targets[rows].to(runner.device)).pow(2).mean() / energy
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


@torch.no_grad()
def layer_targets(runner: Any, layer: int, target: str) -> torch.Tensor:
    """The target y of every calibration sequence [N, T, hidden] (float32, where the hidden states live)."""
    inputs = runner.hidden if target == "local" else runner.source_hidden
    norm = runner.norm(layer)
    out = runner.buffer()
    for start in range(0, runner.samples, runner.batch):
        rows = slice(start, min(start + runner.batch, runner.samples))
        y = runner.source_output(layer, norm(inputs[rows].to(runner.device)))
        if target == "residual":
            y = y + (runner.source_hidden[rows] - runner.hidden[rows]).to(y)
        out[rows] = y.to(out.device)
    return out


def attention_output(runner: Any, module: Any, x: torch.Tensor) -> torch.Tensor:
    """The converted attention's output on x (full causal attention, no cache), with the bias of the fit (the
    source's own o_proj bias is added after refinement)."""
    return module(x, runner.positions.expand(x.shape[0], -1), None, None, None)


@torch.no_grad()
def relative_error(runner: Any, norm: Any, module: Any, targets: torch.Tensor, rows: range) -> float:
    """L on the calibration sequences `rows`."""
    total = energy = 0.0
    for start in range(rows.start, rows.stop, runner.batch):
        part = slice(start, min(start + runner.batch, rows.stop))
        target = targets[part].to(runner.device)
        total += float((attention_output(runner, module, norm(runner.hidden[part].to(runner.device))) - target).double().pow(2).sum())
        energy += float(target.double().pow(2).sum())
    return total / max(energy, 1e-30)
