"""Text sampled from a model: the fixed-shape decoder against transformers' own, documents that end restart in
place, the nucleus draw follows the model's distribution, seeded draws repeat, models without BOS or EOS."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tiny import byte_tokenizer, tiny_model
from transmla.convert import ConvertOptions, convert
from transmla.data.sampling import nucleus_gumbel, sample_windows

GREEDY = 1e-6  # a temperature this low makes the Gumbel-max draw the argmax


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2", "qwen3", "mistral"])
def test_greedy_samples_equal_transformers_greedy_generation(kind):
    """Past several attention spans (SPAN_STEP = 128 slots), the static cache, device-built mask and grouped
    attention decode what transformers' own generate() decodes."""
    model = tiny_model(kind)
    model.config.eos_token_id = None  # no restarts: one document per row
    model.generation_config.eos_token_id = None
    got = sample_windows(model, 2, 300, seed=0, temperature=GREEDY)
    start = torch.full((1, 1), model.config.bos_token_id)
    expected = model.generate(start, max_new_tokens=299, do_sample=False, min_new_tokens=299)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[0])
    assert model.config._attn_implementation != "transmla_slot_decode"  # restored


def test_a_row_that_ends_its_document_starts_the_next_in_place():
    """With greedy draws and EOS set to the 5th token the model writes, every document is the same 6 tokens:
    the start token at position 0 again, and nothing of the earlier documents visible."""
    model = tiny_model("llama-gqa")
    model.config.eos_token_id = None
    free = sample_windows(model, 1, 8, seed=0, temperature=GREEDY)[0]
    model.config.eos_token_id = int(free[5])
    assert int(free[5]) not in free[1:5].tolist()
    got = sample_windows(model, 3, 200, seed=0, temperature=GREEDY)
    period = free[:6]
    assert torch.equal(got, period.repeat(34)[:200].expand(3, -1))


def test_nucleus_draws_follow_the_renormalised_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(40_000, -1)
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(40_000, 4, generator=generator)
    counts = torch.bincount(nucleus_gumbel(logits, 1.0, 0.9, noise), minlength=4).double() / 40_000
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95  # the 4th token lies beyond top_p = 0.9
    assert (counts - expected).abs().max() < 0.008  # 3 standard errors of a share of 40k draws


def test_seeded_draws_repeat_and_seeds_differ():
    model = tiny_model("qwen2")
    a = sample_windows(model, 5, 40, seed=3, rows=2)
    assert torch.equal(a, sample_windows(model, 5, 40, seed=3, rows=2))
    assert not torch.equal(a, sample_windows(model, 5, 40, seed=4, rows=2))
    assert (a[:, 0] == model.config.bos_token_id).all()


def test_a_model_without_bos_or_eos_samples_from_random_start_tokens_and_converts(tmp_path):
    model = tiny_model("qwen2")
    model.config.bos_token_id = model.config.eos_token_id = None
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = None
    ids = sample_windows(model, 6, 24, seed=0)
    assert ids[:, 0].unique().numel() > 1  # each row starts from its own token
    model.save_pretrained(tmp_path / "src")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    out = convert(str(tmp_path / "src"), tmp_path / "mla",
                  ConvertOptions(kv_lora_rank=12, rope_dim=8, calib_samples=2, calib_seq_len=24), progress=False)
    assert (out / "model.safetensors").is_file()


def test_full_rank_conversion_samples_nothing(tmp_path, monkeypatch):
    """At R + D = every key and value dim the result does not depend on the inputs: no text is sampled."""
    import transmla.data.sampling as sampling

    def refuse(*args, **kwargs):
        raise AssertionError("sampled text for a lossless conversion")

    monkeypatch.setattr(sampling, "sample_windows", refuse)
    model = tiny_model("llama-gqa")
    model.save_pretrained(tmp_path / "src")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    key_dims = model.config.num_key_value_heads * model.config.hidden_size // model.config.num_attention_heads
    for options in (ConvertOptions(kv_lora_rank=key_dims, rope_dim=key_dims), ConvertOptions(kv_budget=1.0)):
        out = convert(str(tmp_path / "src"), tmp_path / "mla", ConvertOptions(**{**vars(options), "overwrite": True}),
                      progress=False)
        assert load_file(out / "model.safetensors")["model.layers.0.self_attn.kv_a_proj.weight"].shape[0] == 2 * key_dims


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_draw_what_eager_steps_draw(monkeypatch):
    import transmla.data.sampling as sampling

    model = tiny_model("llama-gqa").cuda().to(torch.bfloat16)
    graphed = sample_windows(model, 8, 300, seed=2)
    captured = []
    real = sampling.Sampler.capture
    monkeypatch.setattr(sampling.Sampler, "capture", lambda self: captured.append(1) or real(self))
    assert torch.equal(sample_windows(model, 8, 300, seed=2), graphed) and captured  # graphs were used
    monkeypatch.setattr(sampling.Sampler, "capture", lambda self: setattr(self, "use_graphs", False))
    assert torch.equal(sample_windows(model, 8, 300, seed=2), graphed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_same_conversion_on_a_gpu_writes_the_same_bytes(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "src")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    written = []
    for name in ("a", "b"):
        options = ConvertOptions(kv_budget=0.25, calib_samples=16, calib_seq_len=64, device="cuda", refine_steps=20)
        out = convert(str(tmp_path / "src"), tmp_path / name, options, progress=False)
        written.append((out / "model.safetensors").read_bytes())
    assert written[0] == written[1]
