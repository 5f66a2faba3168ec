"""Decoding paths of the runtime model: the in-place latent cache against DynamicCache, absorbed against expanded."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from transmla.modeling.cache_transmla import LatentCache, LatentCacheLayer
from transmla.modeling.configuration_transmla import TransMLAConfig
from transmla.modeling.modeling_transmla import _CACHE_FIELD, TransMLAForCausalLM, build_masks

RANKS = [12, 10, 14]
ROPE = 8


def tiny_model(seed: int = 0) -> TransMLAForCausalLM:
    """Three layers of different latent widths and rotary frequencies, float64 so that paths compare tightly."""
    torch.manual_seed(seed)
    freqs = [[500.0 ** (-2 * i / ROPE) * (1 + 0.1 * layer) for i in range(ROPE // 2)] for layer in range(3)]
    freqs[2] = freqs[0]  # layers 0 and 2 share a row of the rope table
    config = TransMLAConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, kv_lora_rank=RANKS, qk_rope_head_dim=ROPE, rope_inv_freq=freqs,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = TransMLAForCausalLM(config).eval().double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def padded_prompts(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :13] = 0
    ids[mask == 0] = 0
    return ids, mask


def cache_of(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


@pytest.fixture(scope="module")
def model() -> TransMLAForCausalLM:
    return tiny_model()


def test_generate_with_latent_cache_equals_dynamic_cache(model):
    ids, mask = padded_prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        default = model.generate(ids, **kwargs)
        dynamic = model.generate(ids, **kwargs, **{_CACHE_FIELD: DynamicCache()})
    assert isinstance(cache_of(default), LatentCache)
    assert type(cache_of(dynamic)) is DynamicCache
    assert torch.equal(default.sequences, dynamic.sequences)
    got, expected = torch.stack(default.logits), torch.stack(dynamic.logits)
    assert (got - expected).abs().max().item() <= 1e-10


def test_generate_cache_holds_only_latent_and_rope_key_allocated_once(model):
    ids, mask = padded_prompts()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    cache = cache_of(out)
    total = out.sequences.shape[1] - 1  # the last token is never fed back
    assert len(cache.layers) == len(RANKS)
    for layer, rank in zip(cache.layers, RANKS):
        assert tuple(layer.keys.shape) == (3, 1, total, rank)
        assert tuple(layer.values.shape) == (3, 1, total, ROPE)
        # generate() sizes the buffers for the whole run: exactly its length, nothing else is stored
        assert layer.capacity == out.sequences.shape[1] - 1
        assert layer._k.numel() + layer._v.numel() == 3 * layer.capacity * (rank + ROPE)


def stepwise_logits(model, ids, mask, cache, prompt: int) -> torch.Tensor:
    """Prefill `prompt` tokens, then feed the rest one at a time; logits of every decoding position."""
    with torch.no_grad():
        out = model(ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache, use_cache=True)
        cache = cache_of(out)
        steps = [out.logits[:, -1]]
        for t in range(prompt, ids.shape[1]):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    return torch.stack(steps, 1)


@pytest.mark.parametrize("form", ["absorbed", "expanded"])
def test_latent_cache_and_dynamic_cache_agree_stepwise(model, form):
    ids, mask = padded_prompts(2)
    model.set_attention_form(form)
    try:
        latent = stepwise_logits(model, ids, mask, LatentCache(config=model.config), 12)
        dynamic = stepwise_logits(model, ids, mask, DynamicCache(), 12)
    finally:
        model.set_attention_form("auto")
    assert (latent - dynamic).abs().max().item() <= 1e-10


def test_absorbed_and_expanded_agree_with_the_latent_cache(model):
    ids, mask = padded_prompts(3)
    results = {}
    for form in ("absorbed", "expanded"):
        model.set_attention_form(form)
        results[form] = stepwise_logits(model, ids, mask, None, 11)  # None: the model makes a LatentCache
    model.set_attention_form("auto")
    valid = mask[:, 10:].bool()  # padded queries differ by design: they see only themselves, or nothing
    assert (results["absorbed"] - results["expanded"])[valid].abs().max().item() <= 1e-9
    with torch.no_grad():  # and both equal the full forward over the whole sequence
        full = model(ids, attention_mask=mask).logits[:, 10:]
    assert (results["absorbed"] - full)[valid].abs().max().item() <= 1e-9


def test_default_forward_cache_is_latent(model):
    ids, mask = padded_prompts()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
    cache = cache_of(out)
    assert isinstance(cache, LatentCache)
    assert [tuple(layer.keys.shape) for layer in cache.layers] == [(3, 1, 20, r) for r in RANKS]


def test_layer_grows_crops_and_selects_in_place():
    layer = LatentCacheLayer()
    chunks = [torch.randn(2, 1, n, 5) for n in (3, 300, 1, 1)]
    for c in chunks:
        k, v = layer.update(c, c[..., :2])
    whole = torch.cat(chunks, dim=2)
    assert torch.equal(k, whole) and torch.equal(v, whole[..., :2])
    assert layer.get_seq_length() == 305 and layer.capacity >= 305
    buffer = layer._k
    layer.update(chunks[2], chunks[2][..., :2])
    assert layer._k is buffer  # no reallocation while there is room
    layer.crop(-2)
    layer.crop(0)
    assert torch.equal(layer.keys, whole[:, :, :304])
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, whole[1:, :, :304]) and layer.batch_size == 1
    layer.reset()
    assert layer.get_seq_length() == 0


def test_decode_masks_need_no_padding_check():
    ones = torch.ones(2, 9, dtype=torch.long)
    assert build_masks(ones, 2, 9, 9, torch.device("cpu")) == (None, None)  # prefill without padding: SDPA causal
    dense, key_mask = build_masks(ones, 2, 1, 9, torch.device("cpu"))  # decoding: mask passed on unchecked
    assert key_mask.dtype == torch.bool and key_mask.all()
    assert dense.shape == (2, 1, 1, 9) and dense.all()


def test_per_head_projections_match_the_grouped_views_and_follow_weight_changes(model):
    ids, mask = padded_prompts(4)
    with torch.no_grad():  # per-head batched matmuls
        fast = stepwise_logits(model, ids, mask, None, 12)
    with torch.enable_grad():  # gradients wanted: grouped views of kv_b_proj
        slow = stepwise_logits_grad(model, ids, mask, 12)
    assert (fast - slow).abs().max().item() <= 1e-10
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        saved = attn.kv_b_proj.weight.clone()
        attn.kv_b_proj.weight.mul_(1.5)
        changed = stepwise_logits(model, ids, mask, None, 12)
        attn.kv_b_proj.weight.copy_(saved)
        assert torch.equal(attn._per_head_up_projections()[0], attn._up_projections()[0].repeat_interleave(2, 0))
    assert (changed - fast).abs().max().item() > 1e-3


def stepwise_logits_grad(model, ids, mask, prompt: int) -> torch.Tensor:
    out = model(ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    cache, steps = cache_of(out), [out.logits[:, -1]]
    for t in range(prompt, ids.shape[1]):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits[:, -1])
    return torch.stack(steps, 1).detach()
