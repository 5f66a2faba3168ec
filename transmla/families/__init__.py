"""Model families: one adapter per architecture (`base.Family`), looked up by the config's model_type.

Every question about an architecture (tensor names, norms, activation, q/k norm, attention scale and capping,
sliding windows, rotary tables, the source's own transformers code) is asked of the family; nothing else in the
package names one. docs/families.md describes how to add a family.
"""

from __future__ import annotations

from typing import Any

from transmla.errors import TransMLAError

from .base import AttentionWeights, Family, QKNorm
from .gemma2 import Gemma2
from .gemma3 import Gemma3
from .llama import Llama
from .mistral import Mistral
from .olmo2 import Olmo2
from .phi3 import Phi3
from .qwen2 import Qwen2
from .qwen3 import Qwen3

FAMILIES: dict[str, Family] = {f.model_type: f for f in (Llama(), Qwen2(), Qwen3(), Mistral(), Phi3(), Gemma2(),
                                                          Gemma3(), Olmo2())}


def supported() -> str:
    """The supported families, one `model_type: summary` each."""
    return "; ".join(f"{name}: {family.summary}" for name, family in FAMILIES.items())


def family_of(config: Any) -> Family:
    """The family of a source config, or one clear error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise TransMLAError(f"architecture {model_type!r} is not supported; supported are {supported()}")
    return FAMILIES[model_type]


def check_family(config: Any) -> Family:
    """The family of `config`, its variant checked to be one the conversion handles."""
    family = family_of(config)
    family.check(config)
    return family


__all__ = ["FAMILIES", "AttentionWeights", "Family", "QKNorm", "check_family", "family_of",
           "supported"]
