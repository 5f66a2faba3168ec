"""Multi-head Latent Attention decoder for checkpoints converted by transmla.

The attention caches, per token and layer, only a latent `c` (R values) and one rotary key shared by all heads
(D values); see docs/format.md in the transmla repository for the weight layout. Prefill runs the expanded
form through SDPA; decoding runs the absorbed form (DeepSeek-V2, appendix C): the key up-projection is applied
to the query, attention is computed directly against the cached latent, and the value up-projection is applied
to the attended latent before `o_proj`.

With `qk_norm` (sources with an RMSNorm on q and k before RoPE, per head or over all heads) q_proj reads the
normalised query q_norm(pre_q_proj(x)) and kv_a_proj the normalised key and the value
[k_norm(pre_k_proj(x)); pre_v_proj(x)] instead of x; the cache and everything after the projections are the same.

Sliding-window layers (`layer_types`, `sliding_window`) mask every query to its last `sliding_window` keys; their
cache keeps every token (the mask, not the cache, enforces the window). Score soft-capping c * tanh(s / c) runs
in the explicit softmax path (SDPA and the decode kernel have none).

By default the cache is a `LatentCache` (cache_transmla.py): per layer, preallocated buffers written in place, holding
the latent as "keys" [B, 1, T, R] and the rotated shared key as "values" [B, 1, T, D].
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:  # transformers >= 4.52
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover
    GradientCheckpointingLayer = nn.Module

from .cache_transmla import LatentCache
from .configuration_transmla import TransMLAConfig
from .mla_decode import mla_decode_attention

# transformers renamed the cache argument and output field from `past_key_values` to `cache`.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(BaseModelOutputWithPast)} else "past_key_values"

# Attention forms: "auto" uses the absorbed form for short query chunks against a longer cache.
ATTENTION_FORMS = ("auto", "expanded", "absorbed")
ABSORB_MAX_QUERY = 16


class TransMLARMSNorm(nn.Module):
    """RMSNorm times (offset + weight): offset 0 as in Llama, 1 as in Gemma (whose weights are stored minus one)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - offset))
        self.variance_epsilon = eps
        self.offset = offset

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # normalised in float32 at least; with a weight of the input's dtype one fused kernel applies the
        # weight before the single rounding (Llama rounds, then multiplies: the same up to one rounding)
        shape = (hidden_states.shape[-1],)
        if self.offset:  # as Gemma: (offset + w) in float32 times the float32 norm, rounded once
            normed = F.rms_norm(hidden_states.float(), shape, eps=self.variance_epsilon)
            return (normed * (self.offset + self.weight.float())).to(hidden_states.dtype)
        if self.weight.dtype == hidden_states.dtype:
            return F.rms_norm(hidden_states, shape, self.weight, eps=self.variance_epsilon)
        return self.weight * F.rms_norm(hidden_states, shape, eps=self.variance_epsilon)


def rms_norm(config: TransMLAConfig, width: int) -> TransMLARMSNorm:
    """An RMSNorm of the config's variant (eps and offset)."""
    return TransMLARMSNorm(width, eps=config.rms_norm_eps, offset=config.rms_norm_offset)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap), or x when cap is None."""
    return x if cap is None else cap * torch.tanh(x / cap)


def scale_embeddings(embeddings: torch.Tensor, multiplier: float) -> torch.Tensor:
    """Token embeddings times the config's `embedding_multiplier`, rounded to their dtype first as the source does."""
    if multiplier == 1.0:
        return embeddings
    return embeddings * torch.tensor(multiplier, dtype=embeddings.dtype, device=embeddings.device)


