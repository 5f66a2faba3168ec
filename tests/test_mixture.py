"""Calibration and healing text mixtures: specs, shares, text sampled from the model, and its cache."""

from __future__ import annotations

import json

import pytest
import torch

from tiny import save_source
from transmla.convert import ConvertOptions, convert
from transmla.convert.calibration_data import calibration_ids
from transmla.convert.geometry import Geometry
from transmla.data.mixture import TextSource, describe, loose_spec, parse_source, parse_sources, shares
from transmla.errors import TransMLAError
from transmla.io.source import open_source

TEXT = "Mixtures of text calibrate a converted model beyond any one corpus. " * 60


def test_specs_parse_with_weights_and_refuse_nonsense(tmp_path):
    path = tmp_path / "a@b.txt"  # an '@' inside a path is part of it
    path.write_text("x")
    assert parse_source("self") == TextSource("self", None, 1.0)
    assert parse_source("self@2.5") == TextSource("self", None, 2.5)
    assert parse_source(f"file:{path}@3") == TextSource("file", str(path), 3.0)
    assert parse_source(str(path)) == TextSource("file", str(path), 1.0)
    assert parse_source("dataset:wikitext2") == TextSource("dataset", "wikitext2", 1.0)
    assert parse_sources([]) == [TextSource("self")]
    # convert --heal-data also takes `self-distill`, a bare path and a bare dataset name
    assert [loose_spec(x) for x in ("self-distill", "self@2", str(path), "wikitext2", "file:x")] == \
        ["self", "self@2", f"file:{path}", "dataset:wikitext2", "file:x"]
    for bad, fragment in [("selfish", "is not one of"), ("self@-1", "must be a positive"),
                          (f"file:{tmp_path / 'none.txt'}", "text file not found")]:
        with pytest.raises(TransMLAError, match=fragment):
            parse_source(bad)
    with pytest.raises(TransMLAError, match="given twice"):
        parse_sources(["self", "self@2"])


def test_shares_follow_the_weights_and_keep_every_source():
    sources = [TextSource("self", None, 3.0), TextSource("file", "a", 1.0)]
    assert shares(sources, 64) == [48, 16]
    assert shares(sources, 7) == [5, 2]
    assert shares([TextSource("self", None, 100.0), TextSource("file", "a", 1.0)], 10) == [9, 1]
    assert describe(sources) == "75% self + 25% file:a"


def test_mixed_calibration_has_each_share_and_sampling_is_cached(tmp_path, monkeypatch):
    save_source("llama-gqa", tmp_path / "src")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    monkeypatch.setenv("TRANSMLA_CACHE", str(tmp_path / "cache"))
    source = open_source(str(tmp_path / "src"))
    options = ConvertOptions(calib_sources=("self@3", f"file:{text}"), calib_samples=8, calib_seq_len=32)
    options = options.resolved(Geometry.of(source.config))
    ids = calibration_ids(source, options)
    assert ids.shape == (8, 32)
    sampled, written = ids[:6], ids[6:]
    assert (sampled[:, 0] == source.config.bos_token_id).all()  # samples start from the start token
    assert all(bytes(row.tolist()).decode() in TEXT * 2 for row in written)  # windows of the file
    cached = list((tmp_path / "cache" / "samples").glob("*.pt"))
    assert len(cached) == 1
    calls = []
    monkeypatch.setattr(type(source), "load_model", lambda *a, **k: calls.append(1))
    assert torch.equal(calibration_ids(source, options), ids) and not calls  # the cache, not the model


def test_default_conversion_samples_its_own_calibration_and_records_it(tmp_path, monkeypatch):
    save_source("qwen2", tmp_path / "src")
    monkeypatch.setenv("TRANSMLA_CACHE", str(tmp_path / "cache"))
    out = convert(str(tmp_path / "src"), tmp_path / "mla",
                  ConvertOptions(kv_lora_rank=12, rope_dim=8, calib_samples=3, calib_seq_len=40), progress=False)
    conversion = json.loads((out / "config.json").read_text())["conversion"]
    assert conversion["method"] == "whiten"
    assert conversion["calibration"]["sources"] == ["self"] and conversion["calibration"]["samples"] == 3
    assert not [p for p in out.iterdir() if p.suffix == ".pt"]  # nothing of the calibration in the output


def test_weights_only_refuses_calibration_text(tmp_path):
    save_source("llama-gqa", tmp_path / "src")
    with pytest.raises(TransMLAError, match="reads no calibration text"):
        convert(str(tmp_path / "src"), tmp_path / "mla", ConvertOptions(method="svd", calib_sources=("self",)), progress=False)
    assert not (tmp_path / "mla").exists()
