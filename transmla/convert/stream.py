"""The layer loop of every conversion: sizes (--kv-budget, --rank-allocation), then each layer in order.

Weights-only (`svd`) layers see the identity statistics of isotropic inputs. Calibrated layers (`pca`, `whiten`)
are converted in order on a `LayerwiseRunner`: statistics of layer l's inputs (as produced by converted layers
0..l-1), the per-layer recipe, an optional least-squares refit of the values under the layer's own attention
weights, then the converted layer is run to produce layer l+1's inputs. Sizes that depend on every layer
(per-layer ranks, the rotary width under a budget) come from a first pass through the source model that only
measures.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from transmla.io.source import Source

from .attention import SourceAttention, read_attention
from .budget import (LayerSpectrum, Sizes, allocate_ranks, choose_split, layer_spectrum, measured_layers, midpoints,
                     rope_candidates, split_grid)
from .calibration import LayerwiseRunner
from .calibration_data import sampling_record
from .geometry import Geometry
from .options import FREQFOLD_AUTO, ConvertOptions
from .recipe import LayerSettings, convert_layer, replace_values
from .methods import method
from .model_config import shared_scaling
from .refine import RefineReport, RefineSettings, refine_layer
from .statistics import LayerStats

SPLIT_LAYERS = 8  # layers on which each candidate split is measured (evenly spaced)
SPLIT_HELD_OUT = 0.25
# On a CPU: queries of each candidate's value refit (the final fit reads REFIT_TOKENS), and candidates far behind
# the lead dropped after a few measured layers.
SPLIT_REFIT_TOKENS = 4096
SPLIT_PRUNE_AFTER = 3  # measured layers after which candidates far behind the lead are dropped ...
SPLIT_PRUNE_RATIO = 1.5  # ... those whose summed error is above this multiple of the least  # share of the calibration sequences that scores the candidates (the rest fits them)


class LayerStream:
    """Each layer's converted attention tensors, in order, for resolved `options`.

    `ids` [N, T] are the calibration tokens of a calibrated method (None for weights only); `scratch_dir` is
    where calibration hidden states go when they do not fit in memory.
    """

    def __init__(self, source: Source, geo: Geometry, options: ConvertOptions, ids: torch.LongTensor | None = None,
                 progress: bool = True, settings: LayerSettings | None = None, scratch_dir: Path | None = None) -> None:
        self.source, self.geo, self.options, self.ids = source, geo, options, ids
        self.settings = settings or LayerSettings.of(options)
        self.device = torch.device(options.device)
        self.family = source.family
        self.rotary = self.family.rotary(source.config)  # per layer: inverse frequencies, cos/sin scaling
        self.scaling = shared_scaling(self.rotary)
        self.progress, self.scratch_dir = progress, scratch_dir
        # The residual target adds the drift to the attention output: where a norm follows the attention before the
        # residual (Gemma 2/3, OLMo 2) the two do not add, and the local target stands in.
        target = options.refine_target if self.family.norm_placement == "pre" else "local"
        self.refine_settings = RefineSettings(options.refine_steps or 0, options.refine_lr, options.refine_batch,
                                              options.calib_seed, target, options.refine_output)
        self.refined: list[RefineReport] = []
        self.split_pruned: dict[int, int] = {}

    @property
    def calibrated(self) -> bool:
        return self.ids is not None

    def record(self, sizes: Sizes) -> dict[str, Any]:
        """Settings worth keeping in the checkpoint's `conversion` record."""
        o = self.options
        out: dict[str, Any] = {"rope_select": self.settings.rope_select, "freqfold": o.freqfold,
                               "rank_allocation": o.rank_allocation, "kv_budget": o.kv_budget}
        if o.calibrated and not self.calibrated:
            out |= {"calibration": "none: the sizes keep every key and value dim, so the conversion is exact on any input"}
        if self.calibrated:
            out |= {"calibration": {"sources": [s.spec() for s in o.sources()], "samples": o.calib_samples,
                                    "seq_len": o.calib_seq_len, "seed": o.calib_seed,
                                    "temperature": o.calib_temperature, "sampled": sampling_record(self.source, o)},
                    "query_shrink": self.settings.shrink}
            if o.refine_steps:
                out |= {"refine": {"steps": o.refine_steps, "lr": o.refine_lr, "batch": o.refine_batch,
                                   "target": o.refine_target, "o_proj": o.refine_output}}
            recorded = {"score_weight": self.settings.score_weight, "refit_values": o.refit_values,
                        "output_bias": self.settings.output_bias}
            out |= {name: recorded[name] for name in method(o.method).records}
        out |= sizes.summary()
        if self.split_pruned and "kv_budget_split" in out:  # candidates dropped early: after how many layers
            out["kv_budget_split"]["dropped_after_layers"] = {str(d): n for d, n in self.split_pruned.items()}
        return out

    def sizes(self) -> Sizes:
        """D and per-layer R: given, or chosen on the calibration loss proxy (one measuring pass)."""
        o, geo = self.options, self.geo
        if o.kv_budget is None:
            rank = o.rank(geo)
            if o.rank_allocation == "uniform":
                return Sizes(o.rope_dim, [rank] * geo.layers)
            return Sizes(o.rope_dim, allocate_ranks(self._measure([o.rope_dim]), o.rope_dim, rank * geo.layers))
        values = int(o.kv_budget * geo.kv_values)
        if o.lossless(geo):  # the whole cache: every key dim rotates, the latent holds the values
            return Sizes(geo.key_dims, [min(values - geo.key_dims, geo.input_width)] * geo.layers)
        candidates = rope_candidates(geo, o.rope_dim)  # under a budget, a given --rope-dim is the only candidate
        if len(candidates) == 1 and o.rank_allocation == "uniform":
            return Sizes(candidates[0], [values - candidates[0]] * geo.layers)
        if self.calibrated and o.rank_allocation == "uniform":
            rope_dim, losses = self._measure_split(values)
            return Sizes(rope_dim, [values - rope_dim] * geo.layers, losses, "held-out attention error")
        chosen, ranks, losses = choose_split(self._measure(candidates), values, candidates, o.rank_allocation)
        return Sizes(chosen, ranks, losses)

    def layers(self, sizes: Sizes) -> Iterator[tuple[int, dict[str, torch.Tensor], list[float]]]:
        """(layer, converted attention tensors with o_proj's own bias, rotary inverse frequencies)."""
        runner = self._runner(track_source=self.refine_settings.tracks_source)
        with tqdm(range(self.geo.layers), desc="converting layers", disable=not self.progress) as bar:
            for layer in bar:
                yield self._layer(runner, layer, sizes)
        if self.refined and self.progress:
            kept = [r for r in self.refined if r.kept]
            mean = lambda values: sum(values) / max(len(values), 1)  # noqa: E731
            tqdm.write(f"refined {len(kept)} of {len(self.refined)} layers ({self.refine_settings.steps} steps each): held-out "
                       f"attention error {mean([r.before for r in self.refined]):.4g} -> "
                       f"{mean([min(r.before, r.after) for r in self.refined]):.4g}")

    def _layer(self, runner: LayerwiseRunner | None, layer: int,
               sizes: Sizes) -> tuple[int, dict[str, torch.Tensor], list[float]]:
        src, o_bias = self._read(layer)
        rank = sizes.ranks[layer]
        stats = runner.statistics(layer, src).to(self.device) if runner is not None else self._identity()
        converted, freqs = self._fit(runner, layer, src, stats, rank, sizes.rope_dim)
        if runner is not None and self.options.refine_steps and rank < self._full_rank(sizes.rope_dim):
            converted, report = refine_layer(runner, layer, src, converted, rank, freqs, self.refine_settings)
            self.refined.append(report)
        if o_bias is not None:
            converted["o_proj.bias"] = converted.get("o_proj.bias", 0) + o_bias.to(converted["o_proj.weight"])
        if runner is not None:
            if runner.source_hidden is not None:
                runner.advance_source(layer, tracked=True)
            runner.advance(layer, converted, rank, freqs)  # layer l+1's inputs, as the converted layer makes them
        return layer, converted, freqs

    def _fit(self, runner: LayerwiseRunner | None, layer: int, src: SourceAttention, stats: LayerStats, rank: int,
             rope_dim: int, rows: range | None = None,
             refit_tokens: int | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
        """The closed-form conversion of one layer, its values refitted under its own attention (whiten) on the
        calibration sequences `rows`."""
        converted, freqs = self._convert(runner, layer, src, stats, rank, rope_dim)
        if runner is not None and method(self.options.method).refits_values and self.options.refit_values \
                and rank < self._full_rank(rope_dim):
            up_value, bias = runner.refit_values(layer, src, converted, rank, freqs, bias=self.settings.output_bias,
                                                 rows=rows, tokens=refit_tokens)
            converted = replace_values(converted, up_value, bias, self.geo.groups, self.geo.head_dim)
        return converted, freqs

    def _measure_split(self, values: int) -> tuple[int, dict[int, float]]:
        """The rotary width D for `values` cached values per layer with the least held-out attention error, and
        every candidate's error (see `budget.split_grid`): a pass through the source model that converts
        SPLIT_LAYERS evenly spaced layers with each candidate."""
        runner = self._runner()
        held = max(1, round(runner.samples * SPLIT_HELD_OUT)) if runner.samples > 1 else 0
        fit, measure = range(runner.samples - held), range(runner.samples - held, runner.samples)
        if not held:
            fit = measure = range(runner.samples)
        grid = split_grid(self.geo, values, self.geo.head_dim if self.options.rope_per_frequency else None)
        layers = set(measured_layers(self.geo.layers, SPLIT_LAYERS))
        scores: dict[int, float] = {}
        pruned: dict[int, int] = {}  # candidates dropped, and after how many measured layers
        on_cpu = self.device.type == "cpu"  # where the measurement costs minutes: fewer refit queries, pruning
        pending = list(grid)
        for round_ in range(2):
            runner = runner if round_ == 0 else self._runner()
            measured = 0
            for layer in tqdm(range(self.geo.layers), desc=f"measuring splits ({', '.join(map(str, pending))})",
                              disable=not self.progress):
                src, _ = self._read(layer)
                if layer in layers and pending:
                    stats = runner.statistics(layer, src, fit).to(self.device)
                    for rope_dim in pending:
                        converted, freqs = self._fit(runner, layer, src, stats, values - rope_dim, rope_dim, fit,
                                                     SPLIT_REFIT_TOKENS if on_cpu else None)
                        error = runner.attention_error(layer, src, None, converted, values - rope_dim, freqs, measure)
                        scores[rope_dim] = scores.get(rope_dim, 0.0) + error
                    measured += 1
                    if on_cpu and round_ == 0 and measured >= SPLIT_PRUNE_AFTER:
                        lead = min(scores[d] for d in pending)
                        for d in [d for d in pending if scores[d] > SPLIT_PRUNE_RATIO * lead]:
                            pending.remove(d)
                            pruned[d] = measured
                            del scores[d]
                runner.advance_source(layer)
            best = min(scores, key=lambda d: (scores[d], -d))
            pending = [d for d in midpoints(sorted([*scores, *pruned]), best, grid[0]) if d not in scores and d not in pruned]
            if not pending:
                break
        best = min(scores, key=lambda d: (scores[d], -d))
        if self.progress:
            listed = ", ".join(f"D={d}: {scores[d]:.4g}" for d in sorted(scores))
            dropped = f"; dropped early: {', '.join(f'D={d}' for d in sorted(pruned))}" if pruned else ""
            tqdm.write(f"split of {values} values per layer: D = {best}, R = {values - best} (held-out attention error "
                       f"summed over {len(layers)} layers: {listed}{dropped})")
        self.split_pruned = {d: pruned[d] for d in sorted(pruned)}
        return best, {d: scores[d] for d in sorted(scores)}

    def _runner(self, track_source: bool = False) -> LayerwiseRunner | None:
        if not self.calibrated:
            return None
        return LayerwiseRunner(self.source.tensors, self.source.config, self.ids, self.rotary, self.device,
                               offload=self.options.calib_offload, scratch_dir=self.scratch_dir,
                               track_source=track_source)

    def _read(self, layer: int) -> tuple[SourceAttention, torch.Tensor | None]:
        src, o_bias = read_attention(self.source.tensors, layer, self.geo, self.family)
        return src.to(self.device), None if o_bias is None else o_bias.to(self.device)

    def _inv_freq(self, layer: int) -> torch.Tensor:
        return self.rotary[layer][0].to(self.device)

    def _identity(self) -> LayerStats:
        return LayerStats.identity(self.geo.input_width, self.geo.heads, self.geo.head_dim).to(self.device)

    def _full_rank(self, rope_dim: int) -> int:
        return min(self.geo.input_width, 2 * self.geo.groups * self.geo.head_dim - rope_dim)

    def _measure(self, candidates: list[int]) -> list[LayerSpectrum]:
        spectra = []
        runner = self._runner()
        for layer in tqdm(range(self.geo.layers), desc="measuring layers", disable=not self.progress):
            src, _ = self._read(layer)
            if runner is not None:
                stats = runner.statistics(layer, src).to(self.device)
                # energy: each layer's loss relative to its residual stream; loss: the whitened loss itself
                scale = runner.residual_energy() if self.options.rank_allocation == "energy" else 1.0
            else:
                stats, scale = self._identity(), 1.0
            spectra.append(layer_spectrum(src, stats, self._inv_freq(layer), self.settings, candidates, scale))
            if runner is not None:
                runner.advance_source(layer)
        return spectra

    def _convert(self, runner: LayerwiseRunner | None, layer: int, src: SourceAttention, stats: LayerStats,
                 rank: int, rope_dim: int) -> tuple[dict[str, torch.Tensor], list[float]]:
        inv_freq = self._inv_freq(layer)
        if str(self.options.freqfold) != "auto" or runner is None:
            return convert_layer(src, stats, inv_freq, self.scaling, rank, rope_dim, self.settings)
        best = None
        for fold in FREQFOLD_AUTO:
            if (self.geo.head_dim // 2) % fold:
                continue
            settings = replace(self.settings, freqfold=fold)
            converted, freqs = convert_layer(src, stats, inv_freq, self.scaling, rank, rope_dim, settings)
            loss = runner.attention_error(layer, src, None, converted, rank, freqs, range(max(1, runner.samples // 4)))
            if best is None or loss < best[0]:
                best = (loss, converted, freqs)
        return best[1], best[2]
