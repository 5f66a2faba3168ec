"""What the converter asks of a model family, answered for the Llama layout; each family module overrides what
differs (docs/families.md says how to add one).

A family owns: the tensor names of a decoder layer (and how fused projections split), the norm variant and where
the norms sit, the MLP's activation, the per-head or whole-projection q/k norm, the attention scale and
soft-capping, the sliding-window layers, the rotary frequencies, and the source-side pieces that calibration runs
(the family's own transformers decoder layer and rotary embedding).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from transmla.errors import TransMLAError

UNSUPPORTED_ROPE = {"dynamic", "longrope"}
SLIDING = "sliding_attention"
TensorGetter = Callable[[str], "torch.Tensor | None"]


@dataclass(frozen=True)
class QKNorm:
    """RMSNorm of the query and the key before RoPE: over each head's d dims with one [d] weight shared by the
    heads (`per_head`, Qwen3 and Gemma 3), or over all H*d (G*d) dims of the projection at once (OLMo 2)."""

    per_head: bool


@dataclass
class AttentionWeights:
    """One layer's attention tensors in grouped-query form: q [H*d, h], k and v [G*d, h], o [h, H*d], their
    biases, and the q/k norm weights of families that have them (None where absent)."""

    q: torch.Tensor | None
    k: torch.Tensor | None
    v: torch.Tensor | None
    o: torch.Tensor | None
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


class Family:
    """The Llama layout: pre-norms (input_layernorm, then post_attention_layernorm before the MLP), separate
    q/k/v/o projections with optional biases, gate/up/down MLP, RMSNorm with weight w, softmax scale
    head_dim ** -0.5, one rotary table for every layer, sliding windows as the config states them."""

    model_type: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    transformers_module: ClassVar[str] = "transformers.models.llama.modeling_llama"
    decoder_layer_class: ClassVar[str] = "LlamaDecoderLayer"
    rotary_class: ClassVar[str] = "LlamaRotaryEmbedding"
    norm_placement: ClassVar[str] = "pre"  # pre | pre_and_post | post: see TransMLAConfig
    norm_offset: ClassVar[float] = 0.0  # RMSNorm multiplies by (offset + w): 1 for Gemma
    qk_norm: ClassVar[QKNorm | None] = None
    attention_prefix: ClassVar[str] = "self_attn."

    # -- checks -------------------------------------------------------------------------------------------------

    def check(self, config: Any) -> None:
        """Refuse variants of the family that the conversion can not express, in one line."""
        for rope in self.rope_parameter_sets(config):
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type in UNSUPPORTED_ROPE:
                raise TransMLAError(f"RoPE type {rope_type!r} depends on the sequence length and can not be moved into "
                                    "a fixed rotary key; supported: default, linear, llama3, yarn")
        widths = sorted({w for w in self.sliding_windows(config) if w is not None})
        if len(widths) > 1:
            raise TransMLAError(f"sliding windows of several widths ({widths}): the converted model has one")
        scalings = sorted({scaling for _, scaling in self.rotary(config)})
        if len(scalings) > 1:
            raise TransMLAError(f"the layers scale cos and sin differently ({scalings}), which the converted model, with "
                                "one rope_attention_scaling, can not express")

    def rope_parameter_sets(self, config: Any) -> list[dict[str, Any]]:
        """The RoPE settings the config holds (one set; families with a table per layer type override this)."""
        return [getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}]

    # -- attention ----------------------------------------------------------------------------------------------

    def attention_weights(self, get: TensorGetter) -> AttentionWeights:
        """The layer's attention tensors; `get(name)` reads `name` under the layer's attention prefix (None if
        absent)."""
        return AttentionWeights(
            q=get("q_proj.weight"), k=get("k_proj.weight"), v=get("v_proj.weight"), o=get("o_proj.weight"),
            q_bias=get("q_proj.bias"), k_bias=get("k_proj.bias"), v_bias=get("v_proj.bias"), o_bias=get("o_proj.bias"),
            q_norm=get("q_norm.weight") if self.qk_norm else None, k_norm=get("k_norm.weight") if self.qk_norm else None,
        )

    def score_divisor(self, config: Any) -> float | None:
        """n of the softmax scale n ** -0.5 where n is not head_dim (None: head_dim)."""
        return None

    def attention_scale(self, config: Any) -> float | None:
        """The softmax scale where it is not head_dim ** -0.5 (None: that default)."""
        divisor = self.score_divisor(config)
        return None if divisor is None else divisor**-0.5

    def attention_softcap(self, config: Any) -> float | None:
        """c in c * tanh(score / c), applied to the scaled scores before the mask; None: no capping."""
        return None

    def final_softcap(self, config: Any) -> float | None:
        """The same on the output logits."""
        return None

    def sliding_windows(self, config: Any) -> list[int | None]:
        """Per layer: the window W of a sliding-window layer (query t sees keys t - W < s <= t) or None."""
        layers = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        if not window:
            return [None] * layers
        types = getattr(config, "layer_types", None)
        if types is None:
            return [int(window)] * layers
        return [int(window) if kind == SLIDING else None for kind in types]

    # -- rotary -------------------------------------------------------------------------------------------------

    def source_rotary(self, config: Any) -> torch.nn.Module:
        """The family's own rotary embedding module (on the CPU)."""
        return self._transformers_class(self.rotary_class)(config=config)

    def rotary(self, config: Any) -> list[tuple[torch.Tensor, float]]:
        """Per layer: the source's inverse frequencies (RoPE scaling applied, float64) and cos/sin scaling."""
        module = self.source_rotary(config)
        table = (module.inv_freq.double().cpu(), float(module.attention_scaling))
        return [table] * config.num_hidden_layers

    def position_embeddings(self, rotary: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor,
                            layer: int, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin that layer `layer` of the source applies at `positions`."""
        return rotary(x, positions)

    # -- the rest of a layer -----------------------------------------------------------------------------------

    def activation(self, config: Any) -> str:
        return config.hidden_act

    def layer_tensor(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """A source tensor of a decoder layer outside the attention (name without the layer prefix), under the
        converted checkpoint's names: itself, or the pieces of a fused projection."""
        return {name: tensor}

    def embedding_multiplier(self, config: Any) -> float:
        """What the token embeddings are multiplied by (Gemma: sqrt(hidden))."""
        return 1.0

    def runtime_config(self, config: Any) -> dict[str, Any]:
        """The TransMLAConfig fields that make the converted model compute what the source does outside the
        latent attention (docs/format.md)."""
        windows = self.sliding_windows(config)
        sliding = sorted({w for w in windows if w is not None})  # one width at most (`check`)
        return dict(
            hidden_act=self.activation(config), rms_norm_eps=float(config.rms_norm_eps),
            mlp_bias=bool(getattr(config, "mlp_bias", False)), rms_norm_offset=self.norm_offset,
            norm_placement=self.norm_placement, qk_norm_per_head=self.qk_norm is None or self.qk_norm.per_head,
            attention_scale=self.attention_scale(config), attn_logit_softcapping=self.attention_softcap(config),
            final_logit_softcapping=self.final_softcap(config), embedding_multiplier=self.embedding_multiplier(config),
            sliding_window=sliding[0] if sliding else None,
            layer_types=[SLIDING if w is not None else "full_attention" for w in windows] if sliding else None,
        )

    # -- the source's own code, for calibration ----------------------------------------------------------------

    def source_layer(self, config: Any, layer: int, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The family's transformers decoder layer `layer` holding `state` (its tensors without the layer prefix),
        with eager attention, so that it returns its attention probabilities."""
        config = copy.copy(config)
        config._attn_implementation = "eager"
        with torch.device("meta"):
            module = self._transformers_class(self.decoder_layer_class)(config, layer)
        module.load_state_dict(state, strict=True, assign=True)
        return module.eval()

    def _transformers_class(self, name: str) -> type:
        return getattr(importlib.import_module(self.transformers_module), name)
