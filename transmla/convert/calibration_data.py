"""The calibration tokens of a calibrated conversion: a mixture of text files, hub datasets and text sampled from
the source model itself (the default: it follows the model's own distribution and needs no data)."""

from __future__ import annotations

import torch

from typing import Any

from transmla.data.mixture import TextSource, describe, shares
from transmla.data.sampling import SAMPLE_DTYPE, Draw, cached_samples, rows_for, sampler_record
from transmla.data.text import calibration_windows, load_text
from transmla.io.source import Source

from .options import ConvertOptions


def calibration_ids(source: Source, options: ConvertOptions, progress: bool = False) -> torch.LongTensor:
    """[calib_samples, calib_seq_len] token windows: each source's share of the samples, in the mixture's order."""
    mixture = options.sources()
    parts = []
    for text_source, count in zip(mixture, shares(mixture, options.calib_samples)):
        if count:
            make = sampled_ids if text_source.kind == "self" else text_ids
            parts.append(make(source, text_source, count, options, progress))
    if progress and len(mixture) > 1:
        print(f"calibration: {options.calib_samples} x {options.calib_seq_len} tokens of {describe(mixture)}")
    return torch.cat(parts)


def check_calibration_text(source: Source, options: ConvertOptions) -> None:
    """Before any work: text sources need the source's tokenizer (sampling from the model needs none)."""
    if options.calibrated and any(s.kind != "self" for s in options.sources()):
        source.require_tokenizer("calibration text")


def text_ids(source: Source, text_source: TextSource, count: int, options: ConvertOptions,
             progress: bool = False) -> torch.LongTensor:
    """`count` windows of a text file or of a hub dataset's validation split."""
    tokenizer = source.require_tokenizer("calibration text")
    if text_source.kind == "file":
        text = load_text(text_file=text_source.value)
    else:
        text = load_text(dataset=text_source.value, split="validation")
    return calibration_windows(tokenizer, text, options.calib_seq_len, count, seed=options.calib_seed)


def sampled_ids(source: Source, text_source: TextSource, count: int, options: ConvertOptions,
                progress: bool = False) -> torch.LongTensor:
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
