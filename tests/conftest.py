"""Shared test set-up: sampled calibration text is cached in a folder of the test session, not the user's cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TRANSMLA_CACHE", str(tmp_path_factory.mktemp("transmla-cache")))
    yield
    mp.undo()
