"""The layer loop of `convert` for every method: sizes (--kv-budget, --rank-allocation), statistics, refits.

Weights-only (`svd`) layers are converted independently. Calibrated layers (`pca`, `whiten`) are converted in
order on a `LayerwiseRunner`: statistics of layer l's inputs (as produced by converted layers 0..l-1), the
layer's conversion, an optional least-squares refit of its values under its own attention weights, then the
converted layer is run to produce layer l+1's inputs. Sizes that depend on every layer (per-layer ranks, the
rotary width under a budget) come from a first pass through the source model that only measures.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .budget import LayerSpectrum, allocate_ranks, choose_split
from .calibrate import LayerStats, LayerwiseRunner, check_offload_mode
from .calibrated import METHODS, LayerSettings, convert_layer, layer_plan, replace_values, whiten_problem
from .errors import TransMLAError
from .mla_layer import on_pre_features
from .rope_select import folded_split
from .whiten import weighted_spectrum

CALIBRATED = ("pca", "whiten")
ALLOCATIONS = ("uniform", "energy")
FREQFOLD_AUTO = (1, 2, 4)


@dataclass
class Sizes:
    """The rotary width D (all layers) and the latent width of every layer."""

    rope_dim: int
    ranks: list[int]
    losses: dict[int, float] | None = None  # proxy loss per candidate D, when a budget was split

    def summary(self) -> dict[str, Any]:
        """What the conversion record (config `conversion`) notes about the chosen sizes."""
        out: dict[str, Any] = {}
        if self.losses is not None:
            out["kv_budget_split"] = {"rope_dim": self.rope_dim, "proxy_loss": {str(k): v for k, v in self.losses.items()}}
        return out


def layer_settings(options: Any) -> LayerSettings:
    calibrated = options.method in CALIBRATED
    fold = getattr(options, "freqfold", 1)
    return LayerSettings(
        method=options.method,
        rope_select=getattr(options, "rope_select", "rotate"),
        freqfold=1 if str(fold) == "auto" else int(fold),
        shrink=calibrated and getattr(options, "query_shrink", True),
        key_weight=getattr(options, "score_weight", 30.0),
        rope_context=options.rope_context,
        per_frequency=getattr(options, "rope_per_frequency", False),
    )


def identity_stats(hidden: int, heads: int, head_dim: int, dtype: torch.dtype = torch.float64) -> LayerStats:
    """Statistics of isotropic inputs with no attention pattern: what the weights-only method assumes."""
    eye = torch.eye(hidden, dtype=dtype)
    return LayerStats(1, torch.zeros(hidden, dtype=dtype), eye, torch.zeros(heads, head_dim // 2, 2, dtype=dtype),
                      torch.zeros(heads, hidden, dtype=dtype), eye)


def calibration_ids(source: Any, options: Any, tokenizer: Any) -> torch.LongTensor:
    from .data import calibration_windows, load_text

    calib_file, calib_dataset = getattr(options, "calib_file", None), getattr(options, "calib_dataset", None)
    if calib_file is None and calib_dataset is None:
        raise TransMLAError(f"--method {options.method} needs calibration text: pass --calib-file FILE or --calib-dataset NAME")
    text = load_text(text_file=calib_file, dataset=calib_dataset, split="validation" if calib_dataset else "test")
    return calibration_windows(tokenizer, text, options.calib_seq_len, options.calib_samples, seed=getattr(options, "calib_seed", 0))


def rope_candidates(geo: Any, fixed: int | None) -> list[int]:
    """D on a grid: quarter and half head widths, then whole and half-head steps up to every key dim."""
    if fixed is not None:
        return [fixed]
    full = geo.groups * geo.head_dim
    grid = {geo.head_dim // 4, geo.head_dim // 2} | set(range(geo.head_dim // 2, full + 1, geo.head_dim // 2)) | {full}
    return sorted(d for d in grid if d >= 2 and d % 2 == 0)


def layer_spectrum(src: Any, stats: LayerStats, inv_freq: torch.Tensor, settings: LayerSettings,
                   candidates: list[int], scale: float) -> LayerSpectrum:
    """The layer's rotary loss and latent spectrum for each candidate D, in the units of the `whiten` loss."""
    rope_loss, sigma2 = {}, {}
    for rope_dim in candidates:
        plan = layer_plan(src, stats, inv_freq, rope_dim, settings)
        split, q_nope, q_nope_bias = folded_split(src, plan)
        problem = whiten_problem(src, stats, split.nope_to_heads, split.key_nope, q_nope, q_nope_bias, settings)
        sigma2[rope_dim] = weighted_spectrum(problem).cpu()
        rope_loss[rope_dim] = settings.key_weight * plan.dropped_cost() / src.head_dim
    return LayerSpectrum(rope_loss, sigma2, scale)


