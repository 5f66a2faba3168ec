"""The default cache of TransMLA models: per layer, preallocated buffers written in place.

`generate()` or any caller appends each step's states into buffers sized for the whole run (or grown by half when
full), so a decoding step costs O(new tokens) instead of DynamicCache's O(whole cache) copy. A TransMLA layer
stores its latent as "keys" [B, 1, T, R] and its rotated shared key as "values" [B, 1, T, D]; nothing here is
specific to MLA.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

# Cache buffers, once past their planned length, grow by half, in multiples of this many tokens.
_CACHE_ROUND = 256


class LatentCacheLayer(CacheLayerMixin):
    """One layer's cache in preallocated [B, heads, capacity, dim] buffers, written in place.

    `keys` and `values` are views of the filled part. When full, the buffers grow by half (one copy), so appending
    costs amortised O(new tokens) instead of DynamicCache's O(whole cache) per step. `max_cache_len` (e.g. what
    `generate()` will need) is allocated at once.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, max_cache_len: int = 0, **kwargs: Any) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0
        self.max_cache_len = max_cache_len
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self.length]

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        # whole-tensor assignment (offload, reorder, batch selection): the tensor becomes the buffer
        self._k = tensor
        self.length = 0 if tensor is None else tensor.shape[-2]
        if tensor is not None:
            self.batch_size = tensor.shape[0]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self.length]

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._v = tensor

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch_size = key_states.shape[0]
        self._k = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self._v = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    def _reserve(self, needed: int) -> None:
        """Make room for `needed` tokens, keeping the filled part."""
        if needed <= self.capacity:
            return
        if needed <= self.max_cache_len:
            size = self.max_cache_len
        else:
            size = -(-max(needed, self.capacity * 3 // 2) // _CACHE_ROUND) * _CACHE_ROUND
        k = self._k.new_empty((*self._k.shape[:2], size, self._k.shape[-1]))
        v = self._v.new_empty((*self._v.shape[:2], size, self._v.shape[-1]))
        k[:, :, : self.length].copy_(self._k[:, :, : self.length])
        v[:, :, : self.length].copy_(self._v[:, :, : self.length])
        self._k, self._v = k, v

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append [B, heads, Q, dim] states in place; returns views of everything cached."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        self._reserve(end)
        self._k[:, :, start:end].copy_(key_states)
        self._v[:, :, start:end].copy_(value_states)
        self.length = end
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 4.57 asks every layer; -1: grows without bound
        return -1

    def reset(self) -> None:
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove tokens (a positive value is the length to keep)."""
        keep = self.length + tokens_to_remove if tokens_to_remove <= 0 else tokens_to_remove
        self.length = max(0, min(self.length, keep))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            values = self.values.repeat_interleave(repeats, dim=0)
            self.keys, self.values = self.keys.repeat_interleave(repeats, dim=0), values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            values = self.values[indices]
            self.keys, self.values = self.keys[indices], values


class LatentCache(Cache):
    """Cache of in-place `LatentCacheLayer`s, one per layer; the default cache of TransMLA models.

    Nothing in it is specific to MLA: any model whose layers cache [B, heads, T, dim] keys and values can use it.
    """

    def __init__(self, config: Any = None, max_cache_len: int = 0, num_layers: int | None = None) -> None:
        if num_layers is None and config is not None:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        if num_layers is None:
            super().__init__(layer_class_to_replicate=partial(LatentCacheLayer, max_cache_len))
        else:
            super().__init__(layers=[LatentCacheLayer(max_cache_len) for _ in range(num_layers)])