class TransMLAMLP(nn.Module):
    def __init__(self, config: TransMLAConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SharedRotary(nn.Module):
    """Rotation of the D-wide shared key: pair p = dims (p, p + D/2) turns at `inv_freq[p]`."""

    def __init__(self, inv_freq: list[float], attention_scaling: float) -> None:
        super().__init__()
        self.inv_freq_values = list(inv_freq)
        self.attention_scaling = attention_scaling
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device = position_ids.device
        if device not in self._inv_freq:
            self._inv_freq[device] = torch.tensor(self.inv_freq_values, dtype=torch.float32, device=device)
        freqs = position_ids[..., None].float() * self._inv_freq[device]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


# Decoding rotates q_rope and k_rope by one small matmul each when D is at most this.
ROTATION_MATRIX_MAX_DIM = 128


def rotation_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[..., D, D] matrices M with `x @ M == apply_rotary(x, cos, sin)` for rows x."""
    cos1, cos2 = cos.chunk(2, dim=-1)
    sin1, sin2 = sin.chunk(2, dim=-1)
    top = torch.cat((torch.diag_embed(cos1), torch.diag_embed(sin2)), dim=-1)  # rows p: x_p feeds p and p + D/2
    bottom = torch.cat((torch.diag_embed(-sin1), torch.diag_embed(cos2)), dim=-1)
    return torch.cat((top, bottom), dim=-2)


class RopeTable:
    """cos and sin of every layer's shared key, computed once per forward for all layers together.

    Layers with the same frequencies share a row; `for_layers(...)[l]` gives layer l's (cos, sin, rotation),
    cos and sin [B, Q, D]; for short query chunks also the rotation matrices [B, Q, D, D] (else None), which
    rotate in one matmul what `apply_rotary` does in five elementwise kernels.
    """

    def __init__(self, inv_freq: list[list[float]], attention_scaling: float) -> None:
        rows = list(dict.fromkeys(tuple(f) for f in inv_freq))
        self.row_of_layer = [rows.index(tuple(f)) for f in inv_freq]
        self.rows = [list(r) for r in rows]
        self.attention_scaling = attention_scaling
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def for_layers(self, position_ids: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
        device = position_ids.device
        if device not in self._inv_freq:
            self._inv_freq[device] = torch.tensor(self.rows, dtype=torch.float32, device=device)
        freqs = position_ids[None, ..., None].float() * self._inv_freq[device][:, None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)
        rot = None
        if position_ids.shape[-1] <= ABSORB_MAX_QUERY and cos.shape[-1] <= ROTATION_MATRIX_MAX_DIM:
            rot = rotation_matrices(cos, sin)
        return [(cos[r], sin[r], None if rot is None else rot[r]) for r in self.row_of_layer]


class TransMLAAttention(nn.Module):
    """Latent attention of one layer; caches [latent (R) | rotated shared key (D)] per token."""

    def __init__(self, config: TransMLAConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.kv_lora_rank = config.kv_lora_rank[layer_idx]
        self.scaling = self.head_dim**-0.5 if config.attention_scale is None else config.attention_scale
        self.softcap = config.attn_logit_softcapping
        self.sliding_window = config.layer_window(layer_idx)
        self.attention_form = "auto"
        h = config.hidden_size
        self.qk_norm = config.qk_norm
        self.qk_norm_per_head = config.qk_norm_per_head
        q_in, kv_in = h, h
        if self.qk_norm:
            q_in, kv_in = self.num_heads * self.head_dim, 2 * self.num_groups * self.head_dim
            self.pre_q_proj = nn.Linear(h, q_in, bias=config.pre_proj_bias)
            self.pre_k_proj = nn.Linear(h, kv_in // 2, bias=config.pre_proj_bias)
            self.pre_v_proj = nn.Linear(h, kv_in // 2, bias=config.pre_proj_bias)
            norm_q, norm_k = (self.head_dim, self.head_dim) if self.qk_norm_per_head else (q_in, kv_in // 2)
            self.q_norm = rms_norm(config, norm_q)
            self.k_norm = rms_norm(config, norm_k)
        self.q_proj = nn.Linear(q_in, self.num_heads * (self.head_dim + self.rope_dim), bias=config.attention_bias)
        self.kv_a_proj = nn.Linear(kv_in, self.kv_lora_rank + self.rope_dim, bias=config.attention_bias)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_groups * 2 * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=config.attention_out_bias)
        self.rotary = SharedRotary(config.rope_inv_freq[layer_idx], config.rope_attention_scaling)
        self._per_head: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def projection_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs of q_proj and kv_a_proj: x itself, or with qk_norm the normalised query, and the normalised
        key next to the value (normalised per head, or over all heads at once)."""
        if not self.qk_norm:
            return x, x
        if self.qk_norm_per_head:
            heads = lambda y: y.unflatten(-1, (-1, self.head_dim))  # noqa: E731
            q = self.q_norm(heads(self.pre_q_proj(x))).flatten(-2)
            k = self.k_norm(heads(self.pre_k_proj(x))).flatten(-2)
        else:
            q, k = self.q_norm(self.pre_q_proj(x)), self.k_norm(self.pre_k_proj(x))
        return q, torch.cat((k, self.pre_v_proj(x)), dim=-1)

    def project(
        self, hidden_states: torch.Tensor, position_ids: torch.Tensor, rope: tuple[torch.Tensor, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q_nope [B, H, Q, d], the rotated q_rope [B, H, Q, D], the latent [B, Q, R] and the rotated shared key
        [B, Q, D] of these tokens."""
        bsz, q_len, _ = hidden_states.shape
        q_in, kv_in = self.projection_inputs(hidden_states)
        q = self.q_proj(q_in).view(bsz, q_len, self.num_heads, self.head_dim + self.rope_dim)
        q = q.transpose(1, 2)
        q_nope, q_rope = q.split([self.head_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj(kv_in).split([self.kv_lora_rank, self.rope_dim], dim=-1)

        cos, sin, rot = rope if rope is not None else (*self.rotary.cos_sin(position_ids, hidden_states.dtype), None)
        if rot is None:
            q_rope = apply_rotary(q_rope, cos[:, None], sin[:, None])
            k_rope = apply_rotary(k_rope, cos, sin)
        else:  # rows times [B, Q, D, D] rotations
            q_rope = (q_rope.transpose(1, 2) @ rot).transpose(1, 2)
            k_rope = (k_rope[:, :, None] @ rot)[:, :, 0]
        return q_nope, q_rope, latent, k_rope

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        key_mask: torch.Tensor | None,
        cache: Cache | None = None,
        rope: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        bsz, q_len, _ = hidden_states.shape
        q_nope, q_rope, latent, k_rope = self.project(hidden_states, position_ids, rope)
        if cache is not None:
            latent, k_rope = cache.update(latent[:, None], k_rope[:, None], self.layer_idx)
            latent, k_rope = latent[:, 0], k_rope[:, 0]

        if self._use_absorbed(q_len, latent.shape[1]):
            out = self._absorbed(q_nope, q_rope, latent, k_rope, key_mask)
        else:
            out = self._expanded(q_nope, q_rope, latent, k_rope, attention_mask)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, q_len, self.num_heads * self.head_dim))

    def attention_weights(
        self, hidden_states: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal weights [B, H, Q, Q] of the expanded form over these tokens alone, and their latent
        [B, Q, R]: for analysing a converted layer (no cache)."""
        q_nope, q_rope, latent, k_rope = self.project(hidden_states, position_ids)
        bsz, length, _ = latent.shape
        k_nope = self.kv_b_proj(latent).view(bsz, length, self.num_groups, 2 * self.head_dim)[..., : self.head_dim]
        grouped = q_nope.reshape(bsz, self.num_groups, -1, self.head_dim)  # heads of a group share its keys
        scores = (grouped @ k_nope.permute(0, 2, 3, 1)).view(bsz, self.num_heads, length, length)
        scores.add_(q_rope @ k_rope[:, None].transpose(-1, -2))  # the rotary key is one, shared by all heads
        allowed = visible_keys(length, length, self.sliding_window, scores.device)
        scores = softcap(scores.mul_(self.scaling), self.softcap).masked_fill_(~allowed, float("-inf"))
        return scores.softmax(-1), latent

    def _use_absorbed(self, q_len: int, kv_len: int) -> bool:
        if self.attention_form == "auto":
            return q_len <= ABSORB_MAX_QUERY and kv_len > q_len
        return self.attention_form == "absorbed"

    def _up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK and W_UV, each [G, d, R]: views of kv_b_proj, no copy."""
        w = self.kv_b_proj.weight.view(self.num_groups, 2 * self.head_dim, self.kv_lora_rank)
        return w[:, : self.head_dim], w[:, self.head_dim :]

    def _per_head_up_projections(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """W_UK and W_UV repeated for each query head, [H, d, R] each, kept while the weight is unchanged.

        Used when no gradient is needed: then the absorbed projections are one batched matmul each over
        head-strided views, with no reshuffling copies. None while gradients are being recorded.
        """
        w = self.kv_b_proj.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return None
        try:
            version = w._version
        except RuntimeError:  # inference tensors keep no version counter
            version = -1
        key = (w.data_ptr(), version, w.dtype, w.device)
        if self._per_head is None or self._per_head[0] != key:
            repeats = self.num_heads // self.num_groups
            w_uk, w_uv = (x.repeat_interleave(repeats, dim=0) for x in self._up_projections())
            self._per_head = (key, w_uk, w_uv)
        return self._per_head[1], self._per_head[2]

    def _expanded(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        bsz, kv_len, _ = latent.shape
        kv = self.kv_b_proj(latent).view(bsz, kv_len, self.num_groups, 2 * self.head_dim).transpose(1, 2)
        k_nope, value = kv.split([self.head_dim, self.head_dim], dim=-1)
        key = torch.cat((k_nope, k_rope[:, None].expand(-1, self.num_groups, -1, -1)), dim=-1)
        query = torch.cat((q_nope, q_rope), dim=-1)
        groups = self.num_heads // self.num_groups
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        if attention_mask is None and self.sliding_window is not None and kv_len > self.sliding_window:
            attention_mask = visible_keys(query.shape[2], kv_len, self.sliding_window, query.device)  # causal, windowed
        if self.softcap is not None:
            return self._capped_attention(query, key, value, attention_mask)
        causal = attention_mask is None and query.shape[2] > 1
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, is_causal=causal, scale=self.scaling
        )

    def _capped_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Softmax attention with capped scores, under a boolean mask (None: causal)."""
        scores = softcap((query @ key.transpose(-1, -2)) * self.scaling, self.softcap)
        if attention_mask is None:
            attention_mask = visible_keys(query.shape[2], key.shape[2], None, query.device)
        scores = scores.masked_fill(~attention_mask, float("-inf"))
        return scores.float().softmax(-1).to(value.dtype) @ value

    def _absorbed(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        bsz, _, q_len, _ = q_nope.shape
        per_head = self._per_head_up_projections()
        if per_head is not None:
            w_uk, w_uv = per_head
            heads = self.num_heads
            q_lat = torch.bmm(q_nope.transpose(0, 1).reshape(heads, bsz * q_len, self.head_dim), w_uk)
            q_lat = q_lat.view(heads, bsz, q_len, -1).transpose(0, 1)
            o_lat = self._decode(q_lat, q_rope, latent, k_rope, key_mask)
            out = torch.bmm(o_lat.transpose(0, 1).reshape(heads, bsz * q_len, -1), w_uv.transpose(1, 2))
            return out.view(heads, bsz, q_len, self.head_dim).transpose(0, 1)
        w_uk, w_uv = self._up_projections()
        grouped = q_nope.reshape(bsz, self.num_groups, -1, q_len, self.head_dim)
        # q_lat_h = W_UK_g^T q_nope_h: scores against the latent equal those against the expanded keys.
        q_lat = torch.einsum("bgjqd,gdr->bgjqr", grouped, w_uk).reshape(bsz, self.num_heads, q_len, -1)
        o_lat = self._decode(q_lat, q_rope, latent, k_rope, key_mask)
        o_lat = o_lat.reshape(bsz, self.num_groups, -1, q_len, self.kv_lora_rank)
        return torch.einsum("bgjqr,gdr->bgjqd", o_lat, w_uv).reshape(bsz, self.num_heads, q_len, self.head_dim)

    def _decode(self, q_lat: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        return mla_decode_attention(q_lat, q_rope, latent, k_rope, key_mask=key_mask, scale=self.scaling,
                                    softcap=self.softcap, window=self.sliding_window)


class TransMLADecoderLayer(GradientCheckpointingLayer):
    """Attention and MLP with residuals; where the norms sit follows `config.norm_placement`:

    pre:          h += attn(input_layernorm(h));                       h += mlp(post_attention_layernorm(h))
    pre_and_post: h += post_attention_layernorm(attn(input_layernorm(h)))
                  h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
    post:         h += post_attention_layernorm(attn(h));              h += post_feedforward_layernorm(mlp(h))
    """

    def __init__(self, config: TransMLAConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = TransMLAAttention(config, layer_idx)
        self.mlp = TransMLAMLP(config)
        self.placement = config.norm_placement
        h = config.hidden_size
        if self.placement != "post":
            self.input_layernorm = rms_norm(config, h)
        self.post_attention_layernorm = rms_norm(config, h)
        if self.placement == "pre_and_post":
            self.pre_feedforward_layernorm = rms_norm(config, h)
        if self.placement != "pre":
            self.post_feedforward_layernorm = rms_norm(config, h)

    def attention_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What the attention reads: the normalised hidden state, or the hidden state itself (post-norms only)."""
        return hidden_states if self.placement == "post" else self.input_layernorm(hidden_states)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        key_mask: torch.Tensor | None,
        cache: Cache | None = None,
        rope: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        attended = self.self_attn(
            self.attention_input(hidden_states), position_ids, attention_mask, key_mask, cache, rope
        )
        if self.placement == "pre":
            hidden_states = hidden_states + attended
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = hidden_states + self.post_attention_layernorm(attended)
        mlp_input = self.pre_feedforward_layernorm(hidden_states) if self.placement == "pre_and_post" else hidden_states
        return hidden_states + self.post_feedforward_layernorm(self.mlp(mlp_input))


class TransMLAPreTrainedModel(PreTrainedModel):
    config_class = TransMLAConfig
    config: TransMLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransMLADecoderLayer"]
    _supports_sdpa = True

    def set_attention_form(self, form: str) -> None:
        """Force the "expanded" or "absorbed" attention form everywhere, or go back to "auto"."""
        if form not in ATTENTION_FORMS:
            raise ValueError(f"attention form must be one of {ATTENTION_FORMS}, not {form!r}")
        for module in self.modules():
            if isinstance(module, TransMLAAttention):
                module.attention_form = form


def visible_keys(q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[Q, T] booleans: query i (position T - Q + i) sees key s when s <= its position, and with a sliding window
    when s > its position - window."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    return allowed if window is None else allowed & (k_pos > q_pos - window)


def build_masks(
    attention_mask: torch.Tensor | None, bsz: int, q_len: int, kv_len: int, device: torch.device,
    window: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Boolean [B, 1, Q, T] mask for SDPA (causal, sliding window and padding) and the [B, T] key mask for
    absorbed decode.

    Queries are the last Q of the T positions. Without padding the SDPA mask is None where SDPA's own causal
    mode (Q == T) or no mask at all (Q == 1) says the same (and no window cuts anything off). Every query may
    always see itself, so that padded query rows stay finite; real queries never see padded keys. While decoding
    (a few queries against a longer cache) the mask is passed on unchecked, so that no step waits for the device
    to say whether it has padding.
    """
    key_mask = None
    if attention_mask is not None:
        mask = attention_mask[:, -kv_len:]
        decoding = q_len <= ABSORB_MAX_QUERY and kv_len > q_len
        if decoding or not bool(mask.all()):
            key_mask = mask.to(device=device, dtype=torch.bool)
    if window is not None and window >= kv_len:
        window = None  # the window holds every key
    if key_mask is None and window is None and (q_len == kv_len or q_len == 1):
        return None, None
    allowed = visible_keys(q_len, kv_len, window, device)[None, None].expand(bsz, 1, q_len, kv_len)
    if key_mask is not None:
        itself = torch.arange(kv_len - q_len, kv_len, device=device)[:, None] == torch.arange(kv_len, device=device)
        allowed = (allowed & key_mask[:, None, None, :]) | itself[None, None]
    return allowed, key_mask


class TransMLAModel(TransMLAPreTrainedModel):
    def __init__(self, config: TransMLAConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(TransMLADecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = rms_norm(config, config.hidden_size)
        self.rope = RopeTable(config.rope_inv_freq, config.rope_attention_scaling)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = scale_embeddings(self.embed_tokens(input_ids), self.config.embedding_multiplier)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = LatentCache(config=self.config)
        bsz, q_len, _ = inputs_embeds.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + q_len, device=inputs_embeds.device)[None].expand(bsz, -1)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("TransMLA models take a 2D [batch, length] attention_mask")
        masks = {window: build_masks(attention_mask, bsz, q_len, past + q_len, inputs_embeds.device, window)
                 for window in {layer.self_attn.sliding_window for layer in self.layers}}

        rope = self.rope.for_layers(position_ids, inputs_embeds.dtype)
        hidden_states = inputs_embeds
        for layer, layer_rope in zip(self.layers, rope):
            mask, key_mask = masks[layer.self_attn.sliding_window]
            hidden_states = layer(hidden_states, position_ids, mask, key_mask, cache, layer_rope)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{_CACHE_FIELD: cache if use_cache else None})


class TransMLAForCausalLM(TransMLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TransMLAConfig) -> None:
        super().__init__(config)
        self.model = TransMLAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = softcap(self.lm_head(hidden_states[:, keep, :]), self.config.final_logit_softcapping)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)})

    def _prepare_cache_for_generation(
        self,
        generation_config: Any,
        model_kwargs: dict,
        generation_mode: Any,
        batch_size: int,
        max_cache_length: int,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """As in transformers, but the default dynamic cache is a `LatentCache` sized for the whole generation."""
        user_cache = any(model_kwargs.get(k) is not None for k in ("cache", "past_key_values"))
        result = super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs
        )
        for key in ("cache", "past_key_values"):
            if not user_cache and type(model_kwargs.get(key)) is DynamicCache:
                model_kwargs[key] = LatentCache(config=self.config, max_cache_len=max_cache_length)
        prepared = any(model_kwargs.get(k) is not None for k in ("cache", "past_key_values"))
        if not user_cache and not prepared and generation_config.use_cache is not False:
            # transformers before 5.1 leaves the default cache to the model's forward
            model_kwargs[_CACHE_FIELD] = LatentCache(config=self.config, max_cache_len=max_cache_length)
        return result
