"""Fixed-shape decoding state for sampling from any transformers causal LM: every step has the same shapes, so
that it can be replayed as a CUDA graph.

`SlotCache` holds each layer's keys and values in buffers [B, G, L, d] allocated once and written in place at
the slot `position` (a device tensor that the step itself advances). A step attends over the first `span` slots
(a multiple of `SPAN_STEP`, chosen by the driver), under a boolean mask [B, 1, 1, span] built on the device from
`position` and each row's document start, through `grouped_decode_attention`: one query token per row, the query
heads of a group read their key head without repeating it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

ATTENTION_NAME = "transmla_slot_decode"
SPAN_STEP = 128  # attention spans are rounded up to this many slots (one captured graph per span)


class SlotCacheLayer(CacheLayerMixin):
    """One layer's keys and values in fixed buffers, written at the shared device `position`."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "SlotCache") -> None:
        super().__init__()
        self.owner = owner
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, heads, _, width = key_states.shape
        # zeros, not empty: masked slots are multiplied by probability 0, and 0 * NaN would poison the output
        self.keys = key_states.new_zeros(rows, heads, self.owner.length, width)
        self.values = value_states.new_zeros(rows, heads, self.owner.length, value_states.shape[-1])
        self.device, self.dtype, self.is_initialized = key_states.device, key_states.dtype, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys.index_copy_(2, self.owner.position, key_states)
        self.values.index_copy_(2, self.owner.position, value_states)
        span = self.owner.span
        return self.keys[:, :, :span], self.values[:, :, :span]

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self.owner.span, 0

    def get_seq_length(self) -> int:
        return self.owner.steps

    def get_max_length(self) -> int:
        return self.owner.length

    def get_max_cache_shape(self) -> int:
        return self.owner.length


class SlotCache(Cache):
    """Keys and values of `layers` layers for `length` slots; `position` [1] is the slot the next token takes."""

    def __init__(self, layers: int, length: int, device: torch.device) -> None:
        self.length, self.span, self.steps = length, SPAN_STEP, 0
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        super().__init__(layers=[SlotCacheLayer(self) for _ in range(layers)])


def span_for(slot: int, length: int) -> int:
    """The attention span of the step that writes `slot`: the next multiple of SPAN_STEP, at most `length`."""
    return min(length, -(-(slot + 1) // SPAN_STEP) * SPAN_STEP)


def grouped_decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor, dropout: float = 0.0, scaling: float | None = None,
                             softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Masked attention of query [B, H, 1, d] against a group's key and value [B, G, S, d]; [B, 1, H, d] out."""
    rows, heads, q_len, dim = query.shape
    groups = key.shape[1]
    grouped = query.reshape(rows, groups, heads // groups * q_len, dim)
    scores = (grouped @ key.transpose(-1, -2)).float() * (dim**-0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~attention_mask, float("-inf"))
    out = scores.softmax(-1).to(value.dtype) @ value  # [B, G, (H/G) Q, d]
    return out.view(rows, heads, q_len, -1).transpose(1, 2), None


def register_attention() -> None:
    """Make `grouped_decode_attention` selectable as `config._attn_implementation = ATTENTION_NAME`."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, grouped_decode_attention)
