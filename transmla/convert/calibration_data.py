"""The calibration tokens of a calibrated conversion: a mixture of text files, hub datasets and text sampled from
the source model itself (the default: it follows the model's own distribution and needs no data)."""

from __future__ import annotations

from typing import Any

import torch

from transmla.data.mixture import SELF, describe, shares
from transmla.data.sampling import SAMPLE_DTYPE, Draw, cached_samples, rows_for, sampler_record
from transmla.data.text import source_windows
from transmla.io.source import Source

from .options import ConvertOptions


def calibration_ids(source: Source, options: ConvertOptions, progress: bool = False) -> torch.LongTensor:
    """[calib_samples, calib_seq_len] token windows: each source's share of the samples, in the mixture's order
    (windows drawn from a text's validation split, or sampled from the model)."""
    mixture = options.sources()
    tokenizer = calibration_tokenizer(source, options)
    parts = [source_windows(text_source, count, options.calib_seq_len, tokenizer, "validation",
                            lambda n: sampled_ids(source, n, options, progress), seed=options.calib_seed)
             for text_source, count in zip(mixture, shares(mixture, options.calib_samples)) if count]
    if progress and len(mixture) > 1:
        print(f"calibration: {options.calib_samples} x {options.calib_seq_len} tokens of {describe(mixture)}")
    return torch.cat(parts)


def calibration_tokenizer(source: Source, options: ConvertOptions) -> Any:
    """The tokenizer that the calibration text needs (None where all of it is sampled from the model); one clear
    error, before any work, where a text source needs one and the source has none."""
    if options.calibrated and any(s.kind != SELF for s in options.sources()):
        return source.require_tokenizer("calibration text")
    return None


def sampled_ids(source: Source, count: int, options: ConvertOptions, progress: bool = False) -> torch.LongTensor:
    """`count` windows sampled from the source model on `options.device` (cached in the user cache)."""

    def load() -> torch.nn.Module:
        return source.load_model(SAMPLE_DTYPE, options.device)

    tokens, _ = cached_samples("calibration", source.fingerprint(), source.config, load, options.device, SAMPLE_DTYPE,
                               count, draw_of(options), progress, "sampling calibration text")
    if str(options.device).startswith("cuda"):
        torch.cuda.empty_cache()
    return tokens


def draw_of(options: ConvertOptions) -> Draw:
    """How the `self` source samples its windows."""
    return Draw(options.calib_seq_len, options.calib_seed, options.calib_temperature)


def sampling_record(source: Source, options: ConvertOptions) -> dict[str, Any] | None:
    """How the `self` share of the calibration text is sampled (device, dtype, sampler, rows at a time), for the
    conversion record; None when no text is sampled."""
    mixture = options.sources()
    counts = dict(zip((s.kind for s in mixture), shares(mixture, options.calib_samples)))
    count = counts.get("self", 0)
    if not count:
        return None
    device = torch.device(options.device)
    return {"count": count, **sampler_record(device, SAMPLE_DTYPE, rows_for(source.config, count, options.calib_seq_len, device))}