class LayerStream:
    """Produces each layer's converted attention tensors, in order."""

    def __init__(self, source: Any, geo: Any, options: Any, inv_freq: torch.Tensor, scaling: float,
                 read_attention: Any, progress: bool = True, settings: LayerSettings | None = None,
                 calibrate: bool | None = None, scratch_dir: Path | None = None) -> None:
        self.source, self.geo, self.options = source, geo, options
        self.scratch_dir = scratch_dir  # where calibration hidden states go when they do not fit in memory
        self.inv_freq, self.scaling, self.read = inv_freq, scaling, read_attention
        self.device = torch.device(options.device)
        self.settings = settings or layer_settings(options)
        self.progress = progress
        self.calibrated = options.method in CALIBRATED if calibrate is None else calibrate
        if self.settings.key_weight <= 0:
            raise TransMLAError(f"--score-weight {self.settings.key_weight} must be positive")
        check_offload_mode(getattr(options, "calib_offload", "auto"))
        self.ids = calibration_ids(source, options, source.require_tokenizer("calibration text")) if self.calibrated else None
        allocation = getattr(options, "rank_allocation", "uniform")
        if allocation not in ALLOCATIONS:
            raise TransMLAError(f"--rank-allocation {allocation!r} is not one of {', '.join(ALLOCATIONS)}")
        self.allocation = allocation

    def record(self, sizes: Sizes) -> dict[str, Any]:
        """Settings worth keeping in the checkpoint's `conversion` record."""
        o = self.options
        out: dict[str, Any] = {"rope_select": self.settings.rope_select, "freqfold": o.freqfold,
                               "rank_allocation": self.allocation, "kv_budget": o.kv_budget}
        if self.calibrated:
            out |= {"calibration": {"file": str(o.calib_file) if o.calib_file else None, "dataset": o.calib_dataset,
                                    "samples": o.calib_samples, "seq_len": o.calib_seq_len, "seed": o.calib_seed},
                    "query_shrink": self.settings.shrink}
            if o.method == "whiten":
                out |= {"score_weight": self.settings.key_weight, "refit_values": o.refit_values}
        return out | sizes.summary()

    def _runner(self) -> LayerwiseRunner:
        return LayerwiseRunner(self.source.tensors, self.source.config, self.ids, self.inv_freq, self.scaling, self.device,
                               offload=getattr(self.options, "calib_offload", "auto"), scratch_dir=self.scratch_dir)

    def _src(self, layer: int) -> tuple[Any, torch.Tensor | None]:
        src, o_bias = self.read(self.source.tensors, layer, self.geo)
        return _move(src, self.device), None if o_bias is None else o_bias.to(self.device)

    def sizes(self, rope_dim: int | None, rank: int | None) -> Sizes:
        """D and per-layer R: given, or chosen on the calibration loss proxy (one measuring pass)."""
        budget = getattr(self.options, "kv_budget", None)
        geo = self.geo
        if budget is None and self.allocation == "uniform":
            return Sizes(rope_dim, [rank] * geo.layers)
        if budget is not None:
            if not 0 < budget <= 1:
                raise TransMLAError(f"--kv-budget {budget} must be a fraction in (0, 1] of the source's KV cache")
            values = int(budget * geo.kv_values)
            candidates = rope_candidates(geo, rope_dim)
            if len(candidates) == 1 and self.allocation == "uniform":
                rank = values - rope_dim
                if rank < 1:
                    raise TransMLAError(f"--kv-budget {budget} leaves no room for a latent next to --rope-dim {rope_dim}")
                return Sizes(rope_dim, [rank] * geo.layers)
        else:
            values = None
            candidates = [rope_dim]
        spectra = self._measure(candidates)
        if values is not None:
            chosen, ranks, losses = choose_split(spectra, values, candidates, self.allocation)
            return Sizes(chosen, ranks, losses)
        return Sizes(rope_dim, allocate_ranks(spectra, rope_dim, rank * geo.layers))

    def _measure(self, candidates: list[int]) -> list[LayerSpectrum]:
        spectra = []
        runner = self._runner() if self.calibrated else None
        settings = self.settings
        for layer in tqdm(range(self.geo.layers), desc="measuring layers", disable=not self.progress):
            src, o_bias = self._src(layer)
            if runner is not None:
                stats, scale = runner.statistics(layer, src), runner.residual_energy()
            else:
                stats, scale = identity_stats(self.geo.input_width, self.geo.heads, self.geo.head_dim), 1.0
            spectra.append(layer_spectrum(src, _move_stats(stats, self.device), self.inv_freq.to(self.device),
                                          settings, candidates, scale))
            if runner is not None:
                runner.advance_source(layer, src, o_bias)
        return spectra

    def layers(self, sizes: Sizes) -> Iterator[tuple[int, dict[str, torch.Tensor], list[float]]]:
        """(layer, converted attention tensors (o_proj's own bias not included), rotary inverse frequencies)."""
        runner = self._runner() if self.calibrated else None
        inv_freq = self.inv_freq.to(self.device)
        for layer in tqdm(range(self.geo.layers), desc="converting layers", disable=not self.progress):
            src, o_bias = self._src(layer)
            rank = sizes.ranks[layer]
            stats = runner.statistics(layer, src) if runner is not None else None
            stats = _move_stats(stats, self.device)
            converted, freqs = self._convert(runner, layer, src, o_bias, stats, inv_freq, rank, sizes.rope_dim)
            if runner is not None:
                if self.settings.method == "whiten" and getattr(self.options, "refit_values", True) and rank < self._full_rank(converted, sizes.rope_dim):
                    up_value, bias = runner.refit_values(layer, src, converted, rank, freqs)
                    converted = replace_values(converted, up_value, bias, self.geo.groups, self.geo.head_dim)
                runner.advance(layer, _with_bias(converted, o_bias), rank, freqs)
            yield layer, converted, freqs

    def _full_rank(self, converted: dict[str, torch.Tensor], rope_dim: int) -> int:
        return min(self.geo.input_width, 2 * self.geo.groups * self.geo.head_dim - rope_dim)

    def _convert(self, runner: LayerwiseRunner | None, layer: int, src: Any, o_bias: torch.Tensor | None,
                 stats: LayerStats | None, inv_freq: torch.Tensor, rank: int, rope_dim: int):
        fold = getattr(self.options, "freqfold", 1)
        if str(fold) != "auto" or runner is None:
            return _convert_layer(src, stats, inv_freq, self.scaling, rank, rope_dim, self.settings)
        best = None
        for f in FREQFOLD_AUTO:
            if (self.geo.head_dim // 2) % f:
                continue
            settings = LayerSettings(**{**vars(self.settings), "freqfold": f})
            converted, freqs = _convert_layer(src, stats, inv_freq, self.scaling, rank, rope_dim, settings)
            loss = runner.attention_error(layer, src, None, converted, rank, freqs, samples=max(1, runner.samples // 4))
            if best is None or loss < best[0]:
                best = (loss, converted, freqs)
        return best[1], best[2]


def _convert_layer(src: Any, *args: Any) -> tuple[dict[str, torch.Tensor], list[float]]:
    """`convert_layer`; on pre-features, with q_proj and kv_a_proj narrowed to what the converted layer feeds them."""
    converted, freqs = convert_layer(src, *args)
    return (converted if src.pre is None else on_pre_features(converted, src.pre)), freqs


def _with_bias(converted: dict[str, torch.Tensor], o_bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    if o_bias is None:
        return converted
    return {**converted, "o_proj.bias": converted.get("o_proj.bias", 0) + o_bias.to(converted["o_proj.weight"])}


def _move(src: Any, device: torch.device) -> Any:
    return src.to(device)


def _move_stats(stats: LayerStats | None, device: torch.device) -> LayerStats | None:
    if stats is None:
        return None
    return LayerStats(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(stats).items()})
