"""Shared test set-up: sampled calibration text is cached in a folder of the test session, not the user's cache;
healing tests start from a fresh accelerate state and share a training text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

WORDS = ("the latent cache holds a small vector per token while every head reads keys and values from it "
         "attention rotary position model layer weight query value key shared group").split()


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TRANSMLA_CACHE", str(tmp_path_factory.mktemp("transmla-cache")))
    yield
    mp.undo()


@pytest.fixture
def fresh_accelerate():
    """Each run builds its own Accelerator; forget the process-wide state between tests."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """Paragraphs of random words about latent attention, for healing."""
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "." for _ in range(200)]
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("\n\n".join(paragraphs))
    return path
