"""Checks to run before a long conversion: the checkpoint holds every tensor the config implies, at its shape,
and the output folder can not replace the source."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from transmla.errors import TransMLAError
from transmla.io.output_dir import check_writable
from transmla.io.reader import TensorSource

LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def expected_tensors(config: Any) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required, optional) tensor names and shapes of a Llama-like decoder with this config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, inter, vocab = text.hidden_size, text.intermediate_size, text.vocab_size
    heads = text.num_attention_heads
    groups = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    q, kv = heads * head_dim, groups * head_dim
    required = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    optional = {"lm_head.weight": (vocab, hidden)}
    if not getattr(text, "tie_word_embeddings", False):
        required["lm_head.weight"] = optional.pop("lm_head.weight")
    for layer in range(text.num_hidden_layers):
        p = f"model.layers.{layer}."
        required.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, q),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
        optional.update({
            p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.bias": (hidden,), p + "mlp.gate_proj.bias": (inter,), p + "mlp.up_proj.bias": (inter,),
            p + "mlp.down_proj.bias": (hidden,),
        })
    return required, optional


def check_source_tensors(tensors: TensorSource, config: Any, where: str) -> None:
    """Raise TransMLAError naming the first missing, misshapen or surplus-layer tensor (reads headers only)."""
    required, optional = expected_tensors(config)
    present = set(tensors.keys())
    missing = sorted(set(required) - present, key=_natural)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise TransMLAError(f"tensor {missing[0]}{more} is missing from the checkpoint at {where}: re-download or re-save it")
    layers = config.get_text_config().num_hidden_layers if hasattr(config, "get_text_config") else config.num_hidden_layers
    found = {int(m.group(1)) for key in present if (m := LAYER_KEY.match(key))}
    if found and max(found) >= layers:
        raise TransMLAError(
            f"the checkpoint at {where} has weights of {max(found) + 1} layers but its config says "
            f"num_hidden_layers={layers}: the config does not match the weights"
        )
    for name, shape in {**optional, **required}.items():
        if name in present and tuple(tensors.shape(name)) != shape:
            raise TransMLAError(
                f"{name} has shape {tuple(tensors.shape(name))} but the config implies {shape}: "
                f"the config does not match the weights at {where}"
            )


def _natural(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def check_output_location(out: Path, source_path: Path) -> None:
    """Refuse an --out that can not be created, or that is (or holds) the source: replacing it would delete it."""
    out, source = Path(out).expanduser().absolute(), Path(source_path).expanduser().resolve()
    if out.resolve() == source or out.resolve() in source.parents:
        raise TransMLAError(f"--out {out} would replace the source checkpoint at {source}; choose another --out")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    check_writable(parent)
