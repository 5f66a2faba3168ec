"""Healing: distil the original model into a converted one (`options` -> `run` -> `loop`, with `data`, `loss`
and `checkpoint`)."""

from .options import HealOptions, HealResult
from .run import heal

__all__ = ["HealOptions", "HealResult", "heal"]
